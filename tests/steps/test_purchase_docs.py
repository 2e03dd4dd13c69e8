"""The purchase step against documented Partner Center behaviours the sandbox shows only when switched on (an
independent Partner Center written from Learn may show them any day): an opaque provisioning ``skuId``, pooled SKUs
under ``REPLACEMENT_QUANTITY_POLICY=license_holders``, the order list's lag (``subscriptions?order_id=`` answering
404 20000, a lost legacy order that shows only in the subscription list), a checkout answering an order and
``orderErrors`` together, and orders Partner Center ends (cancelled, rejected, in error, partial success)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from d365_migration import Settings
from d365_migration.cli import retry
from d365_tooling.sandbox import LEGACY_REPLACEMENT_OFFERS, SandboxConfig, SandboxServer, SandboxState
from tests.steps._world import (
    DEMO_REPLACEMENT_OFFERS,
    SALES,
    Clock,
    Tenant,
    detect,
    drive,
    end_in,
    env_for,
    mine,
    msg_for,
    service,
)


def _events(record: object) -> list[str]:
    return [h["event"] for h in getattr(record, "history", [])]


# ------------------------------------------------------------------ #1 the old SKU must be a listed subscribed SKU


async def test_an_opaque_provisioning_sku_id_blocks_before_buying_and_names_the_id(state: SandboxState,
                                                                                   storage: str) -> None:
    t = Tenant(state, holders=2)
    with SandboxServer(state, SandboxConfig(opaque_provisioning_sku_ids=True)) as srv:
        async with service(srv.url, storage) as svc:
            status = await svc.client.get_provisioning_status(t.customer_id, t.subscription_id)
            listed = {s.product_sku.id.lower() for s in await svc.client.list_subscribed_skus(t.customer_id)}
            assert status.sku_id and status.sku_id.lower() not in listed  # the switch shows what §12 #5 leaves open
            report = await detect(svc)
            left = await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert left == []
    assert record is not None and record.state == "blocked", record
    assert record.history[-1]["event"] == "preflight_sku_unknown"
    assert record.reason is not None and status.sku_id in record.reason and "nothing bought" in record.reason
    assert "RETIRED_OFFERS_EXTRA" in record.reason and "retry" in record.reason
    assert record.old_sku_id is None
    assert mine(state, t) == [] and t.old_status() == "active"
    assert all(t.old_sku in t.licenses(u) for u in t.holders)


async def test_with_the_part_number_configured_the_listed_sku_is_recorded_not_the_opaque_id(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    extra = json.dumps([{"name": SALES.name, "family": "sales", "audience": "commercial",
                         "skuPartNumbers": [SALES.sku.sku_part_number]}])
    with SandboxServer(state, SandboxConfig(opaque_provisioning_sku_ids=True)) as srv:
        async with service(srv.url, storage, RETIRED_OFFERS_EXTRA=extra) as svc:
            report = await detect(svc)
            await drive(svc, report.purchase_messages, stop_before="reassign")
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "purchased", record
    assert record.old_sku_id == t.old_sku  # what subscribedskus lists: its holders can be counted and checked
    assert len(mine(state, t)) == 1


# ------------------------------------------------------------------ #2 pooled SKUs against the OLD quantity


def _pool(state: SandboxState, t: Tenant, *, quantity: int, holders: int) -> list[str]:
    """Another subscription of the customer grants the retiring one's product SKU (not due to expire)."""
    state.add_subscription(t.customer_id, offer=t.offer, quantity=quantity, commitment_end=end_in(300),
                           offer_name=t.offer.name)
    return [t._user(f"pooled{i}", [t.old_sku], "US") for i in range(holders)]


async def test_license_holders_policy_still_blocks_a_pooled_sku(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2, quantity=2)
    extra = _pool(state, t, quantity=3, holders=3)  # five holders; the retiring subscription accounts for two
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, REPLACEMENT_QUANTITY_POLICY="license_holders") as svc:
            report = await detect(svc)
            await drive(svc, [m for m in report.purchase_messages if m.subscription_id == t.subscription_id])
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.history[-1]["event"] == "preflight_pooled_sku"
    assert record.reason is not None and "5 users" in record.reason and "only 2" in record.reason
    assert "--users-file" in record.reason
    assert mine(state, t) == []
    assert all(t.licenses(u) == {t.old_sku} for u in [*t.holders, *extra])


async def test_more_units_in_all_than_the_old_quantity_is_pooled_even_with_few_holders(state: SandboxState,
                                                                                       storage: str) -> None:
    t = Tenant(state, holders=2, quantity=3)  # two holders fit the old quantity of three…
    _pool(state, t, quantity=4, holders=0)  # …but the SKU has seven units: they could be the other one's users
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            skus = {s.product_sku.id.lower(): s for s in await svc.client.list_subscribed_skus(t.customer_id)}
            assert skus[t.old_sku].consumed_units == 2 and skus[t.old_sku].total_units == 7
            report = await detect(svc)
            await drive(svc, [m for m in report.purchase_messages if m.subscription_id == t.subscription_id])
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.reason is not None and "7 units" in record.reason and "only 3" in record.reason
    assert mine(state, t) == [] and t.old_status() == "active"


# ------------------------------------------------------------------ #3 / #14 the order list's lag


@pytest.mark.parametrize("replacements", [DEMO_REPLACEMENT_OFFERS, LEGACY_REPLACEMENT_OFFERS],
                         ids=["nce-cart", "legacy"])
async def test_subscriptions_by_order_404_during_the_order_lag_is_waited_for(
        storage: str, replacements: dict[str, dict[str, str]]) -> None:
    now = [time.time()]
    state = SandboxState(clock=lambda: now[0])
    t = Tenant(state, holders=1)
    # Product names instead of our tag (documented for new commerce; the legacy switch the same for orders): only
    # the order leads to the subscription, and the order is not visible for 15 minutes.
    config = SandboxConfig(order_list_lag_s=900, nce_product_friendly_names=True, legacy_offer_friendly_names=True)
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage, REPLACEMENT_OFFERS=json.dumps(replacements)) as svc:
            (msg,) = (await detect(svc)).purchase_messages
            first = await svc.run(msg)  # no NotFoundError: "not visible yet"
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "purchasing" and record.order_id, record
            assert first.next_messages == [] and "not visible yet" in first.note
            assert not await svc.client.list_orders(t.customer_id)  # the switch: the order list lags
            now[0] += 901
            done = await svc.run(msg.next_poll())
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "purchased", record
    assert [m.step for m in done.next_messages] == ["reassign"]
    (p,) = mine(state, t)
    assert record.new_subscription_id and record.new_subscription_id.lower() == p["subscription_ids"][0].lower()


async def test_a_lost_legacy_order_seen_only_in_the_subscription_list_is_adopted_not_resent(
        server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state, holders=2)
    clock = Clock()
    # The order list lags far longer than LOST_WRITE_RESEND_WAIT_SECONDS; the subscription list does not; the
    # subscription carries the offer's name, not our tag.
    server.config.order_list_lag_s = 3600
    server.config.legacy_offer_friendly_names = True
    async with service(server.url, storage, clock=clock,
                       REPLACEMENT_OFFERS=json.dumps(LEGACY_REPLACEMENT_OFFERS)) as svc:
        (msg,) = (await detect(svc)).purchase_messages
        server.config.faults.lose_first_write_response = True  # the order is placed; its answer is lost
        first = await svc.run(msg)  # a lost answer is looked for later, not a spent delivery
        server.config.faults.lose_first_write_response = False
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None and record.state == "purchasing" and record.order_attempted_at, record
        assert record.order_id is None and first.next_messages == []
        assert len(mine(server.state, t)) == 1
        clock.advance(timedelta(minutes=16))  # past the resend wait: the order list still shows nothing
        adopted = await svc.run(msg.next_poll())
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "purchased", record
    assert [m.step for m in adopted.next_messages] == ["reassign"]
    (p,) = mine(server.state, t)  # nothing re-sent: one purchase
    assert record.new_subscription_id and record.new_subscription_id.lower() == p["subscription_ids"][0].lower()
    assert record.order_id and record.order_id.lower() == p["order_id"].lower()
    assert "order_found" in _events(record)
    orders = [r for r in server.state.requests() if r["method"] == "POST" and r["path"].lower().endswith("/orders")]
    assert len(orders) == 1, orders


# ------------------------------------------------------------------ #15 orders and orderErrors together


async def test_a_checkout_answering_an_order_and_order_errors_records_the_order_and_carries_on(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    with SandboxServer(state, SandboxConfig(checkout_order_errors=True)) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    (p,) = mine(state, t)
    assert record.order_id and record.order_id.lower() == p["order_id"].lower()
    checked_out = next(h for h in record.history if h["event"] == "checked_out")
    assert p["order_id"] in checked_out["detail"] and "orderErrors" in checked_out["detail"]
    assert "10006" in checked_out["detail"]


# ------------------------------------------------------------------ #16 orders Partner Center ends


@pytest.mark.parametrize(("final", "event"), [("cancelled", "order_cancelled"),
                                              ("po_review_rejected", "order_po_review_rejected"),
                                              ("Error", "order_error")])
async def test_an_order_partner_center_ends_fails_on_the_first_delivery_and_retry_buys_again(
        state: SandboxState, storage: str, final: str, event: str) -> None:
    t = Tenant(state, holders=1)
    with SandboxServer(state, SandboxConfig(order_final_status=final)) as srv:
        settings = Settings.from_env(env_for(srv.url, storage))
        async with service(srv.url, storage) as svc:
            (msg,) = (await detect(svc)).purchase_messages
            result = await svc.run(msg)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert result.next_messages == []
            assert record is not None and record.state == "failed", record
            assert record.history[-1]["event"] == event
            (p,) = mine(state, t)
            assert record.reason is not None and final.lower() in record.reason and p["order_id"] in record.reason
            assert record.order_id and record.order_id.lower() == p["order_id"].lower()
            assert t.old_status() == "active"
            # Nothing usable was bought: once Partner Center takes orders again, `retry` buys anew.
            srv.config.order_final_status = ""
            assert await retry(settings, f"{t.customer_id}/{t.subscription_id}", io.StringIO()) == 0
            await drive(svc, [msg_for("purchase", t.customer_id, t.subscription_id)])
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    assert len(mine(state, t)) == 2 and t.old_status() == "suspended"


@pytest.mark.parametrize("replacements", [DEMO_REPLACEMENT_OFFERS, LEGACY_REPLACEMENT_OFFERS],
                         ids=["nce-cart", "legacy"])
async def test_partial_success_without_a_subscription_fails_and_retry_never_buys_again(
        state: SandboxState, storage: str, replacements: dict[str, dict[str, str]]) -> None:
    t = Tenant(state, holders=1)
    with SandboxServer(state, SandboxConfig(order_final_status="partial_success")) as srv:
        env = {"REPLACEMENT_OFFERS": json.dumps(replacements)}
        settings = Settings.from_env(env_for(srv.url, storage, **env))
        async with service(srv.url, storage, **env) as svc:
            (msg,) = (await detect(svc)).purchase_messages
            await svc.run(msg)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "failed", record
            assert record.history[-1]["event"] == "order_partial_success"
            assert record.reason is not None and "partial_success" in record.reason
            assert await retry(settings, f"{t.customer_id}/{t.subscription_id}", io.StringIO()) == 0
            await drive(svc, [msg_for("purchase", t.customer_id, t.subscription_id)])
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "failed", record  # the same order again, nothing bought again
    assert len(mine(state, t)) == 1


async def test_an_order_pending_review_keeps_waiting(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=1)
    with SandboxServer(state, SandboxConfig(order_final_status="pending_review")) as srv:
        async with service(srv.url, storage) as svc:
            (msg,) = (await detect(svc)).purchase_messages
            result = await svc.run(msg)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "purchasing", record
    assert "pending_review" in result.note and len(mine(state, t)) == 1


# ------------------------------------------------------------------ a repeat checkout refused after a lost answer


def _crash_after_first_checkout(svc: Any) -> Callable[[], None]:
    """The worker dies right after the checkout was sent and applied, before its order is recorded. Returns undo."""
    checkout = svc.client.checkout_cart

    async def crash(*args: Any, **kwargs: Any) -> Any:
        await checkout(*args, **kwargs)
        svc.client.checkout_cart = checkout
        raise RuntimeError("worker killed after the checkout")

    svc.client.checkout_cart = crash

    def undo() -> None:
        svc.client.checkout_cart = checkout

    return undo


@pytest.mark.parametrize("visible", [True, False], ids=["subscription-visible", "nothing-visible"])
async def test_a_repeat_checkout_refused_after_a_lost_answer_never_counts_as_nothing_bought(
        storage: str, tmp_path: Any, visible: bool) -> None:
    """The first checkout bought the replacement but its answer was lost; by the repeat the cart has expired (404
    800008) and the order list still lags. Either the new subscription shows and is adopted, or the record stops for
    a human — and a plain `retry` does not buy a second time (only `--buy-anyway` does, on the operator's word)."""
    now = [time.time()]
    state = SandboxState(clock=lambda: now[0])
    t = Tenant(state, holders=1)
    config = SandboxConfig(cart_expiry_s=60, order_list_lag_s=3600, nce_product_friendly_names=True,
                           provisioning_delay_s=0 if visible else 3600)
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage) as svc:
            (msg,) = (await detect(svc)).purchase_messages
            undo = _crash_after_first_checkout(svc)
            with pytest.raises(RuntimeError):
                await svc.run(msg)
            undo()
            assert len(mine(state, t)) == 1  # the purchase happened
            now[0] += 61  # the cart is gone by the time the checkout is repeated
            await svc.run(msg)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None
            if visible:
                assert record.state == "purchased", record
                assert [record.new_subscription_id] == [s.lower() for s in mine(state, t)[0]["subscription_ids"]]
            else:
                assert record.state == "blocked" and "repeat_checkout_refused" in _events(record), record
                assert record.reason is not None and "800008" in record.reason and "--buy-anyway" in record.reason
                settings = Settings.from_env(env_for(srv.url, storage))
                assert await retry(settings, f"{t.customer_id}/{t.subscription_id}", io.StringIO()) == 0
                await svc.run(msg_for("purchase", t.customer_id, t.subscription_id))
                again = await svc.ledger.get(t.customer_id, t.subscription_id)
                assert again is not None and again.state == "blocked", again
                # The operator's word that nothing was bought: the cart is forgotten and the next pass buys anew.
                assert await retry(settings, f"{t.customer_id}/{t.subscription_id}", io.StringIO(),
                                   buy_anyway=True) == 0
                fresh = await svc.ledger.get(t.customer_id, t.subscription_id)
                assert fresh is not None and fresh.cart_id is None and fresh.state == "detected", fresh
    assert len(mine(state, t)) == 1  # never bought twice
    assert t.old_status() == "active"
