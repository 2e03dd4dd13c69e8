"""Each pipeline step called directly through ``MigrationService`` against the Partner Center sandbox and Azurite.

No host: detect → purchase → reassign → suspend are driven by hand (the next step's messages are what a step
returns), so every rule of the runbook can be pinned to one step. Worlds are built by hand (one customer, one
expiring Qualified Offer subscription, a few users) unless the test is about the seeded distractors.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from azure.storage.queue import QueueClient, TextBase64DecodePolicy

from d365_migration import MigrationService, Settings, StepMessage, build_service
from d365_migration.sandbox import (
    DEMO_REPLACEMENT_OFFERS,
    LEGACY_REPLACEMENT_OFFERS,
    RETIRED_OFFERS,
    SandboxConfig,
    SandboxServer,
    SandboxState,
    seed_world,
    sku_for_offer,
)
from d365_migration.sandbox._catalog import CatalogItem, catalog_item

SALES = next(o for o in RETIRED_OFFERS if o.family == "sales" and o.audience == "commercial")
CE = next(o for o in RETIRED_OFFERS if o.family == "customer_engagement" and o.audience == "commercial")
WRITES = {"POST", "PATCH", "PUT", "DELETE"}


# ------------------------------------------------------------------------------------------------- helpers


def guid() -> str:
    return str(uuid.uuid4())


def end_in(days: int) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT00:00:00Z")


class Tenant:
    """One hand-built customer with one Qualified Offer subscription and some users."""

    def __init__(self, state: SandboxState, *, offer: CatalogItem = SALES, holders: int = 2, others: int = 1,
                 quantity: int | None = None, usage_location: str | None = "US", name: str | None = None,
                 sub_offer: CatalogItem | None = None) -> None:
        self.state = state
        self.customer_id = guid()
        self.offer = offer
        state.add_customer(self.customer_id, f"t{self.customer_id[:6]}.onmicrosoft.com",
                           name or f"Tenant {self.customer_id[:6]}")
        granted = (sub_offer or offer).sku.id.lower()
        self.old_sku = granted
        self.holders = [self._user(f"holder{i}", [granted], usage_location) for i in range(holders)]
        self.others = [self._user(f"other{i}", [], "US") for i in range(others)]
        self.quantity = quantity if quantity is not None else holders + 1
        sub = state.add_subscription(self.customer_id, offer=sub_offer or offer, quantity=self.quantity,
                                     commitment_end=end_in(20), offer_id=offer.id, offer_name=offer.name)
        self.subscription_id = sub.id.lower()

    def _user(self, prefix: str, skus: list[str], location: str | None) -> str:
        uid = guid()
        self.state.add_user(self.customer_id, uid, f"{prefix}.{uid[:4]}@t.example", prefix, "User", location, skus)
        return uid

    def upn(self, user_id: str) -> str:
        return next(u["userPrincipalName"] for u in self.state.users(self.customer_id) if u["id"] == user_id)

    def licenses(self, user_id: str) -> set[str]:
        return set(self.state.user_licenses(self.customer_id, user_id))

    def old_status(self) -> str:
        return str(self.state.subscription(self.customer_id, self.subscription_id)["status"])


def env_for(url: str, storage: str, **overrides: str) -> dict[str, str]:
    env = {
        "PARTNER_CENTER_ENDPOINT": url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
        "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS), "AzureWebJobsStorage": storage,
        "PARTNER_CENTER_REQUESTS_PER_MINUTE": "100000", "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "100000",
        "PROVISIONING_POLL_SECONDS": "1",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v != "<unset>"}


@contextlib.asynccontextmanager
async def service(url: str, storage: str, **overrides: str) -> AsyncIterator[MigrationService]:
    svc = build_service(Settings.from_env(env_for(url, storage, **overrides)), max_attempts=2, backoff_base=0.01)
    try:
        yield svc
    finally:
        await svc.client.aclose()
        svc.ledger.close()
        svc.queues.close()


async def drive(svc: MigrationService, messages: Iterable[StepMessage], *, stop_before: str | None = None
                ) -> list[StepMessage]:
    """Run messages through their steps until none are left (or only ``stop_before`` ones); return those left."""
    todo = list(messages)
    left: list[StepMessage] = []
    while todo:
        msg = todo.pop(0)
        if msg.step == stop_before:
            left.append(msg)
            continue
        result = await getattr(svc, msg.step)(msg)
        todo.extend(result.next_messages)
    return left


def msg_for(step: str, customer_id: str, subscription_id: str, poll: int = 0) -> StepMessage:
    from d365_migration._ledger import correlation_id_for

    return StepMessage(step=step, customer_id=customer_id, subscription_id=subscription_id,  # type: ignore[arg-type]
                       correlation_id=correlation_id_for(customer_id, subscription_id), poll=poll)


def writes(state: SandboxState) -> list[dict[str, Any]]:
    return [r for r in state.requests() if r["method"] in WRITES]


def mine(state: SandboxState, tenant: Tenant) -> list[dict[str, Any]]:
    return [p for p in state.purchases() if p["customer_id"].lower() == tenant.customer_id]


def new_sku(replacements: dict[str, dict[str, str]], offer: CatalogItem) -> str:
    granted = sku_for_offer(replacements[str(offer.family)][str(offer.audience)])
    assert granted is not None
    return granted.id.lower()


def queue(storage: str, name: str) -> QueueClient:
    return QueueClient.from_connection_string(storage, name, message_decode_policy=TextBase64DecodePolicy())


@pytest.fixture
def state() -> SandboxState:
    return SandboxState()


@pytest.fixture
def server(state: SandboxState) -> Any:
    with SandboxServer(state, SandboxConfig()) as srv:
        yield srv


# ------------------------------------------------------------------------------------------------- detect


async def test_detect_is_idempotent_and_does_not_re_emit_work_past_detected(server: SandboxServer, storage: str
                                                                            ) -> None:
    a, b = Tenant(server.state), Tenant(server.state, offer=CE)
    async with service(server.url, storage) as svc:
        first = await svc.detect()
        assert first.new_records == 2 and len(first.purchase_messages) == 2
        assert {m.subscription_id for m in first.purchase_messages} == {a.subscription_id, b.subscription_id}
        # a's purchase runs; b's message is "lost" (its record stays `detected`)
        await drive(svc, [m for m in first.purchase_messages if m.subscription_id == a.subscription_id],
                    stop_before="reassign")
        assert (await svc.ledger.get(a.customer_id, a.subscription_id)).state == "purchased"  # type: ignore[union-attr]

        second = await svc.detect()
        assert second.new_records == 0
        assert [m.subscription_id for m in second.purchase_messages] == [b.subscription_id]
        records = await svc.ledger.list_records()
        assert len(records) == 2
    assert len(mine(server.state, a)) == 1 and mine(server.state, b) == []


async def test_dry_run_is_the_default_records_but_queues_and_changes_nothing(server: SandboxServer, storage: str
                                                                            ) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage, DRY_RUN="<unset>") as svc:
        assert svc.settings.dry_run is True
        report = await svc.detect()
        assert report.new_records == 1 and report.purchase_messages == [] and report.bodies() == []
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None and record.state == "detected"
        for step in ("purchase", "reassign", "suspend"):
            result = await getattr(svc, step)(msg_for(step, t.customer_id, t.subscription_id))
            assert result.note == "dry run" and result.next_messages == []
        assert (await svc.ledger.get(t.customer_id, t.subscription_id)).state == "detected"  # type: ignore[union-attr]
    assert writes(server.state) == [] and server.state.purchases() == [] and server.state.patches() == []


async def test_candidate_rules_never_record_the_seeded_distractors(state: SandboxState, storage: str) -> None:
    manifest = seed_world(state, customers=8, seed=3)
    kinds = {d.reason for d in manifest.distractors}
    assert {"expires_after_window", "auto_renew_enabled", "already_suspended", "status_expired", "status_disabled",
            "status_unknown", "far_future_end_date"} <= kinds
    with SandboxServer(state) as srv:
        async with service(srv.url, storage, DRY_RUN="true") as svc:
            report = await svc.detect()
            records = await svc.ledger.list_records()
    recorded = {r.subscription_id.lower() for r in records}
    assert recorded == manifest.expected_subscription_ids()
    assert not recorded & manifest.distractor_subscription_ids()
    reasons = {x.subscription_id.lower(): x.reason for x in report.left_alone}
    for d in manifest.distractors:
        sid = d.subscription_id.lower()
        if d.reason in ("not_qualified_offer", "nce_subscription", "not_qualified_offer_expiring"):
            assert sid not in reasons  # not a retired offer at all
            continue
        expected_words = {"expires_after_window": "beyond", "auto_renew_enabled": "auto-renew",
                          "already_suspended": "suspended", "status_expired": "expired",
                          "status_disabled": "disabled", "status_unknown": "pendingdeletion",
                          "far_future_end_date": "9999"}[d.reason]
        assert expected_words in reasons[sid].lower(), (d.reason, reasons.get(sid))
    assert writes(state) == []


# ------------------------------------------------------------------------------------------------- purchase


async def test_no_replacement_mapping_blocks_with_a_clear_reason(server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)  # sales.commercial, but only customer_engagement is mapped
    only_ce = {"customer_engagement": DEMO_REPLACEMENT_OFFERS["customer_engagement"]}
    async with service(server.url, storage, REPLACEMENT_OFFERS=json.dumps(only_ce)) as svc:
        report = await svc.detect()
        left = await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert left == []
    assert record is not None and record.state == "blocked"
    assert record.reason is not None and "REPLACEMENT_OFFERS" in record.reason and "sales.commercial" in record.reason
    assert "retry" in record.reason
    assert server.state.purchases() == [] and writes(server.state) == []
    assert t.old_status() == "active"


@pytest.mark.parametrize(("replacements", "via"), [(DEMO_REPLACEMENT_OFFERS, "cart"),
                                                   (LEGACY_REPLACEMENT_OFFERS, "order")], ids=["nce-cart", "legacy"])
async def test_purchase_buys_exactly_once_with_the_old_quantity(server: SandboxServer, storage: str,
                                                                replacements: dict[str, dict[str, str]],
                                                                via: str) -> None:
    t = Tenant(server.state, holders=2, quantity=7)
    async with service(server.url, storage, REPLACEMENT_OFFERS=json.dumps(replacements)) as svc:
        report = await svc.detect()
        await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    purchases = mine(server.state, t)
    assert len(purchases) == 1, purchases
    (p,) = purchases
    assert p["via"] == via and p["quantity"] == 7 and record.quantity == 7
    assert str(p["offer_id"]).lower() == replacements["sales"]["commercial"].lower()
    assert record.tag in p["friendly_name"]
    assert catalog_item(p["offer_id"]) is not None
    assert (record.cart_id is not None) == (via == "cart") and record.order_id
    assert t.old_status() == "suspended"


async def test_purchase_waits_for_provisioning_by_requeueing_a_delayed_message(state: SandboxState, storage: str
                                                                              ) -> None:
    t = Tenant(state)
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=2.5)) as srv:
        async with service(srv.url, storage, PROVISIONING_POLL_SECONDS="1") as svc:
            (msg,) = (await svc.detect()).purchase_messages
            started = time.monotonic()
            result = await svc.purchase(msg)
            assert time.monotonic() - started < 1.0  # it did not sit and wait
            assert result.next_messages == [] and "not visible yet" in result.note
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "purchasing" and record.lease_owner is None
            q = queue(storage, "purchase-new")
            assert q.get_queue_properties().approximate_message_count == 1
            assert list(q.peek_messages(max_messages=5)) == []  # hidden: a visibility delay was set
            await asyncio.sleep(1.2)
            (delayed,) = list(q.receive_messages(max_messages=5))
            again = StepMessage.parse(delayed.content, expected_step="purchase")
            assert again.poll == 1 and again.subscription_id == t.subscription_id
            q.delete_message(delayed)
            # still provisioning: the re-delivery buys nothing more and re-queues with poll 2
            await svc.purchase(again)
            assert len(mine(state, t)) == 1
            await asyncio.sleep(1.2)
            (third,) = list(q.receive_messages(max_messages=5))
            third_msg = StepMessage.parse(third.content, expected_step="purchase")
            assert third_msg.poll == 2
            q.delete_message(third)
            q.close()
            await asyncio.sleep(max(0.0, 2.6 - (time.monotonic() - started)))
            done = await svc.purchase(third_msg)
            assert done.record is not None and done.record.state == "purchased"
            assert [m.step for m in done.next_messages] == ["reassign"]
    assert len(mine(state, t)) == 1


async def test_redelivered_purchase_after_success_buys_nothing_and_re_emits_reassign(server: SandboxServer,
                                                                                     storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        (msg,) = (await svc.detect()).purchase_messages
        first = await svc.purchase(msg)
        assert [m.step for m in first.next_messages] == ["reassign"]
        requests_before = len(writes(server.state))
        for _ in range(2):
            again = await svc.purchase(msg)
            assert again.next_messages == first.next_messages
            assert again.record is not None and again.record.state == "purchased"
    assert len(mine(server.state, t)) == 1
    assert len(writes(server.state)) == requests_before


async def test_purchase_rechecks_the_old_subscription_right_before_buying(server: SandboxServer, storage: str
                                                                          ) -> None:
    suspended, renewed = Tenant(server.state), Tenant(server.state, offer=CE)
    async with service(server.url, storage) as svc:
        messages = (await svc.detect()).purchase_messages
        assert len(messages) == 2
        # after detection, a human suspends one and turns auto-renew on for the other (in the portal)
        server.state.set_subscription_status(suspended.customer_id, suspended.subscription_id, "suspended")
        body = server.state.subscription(renewed.customer_id, renewed.subscription_id)
        body["autoRenewEnabled"] = True
        async with httpx.AsyncClient(base_url=server.url) as http:
            answer = await http.patch(f"/v1/customers/{renewed.customer_id}/subscriptions/{renewed.subscription_id}",
                                      json=body)
            assert answer.status_code == 200 and answer.json()["autoRenewEnabled"] is True
        left = await drive(svc, messages)
        a = await svc.ledger.get(suspended.customer_id, suspended.subscription_id)
        b = await svc.ledger.get(renewed.customer_id, renewed.subscription_id)
    assert left == []
    assert a is not None and a.state == "blocked" and "suspended" in (a.reason or "") and "nothing bought" in a.reason
    assert b is not None and b.state == "blocked" and "auto-renew" in (b.reason or "")
    assert server.state.purchases() == []
    assert [r for r in writes(server.state) if "/carts" in r["path"] or "/orders" in r["path"]] == []


async def test_max_purchases_per_run_brake_parks_the_rest_as_blocked(server: SandboxServer, storage: str) -> None:
    tenants = [Tenant(server.state) for _ in range(3)]
    async with service(server.url, storage, MAX_PURCHASES_PER_RUN="1") as svc:
        report = await svc.detect()
        assert len(report.purchase_messages) == 1 and report.braked == 2
        records = await svc.ledger.list_records()
        blocked = [r for r in records if r.state == "blocked"]
        assert len(blocked) == 2
        for r in blocked:
            assert "MAX_PURCHASES_PER_RUN=1" in (r.reason or "") and "retry" in (r.reason or "")
        await drive(svc, report.purchase_messages)
        # a second run does not re-queue the parked ones (they wait for an operator)
        assert (await svc.detect()).purchase_messages == []
    assert len(server.state.purchases()) == 1
    assert sorted(t.old_status() for t in tenants) == ["active", "active", "suspended"]


@pytest.mark.parametrize("mode", ["allow", "deny"])
async def test_allowlist_and_denylist_keep_out_of_scope_customers_untouched(server: SandboxServer, storage: str,
                                                                            mode: str) -> None:
    a, b, c = (Tenant(server.state) for _ in range(3))
    setting = ({"CUSTOMER_ALLOWLIST": f"{a.customer_id.upper()}, {b.customer_id}"} if mode == "allow"
               else {"CUSTOMER_DENYLIST": c.customer_id})
    async with service(server.url, storage, **setting) as svc:
        report = await svc.detect()
        assert report.out_of_scope == 1
        assert any("CUSTOMER_ALLOWLIST" in x.reason and x.customer_id == c.customer_id for x in report.left_alone)
        await drive(svc, report.purchase_messages)
        records = await svc.ledger.list_records()
    assert {r.customer_id.lower() for r in records} == {a.customer_id.lower(), b.customer_id.lower()}
    assert {p["customer_id"].lower() for p in server.state.purchases()} == {a.customer_id, b.customer_id}
    assert c.old_status() == "active" and all(c.licenses(u) == {c.old_sku} for u in c.holders)
    touched = {r["path"].split("/")[3] for r in writes(server.state)}
    assert c.customer_id not in touched


# ------------------------------------------------------------------------------------------------- reassign


async def test_reassign_moves_every_holder_with_one_atomic_update_and_skips_users_already_moved(
        server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state, holders=3, others=1, quantity=5)
    new = new_sku(DEMO_REPLACEMENT_OFFERS, SALES)
    already = t.holders[0]
    server.state.assign_user_license(t.customer_id, already, new)  # someone moved this user by hand
    async with service(server.url, storage) as svc:
        report = await svc.detect()
        left = await drive(svc, report.purchase_messages, stop_before="suspend")
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        outcomes = {o.user_id: o.outcome for o in await svc.ledger.user_outcomes(record)}  # type: ignore[arg-type]
    assert [m.step for m in left] == ["suspend"]
    assert record is not None and record.state == "reassigned"
    assert record.users_moved == 2 and record.users_skipped == 1 and record.users_failed == 0
    updates = server.state.license_updates()
    by_user: dict[str, list[dict[str, Any]]] = {}
    for u in updates:
        by_user.setdefault(u["user_id"], []).append(u)
    assert set(by_user) == set(t.holders)  # every holder, nobody else
    for uid, ups in by_user.items():
        assert len(ups) == 1, ups  # one call: assign and remove together
        assert ups[0]["requested_remove"] == [t.old_sku]
        assert ups[0]["requested_assign"] == ([] if uid == already else [new])
        assert t.licenses(uid) == {new}
    assert outcomes == {already: "skipped", t.holders[1]: "moved", t.holders[2]: "moved"}
    assert t.licenses(t.others[0]) == set()
    assert t.old_status() == "active" and server.state.patches() == []


async def test_reassign_out_of_licenses_60012_blocks_naming_the_user_and_never_suspends(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2, others=1, quantity=2)
    new = new_sku(DEMO_REPLACEMENT_OFFERS, SALES)
    # Between the step's availability check and its license moves, an admin hands a unit of the new product to
    # someone else (as can happen in the real world): the second move is refused with 60012.
    original = state.license_update
    raced: list[bool] = []

    def racing_license_update(customer_id: str, user_id: str, body: Any) -> dict[str, Any]:
        if not raced:
            raced.append(True)
            state.assign_user_license(t.customer_id, t.others[0], new)
        return original(customer_id, user_id, body)

    state.license_update = racing_license_update  # type: ignore[method-assign]
    with SandboxServer(state) as srv:
        async with service(srv.url, storage) as svc:
            report = await svc.detect()
            left = await drive(svc, report.purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert raced and left == []
    assert record is not None and record.state == "blocked"
    refused = [u for u in t.holders if t.old_sku in t.licenses(u)]
    assert len(refused) == 1
    assert t.upn(refused[0]) in (record.reason or "") and "60012" in (record.reason or "")
    assert t.licenses(refused[0]) == {t.old_sku}  # never cut off
    assert t.old_status() == "active" and state.patches() == []


async def test_reassign_usage_location_error_blocks_naming_the_user_and_never_suspends(
        server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state, holders=1, usage_location=None)
    async with service(server.url, storage) as svc:
        report = await svc.detect()
        left = await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None
        outcomes = await svc.ledger.user_outcomes(record)
    assert left == []
    assert record.state == "blocked"
    assert [(o.user_id, o.outcome) for o in outcomes] == [(t.holders[0], "failed")]
    assert t.upn(t.holders[0]) in (record.reason or "") and "usage location" in (record.reason or "")
    assert t.licenses(t.holders[0]) == {t.old_sku}
    assert t.old_status() == "active" and server.state.patches() == []


async def test_same_old_and_new_sku_moves_nobody(server: SandboxServer, storage: str) -> None:
    replacement = catalog_item(DEMO_REPLACEMENT_OFFERS["sales"]["commercial"])
    assert replacement is not None
    # The Qualified Offer subscription already grants the product SKU the replacement grants.
    t = Tenant(server.state, holders=2, sub_offer=replacement)
    async with service(server.url, storage) as svc:
        report = await svc.detect()
        await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed"
    assert record.old_sku_id == record.new_sku_id == replacement.sku.id.lower()
    assert any(h.get("event") == "same_sku" for h in record.history)
    assert server.state.license_updates() == [] and record.users_moved == 0
    assert all(t.licenses(u) == {replacement.sku.id.lower()} for u in t.holders)


# ------------------------------------------------------------------------------------------------- suspend


class HeaderRecorder:
    """ASGI wrapper that records each request's method, path, headers and body before the sandbox handles it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording_receive() -> Any:
            message = await receive()
            chunks.append(message.get("body", b""))
            return message

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        await self.app(scope, recording_receive, send)
        self.seen.append((scope["method"], scope["path"], headers, b"".join(chunks)))


async def test_suspend_refuses_while_a_user_holds_the_old_sku_then_patches_whole_resource_once(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    srv = SandboxServer(state)
    recorder = HeaderRecorder(srv.app)
    srv.app = recorder  # type: ignore[assignment]
    with srv:
        async with service(srv.url, storage) as svc:
            report = await svc.detect()
            (suspend_msg,) = await drive(svc, report.purchase_messages, stop_before="suspend")
            # someone gives a user the old product again before the suspension runs
            state.assign_user_license(t.customer_id, t.others[0], t.old_sku)
            back = await svc.suspend(suspend_msg)
            assert [m.step for m in back.next_messages] == ["reassign"]
            assert back.record is not None and back.record.state == "reassigning"
            assert state.patches() == [] and t.old_status() == "active"
            before = state.subscription(t.customer_id, t.subscription_id)
            await drive(svc, back.next_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            # a late duplicate of the suspend message changes nothing
            dup = await svc.suspend(suspend_msg)
    assert record is not None and record.state == "completed"
    assert dup.note == "already completed"
    assert t.old_sku not in t.licenses(t.others[0])
    patches = state.patches()
    assert len(patches) == 1 and patches[0]["after_status"] == "suspended"
    assert patches[0]["changes"] == {"status": ["active", "suspended"]}  # nothing else changed (auto-renew etc.)
    (patch,) = [s for s in recorder.seen if s[0] == "PATCH"]
    sent = json.loads(patch[3])
    assert patch[2]["if-match"].strip('"') == before["attributes"]["etag"].strip('"')
    for key in ("id", "offerId", "quantity", "autoRenewEnabled", "friendlyName", "commitmentEndDate"):
        assert key in sent, f"PATCH body is not the whole resource: {key} missing"
    assert sent["status"] == "suspended" and sent["autoRenewEnabled"] is False


async def test_suspend_of_an_already_suspended_subscription_completes_without_a_patch(server: SandboxServer,
                                                                                      storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        report = await svc.detect()
        (suspend_msg,) = await drive(svc, report.purchase_messages, stop_before="suspend")
        server.state.set_subscription_status(t.customer_id, t.subscription_id, "suspended")
        result = await svc.suspend(suspend_msg)
        again = await svc.suspend(suspend_msg)
    assert result.record is not None and result.record.state == "completed"
    assert "no PATCH" in (result.record.history[-1].get("detail") or "")
    assert again.note == "already completed"
    assert server.state.patches() == []


async def test_ledger_records_every_transition_with_history(server: SandboxServer, storage: str) -> None:
    t = Tenant(server.state)
    async with service(server.url, storage) as svc:
        report = await svc.detect()
        await drive(svc, report.purchase_messages)
        record = await svc.ledger.get(t.customer_id, t.subscription_id)
        assert record is not None
        # a record read back from storage survives a round trip with its ETag
        saved = await svc.ledger.save(replace(record, reason=None))
        assert saved.etag and saved.etag != record.etag
    states = [h["state"] for h in record.history]
    for expected in ("detected", "purchasing", "purchased", "reassigning", "reassigned", "completed"):
        assert expected in states
    assert states.index("purchased") < states.index("reassigned") < states.index("completed")
    assert record.new_subscription_id and record.lease_owner is None


async def test_retry_after_provisioning_timeout_waits_again(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from d365_migration.cli import main

    now = [time.time()]
    state = SandboxState(clock=lambda: now[0])  # the sandbox's own clock: provisioning waits until we move it
    t = Tenant(state)
    with SandboxServer(state, SandboxConfig(provisioning_delay_s=3600)) as srv:
        env = env_for(srv.url, storage, PROVISIONING_TIMEOUT_MINUTES="1")
        async with service(srv.url, storage, PROVISIONING_TIMEOUT_MINUTES="1") as svc:
            (msg,) = (await svc.detect()).purchase_messages
            assert (await svc.purchase(msg)).next_messages == []  # bought; waiting for provisioning
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert record is not None and record.state == "purchasing"
            # two minutes pass (written into the ledger rather than waited for)
            old = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
            await svc.ledger.save(replace(record, purchase_started_at=old))
            timed_out = await svc.purchase(msg.next_poll())
            assert timed_out.record is not None and timed_out.record.state == "failed"
            assert "provisioning_timeout" in [h["event"] for h in timed_out.record.history]

            # the operator checks the order in Partner Center (still provisioning) and re-drives the record
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            out = io.StringIO()
            assert await asyncio.to_thread(main, ["retry", f"{t.customer_id}/{t.subscription_id}"], out) == 0
            again = await svc.purchase(msg)
            assert again.record is not None and again.record.state == "purchasing", again.record.reason
            now[0] += 3601  # provisioning finishes
            done = await svc.purchase(msg.next_poll())
            assert done.record is not None and done.record.state == "purchased"
    assert len(mine(state, t)) == 1
