"""Rollout controls (issue 11 item 1): kept in the ledger's table on real Azurite, changed through the real CLI, every
change audited; app settings are only the first-deploy defaults; going live for everyone needs --all-customers."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from azure.data.tables import TableServiceClient
from azure.storage.queue import BinaryBase64DecodePolicy, QueueClient

from d365_migration._ledger import MigrationLedger, MigrationRecord
from d365_migration._rollout import RolloutStore, load_effective_controls
from d365_migration._settings import Settings
from d365_migration.cli import main

A = "11111111-1111-1111-1111-111111111111"
B = "22222222-2222-2222-2222-222222222222"
C = "33333333-3333-3333-3333-333333333333"


@pytest.fixture
def env(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> str:
    monkeypatch.chdir(tmp_path)  # no local.settings.json from the checkout
    for name in ("DRY_RUN", "CUSTOMER_ALLOWLIST", "CUSTOMER_DENYLIST", "MAX_PURCHASES_PER_RUN", "LEDGER_TABLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AzureWebJobsStorage", storage)
    monkeypatch.setenv("PARTNER_CENTER_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("PARTNER_CENTER_AUTH", "none")
    return storage


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def show() -> dict[str, Any]:
    code, text = cli("rollout", "show", "--json")
    assert code == 0
    doc: dict[str, Any] = json.loads(text)
    return doc


def store_for(storage: str) -> RolloutStore:
    return RolloutStore(MigrationLedger.from_connection_string(storage).table_client)


def rollout_rows(storage: str) -> list[dict[str, Any]]:
    with TableServiceClient.from_connection_string(storage) as service:
        if "migrations" not in {t.name for t in service.list_tables()}:
            return []
        table = service.get_table_client("migrations")
        return list(table.query_entities("PartitionKey eq 'rollout'"))


def test_show_with_nothing_stored_reports_the_app_settings_and_writes_nothing(
        env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRY_RUN", "true")
    monkeypatch.setenv("CUSTOMER_ALLOWLIST", f"{A},{B}")
    monkeypatch.setenv("MAX_PURCHASES_PER_RUN", "7")
    doc = show()
    controls = doc["controls"]
    assert controls["source"] == "app-settings"
    assert controls["mode"] == "dry-run" and controls["mayPurchase"] is False
    assert controls["allowlist"] == sorted([A, B]) and controls["customers"] == "allow-list"
    assert controls["maxPurchasesPerRun"] == 7
    assert doc["audit"] == []
    assert rollout_rows(env) == []  # read-only


def test_going_live_with_an_empty_allowlist_needs_all_customers(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = cli("rollout", "set", "--live", "--by", "alice")
    assert code == 2
    err = capsys.readouterr().err
    assert "--all-customers" in err and "empty allow-list" in err
    assert rollout_rows(env) == []  # nothing stored, nothing audited
    assert show()["controls"]["mode"] == "dry-run"

    code, text = cli("rollout", "set", "--live", "--all-customers", "--by", "alice", "--reason", "go-live ticket 42")
    assert code == 0, text
    controls = show()["controls"]
    assert controls["mode"] == "live" and controls["customers"] == "all" and controls["mayPurchase"] is True
    assert controls["source"] == "stored" and controls["changedBy"] == "alice"


def test_allowlist_and_all_customers_are_exclusive_and_naming_customers_ends_all(
        env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("rollout", "set", "--live", "--all-customers", "--by", "alice")[0] == 0
    code, _ = cli("rollout", "set", "--all-customers", "--allow", A, "--by", "bob")
    assert code == 2 and "not both" in capsys.readouterr().err
    assert show()["controls"]["customers"] == "all"  # the refused change left the controls alone

    assert cli("rollout", "set", "--allow", A, B, "--by", "bob")[0] == 0
    controls = show()["controls"]
    assert controls["customers"] == "allow-list" and controls["allowlist"] == sorted([A, B])
    assert cli("rollout", "set", "--disallow", B, "--by", "bob")[0] == 0
    assert show()["controls"]["allowlist"] == [A]
    # removing the last customer while live would mean "everyone": refused
    code, _ = cli("rollout", "set", "--disallow", A, "--by", "bob")
    assert code == 2 and "--all-customers" in capsys.readouterr().err
    assert show()["controls"]["allowlist"] == [A]


def test_bad_customer_id_is_refused_with_the_value(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = cli("rollout", "set", "--allow", "not-a-guid", "--by", "alice")
    assert code == 2 and "'not-a-guid' is not a customer tenant id" in capsys.readouterr().err
    assert rollout_rows(env) == []


def test_every_change_is_audited_with_who_what_and_when(env: str) -> None:
    assert cli("rollout", "set", "--allow", A, "--by", "alice", "--reason", "pilot customer")[0] == 0
    assert cli("rollout", "set", "--live", "--by", "bob")[0] == 0
    assert cli("rollout", "set", "--max-purchases", "3", "--by", "carol")[0] == 0
    code, text = cli("rollout", "audit", "--json")
    assert code == 0
    audit = json.loads(text)
    assert [e["by"] for e in audit] == ["carol", "bob", "alice"]  # newest first
    assert audit[2]["before"] is None and audit[2]["after"]["allowlist"] == [A]
    assert audit[2]["reason"] == "pilot customer"
    assert audit[1]["before"]["mode"] == "dry-run" and audit[1]["after"]["mode"] == "live"
    assert audit[0]["before"]["maxPurchasesPerRun"] == 50 and audit[0]["after"]["maxPurchasesPerRun"] == 3
    assert all(e["at"] for e in audit)
    code, text = cli("rollout", "audit")
    assert "carol" in text and "maxPurchasesPerRun: 50 -> 3" in text
    # the audit rows are separate entities next to the controls row, never rewritten
    kinds = sorted(r["Kind"] for r in rollout_rows(env))
    assert kinds == ["rollout", "rollout-audit", "rollout-audit", "rollout-audit"]


def test_stored_controls_win_over_app_settings(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("rollout", "set", "--allow", A, "--max-purchases", "3", "--by", "alice")[0] == 0
    # a re-deploy (or a portal edit) now sets wide-open app settings
    monkeypatch.setenv("DRY_RUN", "false")
    monkeypatch.setenv("CUSTOMER_ALLOWLIST", B)
    monkeypatch.setenv("MAX_PURCHASES_PER_RUN", "99")
    controls = asyncio.run(load_effective_controls(store_for(env), Settings.from_env()))
    assert controls.source == "stored"
    assert controls.dry_run and not controls.may_purchase
    assert controls.allowlist == frozenset({A}) and controls.max_purchases_per_run == 3
    assert controls.customer_in_scope(A) and not controls.customer_in_scope(B)
    assert show()["controls"]["allowlist"] == [A]


def test_app_settings_are_stored_on_first_use_then_ignored(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRY_RUN", "false")
    monkeypatch.setenv("CUSTOMER_ALLOWLIST", A)
    monkeypatch.setenv("MAX_PURCHASES_PER_RUN", "5")
    monkeypatch.setenv("CUSTOMER_DENYLIST", B)
    controls = asyncio.run(load_effective_controls(store_for(env), Settings.from_env(), actor="app:test"))
    assert controls.source == "stored" and controls.live and controls.allowlist == frozenset({A})
    assert controls.max_purchases_per_run == 5
    audit = show()["audit"]
    assert len(audit) == 1 and audit[0]["action"] == "seeded from app settings" and audit[0]["by"] == "app:test"
    # later settings no longer matter; the deny-list (which only narrows) still applies
    monkeypatch.setenv("CUSTOMER_ALLOWLIST", C)
    monkeypatch.setenv("DRY_RUN", "true")
    again = asyncio.run(load_effective_controls(store_for(env), Settings.from_env()))
    assert again.live and again.allowlist == frozenset({A}) and again.version == controls.version
    assert again.denylist == frozenset({B}) and not again.customer_in_scope(B)
    assert len(show()["audit"]) == 1


def test_first_deploy_defaults_never_mean_live_for_everyone(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRY_RUN", "false")  # with no CUSTOMER_ALLOWLIST
    controls = asyncio.run(load_effective_controls(store_for(env), Settings.from_env()))
    assert controls.dry_run and not controls.may_purchase and not controls.all_customers
    assert controls.note and "--all-customers" in controls.note
    assert show()["controls"]["mode"] == "dry-run"


def test_pause_stops_purchases_and_resume_requeues_waiting_records(env: str) -> None:
    assert cli("rollout", "set", "--live", "--allow", A, "--by", "alice")[0] == 0
    ledger = MigrationLedger.from_connection_string(env)
    for sub in ("a0000000-0000-0000-0000-000000000001", "a0000000-0000-0000-0000-000000000002"):
        asyncio.run(ledger.create_if_absent(MigrationRecord(customer_id=A, subscription_id=sub)))
    code, text = cli("rollout", "pause", "--by", "bob", "--reason", "wrong replacement id")
    assert code == 0 and "PAUSED" in text
    controls = show()["controls"]
    assert controls["paused"] is True and controls["pauseReason"] == "wrong replacement id"
    assert controls["mayPurchase"] is False and controls["mode"] == "live"

    code, text = cli("rollout", "resume", "--by", "bob")
    assert code == 0 and "re-queued 2 record(s)" in text
    assert show()["controls"]["mayPurchase"] is True
    queue = QueueClient.from_connection_string(env, "purchase-new", message_decode_policy=BinaryBase64DecodePolicy())
    bodies = [json.loads(m.content) for m in queue.receive_messages(max_messages=32)]
    assert {b["step"] for b in bodies} == {"purchase"}
    assert sorted(b["subscriptionId"] for b in bodies) == [
        "a0000000-0000-0000-0000-000000000001", "a0000000-0000-0000-0000-000000000002"]


def test_concurrent_changes_both_land_and_both_are_audited(env: str) -> None:
    from d365_migration._rollout import controls_from_settings

    settings = Settings.from_env()
    defaults = controls_from_settings(settings)

    async def both() -> None:
        s1, s2 = store_for(env), store_for(env)
        await asyncio.gather(
            s1.change(lambda c: c.__class__(**{**c.__dict__, "allowlist": c.allowlist | {A}}), by="one",
                      action="set", reason=None, defaults=defaults),
            s2.change(lambda c: c.__class__(**{**c.__dict__, "allowlist": c.allowlist | {B}}), by="two",
                      action="set", reason=None, defaults=defaults))

    asyncio.run(both())
    doc = show()
    assert doc["controls"]["allowlist"] == sorted([A, B]) and doc["controls"]["version"] == 2
    assert sorted(e["by"] for e in doc["audit"]) == ["one", "two"]
