"""``cancel`` (issue 11 item 4) through the real CLI, against the sandbox (which implements Partner Center's documented
new-commerce cancellation window) and the ledger on Azurite. The replacement is bought by the real pipeline
(timer → scan → purchase on the local host); users are not moved yet, as in the window where a wrong purchase is
noticed."""

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

import d365_migration._app as app_module
from d365_migration._client import PartnerCenterClient
from d365_migration._exceptions import ClientError
from d365_migration._ledger import MigrationLedger, MigrationRecord
from d365_migration.cli import main
from d365_tooling.localhost import LocalHost
from d365_tooling.sandbox import (
    DEMO_REPLACEMENT_OFFERS,
    LEGACY_REPLACEMENT_OFFERS,
    RETIRED_OFFERS,
    SandboxServer,
    SandboxState,
)

REPO = Path(__file__).resolve().parent.parent
SALES = next(o for o in RETIRED_OFFERS if o.family == "sales" and o.audience == "commercial")
HOUR = 3600.0


def add_tenant(state: SandboxState) -> dict[str, str]:
    cid = str(uuid.uuid4())
    state.add_customer(cid, f"t{cid[:6]}.onmicrosoft.com", f"Tenant {cid[:6]}")
    uid = str(uuid.uuid4())
    state.add_user(cid, uid, f"u{uid[:4]}@t{cid[:6]}.example", "First", "User", "US", [SALES.sku.id])
    end = (datetime.now(UTC) + timedelta(days=20)).strftime("%Y-%m-%dT00:00:00Z")
    sub = state.add_subscription(cid, offer=SALES, quantity=2, commitment_end=end, offer_id=SALES.id,
                                 offer_name=SALES.name)
    return {"cid": cid, "sid": sub.id.lower()}


@pytest.fixture
def bought(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two customers whose replacement the pipeline bought (state ``purchased``); the license step is not served."""
    yield from _buy(storage, monkeypatch, tmp_path, DEMO_REPLACEMENT_OFFERS)


def _buy(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
         offers: dict[str, Any]) -> Iterator[dict[str, Any]]:
    app_module._services.clear()
    state = SandboxState()
    tenants = [add_tenant(state), add_tenant(state)]
    with SandboxServer(state) as server:
        env = {"PARTNER_CENTER_ENDPOINT": server.url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
               "CUSTOMER_ALLOWLIST": ",".join(t["cid"] for t in tenants), "AzureWebJobsStorage": storage,
               "REPLACEMENT_OFFERS": json.dumps(offers), "PROVISIONING_POLL_SECONDS": "1",
               "DETECT_SCHEDULE": "0 0 6 * * *"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)

        async def run() -> list[MigrationRecord]:
            async with LocalHost(REPO, connection_string=storage, env=env,
                                 functions=["detect_expiring", "scan_customers", "purchase_new"],
                                 host_overrides={"visibilityTimeout": 0.3, "maxPollingInterval": 0.2}) as host:
                await host.fire_timer("detect_expiring")
                await host.run(timeout=60, idle_seconds=1.0)
            return await MigrationLedger.from_connection_string(storage).list_records()

        records = asyncio.run(run())
        app_module._services.clear()
        assert {r.state for r in records} == {"purchased"}, [(r.state, r.reason) for r in records]
        yield {"state": state, "server": server, "records": {r.customer_id: r for r in records},
               "tenants": tenants, "storage": storage}


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def record(storage: str, cid: str, sid: str) -> MigrationRecord:
    found = asyncio.run(MigrationLedger.from_connection_string(storage).get(cid, sid))
    assert found is not None
    return found


def test_cancel_inside_the_window_cancels_only_the_replacement(bought: dict[str, Any]) -> None:
    state: SandboxState = bought["state"]
    t = bought["tenants"][0]
    rec = bought["records"][t["cid"]]
    patches_before = len(state.patches())
    code, text = cli("cancel", f"{t['cid']}/{t['sid']}", "--by", "alice")
    assert code == 0, text
    assert f"cancelled replacement {rec.new_subscription_id}" in text and "old subscription stays active" in text
    assert state.subscription(t["cid"], rec.new_subscription_id)["status"] == "deleted"
    assert state.subscription(t["cid"], t["sid"])["status"] == "active"  # the old one is left as it was
    new_patches = state.patches()[patches_before:]
    assert [(p["subscription_id"].lower(), p["after_status"]) for p in new_patches] == [
        (rec.new_subscription_id.lower(), "deleted")]
    saved = record(bought["storage"], t["cid"], t["sid"])
    assert saved.state == "cancelled" and saved.is_final
    assert saved.history[-1]["event"] == "replacement_cancelled" and "alice" in saved.history[-1]["detail"]
    # the other customer's replacement is untouched
    other = bought["tenants"][1]
    other_rec = bought["records"][other["cid"]]
    assert state.subscription(other["cid"], other_rec.new_subscription_id)["status"] == "active"
    # running it again changes nothing and says so
    code, text = cli("cancel", t["sid"], "--by", "alice")
    assert code == 0 and "already cancelled" in text
    assert len(state.patches()) == patches_before + 1
    # the status command shows the final state
    code, text = cli("status", "--json")
    assert {r["State"] for r in json.loads(text)} == {"cancelled", "purchased"}


def test_cancel_accepts_the_replacement_subscription_id_too(bought: dict[str, Any]) -> None:
    t = bought["tenants"][1]
    rec = bought["records"][t["cid"]]
    code, _ = cli("cancel", rec.new_subscription_id, "--by", "bob")
    assert code == 0
    assert bought["state"].subscription(t["cid"], rec.new_subscription_id)["status"] == "deleted"


def test_cancel_refuses_outside_the_window(bought: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    state: SandboxState = bought["state"]
    t = bought["tenants"][0]
    rec = bought["records"][t["cid"]]
    state.age_subscription(t["cid"], rec.new_subscription_id, 168 * HOUR + 60)
    patches_before = len(state.patches())
    code, _ = cli("cancel", t["sid"], "--by", "alice")
    assert code == 2
    err = capsys.readouterr().err
    assert "cancellation window" in err and "closed" in err and rec.new_subscription_id in err
    assert len(state.patches()) == patches_before
    assert state.subscription(t["cid"], rec.new_subscription_id)["status"] == "active"
    assert record(bought["storage"], t["cid"], t["sid"]).state == "purchased"


def test_cancel_just_inside_the_window_still_works(bought: dict[str, Any]) -> None:
    state: SandboxState = bought["state"]
    t = bought["tenants"][0]
    rec = bought["records"][t["cid"]]
    state.age_subscription(t["cid"], rec.new_subscription_id, 167 * HOUR)
    assert cli("cancel", t["sid"], "--by", "alice")[0] == 0
    assert state.subscription(t["cid"], rec.new_subscription_id)["status"] == "deleted"


def test_cancel_refuses_what_the_tool_did_not_buy(bought: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    state: SandboxState = bought["state"]
    storage = bought["storage"]
    t = bought["tenants"][0]
    # a subscription with no migration record at all (someone bought it by hand)
    by_hand = state.purchase_by_hand(t["cid"], DEMO_REPLACEMENT_OFFERS["sales"]["commercial"], 1, "bought in portal")
    code, _ = cli("cancel", f"{t['cid']}/{by_hand['id']}", "--by", "alice")
    assert code == 2 and "no migration record" in capsys.readouterr().err
    # a record pointing at a subscription that carries neither our tag nor our order id
    ledger = MigrationLedger.from_connection_string(storage)
    rec = record(storage, t["cid"], t["sid"])
    asyncio.run(ledger.save(rec.transition(rec.state, "test", new_subscription_id=by_hand["id"])))
    code, _ = cli("cancel", t["sid"], "--by", "alice")
    assert code == 2 and "not bought by this tool" in capsys.readouterr().err
    assert state.subscription(t["cid"], by_hand["id"])["status"] == "active"
    # a record that shows no purchase by the tool
    other = bought["tenants"][1]
    orec = record(storage, other["cid"], other["sid"])
    asyncio.run(ledger.save(orec.transition("detected", "test", new_subscription_id=None, cart_id=None,
                                            order_id=None)))
    code, _ = cli("cancel", other["sid"], "--by", "alice")
    assert code == 2 and "no replacement bought by this tool" in capsys.readouterr().err


def test_cancel_refuses_once_users_hold_the_new_license_or_the_old_one_is_suspended(
        bought: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    state: SandboxState = bought["state"]
    storage = bought["storage"]
    ledger = MigrationLedger.from_connection_string(storage)
    t = bought["tenants"][0]
    rec = record(storage, t["cid"], t["sid"])
    asyncio.run(ledger.save(rec.transition("reassigned", "test", users_moved=1)))
    code, _ = cli("cancel", t["sid"], "--by", "alice")
    assert code == 2 and "already hold the new license" in capsys.readouterr().err
    other = bought["tenants"][1]
    state.set_subscription_status(other["cid"], other["sid"], "suspended")
    code, _ = cli("cancel", other["sid"], "--by", "alice")
    assert code == 2 and "would leave the customer without the product" in capsys.readouterr().err
    for tenant in (t, other):
        new_id = bought["records"][tenant["cid"]].new_subscription_id
        assert state.subscription(tenant["cid"], new_id)["status"] == "active"


def test_cancel_refuses_a_legacy_replacement(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for world in _buy(storage, monkeypatch, tmp_path, LEGACY_REPLACEMENT_OFFERS):
        t = world["tenants"][0]
        code, _ = cli("cancel", t["sid"], "--by", "alice")
        assert code == 2 and "legacy subscription" in capsys.readouterr().err


async def test_sandbox_implements_the_documented_cancellation_window(sandbox: SandboxServer) -> None:
    """PATCH status=deleted of a new-commerce subscription: accepted within 168 hours of purchase, refused after;
    refused for a legacy subscription. The subscription shows cancellationAllowedUntilDate."""
    state = sandbox.state
    cid = sorted(state.customer_ids())[0]
    nce = state.purchase_by_hand(cid, DEMO_REPLACEMENT_OFFERS["sales"]["commercial"], 1, "x")
    late = state.purchase_by_hand(cid, DEMO_REPLACEMENT_OFFERS["sales"]["faculty"], 1, "y")
    legacy = state.purchase_by_hand(cid, LEGACY_REPLACEMENT_OFFERS["sales"]["commercial"], 1, "z")
    state.age_subscription(cid, late["id"], 168 * HOUR + 1)
    async with PartnerCenterClient(sandbox.url, None) as client:
        sub = await client.get_subscription(cid, nce["id"])
        until = datetime.fromisoformat(str(sub.raw["cancellationAllowedUntilDate"]).replace("Z", "+00:00"))
        assert sub.created is not None and until - sub.created == timedelta(hours=168)
        done = await client.update_subscription(cid, sub, status="deleted", request_id=str(uuid.uuid4()))
        assert done.status == "deleted"
        for sid in (late["id"], legacy["id"]):
            current = await client.get_subscription(cid, sid)
            with pytest.raises(ClientError) as err:
                await client.update_subscription(cid, current, status="deleted", request_id=str(uuid.uuid4()))
            assert err.value.status == 400
            assert (await client.get_subscription(cid, sid)).status == "active"
