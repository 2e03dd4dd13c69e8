"""The whole chain, end to end: timer → scan-customers → purchase-new → reassign-licenses → suspend-old, served by
the local host over real Azurite against the sandbox over real HTTP; then the sandbox's state is checked
independently (``verify_world``)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from d365_migration import Settings
from d365_migration._app import read_records
from d365_migration.cli import main
from d365_tooling.demo import run_pipeline, verify_world
from d365_tooling.golive import go_live_for_every_customer
from d365_tooling.sandbox import (
    DEMO_REPLACEMENT_OFFERS,
    LEGACY_REPLACEMENT_OFFERS,
    SandboxConfig,
    SandboxServer,
    SandboxState,
    seed_world,
)

HOST = {"maxPollingInterval": 0.2, "visibilityTimeout": 0.5}


@pytest.fixture
def world() -> Iterator[tuple[SandboxServer, Any, dict[str, str]]]:
    state = SandboxState()
    manifest = seed_world(state, customers=6, seed=11, today=datetime.now(UTC).date())
    # the usage-location edge case is exercised elsewhere; here every migration must complete
    for cid, uid in manifest.users_without_usage_location:
        state.set_usage_location(cid, uid, "US")
    initial = {s["id"].lower(): s["status"] for cid in manifest.customers for s in state.subscriptions(cid)}
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=0.5, list_lag_s=0.5)) as server:
        yield server, manifest, initial


def _env(server: SandboxServer, storage: str, offers: dict[str, Any], **extra: str) -> dict[str, str]:
    if extra.get("DRY_RUN", "false") == "false":
        go_live_for_every_customer(storage)
    return {"PARTNER_CENTER_ENDPOINT": server.url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
            "REPLACEMENT_OFFERS": json.dumps(offers), "AzureWebJobsStorage": storage,
            "PROVISIONING_POLL_SECONDS": "1", "DETECT_SCHEDULE": "0 0 6 * * *",
            "PARTNER_CENTER_REQUESTS_PER_MINUTE": "6000", "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "6000",
            **extra}


@pytest.mark.parametrize("offers", [DEMO_REPLACEMENT_OFFERS, LEGACY_REPLACEMENT_OFFERS], ids=["nce-cart", "legacy"])
async def test_whole_chain_migrates_exactly_what_it_should(world: Any, storage: str, offers: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    server, manifest, initial = world
    env = _env(server, storage, offers)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings.from_env()
    await run_pipeline(settings, env, timeout=120, host_overrides=HOST)
    records = await read_records(settings)
    assert len(records) == len(manifest.expected)
    assert {r.state for r in records} == {"completed"}, [(r.offer_name, r.state, r.reason) for r in records]
    assert verify_world(server.state, manifest, records, initial, offers) == []
    path = "order" if offers is LEGACY_REPLACEMENT_OFFERS else "cart"
    assert {p["via"] for p in server.state.purchases()} == {path}


async def test_dry_run_records_but_changes_nothing(world: Any, storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server, manifest, _ = world
    env = _env(server, storage, DEMO_REPLACEMENT_OFFERS, DRY_RUN="true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings.from_env()
    assert settings.dry_run
    from d365_migration.cli import APP_ROOT
    from d365_tooling.localhost import LocalHost

    async with LocalHost(APP_ROOT, connection_string=storage, env=env, host_overrides=HOST) as host:
        await host.fire_timer("detect_expiring")
        report = await host.run(timeout=60, idle_seconds=1.0)
    assert report.functions["purchase_new"].invocations == 0
    records = await read_records(settings)
    assert {r.state for r in records} == {"detected"}
    assert len(records) == len(manifest.expected)
    assert server.state.purchases() == [] and server.state.patches() == [] and server.state.license_updates() == []


def test_cli_run_plan_and_status(world: Any, storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server, manifest, _ = world
    for k, v in _env(server, storage, DEMO_REPLACEMENT_OFFERS).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DETECT_SCHEDULE")  # a partner's shell will not have it; the default schedule applies
    out = io.StringIO()
    assert main(["plan", "--json"], out=out) == 0
    plan = json.loads(out.getvalue())
    assert {m["subscriptionId"] for m in plan["migrations"]} == manifest.expected_subscription_ids()
    assert all(m["action"] == "migrate" for m in plan["migrations"])
    assert server.state.purchases() == []  # plan is read-only

    out = io.StringIO()
    assert main(["plan", "--csv"], out=out) == 0
    assert out.getvalue().count("\n") == len(manifest.expected) + 1

    out = io.StringIO()
    assert main(["run", "--timeout", "120"], out=out) == 0
    assert "completed" in out.getvalue()
    out = io.StringIO()
    assert main(["status", "--json"], out=out) == 0
    assert {r["State"] for r in json.loads(out.getvalue())} == {"completed"}
