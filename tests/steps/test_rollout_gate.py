"""The stored rollout controls wired into the steps (issue 11 item 1): detection honours scope, brake and pause; a
pause or dry run stops a NEW purchase right before it (record left ``detected``, ``event=rollout_paused`` logged); a
purchase already under way finishes; license moves and suspensions go on under a pause but not in a dry run."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from d365_migration import MigrationService
from d365_migration._rollout import RolloutControls, RolloutStore, controls_from_settings
from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState
from tests.steps._world import Tenant, detect, drive, mine, msg_for, service, writes


async def change(svc: MigrationService, update: object) -> RolloutControls:
    store = RolloutStore(svc.ledger.table_client)
    return await store.change(update, by="tests", action="set", reason=None,  # type: ignore[arg-type]
                              defaults=controls_from_settings(svc.settings))


def pause(c: RolloutControls) -> RolloutControls:
    return replace(c, paused=True, pause_reason="change freeze")


def resume(c: RolloutControls) -> RolloutControls:
    return replace(c, paused=False, pause_reason=None)


def dry(c: RolloutControls) -> RolloutControls:
    return replace(c, live=False)


async def test_pause_stops_a_new_purchase_and_leaves_the_record_detected(
        server: SandboxServer, storage: str, caplog: pytest.LogCaptureFixture) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        (msg,) = (await detect(svc)).purchase_messages
        await change(svc, pause)
        with caplog.at_level(logging.WARNING):
            result = await svc.purchase(msg)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None and record.state == "detected" and record.lease_owner is None
        assert result.next_messages == [] and result.note == "rollout paused"
        assert mine(server.state, t) == [] and writes(server.state) == []
        line = next(r.getMessage() for r in caplog.records if "event=rollout_paused" in r.getMessage())
        assert "change freeze" in line and "rollout resume" in line and t.customer_id in line

        await change(svc, resume)
        await drive(svc, [msg])
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed"
    assert len(mine(server.state, t)) == 1


async def test_detection_while_paused_records_but_queues_nothing_and_says_so(
        server: SandboxServer, storage: str, caplog: pytest.LogCaptureFixture) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        await change(svc, pause)
        with caplog.at_level(logging.WARNING):
            report = await detect(svc)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert report.new_records == 1 and report.purchase_messages == [] and report.braked == 0
    assert record is not None and record.state == "detected"
    assert any("event=rollout_paused" in r.getMessage() and "waiting=1" in r.getMessage() for r in caplog.records)
    assert writes(server.state) == []


async def test_a_purchase_under_way_finishes_under_a_pause(state: SandboxState, storage: str) -> None:
    t = Tenant(state)
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=1.5)) as srv:
        async with service(srv.url, storage, PROVISIONING_POLL_SECONDS="1") as svc:
            (msg,) = (await detect(svc)).purchase_messages
            first = await svc.purchase(msg)  # cart bought, replacement still provisioning
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "purchasing" and record.cart_id, first.note
            await change(svc, pause)
            await asyncio.sleep(1.6)
            done = await svc.purchase(msg_for("purchase", t.customer_id, t.subscription_id, poll=1))
            assert done.record is not None and done.record.state == "purchased", done.note
            # the license move spends nothing: a pause does not stop it, nor the suspension after it
            await drive(svc, done.next_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed"
    assert len(mine(state, t)) == 1 and t.old_status() == "suspended"


async def test_dry_run_stops_the_license_move_and_the_suspension(server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        (msg,) = (await detect(svc)).purchase_messages
        left = await drive(svc, [msg], stop_before="reassign")
        await change(svc, dry)
        before = len(writes(server.state))
        for step_msg in left:
            result = await svc.run(step_msg)
            assert result.note == "dry run" and result.next_messages == []
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "purchased"
    assert len(writes(server.state)) == before
    assert all(t.old_sku in t.licenses(u) for u in t.holders) and t.old_status() == "active"


async def test_scope_comes_from_the_stored_controls_not_the_app_setting(server: SandboxServer, storage: str) -> None:
    a, b = Tenant(server.state), Tenant(server.state)
    # first deploy: allow-list A (from the app setting); later the operator adds B with the CLI's store
    async with service(server.url, storage, CUSTOMER_ALLOWLIST=a.customer_id) as svc:
        await change(svc, lambda c: replace(c, allowlist=c.allowlist | {b.customer_id}))
    # a re-deploy wipes the app setting back to A only: the stored controls still name both
    async with service(server.url, storage, CUSTOMER_ALLOWLIST=a.customer_id) as svc:
        report = await detect(svc)
        assert {m.customer_id for m in report.purchase_messages} == {a.customer_id, b.customer_id}
        # B is taken off the allow-list after detection: its queued purchase buys nothing
        await change(svc, lambda c: replace(c, allowlist=c.allowlist - {b.customer_id}))
        await drive(svc, report.purchase_messages)
        ra = await svc.ledger.get(a.customer_id, a.subscription_id)
        rb = await svc.ledger.get(b.customer_id, b.subscription_id)
    assert ra is not None and ra.state == "completed"
    assert rb is not None and rb.state == "detected" and mine(server.state, b) == []


async def test_stored_purchase_brake_wins_over_the_app_setting(server: SandboxServer, storage: str) -> None:
    for _ in range(3):
        Tenant(server.state)
    async with service(server.url, storage, MAX_PURCHASES_PER_RUN="50") as svc:
        await change(svc, lambda c: replace(c, max_purchases_per_run=1))
        report = await detect(svc)
    assert len(report.purchase_messages) == 1 and report.braked == 2
