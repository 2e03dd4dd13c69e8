"""Every human-needed state raises the deployed alert (issue 11 item 6): blocked records, failed scan pages and a
paused run log the ``event=`` marker one of infra/app/alerts.bicep's rules queries, with the reason and the re-drive
command in the same line."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest

from d365_migration import _app
from d365_migration._messages import ScanMessage
from d365_migration._rollout import RolloutStore, controls_from_settings
from d365_tooling.sandbox import SandboxConfig, SandboxServer, SandboxState
from tests.steps._world import DEMO_REPLACEMENT_OFFERS, Tenant, detect, drive, env_for, service

ALERTS = Path(__file__).resolve().parent.parent / "infra" / "app" / "alerts.bicep"


def alerted_markers() -> set[str]:
    """The markers the deployed alert rules fire on."""
    return set(re.findall(r'message has "(event=[a-z_]+)"', ALERTS.read_text(encoding="utf-8")))


def alert_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    markers = alerted_markers()
    return [r.getMessage() for r in caplog.records if any(m in r.getMessage() for m in markers)]


def test_the_attention_marker_is_deployed() -> None:
    assert "event=needs_attention" in alerted_markers()


async def test_a_blocked_record_raises_the_alert_with_reason_and_retry(
        storage: str, caplog: pytest.LogCaptureFixture) -> None:
    state = SandboxState()
    t = Tenant(state)
    only_ce = {"customer_engagement": DEMO_REPLACEMENT_OFFERS["customer_engagement"]}
    with SandboxServer(state, SandboxConfig()) as server, caplog.at_level(logging.WARNING):
        async with service(server.url, storage, REPLACEMENT_OFFERS=json.dumps(only_ce)) as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
    (line,) = [x for x in alert_lines(caplog) if "event=needs_attention" in x]
    assert "REPLACEMENT_OFFERS" in line
    assert f"python -m d365_migration retry {t.customer_id}/{t.subscription_id}" in line


async def test_a_scan_page_failing_on_its_last_delivery_raises_the_alert(
        storage: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    state = SandboxState()
    Tenant(state)
    config = SandboxConfig()
    config.apply_patch({"faults": {"error_rate": 1.0}})
    with SandboxServer(state, config) as server:
        for k, v in env_for(server.url, storage).items():
            monkeypatch.setenv(k, v)
        body = ScanMessage(run_id="run-1", page=0, cursor=None).to_json().encode()
        with caplog.at_level(logging.WARNING):
            with pytest.raises(Exception):  # noqa: B017 - any failure: the host retries, then poisons
                await _app.run_scan(body, dequeue_count=1)
            assert alert_lines(caplog) == []  # not the last delivery: the host retries it
            with pytest.raises(Exception):  # noqa: B017
                await _app.run_scan(body, dequeue_count=_app.max_dequeue_count())
        await _app.get_service().aclose()
    (line,) = alert_lines(caplog)
    assert "event=message_poisoned" in line and "event=needs_attention" in line and "kind=scan_page_failed" in line
    assert "run=run-1" in line and "page=0" in line and "redrive=" in line and "detect_expiring" in line


async def test_a_paused_run_raises_the_alert_with_the_resume_command(
        storage: str, caplog: pytest.LogCaptureFixture) -> None:
    state = SandboxState()
    Tenant(state)
    with SandboxServer(state, SandboxConfig()) as server:
        async with service(server.url, storage) as svc:
            await RolloutStore(svc.ledger.table_client).change(
                lambda c: replace(c, paused=True, pause_reason="audit"), by="tests",
                action="pause", reason=None, defaults=controls_from_settings(svc.settings))
            with caplog.at_level(logging.WARNING):
                await detect(svc)
    (line,) = alert_lines(caplog)
    assert "event=needs_attention" in line and "'audit'" in line and "rollout resume" in line
