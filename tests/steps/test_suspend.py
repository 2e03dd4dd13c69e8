"""Runbook step 4, the suspension (``d365_migration/steps/suspend.py``), and the whole chain's ledger trail."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from d365_tooling.sandbox import SandboxServer, SandboxState
from tests.steps._world import Tenant, detect, drive, service


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
