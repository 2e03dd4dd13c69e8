"""Runbook step 4, the suspension (``d365_migration/steps/suspend.py``), and the whole chain's ledger trail."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from d365_migration import MigrationService, StepMessage
from d365_migration.steps._policy import ETAG_REJECTIONS_MAX
from d365_tooling.sandbox import SandboxServer, SandboxState
from tests.steps._world import Clock, Tenant, detect, drive, service


class HeaderRecorder:
    """ASGI wrapper that records each request's method, path, headers and body before the sandbox handles it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording_receive() -> Any:
            message = await receive()
            chunks.append(message.get("body", b""))
            return message

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        await self.app(scope, recording_receive, send)
        self.seen.append((scope["method"], scope["path"], headers, b"".join(chunks)))


async def test_suspend_refuses_while_a_user_holds_the_old_sku_then_patches_whole_resource_once(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    srv = SandboxServer(state)
    recorder = HeaderRecorder(srv.app)
    srv.app = recorder  # type: ignore[assignment]
    with srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            (suspend_msg,) = await drive(svc, report.purchase_messages, stop_before="suspend")
            # someone gives a user the old product again before the suspension runs
            state.assign_user_license(t.customer_id, t.others[0], t.old_sku)
            back = await svc.suspend(suspend_msg)
            assert [m.step for m in back.next_messages] == ["reassign"]
            assert back.record is not None and back.record.state == "reassigning"
            assert state.patches() == [] and t.old_status() == "active"
            before = state.subscription(t.customer_id, t.subscription_id)
            await drive(svc, back.next_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            # a late duplicate of the suspend message changes nothing
            dup = await svc.suspend(suspend_msg)
    assert record is not None and record.state == "completed"
    assert dup.note == "already completed"
    assert t.old_sku not in t.licenses(t.others[0])
    patches = state.patches()
    assert len(patches) == 1 and patches[0]["after_status"] == "suspended"
    assert patches[0]["changes"] == {"status": ["active", "suspended"]}  # nothing else changed (auto-renew etc.)
    (patch,) = [s for s in recorder.seen if s[0] == "PATCH"]
    sent = json.loads(patch[3])
    assert patch[2]["if-match"].strip('"') == before["attributes"]["etag"].strip('"')
    for key in ("id", "offerId", "quantity", "autoRenewEnabled", "friendlyName", "commitmentEndDate"):
        assert key in sent, f"PATCH body is not the whole resource: {key} missing"
    assert sent["status"] == "suspended" and sent["autoRenewEnabled"] is False


async def test_suspend_of_an_already_suspended_subscription_completes_without_a_patch(server: SandboxServer,
                                                                                      storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        report = await detect(svc)
        (suspend_msg,) = await drive(svc, report.purchase_messages, stop_before="suspend")
        server.state.set_subscription_status(t.customer_id, t.subscription_id, "suspended")
        result = await svc.suspend(suspend_msg)
        again = await svc.suspend(suspend_msg)
    assert result.record is not None and result.record.state == "completed"
    assert "no PATCH" in (result.record.history[-1].get("detail") or "")
    assert again.note == "already completed"
    assert server.state.patches() == []


async def test_ledger_records_every_transition_with_history(server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        report = await detect(svc)
        await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None
        # a record read back from storage survives a round trip with its ETag
        saved = await svc.ledger.save(replace(record, reason=None))
        assert saved.etag and saved.etag != record.etag
    states = [h["state"] for h in record.history]
    for expected in ("detected", "purchasing", "purchased", "reassigning", "reassigned", "completed"):
        assert expected in states
    assert states.index("purchased") < states.index("reassigned") < states.index("completed")
    assert record.new_subscription_id and record.lease_owner is None


# --- fail closed before the PATCH (audit findings 1, 9, 10 and 13)


async def _until_suspend(svc: MigrationService, t: Tenant) -> StepMessage:
    report = await detect(svc)
    (waiting,) = await drive(svc, [m for m in report.purchase_messages if m.subscription_id == t.subscription_id],
                             stop_before="suspend")
    return waiting


async def test_suspend_waits_then_blocks_when_the_old_sku_is_not_listed(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    clock = Clock()
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, clock=clock, SUBSCRIBED_SKU_WAIT_MINUTES="30") as svc:
            waiting = await _until_suspend(svc, t)
            srv.config.subscribed_skus_omitted = [t.old_sku]  # consumedUnits of the old SKU cannot be seen
            first = await svc.run(waiting)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "reassigned" and record.wait_kind == "old_sku_listed"
            assert first.next_messages == [] and state.patches() == []
            clock.advance(timedelta(minutes=31))
            await svc.run(waiting.next_poll())
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.history[-1]["event"] == "old_sku_not_listed" and t.old_sku in (record.reason or "")
    assert t.old_status() == "active" and state.patches() == []


@pytest.mark.parametrize("status", ["suspended", "deleted", "expired", "disabled"])
async def test_an_old_subscription_that_no_longer_bills_completes_without_a_patch(
        state: SandboxState, storage: str, status: str) -> None:
    t = Tenant(state)
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            waiting = await _until_suspend(svc, t)
            state.set_subscription_status(t.customer_id, t.subscription_id, status)
            result = await svc.run(waiting)
    assert result.record is not None and result.record.state == "completed", result.record
    assert result.record.history[-1]["event"] == f"already_{status}"
    assert state.patches() == []


async def test_a_pending_old_subscription_is_waited_for_by_time_then_blocks(state: SandboxState,
                                                                           storage: str) -> None:
    t = Tenant(state)
    clock = Clock()
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, clock=clock, PROVISIONING_TIMEOUT_MINUTES="120") as svc:
            waiting = await _until_suspend(svc, t)
            state.set_subscription_status(t.customer_id, t.subscription_id, "pending")
            first = await svc.run(waiting)
            assert first.record is not None and first.record.state == "reassigned", first.record
            assert "pending" in first.note and first.record.wait_kind == "old_subscription_pending"
            clock.advance(timedelta(minutes=121))
            last = await svc.run(waiting.next_poll())
    assert last.record is not None and last.record.state == "blocked", last.record
    assert last.record.history[-1]["event"] == "old_subscription_pending"
    assert state.patches() == []


@pytest.mark.parametrize("status", ["none", "somethingnew"])
async def test_an_old_subscription_in_an_unknown_status_blocks_with_it(state: SandboxState, storage: str,
                                                                       status: str) -> None:
    t = Tenant(state)
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            waiting = await _until_suspend(svc, t)
            state.set_subscription_status(t.customer_id, t.subscription_id, status)
            result = await svc.run(waiting)
    assert result.record is not None and result.record.state == "blocked", result.record
    assert result.record.history[-1]["event"] == "old_status_unexpected"
    assert repr(status) in (result.record.reason or "") and state.patches() == []


async def test_an_if_match_refused_every_time_backs_off_then_blocks_etag_rejected(state: SandboxState,
                                                                                  storage: str) -> None:
    t = Tenant(state)
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            waiting = await _until_suspend(svc, t)
            srv.config.if_match_always_rejected = True
            notes = []
            for poll in range(ETAG_REJECTIONS_MAX):
                result = await svc.run(dataclasses.replace(waiting, poll=poll))
                notes.append(result.note)
                assert result.record is not None
                if result.record.is_final:
                    break
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.history[-1]["event"] == "etag_rejected" and "If-Match" in (record.reason or "")
    assert len(notes) == ETAG_REJECTIONS_MAX
    # a growing wait between the rejections, not a one-second loop
    assert [n.rsplit("re-reading in ", 1)[-1] for n in notes[:-1]] == ["1s", "4s", "16s"]
    # every PATCH was sent right after a fresh GET of the subscription
    sub_path = f"/subscriptions/{t.subscription_id}"
    calls = [r["method"] for r in state.requests() if r["path"].lower().endswith(sub_path)]
    patches = [i for i, m in enumerate(calls) if m == "PATCH"]
    assert len(patches) == ETAG_REJECTIONS_MAX and all(calls[i - 1] == "GET" for i in patches)
    assert t.old_status() == "active"


async def test_an_etag_compared_literally_is_sent_as_received_after_the_quoted_one_is_refused(
        state: SandboxState, storage: str) -> None:
    """suspend-a-subscription's example sends If-Match as the GET returned it, test-and-debug says in double quotes:
    a Partner Center comparing it literally refuses the quoted form once, then the step sends it as received."""
    t = Tenant(state)
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            waiting = await _until_suspend(svc, t)
            srv.config.etag_literal_match = True
            first = await svc.run(waiting)
            assert first.record is not None and first.record.state == "reassigned"  # refused, re-reading soon
            await svc.run(dataclasses.replace(waiting, poll=1))
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    assert [h["event"] for h in record.history][-2:] == ["etag_stale", "old_suspended"]
    assert t.old_status() == "suspended" and len(state.patches()) == 1


async def test_throttling_that_outlasts_the_client_waits_instead_of_burning_a_delivery(state: SandboxState,
                                                                                       storage: str) -> None:
    t = Tenant(state)
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            waiting = await _until_suspend(svc, t)
            # 429 with a short Retry-After (the client sleeps it) more often than the client retries
            srv.config.long_retry_after_s, srv.config.long_retry_after_times = 1, 5
            srv.config.long_retry_after_path = "/subscribedskus"
            result = await svc.run(waiting)  # no exception: the host would count a failed delivery
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert "throttled" in result.note and result.next_messages == []
    assert record is not None and record.state == "reassigned", record
    assert t.old_status() == "active" and state.patches() == []


@dataclasses.dataclass
class UnappliedSuspension:
    """A chain driven up to the suspension against a sandbox whose PATCHes are answered 200 but never applied
    (stricter than documented: ``patch_status_ignored``)."""

    tenant: Tenant
    clock: Clock
    server: SandboxServer
    svc: MigrationService
    message: StepMessage

    def patches(self) -> int:
        return sum(1 for r in self.server.state.requests() if r["method"] == "PATCH")


@contextlib.asynccontextmanager
async def unapplied_suspension(state: SandboxState, storage: str) -> AsyncIterator[UnappliedSuspension]:
    t = Tenant(state, holders=1)
    clock = Clock()
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, clock=clock) as svc:
            report = await detect(svc)
            (suspend_msg,) = await drive(svc, report.purchase_messages, stop_before="suspend")
            srv.config.patch_status_ignored = True
            yield UnappliedSuspension(t, clock, srv, svc, suspend_msg)


async def test_a_suspension_answered_but_not_applied_is_resent_only_after_the_wait_then_blocks(
        state: SandboxState, storage: str) -> None:
    """A PATCH answered 200 whose change never shows is looked at, re-sent at most once per
    LOST_WRITE_RESEND_WAIT_SECONDS, and blocked after the provisioning timeout — never a PATCH per delivery without
    end."""
    async with unapplied_suspension(state, storage) as world:
        t, clock, svc, suspend_msg, patches = world.tenant, world.clock, world.svc, world.message, world.patches
        await svc.run(suspend_msg)
        await svc.run(suspend_msg)  # soon after: looked at, not re-sent
        assert patches() == 1
        clock.advance(timedelta(seconds=svc.settings.lost_write_resend_wait_seconds + 1))
        await svc.run(suspend_msg)
        assert patches() == 2  # re-sent once the wait is over
        clock.advance(timedelta(minutes=svc.settings.provisioning_timeout_minutes + 1))
        await svc.run(suspend_msg)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.history[-1]["event"] == "suspension_not_applied"
    assert patches() == 2 and t.old_status() == "active"


async def test_another_wait_in_between_does_not_let_an_unapplied_suspension_be_resent_at_once(
        state: SandboxState, storage: str) -> None:
    """After a PATCH answered but not applied, one delivery waits for something else (the new SKU briefly missing
    from subscribed SKUs). The next delivery still looks rather than PATCHing again before
    LOST_WRITE_RESEND_WAIT_SECONDS, and the unapplied suspension's own wait still ends in a block."""
    async with unapplied_suspension(state, storage) as world:
        t, clock, svc, suspend_msg, patches = world.tenant, world.clock, world.svc, world.message, world.patches
        srv = world.server
        await svc.run(suspend_msg)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None and record.new_sku_id and patches() == 1
        srv.config.subscribed_skus_omitted = [record.new_sku_id]
        await svc.run(suspend_msg)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None and record.wait_kind == "new_sku_consumed"
        srv.config.subscribed_skus_omitted = []
        await svc.run(suspend_msg)
        assert patches() == 1  # looked at, not re-sent: the re-send wait is not over
        clock.advance(timedelta(minutes=svc.settings.provisioning_timeout_minutes + 1))
        await svc.run(suspend_msg)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.history[-1]["event"] == "suspension_not_applied"
    assert patches() == 1 and t.old_status() == "active"
