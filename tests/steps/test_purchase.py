"""Runbook step 2, the purchase (``d365_migration/steps/purchase.py``), against the sandbox and Azurite."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest

from d365_migration import StepMessage
from d365_tooling.sandbox import LEGACY_REPLACEMENT_OFFERS, SandboxConfig, SandboxServer, SandboxState
from d365_tooling.sandbox._catalog import catalog_item
from tests.steps._world import CE, DEMO_REPLACEMENT_OFFERS, Clock, Tenant, detect, drive, mine, queue, service, writes


async def test_no_replacement_mapping_blocks_with_a_clear_reason(server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)  # sales.commercial, but only customer_engagement is mapped
    only_ce = {"customer_engagement": DEMO_REPLACEMENT_OFFERS["customer_engagement"]}
    async with service(server.url, storage, REPLACEMENT_OFFERS=json.dumps(only_ce)) as svc:
        report = await detect(svc)
        left = await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert left == []
    assert record is not None and record.state == "blocked"
    assert record.reason is not None and "REPLACEMENT_OFFERS" in record.reason and "sales.commercial" in record.reason
    assert "retry" in record.reason
    assert server.state.purchases() == [] and writes(server.state) == []
    assert t.old_status() == "active"


@pytest.mark.parametrize(("replacements", "via"), [(DEMO_REPLACEMENT_OFFERS, "cart"),
                                                   (LEGACY_REPLACEMENT_OFFERS, "order")], ids=["nce-cart", "legacy"])
async def test_purchase_buys_exactly_once_with_the_old_quantity(server: SandboxServer, storage: str,
                                                                replacements: dict[str, dict[str, str]],
                                                                via: str) -> None:
    t = Tenant(server.state, holders=2, quantity=7)
    async with service(server.url, storage, REPLACEMENT_OFFERS=json.dumps(replacements)) as svc:
        report = await detect(svc)
        await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    purchases = mine(server.state, t)
    assert len(purchases) == 1, purchases
    (p,) = purchases
    assert p["via"] == via and p["quantity"] == 7 and record.quantity == 7
    assert str(p["offer_id"]).lower() == replacements["sales"]["commercial"].lower()
    assert record.tag in p["friendly_name"]
    assert catalog_item(p["offer_id"]) is not None
    assert (record.cart_id is not None) == (via == "cart") and record.order_id
    assert t.old_status() == "suspended"


async def test_purchase_waits_for_provisioning_by_requeueing_a_delayed_message(state: SandboxState, storage: str
                                                                              ) -> None:
    t = Tenant(state)
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=2.5)) as srv:
        async with service(srv.url, storage, PROVISIONING_POLL_SECONDS="1") as svc:
            (msg,) = (await detect(svc)).purchase_messages
            started = time.monotonic()
            result = await svc.purchase(msg)
            # it did not sit and wait for the 2.5 s of provisioning: it came back before the replacement showed
            assert result.next_messages == [] and "not visible yet" in result.note
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "purchasing" and record.lease_owner is None
            q = queue(storage, "purchase-new")
            assert q.get_queue_properties().approximate_message_count == 1
            assert list(q.peek_messages(max_messages=5)) == []  # hidden: a visibility delay was set
            await asyncio.sleep(1.2)
            (delayed,) = list(q.receive_messages(max_messages=5))
            again = StepMessage.parse(delayed.content, expected_step="purchase")
            assert again.poll == 1 and again.subscription_id == t.subscription_id
            q.delete_message(delayed)
            # still provisioning: the re-delivery buys nothing more and re-queues with poll 2
            await svc.purchase(again)
            assert len(mine(state, t)) == 1
            await asyncio.sleep(1.2)
            (third,) = list(q.receive_messages(max_messages=5))
            third_msg = StepMessage.parse(third.content, expected_step="purchase")
            assert third_msg.poll == 2
            q.delete_message(third)
            q.close()
            await asyncio.sleep(max(0.0, 2.6 - (time.monotonic() - started)))
            done = await svc.purchase(third_msg)
            assert done.record is not None and done.record.state == "purchased"
            assert [m.step for m in done.next_messages] == ["reassign"]
    assert len(mine(state, t)) == 1


async def test_redelivered_purchase_after_success_buys_nothing_and_re_emits_reassign(server: SandboxServer,
                                                                                     storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        (msg,) = (await detect(svc)).purchase_messages
        first = await svc.purchase(msg)
        assert [m.step for m in first.next_messages] == ["reassign"]
        requests_before = len(writes(server.state))
        for _ in range(2):
            again = await svc.purchase(msg)
            assert again.next_messages == first.next_messages
            assert again.record is not None and again.record.state == "purchased"
    assert len(mine(server.state, t)) == 1
    assert len(writes(server.state)) == requests_before


async def test_purchase_rechecks_the_old_subscription_right_before_buying(server: SandboxServer, storage: str
                                                                          ) -> None:
    suspended, renewed = Tenant(server.state), Tenant(server.state, offer=CE)
    async with service(server.url, storage) as svc:
        messages = (await detect(svc)).purchase_messages
        assert len(messages) == 2
        # after detection, a human suspends one and turns auto-renew on for the other (in the portal)
        server.state.set_subscription_status(suspended.customer_id, suspended.subscription_id, "suspended")
        body = server.state.subscription(renewed.customer_id, renewed.subscription_id)
        body["autoRenewEnabled"] = True
        async with httpx.AsyncClient(base_url=server.url) as http:
            answer = await http.patch(f"/v1/customers/{renewed.customer_id}/subscriptions/{renewed.subscription_id}",
                                      json=body)
            assert answer.status_code == 200 and answer.json()["autoRenewEnabled"] is True
        left = await drive(svc, messages)
        a = await svc.ledger.get(suspended.customer_id, suspended.subscription_id)
        b = await svc.ledger.get(renewed.customer_id, renewed.subscription_id)
    assert left == []
    assert a is not None and a.state == "blocked" and "suspended" in (a.reason or "") and "nothing bought" in a.reason
    assert b is not None and b.state == "blocked" and "auto-renew" in (b.reason or "")
    assert server.state.purchases() == []
    assert [r for r in writes(server.state) if "/carts" in r["path"] or "/orders" in r["path"]] == []


async def test_provisioning_timeout_follows_the_injected_clock(state: SandboxState, storage: str) -> None:
    t = Tenant(state)
    clock = Clock()
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=3600)) as srv:
        async with service(srv.url, storage, clock=clock, PROVISIONING_TIMEOUT_MINUTES="30") as svc:
            (msg,) = (await detect(svc)).purchase_messages
            bought = await svc.purchase(msg)
            assert bought.record is not None and bought.record.state == "purchasing"
            clock.advance(timedelta(minutes=29))
            waiting = await svc.purchase(msg.next_poll())
            assert waiting.record is not None and waiting.record.state == "purchasing"
            assert "not active" not in (waiting.record.reason or "")
            clock.advance(timedelta(minutes=2))
            timed_out = await svc.purchase(msg.next_poll().next_poll())
    assert timed_out.record is not None and timed_out.record.state == "failed"
    assert "not active 30 min after purchase" in (timed_out.record.reason or "")
    assert timed_out.record.history[-1]["event"] == "provisioning_timeout"
    assert len(mine(state, t)) == 1


async def test_a_checkout_answered_being_processed_is_retried_with_a_new_request_id(state: SandboxState,
                                                                                     storage: str) -> None:
    """409 800064 is an answer: the next checkout — on another worker, which never saw it — carries a new
    MS-RequestId (headers page), or a Partner Center that replays answers by id says "being processed" for ever."""
    t = Tenant(state, holders=2)
    srv = SandboxServer(state, SandboxConfig(dedupe_request_ids=True))
    app = srv.app
    processing: list[str] = []

    async def first_checkout_busy(scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"].lower().endswith("/checkout")
                and not processing):
            processing.append({k.decode().lower(): v.decode() for k, v in scope["headers"]}["ms-requestid"])
            await send({"type": "http.response.start", "status": 409,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(
                {"code": 800064, "description": "Cart is being processed by another request."}).encode()})
            return
        await app(scope, receive, send)

    srv.app = first_checkout_busy  # type: ignore[assignment]
    with srv:
        async with service(srv.url, storage) as svc:
            (msg,) = (await detect(svc)).purchase_messages
            busy = await svc.purchase(msg)
            assert "checkout in progress (800064)" in busy.note
        async with service(srv.url, storage) as other_worker:
            await drive(other_worker, [msg])
            record = await other_worker.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    checkouts = [r["requestId"] for r in writes(state) if r["path"].lower().endswith("/checkout")]
    assert len(processing) == 1 and len(checkouts) == 1 and checkouts[0] != processing[0]
    assert len(mine(state, t)) == 1
