"""Acting on many at once (issue 11 item 7) and the quantity policy in ``plan`` (item 2), through the real CLI over
Azurite and the sandbox: ``retry`` with filters shows what it will re-drive and asks first (or ``--yes``); ``status
--csv`` and ``--by-customer``; the ids ``retry`` needs in the tables; ``plan --all --csv`` keeps the left-alone rows."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError

from d365_migration.cli import main
from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState, seed_world
from tests.steps._world import Tenant, detect, env_for, queue, service


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


@pytest.fixture
def braked(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[tuple[SandboxState, list[Tenant]]]:
    """Four customers detected in one run with a purchase brake of 1: three records parked ``blocked``."""
    monkeypatch.chdir(tmp_path)
    state = SandboxState()
    tenants = [Tenant(state) for _ in range(4)]
    with SandboxServer(state, SandboxConfig()) as server:
        for k, v in env_for(server.url, storage).items():
            monkeypatch.setenv(k, v)
        yield state, tenants


async def _detect_with_brake(url: str, storage: str) -> None:
    from d365_migration._rollout import RolloutStore, controls_from_settings

    async with service(url, storage) as svc:
        await RolloutStore(svc.ledger.table_client).change(
            lambda c: replace(c, max_purchases_per_run=1), by="tests", action="set", reason=None,
            defaults=controls_from_settings(svc.settings))
        report = await detect(svc)
    assert report.braked == 3


def purchase_queue_count(storage: str) -> int:
    with queue(storage, "purchase-new") as q:
        try:
            return int(q.get_queue_properties().approximate_message_count)
        except ResourceNotFoundError:
            return 0


def test_retry_by_filter_shows_asks_and_re_drives(braked: Any, storage: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    _state, tenants = braked
    import os

    asyncio.run(_detect_with_brake(os.environ["PARTNER_CENTER_ENDPOINT"], storage))
    code, text = cli("status", "--csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    blocked = [r for r in rows if r["state"] == "blocked"]
    assert code == 0 and len(rows) == 4 and len(blocked) == 3
    assert all(r["reasonCode"] == "purchase_brake" and r["retry"].endswith(r["record"]) for r in blocked)

    # without --yes and without a terminal: shows what it would re-drive, re-drives nothing
    code, text = cli("retry", "--state", "blocked", "--reason-code", "purchase_brake")
    assert code == 2 and "--yes" in capsys.readouterr().err
    for r in blocked:
        assert r["record"] in text
    assert purchase_queue_count(storage) == 0

    # one customer only
    one = blocked[0]["customerId"]
    code, text = cli("retry", "--customer", one, "--yes")
    assert code == 0 and text.count("re-driven ") == 1 and one in text
    # the rest, by reason code
    code, text = cli("retry", "--reason-code", "purchase_brake", "--yes")
    assert code == 0 and text.count("re-driven ") == 2
    assert purchase_queue_count(storage) == 3
    states = {r["state"] for r in csv.DictReader(io.StringIO(cli("status", "--csv")[1]))}
    assert "blocked" not in states

    code, text = cli("status", "--by-customer", "--csv")
    per_customer = list(csv.DictReader(io.StringIO(text)))
    assert code == 0 and {r["customerId"] for r in per_customer} == {t.customer_id for t in tenants}
    assert all(int(r["blocked"]) == 0 for r in per_customer)


def test_status_by_customer_names_the_filter_that_re_drives_it(braked: Any, storage: str) -> None:
    import os

    asyncio.run(_detect_with_brake(os.environ["PARTNER_CENTER_ENDPOINT"], storage))
    code, text = cli("status", "--by-customer", "--json")
    rows = json.loads(text)
    assert code == 0 and sum(r["blocked"] for r in rows) == 3
    for r in rows:
        assert (r["retry"] == f"python -m d365_migration retry --customer {r['customerId']}") == (r["blocked"] > 0)
    code, text = cli("status")
    assert code == 0
    for t in braked[1]:
        assert f"{t.customer_id}/{t.subscription_id}" in text  # the table shows the ids retry takes


def test_retry_needs_a_record_or_filters(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AzureWebJobsStorage", storage)
    assert cli("retry")[0] == 2
    assert "--state" in capsys.readouterr().err


@pytest.fixture
def seeded(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[tuple[SandboxServer, Any]]:
    monkeypatch.chdir(tmp_path)
    state = SandboxState()
    manifest = seed_world(state, customers=5, seed=4, today=datetime.now(UTC).date())
    with SandboxServer(state, SandboxConfig()) as server:
        for k, v in env_for(server.url, storage).items():
            monkeypatch.setenv(k, v)
        yield server, manifest


def test_plan_all_csv_includes_the_left_alone_rows(seeded: Any) -> None:
    code, text = cli("plan", "--all", "--json")
    plan = json.loads(text)
    assert code == 0 and plan["leftAlone"]
    code, text = cli("plan", "--all", "--csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    left = [r for r in rows if r["action"].startswith("leave alone: ")]
    assert len(rows) == len(plan["migrations"]) + len(plan["leftAlone"])
    assert {(r["subscriptionId"], r["action"]) for r in left} == {
        (x["subscriptionId"], f"leave alone: {x['reason']}") for x in plan["leftAlone"]}
    assert len(list(csv.DictReader(io.StringIO(cli("plan", "--csv")[1])))) == len(plan["migrations"])


def test_plan_shows_the_quantity_policy_and_what_it_buys(seeded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server, manifest = seeded
    code, text = cli("plan", "--json")
    plan = json.loads(text)
    assert code == 0 and plan["quantityPolicy"] == "old_quantity"
    assert all(m["quantityToBuy"] == m["quantity"] for m in plan["migrations"])
    monkeypatch.setenv("REPLACEMENT_QUANTITY_POLICY", "license_holders")
    plan = json.loads(cli("plan", "--json")[1])
    assert plan["quantityPolicy"] == "license_holders" and "one seat per user" in plan["quantityPolicyText"]
    state = server.state
    holders = {em.subscription_id.lower(): sum(em.old_sku_id.lower() in {x.lower() for x in state.user_licenses(
        em.customer_id, u["id"])} for u in state.users(em.customer_id)) for em in manifest.expected}
    for m in plan["migrations"]:
        # one seat per holder (never fewer, at least 1), or the old quantity when the holders cannot be told apart
        assert m["quantityToBuy"] in (max(1, holders[m["subscriptionId"]]), m["quantity"]), m
    assert any(m["quantityToBuy"] != m["quantity"] for m in plan["migrations"])  # the policy changed something
    code, table = cli("plan")
    assert code == 0 and "REPLACEMENT_QUANTITY_POLICY=license_holders" in table and "to buy" in table


def test_plan_takes_the_rollout_scope_from_the_stored_controls(seeded: Any, storage: str) -> None:
    """The app settings are only first-deploy defaults: with controls stored in the ledger, `plan` says in scope
    exactly who the purchase step would buy for."""
    from d365_migration._ledger import MigrationLedger
    from d365_migration._rollout import RolloutStore, controls_from_settings
    from d365_migration._settings import Settings

    plan = json.loads(cli("plan", "--json")[1])
    customers = sorted({m["customerId"] for m in plan["migrations"]})
    assert len(customers) >= 2
    chosen = customers[0]

    async def store_allowlist() -> None:
        ledger = MigrationLedger.from_connection_string(storage)
        try:
            await RolloutStore(ledger.table_client).change(
                lambda c: replace(c, live=True, allowlist=frozenset({chosen.lower()}), all_customers=False),
                by="tests", action="set", reason=None, defaults=controls_from_settings(Settings.from_env()))
        finally:
            ledger.close()

    asyncio.run(store_allowlist())
    plan = json.loads(cli("plan", "--json")[1])
    skipped = {m["customerId"] for m in plan["migrations"] if m["action"] == "skip: customer not in scope"}
    assert skipped == set(customers) - {chosen}
