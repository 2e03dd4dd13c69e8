"""The ``status`` HTTP function through the local host, after a small real run (detect → purchase → reassign →
suspend over Azurite against the sandbox) that leaves one record completed, two blocked and one failed.

Names come from Partner Center, so one customer and its offer carry HTML that must come out escaped.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any

import pytest

import d365_migration._app as app_module
from d365_migration import APP_SETTINGS, ConfigurationError, MigrationLedger, MigrationRecord, Settings
from d365_migration._app import build_credential
from d365_tooling.localhost import LocalHost
from d365_tooling.sandbox import DEMO_REPLACEMENT_OFFERS, RETIRED_OFFERS, SandboxServer, SandboxState

REPO = Path(__file__).resolve().parent.parent
SALES = next(o for o in RETIRED_OFFERS if o.family == "sales" and o.audience == "commercial")
SALES_FACULTY = next(o for o in RETIRED_OFFERS if o.family == "sales" and o.audience == "faculty")
CE = next(o for o in RETIRED_OFFERS if o.family == "customer_engagement" and o.audience == "commercial")
EVIL_OFFER = "Dynamics 365 for Sales <script>alert('offer')</script> (Qualified Offer)"
EVIL_CUSTOMER = "Evil <img src=x onerror=alert(1)> & Co"


def add_tenant(state: SandboxState, offer: Any, *, name: str | None = None, offer_name: str | None = None,
               usage_location: str | None = "US") -> dict[str, str]:
    cid = str(uuid.uuid4())
    state.add_customer(cid, f"t{cid[:6]}.onmicrosoft.com", name or f"Tenant {cid[:6]}")
    uid = str(uuid.uuid4())
    upn = f"first.user.{uid[:4]}@t{cid[:6]}.example"
    state.add_user(cid, uid, upn, "First", "User", usage_location, [offer.sku.id])
    end = (datetime.now(UTC) + timedelta(days=20)).strftime("%Y-%m-%dT00:00:00Z")
    sub = state.add_subscription(cid, offer=offer, quantity=2, commitment_end=end, offer_id=offer.id,
                                 offer_name=offer_name or offer.name)
    return {"cid": cid, "sid": sub.id.lower(), "upn": upn}


@pytest.fixture
async def run(storage: str) -> AsyncIterator[dict[str, Any]]:
    """One small run; yields the host (still open), the tenants and the run report."""
    app_module._services.clear()
    state = SandboxState()
    tenants = {
        "completed": add_tenant(state, SALES),
        "evil_blocked": add_tenant(state, SALES, name=EVIL_CUSTOMER, offer_name=EVIL_OFFER, usage_location=None),
        "unmapped_blocked": add_tenant(state, SALES_FACULTY),
        "rejected_failed": add_tenant(state, CE),
    }
    # customer_engagement.commercial points at an offer Partner Center no longer sells: the order is rejected
    replacements = {"sales": {"commercial": DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]},
                    "customer_engagement": {"commercial": CE.id}}
    with SandboxServer(state) as server:
        env = {
            "PARTNER_CENTER_ENDPOINT": server.url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
            "REPLACEMENT_OFFERS": json.dumps(replacements), "PROVISIONING_POLL_SECONDS": "1",
            "DETECT_SCHEDULE": "0 0 6 * * *", "PARTNER_CENTER_REQUESTS_PER_MINUTE": "100000",
            "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "100000",
            # live for these customers (an empty allow-list is never "everyone" for the rollout controls)
            "CUSTOMER_ALLOWLIST": ",".join(t["cid"] for t in tenants.values()),
            # the partner lists one more retired offer by name (a name that happens to carry HTML)
            "RETIRED_OFFERS_EXTRA": json.dumps([{"name": EVIL_OFFER, "family": "sales", "audience": "commercial",
                                                 "channel": "CRMOL Basic", "offerIds": [], "skuPartNumbers": []}]),
        }
        async with LocalHost(REPO, connection_string=storage, env=env,
                             host_overrides={"visibilityTimeout": 0.2, "maxPollingInterval": 0.2}) as host:
            await host.fire_timer("detect_expiring")
            report = await host.run(timeout=30, idle_seconds=0.8)
            yield {"host": host, "tenants": tenants, "report": report, "state": state}
    app_module._services.clear()


async def status_json(host: LocalHost) -> dict[str, Any]:
    response = await host.call_http("status", params={"format": "json"})
    assert response.status_code == 200 and response.mimetype == "application/json"
    return json.loads(response.get_body())


async def test_json_has_counts_per_state_and_every_record_needing_attention(run: dict[str, Any]) -> None:
    assert run["report"].failures == 0, run["report"].to_dict()
    doc = await status_json(run["host"])
    assert doc["dryRun"] is False and doc["total"] == 4
    assert doc["counts"] == {"detected": 0, "purchasing": 0, "purchased": 0, "reassigning": 0, "reassigned": 0,
                             "completed": 1, "blocked": 2, "failed": 1, "cancelled": 0, "native_pending": 0,
                             "native_moving": 0}
    t = run["tenants"]
    attention = {a["subscriptionId"]: a for a in doc["attention"]}
    assert set(attention) == {t["evil_blocked"]["sid"], t["unmapped_blocked"]["sid"], t["rejected_failed"]["sid"]}
    for key, state, words in (("evil_blocked", "blocked", [t["evil_blocked"]["upn"], "usage location"]),
                              ("unmapped_blocked", "blocked", ["REPLACEMENT_OFFERS", "sales.faculty"]),
                              ("rejected_failed", "failed", ["2091", "no longer available"])):
        entry = attention[t[key]["sid"]]
        assert entry["state"] == state and entry["customerId"] == t[key]["cid"]
        for word in words:
            assert word in (entry["reason"] or ""), (key, entry["reason"])
        assert entry["retry"] == f"python -m d365_migration retry {t[key]['cid']}/{t[key]['sid']}"
    # the JSON carries names verbatim (escaping is the HTML page's job); Accept: application/json also works
    assert attention[t["evil_blocked"]["sid"]]["offerName"] == EVIL_OFFER
    by_accept = await run["host"].call_http("status", headers={"Accept": "application/json"})
    assert json.loads(by_accept.get_body())["counts"] == doc["counts"]
    states = {r["subscriptionId"]: r["state"] for r in doc["records"]}
    assert states[t["completed"]["sid"]] == "completed"


async def test_html_page_shows_counts_reasons_and_retry_commands_with_names_escaped(run: dict[str, Any]) -> None:
    response = await run["host"].call_http("status")
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_body().decode("utf-8")
    t = run["tenants"]
    # counts per state
    for state, n in (("completed", 1), ("blocked", 2), ("failed", 1)):
        assert re.search(rf"<b>{n}</b>{state}<", page), state
    assert "Needs attention (3)" in page and "All migrations (4)" in page
    # every record needing attention: its reason and its retry command
    doc = await status_json(run["host"])
    for entry in doc["attention"]:
        assert escape(entry["reason"]) in page
        assert escape(entry["retry"]) in page
    assert t["evil_blocked"]["upn"] in page
    # HTML in names is escaped, never live
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert escape(EVIL_OFFER) in page and escape(EVIL_CUSTOMER) in page
    assert "&lt;script&gt;alert(&#x27;offer&#x27;)&lt;/script&gt;" in page


async def test_dry_run_banner_and_empty_ledger(storage: str) -> None:
    app_module._services.clear()
    state = SandboxState()
    with SandboxServer(state) as server:
        env = {"PARTNER_CENTER_ENDPOINT": server.url, "PARTNER_CENTER_AUTH": "none", "DETECT_SCHEDULE": "0 0 6 * * *"}
        async with LocalHost(REPO, connection_string=storage, env=env, functions=["status"]) as host:
            doc = await status_json(host)
            page = (await host.call_http("status")).get_body().decode()
    app_module._services.clear()
    assert doc["dryRun"] is True and doc["total"] == 0 and doc["attention"] == []
    assert "DRY_RUN is on" in page and "Nothing needs attention" in page


async def test_rollout_controls_are_shown_and_stored_controls_decide_the_mode(storage: str) -> None:
    from d365_migration._ledger import MigrationLedger
    from d365_migration._rollout import RolloutStore, controls_from_settings
    from d365_migration._settings import Settings

    app_module._services.clear()
    customer = str(uuid.uuid4())
    reason = "wrong <b>replacement</b> id"
    env = {"PARTNER_CENTER_ENDPOINT": "http://127.0.0.1:9", "PARTNER_CENTER_AUTH": "none",
           "DETECT_SCHEDULE": "0 0 6 * * *", "DRY_RUN": "true"}
    store = RolloutStore(MigrationLedger.from_connection_string(storage).table_client)
    defaults = controls_from_settings(Settings.from_env({**env, "AzureWebJobsStorage": storage}))
    await store.change(lambda c: type(c)(**{**c.__dict__, "live": True, "allowlist": frozenset({customer}),
                                          "max_purchases_per_run": 4, "paused": True, "pause_reason": reason}),
                       by="alice", action="set", reason=None, defaults=defaults)
    async with LocalHost(REPO, connection_string=storage, env=env, functions=["status"]) as host:
        doc = await status_json(host)
        page = (await host.call_http("status")).get_body().decode()
    app_module._services.clear()
    rollout = doc["rollout"]
    assert rollout["source"] == "stored" and rollout["changedBy"] == "alice"
    assert rollout["live"] is True and rollout["paused"] is True and rollout["mayPurchase"] is False
    assert rollout["allowlist"] == [customer] and rollout["maxPurchasesPerRun"] == 4
    assert doc["dryRun"] is False  # the stored controls, not DRY_RUN=true, decide
    assert "Rollout controls" in page and customer in page and "at most 4 purchase(s)" in page
    assert "Paused: wrong &lt;b&gt;replacement&lt;/b&gt; id" in page and "<b>replacement" not in page


async def test_status_reads_the_ledger_with_no_partner_center_settings_or_credentials(
        storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page an operator needs when the Partner Center credential is broken must not depend on it: with no
    PARTNER_CENTER_* setting at all (so app-user auth has no client id, secret or refresh token), status still
    reads the ledger, and the Partner Center service is never built."""
    for name in APP_SETTINGS:
        if name.startswith("PARTNER_CENTER") or name == "KEY_VAULT_URL":
            monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError):  # what building the Partner Center side would do here
        build_credential(Settings.from_env({"AzureWebJobsStorage": storage}))
    cid, sid = str(uuid.uuid4()), str(uuid.uuid4())
    ledger = MigrationLedger.from_connection_string(storage)
    try:
        record, _ = await ledger.create_if_absent(MigrationRecord(cid, sid, offer_name="Dynamics 365 for Sales"))
        await ledger.save(record.transition("blocked", "no_replacement", "no REPLACEMENT_OFFERS entry"))
    finally:
        ledger.close()
    env = {"DETECT_SCHEDULE": "0 0 6 * * *", "DRY_RUN": "false", "CUSTOMER_ALLOWLIST": cid}
    async with LocalHost(REPO, connection_string=storage, env=env, functions=["status"]) as host:
        doc = await status_json(host)
        page = (await host.call_http("status")).get_body().decode()
    assert doc["total"] == 1 and doc["counts"]["blocked"] == 1 and doc["dryRun"] is False
    assert doc["attention"][0]["subscriptionId"] == sid and "REPLACEMENT_OFFERS" in doc["attention"][0]["reason"]
    assert "Needs attention (1)" in page
    assert len(app_module._services) == 0  # no Partner Center client, no credential


async def test_customers_the_latest_detection_run_could_not_scan_are_shown_until_a_run_reads_them(
        storage: str) -> None:
    """A customer whose subscriptions could not be read (403 20002) was not checked: the page says so, with the
    reason and what to do, and stops saying so once a later detection run reads it."""
    app_module._services.clear()
    state = SandboxState()
    forbidden = add_tenant(state, SALES, name="Locked <Out> Ltd")
    fine = add_tenant(state, SALES)
    with SandboxServer(state) as server:
        server.config.subscriptions_forbidden_customers = [forbidden["cid"]]
        sales = {"sales": {"commercial": DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]}}
        env = {"PARTNER_CENTER_ENDPOINT": server.url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "true",
               "DETECT_SCHEDULE": "0 0 6 * * *", "PROVISIONING_POLL_SECONDS": "1",
               "REPLACEMENT_OFFERS": json.dumps(sales)}
        async with LocalHost(REPO, connection_string=storage, env=env,
                             functions=["detect_expiring", "scan_customers", "status"],
                             host_overrides={"visibilityTimeout": 0.2, "maxPollingInterval": 0.2}) as host:
            await host.fire_timer("detect_expiring")
            await host.run(timeout=30, idle_seconds=0.8)
            first = await status_json(host)
            page = (await host.call_http("status")).get_body().decode()
            server.config.subscriptions_forbidden_customers = []
            await host.fire_timer("detect_expiring")
            await host.run(timeout=30, idle_seconds=0.8)
            second = await status_json(host)
            page_after = (await host.call_http("status")).get_body().decode()
    app_module._services.clear()
    (missed,) = first["detection"]["notScanned"]
    assert missed["customerId"] == forbidden["cid"] and "20002" in missed["reason"]
    assert first["detection"]["latestRunId"] and "detect_expiring" in first["detection"]["redrive"]
    assert {r["subscriptionId"].lower() for r in first["records"]} == {fine["sid"]}
    assert "Not scanned by the latest detection run (1)" in page and forbidden["cid"] in page
    assert second["detection"]["notScanned"] == []
    assert second["detection"]["latestRunId"] != first["detection"]["latestRunId"]
    assert {r["subscriptionId"].lower() for r in second["records"]} == {fine["sid"], forbidden["sid"]}
    assert "Not scanned by the latest detection run" not in page_after
