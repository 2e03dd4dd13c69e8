"""Runbook step 3, the license move (``d365_migration/steps/reassign.py``), against the sandbox and Azurite."""

from __future__ import annotations

from typing import Any

from d365_tooling.sandbox import SandboxServer, SandboxState
from d365_tooling.sandbox._catalog import catalog_item
from tests.steps._world import DEMO_REPLACEMENT_OFFERS, SALES, Tenant, detect, drive, new_sku, service


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
