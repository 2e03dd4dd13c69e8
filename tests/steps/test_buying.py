"""Buying what exists now (issue 10 item 2), request ids by the documented rule (item 4) and the reseller of record
(item 10), against the sandbox with the documented behaviours switched on."""

from __future__ import annotations

from typing import Any

import pytest

from d365_migration import MigrationService, StepMessage
from d365_migration.steps._routes import message_for
from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState, sku_for_offer
from d365_tooling.sandbox._catalog import catalog_item
from tests.steps._world import DEMO_REPLACEMENT_OFFERS, SALES, Tenant, detect, drive, mine, service


def _product_sku(offer: str) -> tuple[str, str]:
    product, sku, *_ = offer.split(":")
    return product, sku


async def test_rotated_availabilities_buy_the_current_one_resolved_at_purchase_time(state: SandboxState,
                                                                                    storage: str) -> None:
    t = Tenant(state, holders=2, quantity=3)
    configured = DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]
    with SandboxServer(state, SandboxConfig(availabilities_rotated=True)) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    (p,) = mine(state, t)
    bought = str(p["offer_id"]).lower()
    assert bought != configured.lower()  # the configured availability is stale…
    assert bought.split(":")[:2] == configured.lower().split(":")[:2]  # …the same product SKU was bought
    assert p["quantity"] == 3
    assert any("/availabilities" in r["path"].lower() and "country=" in r["query"].lower()
               for r in state.requests())


async def test_no_availability_for_the_configured_term_blocks_on_the_first_delivery(server: SandboxServer,
                                                                                    storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage, REPLACEMENT_TERM_DURATION="P3Y") as svc:
        report = await detect(svc)
        left = await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert left == []
    assert record is not None and record.state == "blocked", record
    assert record.reason is not None and "P3Y" in record.reason and "nothing was bought" in record.reason
    assert mine(server.state, t) == [] and t.old_status() == "active"


async def test_availability_rotating_before_checkout_fails_with_partner_centers_code_first_time(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state)
    original = state.create_cart

    def cart_then_rotate(customer_id: str, body: Any) -> dict[str, Any]:
        cart = original(customer_id, body)
        state.rotate_availability(*_product_sku(DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]))
        return cart

    state.create_cart = cart_then_rotate  # type: ignore[method-assign]
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            left = await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert left == []
    assert record is not None and record.state == "failed", record
    assert record.reason is not None and "400019" in record.reason and "checkout" in record.reason
    assert mine(state, t) == [] and t.old_status() == "active"
    # the answer was seen: the next attempt would use new request ids
    assert record.purchase_attempt >= 2


async def test_request_ids_are_new_after_every_answer_and_the_client_is_strict(server: SandboxServer,
                                                                              storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        assert svc.client._sender._strict_request_ids  # the app builds a strict client
        report = await detect(svc)
        await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    ids = [r["requestId"] for r in server.state.requests() if r["method"] in ("POST", "PATCH")]
    assert ids and len(ids) == len(set(ids)), ids  # no MS-RequestId was sent twice (no lost answers here)


async def test_the_old_subscriptions_indirect_reseller_is_carried_to_the_purchase(server: SandboxServer,
                                                                                 storage: str) -> None:
    t = Tenant(server.state)
    reseller = "5123456"  # an indirect reseller's Partner Center (MPN) id on the old subscription
    with server.state.lock:
        server.state._customer(t.customer_id).subscriptions[t.subscription_id].partner_id = reseller
    async with service(server.url, storage) as svc:
        report = await detect(svc)
        await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    assert record.reseller_partner_id == reseller
    (p,) = mine(server.state, t)
    assert p.get("reseller_partner_id") == reseller, p
    assert catalog_item(p["offer_id"]) is not None and SALES.family == "sales"


async def test_two_migrations_of_one_customer_to_one_product_each_keep_their_own_purchase(
        state: SandboxState, storage: str) -> None:
    """Two retiring subscriptions of one customer with the same replacement product and quantity. New commerce names
    orders and subscriptions after the product, so neither is found by tag: the second must neither take the first's
    purchase for a purchase made by hand (and block) nor adopt the first's order when it looks for its own."""
    import json

    from tests.steps._world import CE, end_in

    t = Tenant(state, holders=2, quantity=3)
    ce_holders = [t._user(f"ce{i}", [CE.sku.id.lower()], "US") for i in range(2)]
    ce_sub = state.add_subscription(t.customer_id, offer=CE, quantity=3, commitment_end=end_in(20)).id.lower()
    replacements = {family: dict(audiences) for family, audiences in DEMO_REPLACEMENT_OFFERS.items()}
    replacements["customer_engagement"]["commercial"] = replacements["sales"]["commercial"]
    config = SandboxConfig(nce_product_friendly_names=True)
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage, REPLACEMENT_OFFERS=json.dumps(replacements)) as svc:
            report = await detect(svc)
            by_sub = {m.subscription_id.lower(): m for m in report.purchase_messages}
            # The second starts buying (its worker dies before the cart), then the first buys and completes, then
            # the second checks out and dies before recording its order: the first's order is of the same product
            # and quantity, and newer than the second's recorded start.
            create_cart = svc.client.create_cart

            async def crash_before_the_cart(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("worker killed before the cart")

            svc.client.create_cart = crash_before_the_cart  # type: ignore[method-assign]
            with pytest.raises(RuntimeError):
                await svc.run(by_sub[ce_sub])
            svc.client.create_cart = create_cart  # type: ignore[method-assign]
            started = await svc.ledger.get(t.customer_id, ce_sub)
            assert started is not None and started.state == "purchasing" and started.order_id is None
            await _until_final(svc, by_sub[t.subscription_id])
            checkout = svc.client.checkout_cart

            async def crash_after_checkout(*args: Any, **kwargs: Any) -> Any:
                await checkout(*args, **kwargs)
                raise RuntimeError("worker killed after the checkout, before recording its order")

            svc.client.checkout_cart = crash_after_checkout  # type: ignore[method-assign]
            with pytest.raises(RuntimeError):
                await svc.run(by_sub[ce_sub])
            svc.client.checkout_cart = checkout  # type: ignore[method-assign]
            await _until_final(svc, by_sub[ce_sub])
            first = await svc.ledger.get(t.customer_id, t.subscription_id)
            second = await svc.ledger.get(t.customer_id, ce_sub)
    assert first is not None and first.state == "completed", first
    assert second is not None and second.state == "completed", second
    assert first.order_id and second.order_id and first.order_id.lower() != second.order_id.lower()
    assert first.new_subscription_id != second.new_subscription_id
    assert len(mine(state, t)) == 2
    new = sku_for_offer(replacements["sales"]["commercial"])
    assert new is not None
    for user in [*t.holders, *ce_holders]:
        assert new.id.lower() in t.licenses(user)


async def _until_final(svc: MigrationService, message: StepMessage, rounds: int = 20) -> None:
    """Drive one record to a final state, re-running its current step after a lost answer (what the delayed
    re-queued message would do)."""
    for _ in range(rounds):
        await drive(svc, [message])
        record = await svc.ledger.get(message.customer_id, message.subscription_id)
        assert record is not None
        if record.is_final:
            return
        next_message = message_for(record)
        assert next_message is not None
        message = next_message
    raise AssertionError(f"not final after {rounds} rounds: {record.state}")
