"""MS-RequestIds of license updates and of the suspension by the documented rule (issue 10 item 4) and the
suspension's ``400 800091`` after a lost answer (item 6), against the sandbox with the app's strict client.

Rule (Partner Center REST headers page): reuse an ``MS-RequestId`` only to retry the same call after a timeout or a
lost answer; after any response — success or business failure — the next attempt gets a new id. The app's client
refuses to send an id that already got an answer (``RequestIdReusedError``), so a step that breaks the rule fails.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from d365_migration import PartnerCenterApiError
from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState
from d365_tooling.sandbox._state import ApiError
from tests.steps._world import Tenant, detect, drive, service


def _license_ids(state: SandboxState, user_id: str) -> list[str]:
    return [r["requestId"] for r in state.requests()
            if r["method"] == "POST" and r["path"].lower().endswith(f"/users/{user_id}/licenseupdates")]


def _patch_ids(state: SandboxState, subscription_id: str) -> list[str]:
    return [r["requestId"] for r in state.requests()
            if r["method"] == "PATCH" and r["path"].lower().endswith(f"/subscriptions/{subscription_id}")]


async def test_a_redelivered_license_step_sends_new_ids_after_answers_and_the_same_id_after_no_answer(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    refused, unanswered = t.holders
    state.set_usage_location(t.customer_id, refused, None)  # its update answers 400 60005 (a business failure)
    original = state.license_update
    server_errors = {"left": 2}  # the client's two tries for `unanswered` get no result: the delivery fails

    def license_update(customer_id: str, user_id: str, body: Any) -> dict[str, Any]:
        if user_id.lower() == unanswered and server_errors["left"]:
            server_errors["left"] -= 1
            raise ApiError(500, 800003, "Unexpected service error.")
        return original(customer_id, user_id, body)

    state.license_update = license_update  # type: ignore[method-assign]
    # `refused` must be answered before `unanswered` fails, so its update is re-sent by the redelivery.
    assert [u["id"] for u in state.users(t.customer_id)].index(refused) < \
        [u["id"] for u in state.users(t.customer_id)].index(unanswered)
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            (reassign_msg,) = await drive(svc, report.purchase_messages, stop_before="reassign")
            with pytest.raises(PartnerCenterApiError):
                await svc.reassign(reassign_msg)  # the host would redeliver this message
            redelivered = await svc.reassign(reassign_msg)  # no RequestIdReusedError
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert redelivered.record is not None and record is not None
    assert record.state == "blocked" and record.reason is not None and "60005" in record.reason, record
    assert t.old_sku not in t.licenses(unanswered) and t.old_sku in t.licenses(refused)
    refused_ids = _license_ids(state, refused)
    assert len(refused_ids) == 2 and len(set(refused_ids)) == 2, refused_ids  # answered → a new id
    unanswered_ids = _license_ids(state, unanswered)
    assert len(unanswered_ids) == 3 and len(set(unanswered_ids)) == 1, unanswered_ids  # no answer → the same id


async def test_a_duplicate_license_step_after_an_answered_update_and_retry_sends_new_ids(
        server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state, holders=1)
    (refused,) = t.holders
    server.state.set_usage_location(t.customer_id, refused, None)
    async with service(server.url, storage) as svc:
        report = await detect(svc)
        (reassign_msg,) = await drive(svc, report.purchase_messages, stop_before="reassign")
        await svc.reassign(reassign_msg)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None and record.state == "blocked"
        # The user is fixed and the record put back to reassigning without the `retry` command's history event: the
        # recorded answer alone must give the user's next update a new id.
        server.state.set_usage_location(t.customer_id, refused, "US")
        await svc.ledger.save(record.transition("reassigning", "operator_fix", "usage location set"))
        await drive(svc, [reassign_msg])
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    ids = _license_ids(server.state, refused)
    assert len(ids) == 2 and len(set(ids)) == 2, ids


async def test_a_suspension_pending_after_202_is_re_patched_with_a_new_id_then_completes(storage: str) -> None:
    now = [time.time()]
    state = SandboxState(clock=lambda: now[0])
    t = Tenant(state)
    config = SandboxConfig(patch_accepted=True, patch_apply_delay_s=60.0)
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage,
                           client_options={"update_confirm_seconds": 0, "confirm_poll_seconds": 0}) as svc:
            report = await detect(svc)
            (suspend_msg,) = await drive(svc, report.purchase_messages, stop_before="suspend")
            first = await svc.suspend(suspend_msg)  # 202 Accepted, not visible yet: look again later
            assert [m.step for m in first.next_messages] == [] and t.old_status() == "active"
            second = await svc.suspend(suspend_msg)  # a duplicate while pending: PATCH again → 409 800082
            assert second.record is not None and second.record.state == "reassigned"
            now[0] += 120  # the accepted PATCH applies
            third = await svc.suspend(suspend_msg)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert third.record is not None and record is not None and record.state == "completed", record
    assert t.old_status() == "suspended"
    ids = _patch_ids(state, t.subscription_id)
    assert len(ids) == 2 and len(set(ids)) == 2, ids  # each PATCH that got an answer was followed by a new id
    assert record.suspend_attempt == 2


async def test_a_lost_suspension_answer_resends_the_same_id_and_the_next_delivery_completes(
        server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        report = await detect(svc)
        (suspend_msg,) = await drive(svc, report.purchase_messages, stop_before="suspend")
        # The PATCH is applied but its answer is lost; the client re-sends the same call with the same id (the
        # sandbox checks the ETag first: 412), and the next delivery finds the subscription suspended.
        server.config.faults.lose_first_write_response = True
        first = await svc.suspend(suspend_msg)
        assert first.record is not None and first.record.state == "reassigned"
        second = await svc.suspend(suspend_msg)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert second.record is not None and record is not None and record.state == "completed", record
    assert t.old_status() == "suspended"
    ids = _patch_ids(server.state, t.subscription_id)
    assert len(ids) == 2 and len(set(ids)) == 1, ids  # lost answer → the same id
    assert len(server.state.patches()) == 1


async def test_800091_on_a_resent_suspension_after_a_lost_answer_completes_after_a_re_read(
        state: SandboxState, storage: str) -> None:
    """A Partner Center that checks the status before the ETag answers the re-sent PATCH ``400 800091``
    (update-a-subscription-by-id); the step re-reads the subscription and completes."""
    t = Tenant(state)
    original = state.patch_subscription
    calls = {"n": 0}

    def patch_subscription(customer_id: str, subscription_id: str, body: Any, if_match: str | None,
                           **kwargs: Any) -> dict[str, Any] | None:
        calls["n"] += 1
        if calls["n"] == 1:
            original(customer_id, subscription_id, body, if_match, **kwargs)
            raise ApiError(500, 800003, "Unexpected service error.")  # applied; the answer is lost
        if state.subscription(customer_id, subscription_id)["status"] == "suspended":
            raise ApiError(400, 800091, f"Can't update subscription {subscription_id} with suspended status.")
        return original(customer_id, subscription_id, body, if_match, **kwargs)

    state.patch_subscription = patch_subscription  # type: ignore[method-assign]
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            (suspend_msg,) = await drive(svc, report.purchase_messages, stop_before="suspend")
            result = await svc.suspend(suspend_msg)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert result.record is not None and record is not None and record.state == "completed", record
    assert t.old_status() == "suspended" and calls["n"] == 2
    ids = _patch_ids(state, t.subscription_id)
    assert len(ids) == 2 and len(set(ids)) == 1, ids  # the lost answer was retried with the same id
    assert any("800091" in (h.get("detail") or "") for h in record.history), record.history


async def test_800091_while_the_subscription_is_not_suspended_blocks_with_the_code(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state)

    def refuse(customer_id: str, subscription_id: str, body: Any, if_match: str | None,
               **kwargs: Any) -> dict[str, Any] | None:
        raise ApiError(400, 800091, f"Can't update subscription {subscription_id} with suspended status.")

    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            (suspend_msg,) = await drive(svc, report.purchase_messages, stop_before="suspend")
            state.patch_subscription = refuse  # type: ignore[method-assign]
            await svc.suspend(suspend_msg)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.reason is not None and "800091" in record.reason and t.old_status() == "active"
