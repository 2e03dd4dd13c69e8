"""Detection leaves nothing unexplained (issue 10 item 9): an offer that looks like a Qualified Offer but is not in
the catalog is reported as unrecognised, with its name; a year-9999 ``commitmentEndDate`` takes the end date from the
provisioning status ``endDate``, or is listed as "end date unknown" — through ``scan_page`` and ``plan``."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime

import pytest

from d365_migration.cli import main
from d365_tooling.sandbox import SandboxServer, SandboxState, seed_world
from tests.steps._world import Tenant, detect, env_for, service, writes


async def test_unrecognised_offers_and_hidden_end_dates_are_explained_by_the_scan(state: SandboxState,
                                                                                 storage: str) -> None:
    manifest = seed_world(state, customers=8, seed=3, unrecognised_offers=True, hidden_end_dates=True)
    (unknown,) = manifest.unrecognised
    (hidden,) = [e for e in manifest.expected if e.end_date_source == "provisioningStatus"]
    far_future = [d for d in manifest.distractors if d.reason == "far_future_end_date"]
    assert far_future
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, DRY_RUN="true") as svc:
            report = await detect(svc)
            records = {r.subscription_id.lower(): r for r in await svc.ledger.list_records()}
    left = {x.subscription_id.lower(): x for x in report.left_alone}
    # the unrecognised offer: reported with its name, never recorded
    x = left[unknown.subscription_id.lower()]
    assert x.unrecognised and x.offer_name == unknown.offer_name and "unrecognised" in x.reason
    assert unknown.subscription_id.lower() not in records
    # the year-9999 subscription whose provisioning status carries the real end: a candidate with that end
    record = records[hidden.subscription_id.lower()]
    assert record.commitment_end is not None
    assert datetime.fromisoformat(record.commitment_end).date().isoformat() == hidden.commitment_end_date[:10]
    # a year-9999 subscription with no endDate elsewhere either: listed as "end date unknown", not dropped
    for d in far_future:
        assert left[d.subscription_id.lower()].reason.startswith("end date unknown"), left[d.subscription_id.lower()]
    assert set(records) == manifest.expected_subscription_ids()
    assert writes(state) == []


async def test_an_unreadable_provisioning_status_leaves_a_year_9999_end_unknown_with_the_reason(
        server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)
    with server.state.lock:
        server.state._customer(t.customer_id).subscriptions[t.subscription_id].commitment_end = "9999-12-31T00:00:00Z"
    server.config.gdap_missing_roles_customers = [t.customer_id]
    async with service(server.url, storage, DRY_RUN="true") as svc:
        report = await detect(svc)
        assert await svc.ledger.list_records() == []
    (x,) = [x for x in report.left_alone if x.subscription_id.lower() == t.subscription_id]
    assert x.reason.startswith("end date unknown") and "Directory Reader" in x.reason, x.reason


def test_plan_all_lists_the_unrecognised_offer_by_name_in_every_format(state: SandboxState, storage: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = seed_world(state, customers=4, seed=3, unrecognised_offers=True, hidden_end_dates=True)
    (unknown,) = manifest.unrecognised
    (hidden,) = [e for e in manifest.expected if e.end_date_source == "provisioningStatus"]
    with SandboxServer(state) as srv:
        for k, v in env_for(srv.url, storage).items():
            monkeypatch.setenv(k, v)
        out = io.StringIO()
        assert main(["plan", "--json", "--all"], out=out) == 0
        plan = json.loads(out.getvalue())
        out = io.StringIO()
        assert main(["plan", "--csv", "--all"], out=out) == 0
        rows = list(csv.DictReader(io.StringIO(out.getvalue())))
        out = io.StringIO()
        assert main(["plan", "--csv"], out=out) == 0
        plain = list(csv.DictReader(io.StringIO(out.getvalue())))
    (x,) = [x for x in plan["leftAlone"] if x["subscriptionId"] == unknown.subscription_id.lower()]
    assert x["offerName"] == unknown.offer_name and x["reason"].startswith("unrecognised")
    (row,) = [r for r in rows if r["subscriptionId"] == unknown.subscription_id.lower()]
    assert row["offerName"] == unknown.offer_name and row["action"] == f"leave alone: {row['pathReason']}"
    assert row["pathReason"].startswith("unrecognised")
    assert all(not r["action"].startswith("leave alone") for r in plain)  # without --all, only the migrations
    (migration,) = [m for m in plan["migrations"] if m["subscriptionId"] == hidden.subscription_id.lower()]
    assert migration["commitmentEndDate"] == hidden.commitment_end_date[:10]
    assert state.purchases() == []
