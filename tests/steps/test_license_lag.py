"""The license move and the suspension against reported units that lag the moves (audit findings 11 and 12): the
suspension waits by time for subscribedskus to show the moves instead of bouncing, counts only hand-backs that
moved someone, and never suspends while the new SKU's units do not cover the users recorded as moved."""

from __future__ import annotations

import time
from datetime import timedelta

from d365_migration import MigrationService, StepMessage
from d365_migration._ledger import MigrationRecord
from d365_migration.steps import MAX_REASSIGN_TRIPS
from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState
from tests.steps._world import DEMO_REPLACEMENT_OFFERS, SALES, Clock, Tenant, detect, drive, new_sku, service


class SandboxClock:
    """The sandbox's own clock (seconds), moved by hand: Partner Center's lag passes without the test sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def _until_suspend(svc: MigrationService, t: Tenant) -> StepMessage:
    report = await detect(svc)
    (waiting,) = await drive(svc, [m for m in report.purchase_messages if m.subscription_id == t.subscription_id],
                             stop_before="suspend")
    return waiting


def _events(record: MigrationRecord) -> list[str]:
    return [str(h.get("event")) for h in record.history]


async def test_lagging_consumed_units_are_waited_for_by_time_not_bounced(storage: str) -> None:
    sandbox_clock = SandboxClock()
    state = SandboxState(clock=sandbox_clock)
    t = Tenant(state, holders=2)
    with SandboxServer(state, SandboxConfig(consumed_units_lag_s=600)) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            left = await drive(svc, report.purchase_messages)  # moves, hands back once, then waits
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert left == [] and record is not None and record.state == "reassigned", record
            events = _events(record)
            assert events.count("old_sku_still_used") == 1 and "moved_again" not in events
            assert record.wait_kind == "old_sku_consumed" and t.old_status() == "active"
            assert all(t.licenses(u) == {new_sku(DEMO_REPLACEMENT_OFFERS, SALES)} for u in t.holders)
            sandbox_clock.now += 601  # subscribedskus catches up with the moves
            suspend = StepMessage(step="suspend", customer_id=t.customer_id, subscription_id=t.subscription_id,
                                  correlation_id=record.correlation_id, poll=1)
            result = await svc.run(suspend)
    assert result.record is not None and result.record.state == "completed", result.record
    assert len(state.patches()) == 1 and t.old_status() == "suspended"


async def test_consumed_units_that_never_drop_block_after_the_wait(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    clock = Clock()
    with SandboxServer(state, SandboxConfig(consumed_units_lag_s=3600)) as srv:
        async with service(srv.url, storage, clock=clock, SUBSCRIBED_SKU_WAIT_MINUTES="30") as svc:
            report = await detect(svc)
            await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.wait_kind == "old_sku_consumed", record
            clock.advance(timedelta(minutes=31))
            suspend = StepMessage(step="suspend", customer_id=t.customer_id, subscription_id=t.subscription_id,
                                  correlation_id=record.correlation_id, poll=1)
            result = await svc.run(suspend)
    assert result.record is not None and result.record.state == "blocked", result.record
    assert result.record.history[-1]["event"] == "old_sku_still_consumed"
    assert "SUBSCRIBED_SKU_WAIT_MINUTES" in (result.record.reason or "")
    assert t.old_status() == "active" and state.patches() == []


async def test_only_hand_backs_that_moved_someone_count_as_trips(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            waiting = await _until_suspend(svc, t)
            runs = 0
            for _ in range(MAX_REASSIGN_TRIPS + 1):
                # someone gives a moved user the old product again right before each suspension
                state.assign_user_license(t.customer_id, t.holders[0], t.old_sku)
                result = await svc.run(waiting)
                runs += 1
                assert result.record is not None
                if result.record.is_final:
                    break
                assert [m.step for m in result.next_messages] == ["reassign"]
                (waiting,) = await drive(svc, result.next_messages, stop_before="suspend")
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.history[-1]["event"] == "old_sku_keeps_returning" and runs == MAX_REASSIGN_TRIPS + 1
    assert _events(record).count("moved_again") == MAX_REASSIGN_TRIPS
    assert t.old_status() == "active" and state.patches() == []


async def test_a_move_whose_assignment_did_not_stick_keeps_the_old_subscription(state: SandboxState,
                                                                                storage: str) -> None:
    t = Tenant(state, holders=2)
    clock = Clock()
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, clock=clock, SUBSCRIBED_SKU_WAIT_MINUTES="30") as svc:
            report = await detect(svc)
            (waiting,) = await drive(svc, report.purchase_messages, stop_before="reassign")
            # one license update answers 201 and removes the old SKU, but its assignment of the new one is lost
            srv.config.license_assignments_dropped = 1
            left = await drive(svc, [waiting])
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert left == [] and record is not None and record.state == "reassigned", record
            assert record.users_moved == 2 and record.wait_kind == "new_sku_consumed"
            assert state.patches() == []
            clock.advance(timedelta(minutes=31))
            suspend = StepMessage(step="suspend", customer_id=t.customer_id, subscription_id=t.subscription_id,
                                  correlation_id=record.correlation_id, poll=1)
            result = await svc.run(suspend)
    assert result.record is not None and result.record.state == "blocked", result.record
    assert result.record.history[-1]["event"] == "moves_not_visible"
    assert "2 user(s)" in (result.record.reason or "") and "only 1" in (result.record.reason or "")
    assert t.old_status() == "active" and state.patches() == []
