"""Runbook step 1, detection, driven the way Azure runs it: the timer's first page (``start_scan``) and
``scan_page`` for every page queued on ``scan-customers`` (``tests/steps/_world.detect``)."""

from __future__ import annotations

import pytest

from d365_migration._messages import ScanMessage
from d365_tooling.sandbox import SandboxServer, SandboxState, seed_world
from tests.steps._world import CE, Tenant, detect, drive, mine, msg_for, queued_scan_pages, service, writes


async def test_detect_is_idempotent_and_does_not_re_emit_work_past_detected(server: SandboxServer, storage: str
                                                                            ) -> None:
    a, b = Tenant(server.state), Tenant(server.state, offer=CE)
    async with service(server.url, storage) as svc:
        first = await detect(svc)
        assert first.new_records == 2 and len(first.purchase_messages) == 2
        assert {m.subscription_id for m in first.purchase_messages} == {a.subscription_id, b.subscription_id}
        # a's purchase runs; b's message is "lost" (its record stays `detected`)
        await drive(svc, [m for m in first.purchase_messages if m.subscription_id == a.subscription_id],
                    stop_before="reassign")
        assert (await svc.ledger.get(a.customer_id, a.subscription_id)).state == "purchased"  # type: ignore[union-attr]

        second = await detect(svc)
        assert second.new_records == 0
        assert [m.subscription_id for m in second.purchase_messages] == [b.subscription_id]
        records = await svc.ledger.list_records()
        assert len(records) == 2
    assert len(mine(server.state, a)) == 1 and mine(server.state, b) == []


async def test_dry_run_is_the_default_records_but_queues_and_changes_nothing(server: SandboxServer, storage: str
                                                                            ) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage, DRY_RUN="<unset>") as svc:
        assert svc.settings.dry_run is True
        report = await detect(svc)
        assert report.new_records == 1 and report.purchase_messages == [] and report.bodies() == []
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None and record.state == "detected"
        for step in ("purchase", "reassign", "suspend"):
            result = await getattr(svc, step)(msg_for(step, t.customer_id, t.subscription_id))
            assert result.note == "dry run" and result.next_messages == []
        assert (await svc.ledger.get(t.customer_id, t.subscription_id)).state == "detected"  # type: ignore[union-attr]
    assert writes(server.state) == [] and server.state.purchases() == [] and server.state.patches() == []


async def test_candidate_rules_never_record_the_seeded_distractors(state: SandboxState, storage: str) -> None:
    manifest = seed_world(state, customers=8, seed=3)
    kinds = {d.reason for d in manifest.distractors}
    assert {"expires_after_window", "auto_renew_enabled", "already_suspended", "status_expired", "status_disabled",
            "status_unknown", "far_future_end_date"} <= kinds
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, DRY_RUN="true") as svc:
            report = await detect(svc)
            records = await svc.ledger.list_records()
    recorded = {r.subscription_id.lower() for r in records}
    assert recorded == manifest.expected_subscription_ids()
    assert not recorded & manifest.distractor_subscription_ids()
    reasons = {x.subscription_id.lower(): x.reason for x in report.left_alone}
    for d in manifest.distractors:
        sid = d.subscription_id.lower()
        if d.reason in ("not_qualified_offer", "nce_subscription", "not_qualified_offer_expiring"):
            assert sid not in reasons  # not a retired offer at all
            continue
        expected_words = {"expires_after_window": "beyond", "auto_renew_enabled": "auto-renew",
                          "already_suspended": "suspended", "status_expired": "expired",
                          "status_disabled": "disabled", "status_unknown": "pendingdeletion",
                          "far_future_end_date": "9999"}[d.reason]
        assert expected_words in reasons[sid].lower(), (d.reason, reasons.get(sid))
    assert writes(state) == []


async def test_max_purchases_per_run_brake_parks_the_rest_as_blocked(server: SandboxServer, storage: str) -> None:
    tenants = [Tenant(server.state) for _ in range(3)]
    async with service(server.url, storage, MAX_PURCHASES_PER_RUN="1") as svc:
        report = await detect(svc)
        assert len(report.purchase_messages) == 1 and report.braked == 2
        records = await svc.ledger.list_records()
        blocked = [r for r in records if r.state == "blocked"]
        assert len(blocked) == 2
        for r in blocked:
            assert "MAX_PURCHASES_PER_RUN=1" in (r.reason or "") and "retry" in (r.reason or "")
        await drive(svc, report.purchase_messages)
        # a second run does not re-queue the parked ones (they wait for an operator)
        assert (await detect(svc)).purchase_messages == []
    assert len(server.state.purchases()) == 1
    assert sorted(t.old_status() for t in tenants) == ["active", "active", "suspended"]


@pytest.mark.parametrize("mode", ["allow", "deny"])
async def test_allowlist_and_denylist_keep_out_of_scope_customers_untouched(server: SandboxServer, storage: str,
                                                                            mode: str) -> None:
    a, b, c = (Tenant(server.state) for _ in range(3))
    setting = ({"CUSTOMER_ALLOWLIST": f"{a.customer_id.upper()}, {b.customer_id}"} if mode == "allow"
               else {"CUSTOMER_DENYLIST": c.customer_id})
    async with service(server.url, storage, **setting) as svc:
        report = await detect(svc)
        assert report.out_of_scope == 1
        assert any("CUSTOMER_ALLOWLIST" in x.reason and x.customer_id == c.customer_id for x in report.left_alone)
        await drive(svc, report.purchase_messages)
        records = await svc.ledger.list_records()
    assert {r.customer_id.lower() for r in records} == {a.customer_id.lower(), b.customer_id.lower()}
    assert {p["customer_id"].lower() for p in server.state.purchases()} == {a.customer_id, b.customer_id}
    assert c.old_status() == "active" and all(c.licenses(u) == {c.old_sku} for u in c.holders)
    touched = {r["path"].split("/")[3] for r in writes(server.state)}
    assert c.customer_id not in touched


async def test_scan_page_queues_the_next_page_and_a_redelivered_page_is_not_scanned_again(
        server: SandboxServer, storage: str) -> None:
    tenants = [Tenant(server.state) for _ in range(3)]
    async with service(server.url, storage, DRY_RUN="true") as svc:
        first = ScanMessage("run1", 0, svc.client.first_customer_page(2).to_json())  # pages of two customers
        report = await svc.scan_page(first)
        assert report.customers == 2 and report.new_records == 2
        (following,) = queued_scan_pages(storage)
        assert following.run_id == "run1" and following.page == 1 and following.cursor
        before = len(server.state.requests())
        again = await svc.scan_page(first)  # the same page delivered again
        assert again.customers == 0 and again.new_records == 0
        assert len(server.state.requests()) == before and queued_scan_pages(storage) == []
        last = await svc.scan_page(following)
        assert last.customers == 1 and last.new_records == 1
        assert queued_scan_pages(storage) == []  # the last page queues nothing
        records = await svc.ledger.list_records()
    assert {r.subscription_id.lower() for r in records} == {t.subscription_id for t in tenants}
    assert writes(server.state) == []


async def test_the_purchase_brake_counts_across_the_pages_of_one_run(server: SandboxServer, storage: str) -> None:
    for _ in range(3):
        Tenant(server.state)
    async with service(server.url, storage, MAX_PURCHASES_PER_RUN="2") as svc:
        first = ScanMessage("run2", 0, svc.client.first_customer_page(2).to_json())
        page0 = await svc.scan_page(first)
        (following,) = queued_scan_pages(storage)
        page1 = await svc.scan_page(following)
        records = await svc.ledger.list_records()
    assert len(page0.purchase_messages) == 2 and page0.braked == 0
    assert page1.purchase_messages == [] and page1.braked == 1
    assert sorted(r.state for r in records) == ["blocked", "detected", "detected"]
    assert server.state.purchases() == []
