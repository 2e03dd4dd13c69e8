"""Re-drive (``d365_migration/steps/redrive.py``) and the routing table it shares with the steps."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from d365_migration import FINAL_STATES, STATES, MigrationLedger, MigrationRecord, QueueSender, StepMessage
from d365_migration.steps import STEP_FOR_STATE, message_for, redrive, states_owned_by
from d365_migration.steps.redrive import resume_state
from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState
from tests.steps._world import Tenant, detect, env_for, guid, mine, queue, service


async def test_retry_after_provisioning_timeout_waits_again(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from d365_migration.cli import main

    now = [time.time()]
    state = SandboxState(clock=lambda: now[0])  # the sandbox's own clock: provisioning waits until we move it
    t = Tenant(state)
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=3600)) as srv:
        env = env_for(srv.url, storage, PROVISIONING_TIMEOUT_MINUTES="1")
        async with service(srv.url, storage, PROVISIONING_TIMEOUT_MINUTES="1") as svc:
            (msg,) = (await detect(svc)).purchase_messages
            assert (await svc.purchase(msg)).next_messages == []  # bought; waiting for provisioning
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "purchasing"
            # two minutes pass (written into the ledger rather than waited for)
            old = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
            await svc.ledger.save(replace(record, purchase_started_at=old))
            timed_out = await svc.purchase(msg.next_poll())
            assert timed_out.record is not None and timed_out.record.state == "failed"
            assert "provisioning_timeout" in [h["event"] for h in timed_out.record.history]

            # the operator checks the order in Partner Center (still provisioning) and re-drives the record
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            out = io.StringIO()
            assert await asyncio.to_thread(main, ["retry", f"{t.customer_id}/{t.subscription_id}"], out) == 0
            again = await svc.purchase(msg)
            assert again.record is not None and again.record.state == "purchasing", again.record.reason
            now[0] += 3601  # provisioning finishes
            done = await svc.purchase(msg.next_poll())
            assert done.record is not None and done.record.state == "purchased"
    assert len(mine(state, t)) == 1


def test_every_state_is_owned_by_exactly_one_step_or_is_final() -> None:
    assert set(STEP_FOR_STATE) | FINAL_STATES == set(STATES)
    assert not set(STEP_FOR_STATE) & FINAL_STATES
    assert states_owned_by("purchase") == {"detected", "purchasing", "native_pending", "native_moving"}
    assert states_owned_by("reassign") == {"purchased", "reassigning"}
    assert states_owned_by("suspend") == {"reassigned"}
    for state in FINAL_STATES:
        assert message_for(MigrationRecord(guid(), guid(), state=state)) is None


def _seen(event: str) -> list[dict[str, Any]]:
    return [{"at": "2025-01-01T00:00:00+00:00", "state": "purchased", "event": event}]


@pytest.mark.parametrize(("recorded", "state", "queue_name"), [
    ({}, "detected", "purchase-new"),
    ({"cart_id": "cart-1"}, "purchasing", "purchase-new"),
    ({"order_attempted_at": "2025-01-01T00:00:00+00:00"}, "purchasing", "purchase-new"),
    # bought but never seen active (a provisioning timeout): the purchase finds the recorded subscription, buys nothing
    ({"new_subscription_id": "sub-new"}, "purchasing", "purchase-new"),
    ({"new_subscription_id": "sub-new", "history": _seen("replacement_active")}, "purchased", "reassign-licenses"),
    ({"new_subscription_id": "sub-new", "old_sku_id": "sku-old", "history": _seen("replacement_active")},
     "reassigning", "reassign-licenses"),
    # a native move blocked before its verification waits and verifies again; one verified goes on to the users
    ({"new_subscription_id": "sub-new", "migration_path": "native_transition"}, "native_moving", "purchase-new"),
    ({"new_subscription_id": "sub-new", "migration_path": "native_upgrade", "old_sku_id": "sku-old",
      "history": _seen("native_verified")}, "reassigning", "reassign-licenses"),
    # a native move refused: chosen again (route looks for an earlier move before asking for one)
    ({"migration_path": "native_transition", "native_attempted_at": "2025-01-01T00:00:00+00:00",
      "blocked_by": "native_rejected"}, "detected", "purchase-new"),
    # a native move sent and never found: looked for again, never re-sent
    ({"migration_path": "native_transition", "native_attempted_at": "2025-01-01T00:00:00+00:00",
      "blocked_by": "native_target_unknown"}, "native_pending", "purchase-new"),
])
async def test_redrive_resumes_at_the_state_its_record_has_reached_and_queues_that_states_step(
        storage: str, recorded: dict[str, Any], state: str, queue_name: str) -> None:
    cid, sid = guid(), guid()
    ledger, queues = MigrationLedger.from_connection_string(storage), QueueSender.from_connection_string(storage)
    try:
        fields = dict(recorded)
        blocked_by = str(fields.pop("blocked_by", "not_enough_licenses"))
        record, _ = await ledger.create_if_absent(MigrationRecord(cid, sid, **fields))  # type: ignore[arg-type]
        record = await ledger.save(record.transition("blocked", blocked_by, "needs a look"))
        assert resume_state(record) == state
        first = await redrive.run(ledger, queues, f"{cid.upper()}/{sid}")
        second = await redrive.run(ledger, queues, sid)
    finally:
        ledger.close()
        queues.close()
    assert first.record is not None and first.record.state == state and first.previous_state == "blocked"
    assert first.message is not None and first.message.queue == queue_name
    assert first.describe() == f"re-driven {cid}/{sid}: blocked → {state}; queued {queue_name}"
    assert second.message is None and "nothing to re-drive" in second.describe() and second.exit_code == 0
    with queue(storage, queue_name) as q:
        (sent,) = list(q.receive_messages(max_messages=5))
    assert StepMessage.parse(sent.content, expected_step=first.message.step).subscription_id == sid


async def test_a_retry_starts_every_wait_afresh_even_for_a_failed_record(storage: str) -> None:
    """A record can fail (its message's last delivery) in the middle of a wait; the operator's retry must not hand
    it back a wait that is already over, which would block it on its first poll."""
    cid, sid = guid(), guid()
    ledger, queues = MigrationLedger.from_connection_string(storage), QueueSender.from_connection_string(storage)
    long_ago = "2025-01-01T00:00:00+00:00"
    try:
        record, _ = await ledger.create_if_absent(MigrationRecord(
            cid, sid, new_subscription_id="sub-new", old_sku_id="sku-old", wait_kind="free_units",
            wait_started_at=long_ago, wait_starts=f'{{"free_units": "{long_ago}"}}',
            history=_seen("replacement_active")))
        record = await ledger.save(record.transition("failed", "step_failed", "ServerError on the last delivery"))
        result = await redrive.run(ledger, queues, f"{cid}/{sid}")
        stored = await ledger.get(cid, sid)
    finally:
        ledger.close()
        queues.close()
    assert result.record is not None and result.record.state == "reassigning"
    assert stored is not None and (stored.wait_kind, stored.wait_started_at, stored.wait_starts) == (None, None, None)
