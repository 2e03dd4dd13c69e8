"""``run`` tells the truth (issue 11 item 5), through the real CLI over Azurite and the sandbox: a dry run scans,
records and prints what going live would do; every run serves its own scan; the exit code is non-zero when detection
or a record failed; progress goes to stderr; unreachable storage or Partner Center is one line naming the setting."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.storage.queue import QueueServiceClient

from d365_migration.cli import main
from d365_tooling.golive import go_live_for_every_customer
from d365_tooling.sandbox import DEMO_REPLACEMENT_OFFERS, SandboxConfig, SandboxServer, SandboxState, seed_world
from tests.steps._world import Tenant


@pytest.fixture
def world() -> Iterator[tuple[SandboxServer, Any]]:
    state = SandboxState()
    manifest = seed_world(state, customers=4, seed=3, today=datetime.now(UTC).date())
    for cid, uid in manifest.users_without_usage_location:
        state.set_usage_location(cid, uid, "US")
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=0.3, list_lag_s=0.3)) as server:
        yield server, manifest


@pytest.fixture
def cli_env(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)  # no local.settings.json from the checkout
    for k, v in {"PARTNER_CENTER_AUTH": "none", "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS),
                 "AzureWebJobsStorage": storage, "PROVISIONING_POLL_SECONDS": "1",
                 "PARTNER_CENTER_REQUESTS_PER_MINUTE": "6000",
                 "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "6000"}.items():
        monkeypatch.setenv(k, v)
    for name in ("DRY_RUN", "CUSTOMER_ALLOWLIST", "MAX_PURCHASES_PER_RUN", "LEDGER_TABLE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def queue_counts(storage: str) -> dict[str, int]:
    with QueueServiceClient.from_connection_string(storage) as service:
        return {q.name: service.get_queue_client(q.name).get_queue_properties().approximate_message_count
                for q in service.list_queues()}


def test_dry_run_scans_records_and_prints_what_it_would_do(
        world: Any, storage: str, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    server, manifest = world
    cli_env.setenv("PARTNER_CENTER_ENDPOINT", server.url)
    code, text = run("run", "--timeout", "60")
    assert code == 0, (text, capsys.readouterr().err)
    assert "DRY RUN" in text and "would do" in text and text.count("buy ") >= 1
    for em in manifest.expected:
        assert f"{em.customer_id.lower()}/{em.subscription_id.lower()}" in text.lower()  # the ids retry needs
    code, status = run("status", "--json")
    assert {r["State"] for r in json.loads(status)} == {"detected"}
    assert len(json.loads(status)) == len(manifest.expected)
    assert all(n == 0 for n in queue_counts(storage).values())  # no scan message left behind
    assert server.state.purchases() == [] and server.state.patches() == []
    assert "progress:" in capsys.readouterr().err


def test_run_serves_its_own_scan_when_every_earlier_record_is_final(
        world: Any, storage: str, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    server, manifest = world
    cli_env.setenv("PARTNER_CENTER_ENDPOINT", server.url)
    go_live_for_every_customer(storage)
    code, text = run("run", "--timeout", "120")
    assert code == 0, (text, capsys.readouterr().err)
    # a new expiring subscription appears after every earlier record completed
    late = Tenant(server.state)
    code, text = run("run", "--timeout", "120")
    assert code == 0, (text, capsys.readouterr().err)
    records = json.loads(run("status", "--json")[1])
    assert len(records) == len(manifest.expected) + 1
    assert {r["State"] for r in records} == {"completed"}
    assert late.old_status() == "suspended"


def test_a_blocked_record_makes_run_exit_non_zero_with_the_retry_command(
        storage: str, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state = SandboxState()
    t = Tenant(state, usage_location=None)  # a holder without a usage location: the license move is refused
    with SandboxServer(state, SandboxConfig()) as server:
        cli_env.setenv("PARTNER_CENTER_ENDPOINT", server.url)
        go_live_for_every_customer(storage)
        code, text = run("run", "--timeout", "60")
    err = capsys.readouterr().err
    assert code == 1, (text, err)
    assert f"retry {t.customer_id}/{t.subscription_id}" in err and "blocked" in err


def test_failed_detection_makes_run_exit_non_zero(storage: str, cli_env: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    state = SandboxState()
    Tenant(state)
    config = SandboxConfig()
    config.apply_patch({"faults": {"error_rate": 1.0}})  # every Partner Center call answers 5xx
    with SandboxServer(state, config) as server:
        cli_env.setenv("PARTNER_CENTER_ENDPOINT", server.url)
        cli_env.setenv("AzureFunctionsJobHost__extensions__queues__maxDequeueCount", "1")
        code, text = run("run", "--timeout", "120")
    err = capsys.readouterr().err
    assert code == 1, (text, err)
    assert "detection failed" in err


def test_customers_detection_could_not_scan_make_run_exit_non_zero_naming_them(
        storage: str, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state = SandboxState()
    refused, fine = Tenant(state), Tenant(state)
    config = SandboxConfig(subscriptions_forbidden_customers=[refused.customer_id])  # 403 20002 on its subscriptions
    with SandboxServer(state, config) as server:
        cli_env.setenv("PARTNER_CENTER_ENDPOINT", server.url)
        code, text = run("run", "--timeout", "60")
    err = capsys.readouterr().err
    assert code == 1, (text, err)
    (line,) = [x for x in err.splitlines() if x.startswith("not scanned:")]
    assert f"customer {refused.customer_id}" in line and "20002" in line
    assert f"{fine.customer_id}/{fine.subscription_id}" in text.lower()  # the rest was scanned and recorded


@pytest.mark.parametrize("command", [["run", "--timeout", "30"], ["status"]])
def test_unreachable_storage_is_one_line_naming_the_setting(
        cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    cli_env.setenv("PARTNER_CENTER_ENDPOINT", "http://127.0.0.1:9")
    cli_env.setenv("AzureWebJobsStorage", "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey="
                   "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
                   "QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;TableEndpoint=http://127.0.0.1:9/devstoreaccount1;")
    code, _ = run(*command)
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "AzureWebJobsStorage" in lines[0] and "127.0.0.1:9" in lines[0], err
    assert "Traceback" not in err


def test_unreachable_partner_center_is_one_line_naming_the_setting(
        storage: str, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cli_env.setenv("PARTNER_CENTER_ENDPOINT", "http://127.0.0.1:9")
    code, _ = run("run", "--timeout", "30")
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "PARTNER_CENTER_ENDPOINT" in lines[0] and "127.0.0.1:9" in lines[0], err
    assert all(n == 0 for n in queue_counts(storage).values())  # nothing was started
