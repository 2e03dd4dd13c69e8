"""Runbook step 3, the license move (``d365_migration/steps/reassign.py``), against the sandbox and Azurite."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState
from d365_tooling.sandbox._catalog import catalog_item
from d365_tooling.sandbox._state import ApiError
from tests.steps._world import DEMO_REPLACEMENT_OFFERS, SALES, Clock, Tenant, detect, drive, new_sku, service


async def test_reassign_moves_every_holder_with_one_atomic_update_and_skips_users_already_moved(
        server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state, holders=3, others=1, quantity=5)
    new = new_sku(DEMO_REPLACEMENT_OFFERS, SALES)
    already = t.holders[0]
    server.state.assign_user_license(t.customer_id, already, new)  # someone moved this user by hand
    async with service(server.url, storage) as svc:
        report = await detect(svc)
        left = await drive(svc, report.purchase_messages, stop_before="suspend")
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        outcomes = {o.user_id: o.outcome for o in await svc.ledger.user_outcomes(record)}  # type: ignore[arg-type]
    assert [m.step for m in left] == ["suspend"]
    assert record is not None and record.state == "reassigned"
    assert record.users_moved == 2 and record.users_skipped == 1 and record.users_failed == 0
    updates = server.state.license_updates()
    by_user: dict[str, list[dict[str, Any]]] = {}
    for u in updates:
        by_user.setdefault(u["user_id"], []).append(u)
    assert set(by_user) == set(t.holders)  # every holder, nobody else
    for uid, ups in by_user.items():
        assert len(ups) == 1, ups  # one call: assign and remove together
        assert ups[0]["requested_remove"] == [t.old_sku]
        assert ups[0]["requested_assign"] == ([] if uid == already else [new])
        assert t.licenses(uid) == {new}
    assert outcomes == {already: "skipped", t.holders[1]: "moved", t.holders[2]: "moved"}
    assert t.licenses(t.others[0]) == set()
    assert t.old_status() == "active" and server.state.patches() == []


async def test_reassign_out_of_licenses_60012_blocks_naming_the_user_and_never_suspends(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2, others=1, quantity=2)
    new = new_sku(DEMO_REPLACEMENT_OFFERS, SALES)
    # Between the step's availability check and its license moves, an admin hands a unit of the new product to
    # someone else (as can happen in the real world): the second move is refused with 60012.
    original = state.license_update
    raced: list[bool] = []

    def racing_license_update(customer_id: str, user_id: str, body: Any) -> dict[str, Any]:
        if not raced:
            raced.append(True)
            state.assign_user_license(t.customer_id, t.others[0], new)
        return original(customer_id, user_id, body)

    state.license_update = racing_license_update  # type: ignore[method-assign]
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            left = await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert raced and left == []
    assert record is not None and record.state == "blocked"
    refused = [u for u in t.holders if t.old_sku in t.licenses(u)]
    assert len(refused) == 1
    assert t.upn(refused[0]) in (record.reason or "") and "60012" in (record.reason or "")
    assert t.licenses(refused[0]) == {t.old_sku}  # never cut off
    assert t.old_status() == "active" and state.patches() == []


async def test_reassign_usage_location_error_blocks_naming_the_user_and_never_suspends(
        server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state, holders=1, usage_location=None)
    async with service(server.url, storage) as svc:
        report = await detect(svc)
        left = await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None
        outcomes = await svc.ledger.user_outcomes(record)
    assert left == []
    assert record.state == "blocked"
    assert [(o.user_id, o.outcome) for o in outcomes] == [(t.holders[0], "failed")]
    assert t.upn(t.holders[0]) in (record.reason or "") and "usage location" in (record.reason or "")
    assert t.licenses(t.holders[0]) == {t.old_sku}
    assert t.old_status() == "active" and server.state.patches() == []


async def test_same_old_and_new_sku_moves_nobody(server: SandboxServer, storage: str) -> None:
    replacement = catalog_item(DEMO_REPLACEMENT_OFFERS["sales"]["commercial"])
    assert replacement is not None
    # The Qualified Offer subscription already grants the product SKU the replacement grants.
    t = Tenant(server.state, holders=2, sub_offer=replacement)
    async with service(server.url, storage) as svc:
        report = await detect(svc)
        await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed"
    assert record.old_sku_id == record.new_sku_id == replacement.sku.id.lower()
    assert any(h.get("event") == "same_sku" for h in record.history)
    assert server.state.license_updates() == [] and record.users_moved == 0
    assert all(t.licenses(u) == {replacement.sku.id.lower()} for u in t.holders)


# --- fail closed and per-user answers (audit findings 1 and 4)


async def test_reassign_never_concludes_on_an_old_sku_missing_from_subscribed_skus(state: SandboxState,
                                                                                   storage: str) -> None:
    t = Tenant(state, holders=2)
    clock = Clock()
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, clock=clock, SUBSCRIBED_SKU_WAIT_MINUTES="30") as svc:
            report = await detect(svc)
            (waiting,) = await drive(svc, report.purchase_messages, stop_before="reassign")
            # From here on the old SKU is not among the customer's subscribed SKUs (its id is not one the
            # suspension's "nobody holds it" check can see).
            srv.config.subscribed_skus_omitted = [t.old_sku]
            first = await svc.run(waiting)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "reassigning", record
            assert first.next_messages == [] and record.wait_kind == "old_sku_listed"
            clock.advance(timedelta(minutes=31))
            await svc.run(waiting.next_poll())
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "blocked", record
    assert record.history[-1]["event"] == "old_sku_not_listed"
    assert t.old_sku in (record.reason or "") and "SUBSCRIBED_SKU_WAIT_MINUTES" in (record.reason or "")
    assert record.wait_kind is None  # a re-drive waits afresh
    assert state.license_updates() == [] and all(t.licenses(u) == {t.old_sku} for u in t.holders)
    assert t.old_status() == "active" and state.patches() == []


async def test_a_user_deleted_between_the_users_list_and_their_licenses_is_recorded_gone(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=3, quantity=3)
    gone = t.holders[0]
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            (waiting,) = await drive(svc, report.purchase_messages, stop_before="reassign")
            srv.config.users_deleted_after_listing = [gone]  # 404 60002 on the licenses read that follows
            left = await drive(svc, [waiting])
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None
            outcomes = {o.user_id: o.outcome for o in await svc.ledger.user_outcomes(record)}
    assert left == [] and record.state == "completed", record
    assert outcomes == {gone: "gone", t.holders[1]: "moved", t.holders[2]: "moved"}
    assert record.users_moved == 2 and record.users_failed == 0
    assert t.old_status() == "suspended"


async def test_a_user_deleted_right_before_their_license_update_is_gone_not_failed(state: SandboxState,
                                                                                  storage: str) -> None:
    t = Tenant(state, holders=2, quantity=2)
    original = state.license_update

    def deleting_license_update(customer_id: str, user_id: str, body: Any) -> dict[str, Any]:
        if user_id.lower() == t.holders[0]:
            state.delete_user(t.customer_id, t.holders[0])  # an admin deleted the user a moment ago: 404 60002
        return original(customer_id, user_id, body)

    state.license_update = deleting_license_update  # type: ignore[method-assign]
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None
            outcomes = {o.user_id: o.outcome for o in await svc.ledger.user_outcomes(record)}
    assert record.state == "completed", record
    assert outcomes == {t.holders[0]: "gone", t.holders[1]: "moved"}
    assert t.old_status() == "suspended"


async def test_an_unreadable_users_licenses_block_naming_the_user_and_keep_the_old_active(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=3, quantity=3)
    refused = t.holders[1]
    original = state.user_licenses_json

    def refusing_licenses(customer_id: str, user_id: str) -> list[dict[str, Any]]:
        if user_id.lower() == refused:
            raise ApiError(400, 800002, "Invalid request input: the user object is not valid.")
        return original(customer_id, user_id)

    state.user_licenses_json = refusing_licenses  # type: ignore[method-assign]
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            left = await drive(svc, report.purchase_messages)  # first delivery of every message: no poison
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None
            outcomes = {o.user_id: o.outcome for o in await svc.ledger.user_outcomes(record)}
    assert left == [] and record.state == "blocked", record
    assert record.history[-1]["event"] == "user_license_failed"
    assert t.upn(refused) in (record.reason or "") and "800002" in (record.reason or "")
    assert outcomes[refused] == "failed" and t.licenses(refused) == {t.old_sku}  # never cut off
    assert {outcomes[u] for u in t.holders if u != refused} == {"moved"}  # the others moved
    assert t.old_status() == "active" and state.patches() == []


async def test_inactive_users_in_the_list_are_not_touched(state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=3, quantity=3)
    deleted = t.holders[0]
    state.delete_user(t.customer_id, deleted)  # soft-deleted: its license is released
    with SandboxServer(state, SandboxConfig(deleted_users_listed=True)) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None
            outcomes = {o.user_id: o.outcome for o in await svc.ledger.user_outcomes(record)}
    listed = [u for u in state.users(t.customer_id) if u["id"] == deleted]
    assert listed and listed[0]["state"] == "inactive"
    assert record.state == "completed", record
    assert [r for r in state.requests() if deleted in r["path"].lower()] == []  # no licenses read, no update
    assert deleted not in outcomes and record.users_moved == 2


async def test_throttling_that_outlasts_the_client_waits_instead_of_burning_a_delivery(state: SandboxState,
                                                                                       storage: str) -> None:
    t = Tenant(state, holders=1)
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await detect(svc)
            (waiting,) = await drive(svc, report.purchase_messages, stop_before="reassign")
            # 429 with a short Retry-After (the client sleeps it) more often than the client retries
            srv.config.long_retry_after_s, srv.config.long_retry_after_times = 1, 5
            srv.config.long_retry_after_path = "/licenseupdates"
            result = await svc.run(waiting)  # no exception: the host would count a failed delivery
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert "throttled" in result.note and result.next_messages == []
    assert record is not None and record.state == "reassigning" and record.users_failed == 0, record
    assert t.old_status() == "active"
