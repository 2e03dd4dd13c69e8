"""Buying what exists now (issue 10 item 2), request ids by the documented rule (item 4) and the reseller of record
(item 10), against the sandbox with the documented behaviours switched on."""

from __future__ import annotations

from typing import Any

from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState
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
