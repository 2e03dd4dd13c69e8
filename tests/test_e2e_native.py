"""A mixed tenant end to end through the local host: some customers have Partner Center's native transition with
license transfer, the others only the runbook (MIGRATION_PATH_POLICY=prefer_native). The sandbox's own state is
checked independently afterwards (``verify_world``: one move or one purchase per migration, every user on the new
SKU, every old subscription suspended, nothing else touched)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from d365_migration import Settings
from d365_migration._app import read_records
from d365_tooling.demo import run_pipeline, verify_world
from d365_tooling.golive import go_live_for_every_customer
from d365_tooling.sandbox import DEMO_REPLACEMENT_OFFERS, SandboxConfig, SandboxServer, SandboxState, seed_world
from d365_tooling.sandbox._transitions import native_operations

HOST = {"maxPollingInterval": 0.2, "visibilityTimeout": 0.5}


async def test_mixed_tenant_native_and_runbook(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    state = SandboxState()
    manifest = seed_world(state, customers=6, seed=11, today=datetime.now(UTC).date())
    for cid, uid in manifest.users_without_usage_location:
        state.set_usage_location(cid, uid, "US")
    initial = {s["id"].lower(): s["status"] for cid in manifest.customers for s in state.subscriptions(cid)}
    # Customers with a pooled SKU (another subscription grants the same product) stay on the runbook: a native move
    # carries every holder of the SKU, which is a different question (not this test's).
    pooled = {p.customer_id.lower() for p in manifest.pooled}
    candidates = sorted({em.customer_id.lower() for em in manifest.expected} - pooled)
    native_customers = set(candidates[::2])
    assert native_customers and set(candidates) - native_customers
    config = SandboxConfig(provisioning_delay_s=0.5, list_lag_s=0.5, native_completion_s=0.5,
                           native_paths={c: "transition_with_license_transfer" for c in native_customers})
    with SandboxServer(state, config) as server:
        env = {"PARTNER_CENTER_ENDPOINT": server.url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
               "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS), "AzureWebJobsStorage": storage,
               "PROVISIONING_POLL_SECONDS": "1", "DETECT_SCHEDULE": "0 0 6 * * *",
               "PARTNER_CENTER_REQUESTS_PER_MINUTE": "6000", "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "6000",
               "MIGRATION_PATH_POLICY": "prefer_native"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        settings = Settings.from_env()
        go_live_for_every_customer(storage)  # DRY_RUN=false alone does not go live: the stored controls decide
        await run_pipeline(settings, env, timeout=120, host_overrides=HOST)
        records = await read_records(settings)
        assert {r.state for r in records} == {"completed"}, [(r.offer_name, r.state, r.history[-3:]) for r in records
                                                             if r.state != "completed"]
        assert verify_world(state, manifest, records, initial, DEMO_REPLACEMENT_OFFERS) == []
        paths = {r.subscription_id.lower(): (r.customer_id.lower(), r.migration_path) for r in records}
        assert {p for c, p in paths.values() if c in native_customers} == {"native_transition"}
        assert {p for c, p in paths.values() if c not in native_customers} == {"runbook"}
        moved = {op["from_subscription_id"].lower() for op in native_operations(state)}
        assert moved == {s for s, (c, _) in paths.items() if c in native_customers}
        bought = {p["customer_id"].lower() for p in state.purchases() if p.get("via") != "by_hand"}
        assert bought and not bought & native_customers
