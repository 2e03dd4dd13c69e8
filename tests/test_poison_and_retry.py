"""Poison handling and operator re-drive, through the local host (the app's real function folders) over Azurite.

* A message that can never succeed goes to ``<queue>-poison`` on its FIRST delivery, with the reason, and never
  reaches Partner Center.
* A message that fails on every delivery ends in ``<queue>-poison`` after ``maxDequeueCount`` deliveries, and its
  ledger record is ``failed`` with the last error.
* ``python -m d365_migration retry <customer>/<subscription>`` re-drives a failed or blocked record once the cause
  is fixed; running it twice is harmless.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

import d365_migration._app as app_module
from d365_migration import Settings, build_service, run_step
from d365_migration._ledger import MigrationLedger, MigrationRecord, correlation_id_for
from d365_migration.cli import main
from d365_tooling.golive import go_live_for_every_customer
from d365_tooling.localhost import LocalHost
from d365_tooling.sandbox import (
    DEMO_REPLACEMENT_OFFERS,
    LEGACY_REPLACEMENT_OFFERS,
    RETIRED_OFFERS,
    SandboxServer,
    SandboxState,
    sku_for_offer,
)

APP_ROOT = Path(__file__).resolve().parent.parent
SALES = next(o for o in RETIRED_OFFERS if o.family == "sales" and o.audience == "commercial")
NEW_SKU = sku_for_offer(DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]).id.lower()  # type: ignore[union-attr]
NEW_SKU_LEGACY = sku_for_offer(LEGACY_REPLACEMENT_OFFERS["sales"]["commercial"]).id.lower()  # type: ignore[union-attr]
HOST = {"visibilityTimeout": 0.2, "maxPollingInterval": 0.2, "minPollingInterval": 0.05}
STEP_FUNCTIONS = ["purchase_new", "reassign_licenses", "suspend_old"]
QUEUES = {"purchase": "purchase-new", "reassign": "reassign-licenses", "suspend": "suspend-old"}


def guid() -> str:
    return str(uuid.uuid4())


def add_tenant(state: SandboxState, *, usage_location: str | None = "US") -> tuple[str, str, list[str]]:
    cid = guid()
    state.add_customer(cid, f"t{cid[:6]}.onmicrosoft.com", f"Tenant {cid[:6]}")
    users = []
    for i in range(2):
        uid = guid()
        state.add_user(cid, uid, f"user{i}.{uid[:4]}@t.example", "U", str(i), usage_location if i == 0 else "US",
                       [SALES.sku.id])
        users.append(uid)
    end = (datetime.now(UTC) + timedelta(days=20)).strftime("%Y-%m-%dT00:00:00Z")
    sub = state.add_subscription(cid, offer=SALES, quantity=3, commitment_end=end)
    return cid, sub.id.lower(), users


def env_for(url: str, storage: str, **overrides: str) -> dict[str, str]:
    env = {
        "PARTNER_CENTER_ENDPOINT": url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
        "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS), "AzureWebJobsStorage": storage,
        "PARTNER_CENTER_REQUESTS_PER_MINUTE": "100000", "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "100000",
        "PROVISIONING_POLL_SECONDS": "1", "DETECT_SCHEDULE": "0 0 6 * * *",
    }
    env.update(overrides)
    if env["DRY_RUN"] == "false" and not env.get("CUSTOMER_ALLOWLIST"):
        go_live_for_every_customer(storage)
    return env


def queue(storage: str, name: str) -> QueueClient:
    return QueueClient.from_connection_string(storage, name, message_encode_policy=TextBase64EncodePolicy(),
                                              message_decode_policy=TextBase64DecodePolicy())


def drain(storage: str, name: str) -> list[str]:
    q = queue(storage, name)
    try:
        out = []
        while True:
            batch = list(q.receive_messages(max_messages=32, visibility_timeout=60))
            if not batch:
                return out
            out += [m.content for m in batch]
    except Exception:
        return out
    finally:
        q.close()


def step_body(step: str, cid: str, sid: str, **changes: Any) -> str:
    body: dict[str, Any] = {"schemaVersion": 1, "step": step, "customerId": cid, "subscriptionId": sid,
                            "correlationId": correlation_id_for(cid, sid), "poll": 0}
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...})


@pytest.fixture
def sandbox_state() -> SandboxState:
    return SandboxState()


@pytest.fixture
def server(sandbox_state: SandboxState) -> Iterator[SandboxServer]:
    with SandboxServer(sandbox_state) as srv:
        yield srv


async def records(storage: str) -> list[MigrationRecord]:
    ledger = MigrationLedger.from_connection_string(storage)
    try:
        return await ledger.list_records()
    finally:
        ledger.close()


async def cli(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = io.StringIO()
    code = await asyncio.to_thread(main, list(argv), out)
    return code, out.getvalue()


class Injected:
    """A service for the host's event loop built with fast client retries, so a fault that fails every attempt
    costs milliseconds instead of the production back-off (the client itself is unchanged)."""

    @staticmethod
    def install(env: dict[str, str]) -> Any:
        service = build_service(Settings.from_env(env), max_attempts=1)
        app_module._services[asyncio.get_running_loop()] = service
        return service


async def open_host(storage: str, env: dict[str, str], functions: list[str]) -> LocalHost:
    return LocalHost(APP_ROOT, connection_string=storage, env=env, host_overrides=HOST, functions=functions)


# ------------------------------------------------------------------------------------------- malformed input


def malformed_bodies(step: str) -> dict[str, str]:
    cid, sid = guid(), guid()
    other = {"purchase": "reassign", "reassign": "suspend", "suspend": "purchase"}[step]
    return {
        "not JSON": "this is {not json",
        "JSON but not an object": "[1, 2, 3]",
        "unknown schemaVersion": step_body(step, cid, sid, schemaVersion=2),
        "missing customerId": step_body(step, cid, sid, customerId=...),
        "mistyped subscriptionId": step_body(step, cid, sid, subscriptionId=12345),
        "mistyped poll": step_body(step, cid, sid, poll="1"),
        "non-GUID id": step_body(step, "../../v1/customers", sid),
        "wrong step for this queue": step_body(other, cid, sid),
        "no ledger record": step_body(step, cid, sid),
    }


EXPECTED_REASON = {
    "not JSON": "not JSON",
    "JSON but not an object": "not a JSON object",
    "unknown schemaVersion": "schemaVersion",
    "missing customerId": "customerId",
    "mistyped subscriptionId": "subscriptionId",
    "mistyped poll": "poll",
    "non-GUID id": "customerId must be a GUID",
    "wrong step for this queue": "arrived on the",
    "no ledger record": "no ledger record",
}


@pytest.mark.parametrize("step", ["purchase", "reassign", "suspend"])
async def test_malformed_messages_are_poisoned_on_first_delivery_without_calling_partner_center(
        server: SandboxServer, storage: str, step: str) -> None:
    env = env_for(server.url, storage)
    cases = malformed_bodies(step)
    name = QUEUES[step]
    q = queue(storage, name)
    q.create_queue()
    for body in cases.values():
        q.send_message(body)
    q.close()
    fn = {"purchase": "purchase_new", "reassign": "reassign_licenses", "suspend": "suspend_old"}[step]
    async with await open_host(storage, env, [fn]) as host:
        report = await host.run(timeout=20, idle_seconds=0.6)
    stats = report.functions[fn]
    # each message was delivered exactly once: no retries, no host-level poisoning
    assert stats.invocations == len(cases) and stats.failures == 0 and stats.poisoned == 0, report.to_dict()
    poisoned = [json.loads(b) for b in drain(storage, f"{name}-poison")]
    assert len(poisoned) == len(cases)
    by_body = {p["body"]: p for p in poisoned}
    for label, body in cases.items():
        entry = by_body[body]
        assert entry["queue"] == name
        assert EXPECTED_REASON[label] in entry["reason"], (label, entry["reason"])
    assert drain(storage, name) == []
    assert server.state.requests() == []  # Partner Center never called


async def test_oversize_message_is_poisoned_with_its_size_and_a_truncated_body() -> None:
    # Bigger than any real message (a base64 queue message cannot even carry it): refused before parsing.
    body = b'{"schemaVersion":1,"pad":"' + b"x" * (60 * 1024) + b'"}'
    for step in ("purchase", "reassign", "suspend"):
        outputs = await run_step(step, body, 1)  # type: ignore[arg-type]
        assert outputs.poison is not None and outputs.messages == {}
        entry = json.loads(outputs.poison)
        assert "bytes" in entry["reason"] and "limit" in entry["reason"]
        assert len(entry["body"]) <= 4096
    assert len(app_module._services) == 0  # the service (and so Partner Center) was never even built


# ------------------------------------------------------------------------------- failing on every delivery


async def test_message_failing_every_delivery_is_poisoned_and_its_record_marked_failed_then_retry_completes(
        server: SandboxServer, storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cid, sid, _users = add_tenant(server.state)
    env = env_for(server.url, storage)
    async with await open_host(storage, env, ["detect_expiring", "scan_customers"]) as host:
        await host.fire_timer("detect_expiring")
        await host.run(timeout=20, idle_seconds=0.5)
    # detection queued the purchase; now Partner Center fails every call
    server.config.faults.error_rate = 1.0
    before = len(server.state.requests())
    async with await open_host(storage, env, STEP_FUNCTIONS) as host:
        Injected.install(env)
        report = await host.run(timeout=30, idle_seconds=0.6)
    stats = report.functions["purchase_new"]
    assert stats.invocations == 5 and stats.failures == 5 and stats.poisoned == 1, report.to_dict()
    poisoned = drain(storage, "purchase-new-poison")
    assert len(poisoned) == 1 and json.loads(poisoned[0])["subscriptionId"] == sid
    (record,) = await records(storage)
    assert record.state == "failed"
    assert record.reason is not None and "ServerError" in record.reason and "800003" in record.reason
    assert record.history[-1]["event"] == "purchase_gave_up"
    assert server.state.purchases() == [] and len(server.state.requests()) > before

    # the cause is fixed; the operator re-drives the record
    server.config.faults.error_rate = 0.0
    code, text = await cli(env, monkeypatch, "retry", f"{cid}/{sid}")
    assert code == 0 and "failed → detected" in text and "purchase-new" in text, text
    app_module._services.clear()
    async with await open_host(storage, env, STEP_FUNCTIONS) as host:
        report = await host.run(timeout=30, idle_seconds=0.8)
    assert report.failures == 0 and report.poisoned == 0, report.to_dict()
    (record,) = await records(storage)
    assert record.state == "completed", record.reason
    assert len(server.state.purchases()) == 1
    assert server.state.subscription(cid, sid)["status"] == "suspended"

    # a second retry is harmless: nothing to re-drive, nothing queued, nothing bought
    code, text = await cli(env, monkeypatch, "retry", f"{cid}/{sid}")
    assert code == 0 and "nothing to re-drive" in text, text
    assert drain(storage, "purchase-new") == []
    assert len(server.state.purchases()) == 1


async def test_blocked_record_is_re_driven_after_the_fix_and_retry_twice_is_safe(
        server: SandboxServer, storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cid, sid, users = add_tenant(server.state, usage_location=None)
    env = env_for(server.url, storage)
    async with await open_host(storage, env, ["detect_expiring", "scan_customers", *STEP_FUNCTIONS]) as host:
        await host.fire_timer("detect_expiring")
        report = await host.run(timeout=30, idle_seconds=0.8)
    assert report.failures == 0, report.to_dict()
    (record,) = await records(storage)
    assert record.state == "blocked" and "usage location" in (record.reason or "")
    assert server.state.subscription(cid, sid)["status"] == "active"

    # the partner fixes the user; two operators both run retry
    server.state.set_usage_location(cid, users[0], "US")
    first = await cli(env, monkeypatch, "retry", f"{cid}/{sid}")
    second = await cli(env, monkeypatch, "retry", f"{cid.upper()}/{sid.upper()}")
    assert first[0] == 0 and "blocked → reassigning" in first[1] and "reassign-licenses" in first[1], first
    assert second[0] == 0 and "nothing to re-drive" in second[1], second
    app_module._services.clear()
    async with await open_host(storage, env, STEP_FUNCTIONS) as host:
        report = await host.run(timeout=30, idle_seconds=0.8)
    assert report.failures == 0 and report.poisoned == 0, report.to_dict()
    (record,) = await records(storage)
    assert record.state == "completed", record.reason
    assert len(server.state.purchases()) == 1
    for uid in users:
        assert server.state.user_licenses(cid, uid) == [NEW_SKU]
    assert server.state.subscription(cid, sid)["status"] == "suspended"
    assert len(server.state.patches()) == 1


async def test_retry_of_an_unknown_record_says_so(server: SandboxServer, storage: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_for(server.url, storage)
    code, text = await cli(env, monkeypatch, "retry", f"{guid()}/{guid()}")
    assert code == 2 and "no record" in text


async def test_retry_after_a_rejected_order_uses_the_fixed_replacement_mapping(
        server: SandboxServer, storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cid, sid, users = add_tenant(server.state)
    # a typo'd mapping: sales.commercial points at an offer Partner Center no longer sells (403, code 2091)
    wrong = {"sales": {"commercial": SALES.id}}
    env = env_for(server.url, storage, REPLACEMENT_OFFERS=json.dumps(wrong))
    async with await open_host(storage, env, ["detect_expiring", "scan_customers", *STEP_FUNCTIONS]) as host:
        await host.fire_timer("detect_expiring")
        await host.run(timeout=30, idle_seconds=0.8)
    (record,) = await records(storage)
    assert record.state == "failed" and "2091" in (record.reason or "")
    assert server.state.purchases() == []

    # the operator fixes the mapping and re-drives the record
    fixed = env_for(server.url, storage, REPLACEMENT_OFFERS=json.dumps(LEGACY_REPLACEMENT_OFFERS))
    code, text = await cli(fixed, monkeypatch, "retry", f"{cid}/{sid}")
    assert code == 0, text
    app_module._services.clear()

    async def final() -> bool:
        return all(r.state in ("completed", "blocked", "failed") for r in await records(storage))

    async with await open_host(storage, fixed, STEP_FUNCTIONS) as host:
        await host.run(until=final, timeout=7, idle_seconds=None)  # a working re-drive needs ~2 s
    (record,) = await records(storage)
    assert record.state == "completed", (record.state, record.reason, record.replacement_offer_id)
    (purchase,) = server.state.purchases()
    assert str(purchase["offer_id"]).lower() == LEGACY_REPLACEMENT_OFFERS["sales"]["commercial"].lower()
    for uid in users:
        assert server.state.user_licenses(cid, uid) == [NEW_SKU_LEGACY]
