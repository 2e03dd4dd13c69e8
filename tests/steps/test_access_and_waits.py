"""One authentication stop (issue 10 item 11) and "look again later" answers (item 12) in the record steps, against
the sandbox with the documented behaviours switched on."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

from d365_migration import MigrationService, StepMessage
from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState
from tests.steps._world import Clock, Tenant, detect, drive, end_in, queue, service


async def test_mfa_missing_on_license_updates_stops_once_with_the_fix_and_nothing_is_suspended(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=3, quantity=4)
    with SandboxServer(state, SandboxConfig(mfa_missing_customers=[t.customer_id])) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            left = await drive(svc, report.purchase_messages)  # first delivery of every message, no retries
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            outcomes = await svc.ledger.user_outcomes(record)  # type: ignore[arg-type]
    assert left == []
    assert record is not None and record.state == "blocked", record
    assert record.reason is not None and "mfa_required" in record.reason and "900421" in record.reason
    assert "retry" in record.reason
    assert record.users_failed == 0 and not record.user_failures and outcomes == []  # no per-user failures
    # one refused license update, then the step stopped (the client does not retry a 401 that means "no MFA")
    refused = [r for r in state.requests() if r["path"].lower().endswith("/licenseupdates")]
    assert len(refused) == 1, refused
    assert t.old_status() == "active" and state.patches() == []
    assert [h["event"] for h in record.history].count("access_denied") == 1


async def test_gdap_roles_missing_blocks_naming_the_roles(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    with SandboxServer(state, SandboxConfig(gdap_missing_roles_customers=[t.customer_id])) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.reason is not None and "900308" in record.reason
    assert "Directory Reader" in record.reason and "GDAP" in record.reason
    assert "nothing bought" in record.reason and state.purchases() == []  # pre-flight: blocked before spending
    assert t.old_status() == "active" and state.patches() == []


async def test_a_retry_after_longer_than_the_client_sleeps_becomes_a_delayed_message(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=1)
    config = SandboxConfig(long_retry_after_s=600, long_retry_after_path="/licenseupdates", long_retry_after_times=1)
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            (waiting,) = await drive(svc, report.purchase_messages, stop_before="reassign")
            result = await svc.run(waiting)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "reassigning", record  # not failed, not blocked
            assert svc.client.max_retry_after < 600  # the wait really was longer than the client sleeps
            assert "look again later" in result.note and result.next_messages == []
            q = queue(storage, "reassign-licenses")
            assert q.get_queue_properties().approximate_message_count == 1
            assert list(q.peek_messages(max_messages=5)) == []  # hidden for the service's Retry-After
    assert record.users_failed == 0 and t.old_status() == "active"


async def test_preflight_blocks_a_pooled_sku_with_the_counts_and_buys_nothing(state: SandboxState, storage: str
                                                                             ) -> None:
    t = Tenant(state, holders=2, quantity=2)
    # Another subscription of the customer grants the same product SKU to three more users (subscribedskus pools
    # them): five holders, but the retiring subscription accounts for two.
    other = state.add_subscription(t.customer_id, offer=t.offer, quantity=3, commitment_end=end_in(300),
                                   offer_name=t.offer.name)
    extra = [t._user(f"pooled{i}", [t.old_sku], "US") for i in range(3)]
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            await drive(svc, [m for m in report.purchase_messages if m.subscription_id == t.subscription_id])
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.reason is not None and "nothing bought" in record.reason
    assert "5 users" in record.reason and "only 2" in record.reason
    assert [p for p in state.purchases() if p["customer_id"].lower() == t.customer_id] == []
    assert all(t.licenses(u) == {t.old_sku} for u in [*t.holders, *extra])  # nobody moved
    assert state.subscription(t.customer_id, other.id)["status"] == "active" and t.old_status() == "active"


async def _until_reassign(svc: MigrationService, t: Tenant) -> StepMessage:
    report = await detect(svc)
    (waiting,) = await drive(svc, [m for m in report.purchase_messages if m.subscription_id == t.subscription_id],
                             stop_before="reassign")
    return waiting


async def test_provisioning_status_404_800007_is_waited_for_by_time_not_polls(state: SandboxState,
                                                                             storage: str) -> None:
    t = Tenant(state)
    clock = Clock()
    with SandboxServer(state, SandboxConfig(provisioning_status_lag_s=600)) as srv:
        async with service(srv.url, storage, clock=clock) as svc:
            waiting = await _until_reassign(svc, t)
            many_polls = dataclasses.replace(waiting, poll=500)  # hundreds of quick polls are not a long wait
            result = await svc.run(many_polls)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "purchased", record
            assert "800007" in result.note and record.wait_kind == "provisioning_status"
            clock.advance(timedelta(minutes=59))
            await svc.run(many_polls)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "purchased", record
            clock.advance(timedelta(minutes=2))  # past PROVISIONING_STATUS_WAIT_MINUTES (60)
            await svc.run(many_polls)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.reason is not None and "PROVISIONING_STATUS_WAIT_MINUTES" in record.reason
    assert state.license_updates() == [] and t.old_status() == "active"


async def test_new_sku_missing_from_subscribed_skus_has_its_own_wait(state: SandboxState, storage: str) -> None:
    t = Tenant(state)
    clock = Clock()
    with SandboxServer(state, SandboxConfig(subscribed_skus_lag_s=3600)) as srv:
        async with service(srv.url, storage, clock=clock, SUBSCRIBED_SKU_WAIT_MINUTES="30") as svc:
            waiting = await _until_reassign(svc, t)
            many_polls = dataclasses.replace(waiting, poll=500)
            result = await svc.run(many_polls)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "reassigning", record
            assert "subscribed SKUs" in result.note and record.wait_kind == "subscribed_sku"
            clock.advance(timedelta(minutes=31))
            await svc.run(many_polls)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.reason is not None and "SUBSCRIBED_SKU_WAIT_MINUTES" in record.reason
    assert state.license_updates() == [] and t.old_status() == "active"


async def test_with_both_lags_on_the_chain_completes_after_waiting(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    with SandboxServer(state, SandboxConfig(provisioning_status_lag_s=2.0, subscribed_skus_lag_s=1.5)) as srv:
        async with service(srv.url, storage) as svc:
            message = await _until_reassign(svc, t)
            for _ in range(40):
                result = await svc.run(message)
                if result.next_messages:
                    await drive(svc, result.next_messages)
                    break
                await asyncio.sleep(0.25)
                message = message.next_poll()
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    assert t.old_status() == "suspended"


async def test_license_warnings_are_kept_with_each_users_outcome(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    with SandboxServer(state, SandboxConfig(license_warnings=True)) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            outcomes = await svc.ledger.user_outcomes(record)  # type: ignore[arg-type]
    assert record is not None and record.state == "completed", record
    moved = [o for o in outcomes if o.outcome == "moved"]
    assert {o.user_id for o in moved} == set(t.holders)
    assert all(o.detail and "license warning" in o.detail for o in moved), moved


async def test_answers_flapping_between_two_waits_still_end_in_a_block(state: SandboxState, storage: str) -> None:
    """subscribedskus alternately leaves out the old SKU and the new one: each wait is met again before the step
    makes progress. A wait met again continues from its first start, so the record blocks once the old SKU's wait
    has lasted SUBSCRIBED_SKU_WAIT_MINUTES in all, instead of restarting both waits on every poll for ever."""
    t = Tenant(state, holders=2)
    clock = Clock()
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, clock=clock, SUBSCRIBED_SKU_WAIT_MINUTES="30") as svc:
            message = await _until_reassign(svc, t)  # the pre-flight saw both SKUs
            srv.config.subscribed_skus_omitted = [t.old_sku]
            seen: list[str | None] = []
            record = None
            for poll in range(8):
                await svc.run(message)
                record = await svc.ledger.get(t.customer_id, t.subscription_id)
                assert record is not None
                seen.append(record.wait_kind)
                if record.is_final:
                    break
                assert record.new_sku_id
                # the next answer leaves out the other SKU
                srv.config.subscribed_skus_omitted = [record.new_sku_id if poll % 2 == 0 else t.old_sku]
                clock.advance(timedelta(minutes=10))
                message = message.next_poll()
    assert record is not None and record.state == "blocked", (record, seen)
    assert seen[:4] == ["old_sku_listed", "subscribed_sku", "old_sku_listed", "subscribed_sku"], seen
    assert record.reason is not None and "SUBSCRIBED_SKU_WAIT_MINUTES" in record.reason
    assert record.history[-1]["event"] == "old_sku_not_listed"
    assert record.wait_kind is None and record.wait_starts is None  # a re-drive starts every wait afresh
    assert state.license_updates() == [] and t.old_status() == "active"
