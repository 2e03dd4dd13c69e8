"""The native step (``d365_migration/steps/native.py``) against the sandbox's native-path switches
(``native_paths``, ``native_license_error_users``, ``native_completion_s``, ``native_source_left_active``)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from d365_migration import MigrationService
from d365_migration._ledger import MigrationRecord
from d365_tooling.sandbox import LEGACY_REPLACEMENT_OFFERS, FaultConfig, SandboxConfig, SandboxServer, SandboxState
from d365_tooling.sandbox._transitions import native_operations
from tests.steps._world import DEMO_REPLACEMENT_OFFERS, Clock, Tenant, detect, drive, new_sku, service, writes

TRANSFER = "transition_with_license_transfer"


def _native_posts(state: SandboxState) -> list[dict[str, Any]]:
    return [r for r in writes(state) if r["path"].lower().rstrip("/").endswith(("/transitions", "/upgrades"))]


def _buys(state: SandboxState) -> list[dict[str, Any]]:
    return [r for r in writes(state) if "/carts" in r["path"].lower() or r["path"].lower().endswith("/orders")]


def withdraw_path_on_post(srv: SandboxServer, config: SandboxConfig) -> None:
    """Partner Center withdraws the native path between the eligibility read and the POST (the POST is refused)."""
    app = srv.app

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].lower().endswith("/transitions"):
            config.native_paths = {}
        await app(scope, receive, send)

    srv.app = wrapped  # type: ignore[assignment]


async def _record(svc: MigrationService, t: Tenant) -> MigrationRecord:
    record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None
    return record


def _events(record: MigrationRecord) -> list[str]:
    return [h["event"] for h in record.history]


async def test_transition_with_license_transfer_replaces_buy_and_move(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=3)
    with SandboxServer(state, SandboxConfig(native_paths={t.customer_id: TRANSFER})) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await _record(svc, t)
            outcomes = {o.user_id: o.outcome for o in await svc.ledger.user_outcomes(record)}
    assert record.state == "completed", record.reason
    assert record.migration_path == "native_transition"
    assert {"path_native", "native_attempt", "native_started", "native_verified"} <= set(_events(record))
    assert _events(record).index("native_attempt") < _events(record).index("native_started")
    assert _buys(state) == [] and state.purchases() == []
    assert len(_native_posts(state)) == 1 and len(native_operations(state)) == 1
    wanted = new_sku(DEMO_REPLACEMENT_OFFERS, t.offer)
    for holder in t.holders:
        assert wanted in t.licenses(holder) and t.old_sku not in t.licenses(holder)
    assert outcomes == {h: "moved" for h in t.holders}
    assert t.old_status() == "suspended" and state.patches() == []  # Partner Center suspended it


async def test_native_only_without_a_path_blocks_with_the_eligibility_reason(state: SandboxState,
                                                                              storage: str) -> None:
    t = Tenant(state)
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="native_only") as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await _record(svc, t)
    assert record.state == "blocked"
    assert record.reason is not None and "does not have any transition paths" in record.reason
    assert "native_only" in record.reason and "nothing bought" in record.reason
    assert writes(state) == [] and t.old_status() == "active"


async def test_prefer_native_without_license_transfer_takes_the_runbook(state: SandboxState, storage: str) -> None:
    t = Tenant(state)
    with SandboxServer(state, SandboxConfig(native_paths={t.customer_id: "transition_only"})) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await _record(svc, t)
    assert record.state == "completed" and record.migration_path == "runbook"
    runbook_choice = next(h for h in record.history if h["event"] == "path_runbook")
    assert "transition_only" in runbook_choice["detail"]
    assert _native_posts(state) == [] and len(state.purchases()) == 1


async def test_native_upgrade_to_the_legacy_replacement(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    config = SandboxConfig(native_paths={t.customer_id: "upgrade_with_license_transfer"})
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="native_only",
                           REPLACEMENT_OFFERS=json.dumps(LEGACY_REPLACEMENT_OFFERS)) as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await _record(svc, t)
    assert record.state == "completed", record.reason
    assert record.migration_path == "native_upgrade"
    assert len(_native_posts(state)) == 1 and _buys(state) == []
    wanted = new_sku(LEGACY_REPLACEMENT_OFFERS, t.offer)
    assert all(wanted in t.licenses(h) and t.old_sku not in t.licenses(h) for h in t.holders)


async def test_license_errors_block_naming_the_users_and_nothing_is_suspended(state: SandboxState,
                                                                               storage: str) -> None:
    t = Tenant(state, holders=3)
    failing = t.holders[1]
    config = SandboxConfig(native_paths={t.customer_id: TRANSFER}, native_license_error_users=[failing])
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            left = await drive(svc, (await detect(svc)).purchase_messages)
            record = await _record(svc, t)
    assert left == [] and record.state == "blocked"
    assert record.reason is not None and t.upn(failing) in record.reason
    assert all(t.upn(h) not in record.reason for h in t.holders if h != failing)
    assert t.old_sku in t.licenses(failing)
    assert t.old_status() == "active" and state.patches() == []
    assert len(_native_posts(state)) == 1 and _buys(state) == []


async def test_source_left_active_is_suspended_by_the_tool_after_verification(state: SandboxState,
                                                                              storage: str) -> None:
    t = Tenant(state, holders=2)
    config = SandboxConfig(native_paths={t.customer_id: TRANSFER}, native_source_left_active=True)
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await _record(svc, t)
    assert record.state == "completed" and "old_suspended" in _events(record)
    assert t.old_status() == "suspended"
    assert [p["subscription_id"].lower() for p in state.patches()] == [t.subscription_id]


async def test_slow_completion_waits_on_the_clock_then_blocks(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    clock = Clock()
    config = SandboxConfig(native_paths={t.customer_id: TRANSFER}, native_completion_s=24 * 3600)
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage, clock=clock, MIGRATION_PATH_POLICY="prefer_native") as svc:
            (act,) = (await detect(svc)).purchase_messages
            waiting = await svc.run(act)
            assert waiting.next_messages == [] and waiting.note == "native move in progress"
            assert (await _record(svc, t)).state == "native_moving"
            clock.advance(timedelta(minutes=svc.settings.provisioning_timeout_minutes + 1))
            timed_out = await svc.run(act)
            record = await _record(svc, t)
    assert timed_out.note == "blocked" and record.state == "blocked"
    assert "native_timeout" in _events(record)
    assert len(_native_posts(state)) == 1 and t.old_status() == "active" and state.patches() == []


async def test_lost_answer_is_recovered_from_the_transitions_list_without_resending(state: SandboxState,
                                                                                    storage: str) -> None:
    t = Tenant(state, holders=2)
    config = SandboxConfig(native_paths={t.customer_id: TRANSFER},
                           faults=FaultConfig(lose_first_write_response=True))
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            (act,) = (await detect(svc)).purchase_messages
            lost = await svc.run(act)
            assert lost.next_messages == [] and "answer lost" in lost.note
            attempted = await _record(svc, t)
            assert attempted.state == "native_pending" and attempted.native_attempted_at
            await drive(svc, [act])
            record = await _record(svc, t)
    assert record.state == "completed", record.reason
    assert len(_native_posts(state)) == 1 and len(native_operations(state)) == 1
    assert record.native_request_id == attempted.native_request_id
    assert [p["requestId"] for p in _native_posts(state)] == [record.native_request_id]


async def test_rejected_native_move_falls_back_to_the_runbook_only_when_nothing_changed(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    config = SandboxConfig(native_paths={t.customer_id: TRANSFER})
    srv = SandboxServer(state, config)
    withdraw_path_on_post(srv, config)
    with srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await _record(svc, t)
    assert record.state == "completed" and record.migration_path == "runbook"
    assert "native_rejected_fallback" in _events(record)
    assert native_operations(state) == [] and len(state.purchases()) == 1
    assert t.old_status() == "suspended"


async def test_rejected_native_move_under_native_only_blocks(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    config = SandboxConfig(native_paths={t.customer_id: TRANSFER})
    srv = SandboxServer(state, config)
    withdraw_path_on_post(srv, config)
    with srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="native_only") as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await _record(svc, t)
    assert record.state == "blocked" and "native_rejected" in _events(record)
    assert record.reason is not None and "does not have any transition paths" in record.reason
    assert _buys(state) == [] and native_operations(state) == [] and t.old_status() == "active"


async def test_runbook_only_default_never_asks_for_eligibility(state: SandboxState, storage: str) -> None:
    t = Tenant(state)
    with SandboxServer(state, SandboxConfig(native_paths={t.customer_id: TRANSFER})) as srv:
        async with service(srv.url, storage) as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await _record(svc, t)
    assert record.state == "completed" and record.migration_path is None
    assert not [r for r in state.requests() if "transition" in r["path"].lower() or "upgrade" in r["path"].lower()]
    assert native_operations(state) == [] and len(state.purchases()) == 1


async def test_a_pause_stops_a_native_move_too(state: SandboxState, storage: str) -> None:
    """A transition or upgrade creates (and bills) the replacement as surely as a purchase: the rollout gate comes
    before the native step, so a paused rollout sends no eligibility-driven write at all."""
    from dataclasses import replace

    from d365_migration._rollout import RolloutStore, controls_from_settings

    t = Tenant(state, holders=2)
    with SandboxServer(state, SandboxConfig(native_paths={t.customer_id: TRANSFER})) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            (msg,) = (await detect(svc)).purchase_messages
            store = RolloutStore(svc.ledger.table_client)
            await store.change(lambda c: replace(c, paused=True, pause_reason="freeze"), by="tests", action="pause",
                               reason=None, defaults=controls_from_settings(svc.settings))
            result = await svc.purchase(msg)
            record = await _record(svc, t)
    assert result.note == "rollout paused" and record.state == "detected"
    assert _native_posts(state) == [] and _buys(state) == [] and t.old_status() == "active"


def _answer_first_post_with(srv: SandboxServer, suffix: str, *, apply: bool) -> list[str]:
    """The first POST whose path ends in ``suffix`` gets a 500 (an answer that says nothing): Partner Center applied
    it (``apply``) or never did. Either way the client cannot tell, which is the point. Returns the MS-RequestId of
    that POST (once it is sent); an unapplied one never reaches the sandbox's request log."""
    app = srv.app
    intercepted: list[str] = []

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"].lower().endswith(suffix)
                and not intercepted):
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            intercepted.append(headers.get("ms-requestid", ""))
            if apply:
                async def swallow(message: Any) -> None:
                    return None
                await app(scope, receive, swallow)
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body",
                        "body": b'{"code": 800003, "description": "Unexpected service error", "source": "PartnerFD"}'})
            return
        await app(scope, receive, send)

    srv.app = wrapped  # type: ignore[assignment]
    return intercepted


def _hide_transitions(srv: SandboxServer, *, items: list[dict[str, Any]] | None = None) -> list[bool]:
    """``GET …/transitions`` lists nothing (a history that lags the move), or just ``items``, while the returned
    flag is set (clear it to show the real history)."""
    app = srv.app
    hiding = [True]

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if (hiding[0] and scope["type"] == "http" and scope["method"] == "GET"
                and scope["path"].lower().endswith("/transitions")):
            listed = items or []
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(
                {"totalCount": len(listed), "items": listed, "attributes": {"objectType": "Collection"}}).encode()})
            return
        await app(scope, receive, send)

    srv.app = wrapped  # type: ignore[assignment]
    return hiding


async def test_an_accepted_move_without_its_target_is_looked_for_never_resent_then_blocks(
        state: SandboxState, storage: str) -> None:
    """The POST was answered (the move exists) but named no target, and the history does not show it yet: the move
    is never asked for again — not after the lost-answer re-send wait either — and blocks at the timeout."""
    t = Tenant(state, holders=2)
    clock = Clock()
    config = SandboxConfig(native_paths={t.customer_id: TRANSFER}, transition_answer_without_target=True,
                           native_source_left_active=True)
    srv = SandboxServer(state, config)
    _hide_transitions(srv)
    with srv:
        async with service(srv.url, storage, clock=clock, MIGRATION_PATH_POLICY="prefer_native") as svc:
            (act,) = (await detect(svc)).purchase_messages
            accepted = await svc.run(act)
            assert "not named yet" in accepted.note
            clock.advance(timedelta(seconds=svc.settings.lost_write_resend_wait_seconds + 60))
            looking = await svc.run(act)
            assert "not named yet" in looking.note and len(_native_posts(state)) == 1
            clock.advance(timedelta(minutes=svc.settings.provisioning_timeout_minutes + 1))
            await svc.run(act)
            record = await _record(svc, t)
    assert record.state == "blocked" and "native_target_unknown" in _events(record)
    assert record.reason is not None and "nothing re-sent" in record.reason
    assert len(_native_posts(state)) == 1 and len(native_operations(state)) == 1
    assert _buys(state) == [] and state.patches() == []


async def test_a_completed_transition_naming_no_target_blocks_for_a_human(state: SandboxState,
                                                                          storage: str) -> None:
    t = Tenant(state, holders=2)
    srv = SandboxServer(state, SandboxConfig(native_paths={t.customer_id: TRANSFER}))
    _answer_first_post_with(srv, "/transitions", apply=False)
    _hide_transitions(srv, items=[{"id": "op-1", "fromSubscriptionId": t.subscription_id, "status": "Completed",
                                   "transitionType": TRANSFER, "events": []}])
    with srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            (act,) = (await detect(svc)).purchase_messages
            await svc.run(act)  # the POST's answer says nothing
            await svc.run(act)
            record = await _record(svc, t)
    assert record.state == "blocked" and "native_target_unknown" in _events(record)
    assert record.reason is not None and "op-1" in record.reason
    assert _native_posts(state) == [] and _buys(state) == [] and state.patches() == []


async def test_a_retried_native_move_adopts_the_move_an_earlier_attempt_made(state: SandboxState,
                                                                              storage: str) -> None:
    """Blocked with the target unknown, the operator re-drives once the history shows the move: the move is found
    and verified; a second one is never asked for."""
    from d365_migration.steps import redrive

    t = Tenant(state, holders=2)
    clock = Clock()
    config = SandboxConfig(native_paths={t.customer_id: TRANSFER}, transition_answer_without_target=True,
                           native_source_left_active=True)
    srv = SandboxServer(state, config)
    hiding = _hide_transitions(srv)
    with srv:
        async with service(srv.url, storage, clock=clock, MIGRATION_PATH_POLICY="prefer_native") as svc:
            (act,) = (await detect(svc)).purchase_messages
            await svc.run(act)
            clock.advance(timedelta(minutes=svc.settings.provisioning_timeout_minutes + 1))
            await svc.run(act)
            assert (await _record(svc, t)).state == "blocked"
            hiding[0] = False  # the history shows the move now
            retried = await redrive.run(svc.ledger, svc.queues, t.subscription_id, clock=clock)
            assert retried.record is not None and retried.record.state == "native_pending"
            await drive(svc, [act])
            record = await _record(svc, t)
    assert record.state == "completed", record.reason
    assert len(_native_posts(state)) == 1 and len(native_operations(state)) == 1 and _buys(state) == []
    assert all(t.old_sku not in t.licenses(h) for h in t.holders)


async def test_lost_upgrade_answer_is_recovered_from_the_target_offers_new_subscription(state: SandboxState,
                                                                                         storage: str) -> None:
    t = Tenant(state, holders=2)
    config = SandboxConfig(native_paths={t.customer_id: "upgrade_with_license_transfer"},
                           faults=FaultConfig(lose_first_write_response=True))
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="native_only",
                           REPLACEMENT_OFFERS=json.dumps(LEGACY_REPLACEMENT_OFFERS)) as svc:
            (act,) = (await detect(svc)).purchase_messages
            lost = await svc.run(act)
            assert lost.next_messages == [] and "answer lost" in lost.note
            assert (await _record(svc, t)).state == "native_pending"
            await drive(svc, [act])
            record = await _record(svc, t)
    assert record.state == "completed", record.reason
    assert record.migration_path == "native_upgrade" and "native_started" in _events(record)
    (op,) = native_operations(state)
    assert record.new_subscription_id == op["to_subscription_id"].lower()
    assert len(_native_posts(state)) == 1 and _buys(state) == []
    wanted = new_sku(LEGACY_REPLACEMENT_OFFERS, t.offer)
    assert all(wanted in t.licenses(h) and t.old_sku not in t.licenses(h) for h in t.holders)


async def test_a_lost_move_that_never_happened_is_resent_with_the_same_request_id_only_after_the_wait(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    clock = Clock()
    srv = SandboxServer(state, SandboxConfig(native_paths={t.customer_id: TRANSFER}))
    first = _answer_first_post_with(srv, "/transitions", apply=False)
    with srv:
        async with service(srv.url, storage, clock=clock, MIGRATION_PATH_POLICY="prefer_native") as svc:
            (act,) = (await detect(svc)).purchase_messages
            await svc.run(act)  # the POST's answer says nothing
            looking = await svc.run(act)
            assert "looking for it" in looking.note
            assert len(first) == 1 and _native_posts(state) == [] and native_operations(state) == []  # not re-sent
            clock.advance(timedelta(seconds=svc.settings.lost_write_resend_wait_seconds + 1))
            await drive(svc, [act])
            record = await _record(svc, t)
    assert record.state == "completed", record.reason
    (resent,) = _native_posts(state)
    assert len(native_operations(state)) == 1
    assert first == [resent["requestId"]] == [record.native_request_id]  # no answer → the same id again
    assert _buys(state) == []


async def test_a_lost_answer_with_the_old_subscription_no_longer_active_is_never_resent(state: SandboxState,
                                                                                       storage: str) -> None:
    t = Tenant(state, holders=2)
    clock = Clock()
    srv = SandboxServer(state, SandboxConfig(native_paths={t.customer_id: TRANSFER}))
    # The move happened (Partner Center suspended the old subscription)…
    applied = _answer_first_post_with(srv, "/transitions", apply=True)
    _hide_transitions(srv)  # …but its history does not show it
    with srv:
        async with service(srv.url, storage, clock=clock, MIGRATION_PATH_POLICY="prefer_native") as svc:
            (act,) = (await detect(svc)).purchase_messages
            await svc.run(act)
            clock.advance(timedelta(seconds=svc.settings.lost_write_resend_wait_seconds + 60))
            waiting = await svc.run(act)
            assert "old subscription suspended" in waiting.note
            clock.advance(timedelta(minutes=svc.settings.provisioning_timeout_minutes + 1))
            await svc.run(act)
            record = await _record(svc, t)
    assert record.state == "blocked" and "native_lost_answer_unresolved" in _events(record)
    assert record.reason is not None and "nothing re-sent" in record.reason
    assert len(applied) == 1 and len(_native_posts(state)) == 1 and len(native_operations(state)) == 1
    assert _buys(state) == [] and state.patches() == []


async def test_a_pooled_sku_blocks_the_native_move_and_named_users_take_the_runbook(state: SandboxState,
                                                                                    storage: str,
                                                                                    tmp_path: Any) -> None:
    """A license transfer moves whom Partner Center moves: with a pooled product SKU that could be users of the
    other subscription. So the native path runs the same pre-flight as a purchase (nothing sent), and once an operator
    names who moves, only the runbook can move exactly them."""
    import io

    from d365_migration import Settings
    from d365_migration.cli import retry
    from d365_tooling.sandbox import seed_world
    from tests.steps._world import env_for, msg_for

    manifest = seed_world(state, customers=3, seed=3, pooled_skus=True)
    (pooled,) = manifest.pooled
    (em,) = [e for e in manifest.expected if e.subscription_id.lower() == pooled.subscription_id.lower()]
    cid, sid = pooled.customer_id, pooled.subscription_id.lower()
    for customer_id, user_id in manifest.users_without_usage_location:
        state.set_usage_location(customer_id, user_id, "US")
    upn = {u["id"].lower(): u["userPrincipalName"] for u in state.users(cid)}
    retiring = {u.lower() for u in em.user_ids}
    with SandboxServer(state, SandboxConfig(native_paths={cid: TRANSFER})) as srv:
        settings = Settings.from_env(env_for(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native"))
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            report = await detect(svc)
            await drive(svc, [m for m in report.purchase_messages if m.subscription_id.lower() == sid])
            record = await svc.ledger.get(cid, sid)
            assert record is not None and record.state == "blocked", record
            assert "preflight_pooled_sku" in _events(record) and "path_native" not in _events(record)
            assert _native_posts(state) == [] and _buys(state) == []

            users_file = tmp_path / "users.txt"
            users_file.write_text("\n".join(upn[u] for u in sorted(retiring)) + "\n", encoding="utf-8")
            out = io.StringIO()
            assert await retry(settings, f"{cid}/{sid}", out, users_file=str(users_file)) == 0, out.getvalue()
            await drive(svc, [msg_for("purchase", cid, sid)])
            record = await svc.ledger.get(cid, sid)
    assert record is not None and record.state == "completed", record
    assert record.migration_path == "runbook"
    assert "--users-file" in next(h["detail"] for h in record.history if h["event"] == "path_runbook")
    assert _native_posts(state) == [] and native_operations(state) == []
    moved = {u["user_id"].lower() for u in state.license_updates() if u["customer_id"].lower() == cid.lower()
             and pooled.sku_id.lower() in u["removed"]}
    assert moved == retiring


async def test_native_only_refuses_named_users_it_cannot_honour(state: SandboxState, storage: str) -> None:
    from d365_migration._ledger import MigrationRecord as Record

    t = Tenant(state, holders=2)
    with SandboxServer(state, SandboxConfig(native_paths={t.customer_id: TRANSFER})) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="native_only") as svc:
            (act,) = (await detect(svc)).purchase_messages
            record = await _record(svc, t)
            named: Record = await svc.ledger.save(
                dataclasses_replace(record, moving_users=json.dumps([t.upn(t.holders[0]).lower()])))
            assert named.named_users
            await drive(svc, [act])
            record = await _record(svc, t)
    assert record.state == "blocked" and "no_native_path" in _events(record)
    assert record.reason is not None and "--users-file" in record.reason and "nothing bought" in record.reason
    assert writes(state) == [] and t.old_status() == "active"


def dataclasses_replace(record: MigrationRecord, **changes: Any) -> MigrationRecord:
    import dataclasses

    return dataclasses.replace(record, **changes)
