"""The runbook against answers shaped like Microsoft Learn's own examples (what a Partner Center fake written from
the docs may send): absolute or ``/V1`` next links, the country only in the company profile, a checkout answering
the bare Order, a bare Availability, required partner attestation, availabilities of every segment, and a native
transition whose answer does not name its target yet."""

from __future__ import annotations

import json
from typing import Any

import pytest

from d365_migration._messages import ScanMessage
from d365_tooling.sandbox import LEGACY_REPLACEMENT_OFFERS, RETIRED_OFFERS, SandboxConfig, SandboxServer, SandboxState
from d365_tooling.sandbox._transitions import native_operations
from tests.steps._world import (
    DEMO_REPLACEMENT_OFFERS,
    Tenant,
    detect,
    drive,
    mine,
    new_sku,
    queued_scan_pages,
    service,
    writes,
)

FACULTY = next(o for o in RETIRED_OFFERS if o.family == "sales" and o.audience == "faculty")


@pytest.mark.parametrize(("absolute", "prefix"), [(True, ""), (True, "/V1"), (False, "/V1")])
async def test_detection_follows_absolute_and_upper_case_next_links_from_page_to_page(
        state: SandboxState, storage: str, absolute: bool, prefix: str) -> None:
    tenants = [Tenant(state) for _ in range(3)]
    with SandboxServer(state, SandboxConfig(absolute_next_links=absolute, next_link_v1_prefix=prefix)) as srv:
        async with service(srv.url, storage, DRY_RUN="true") as svc:
            first = ScanMessage("run1", 0, svc.client.first_customer_page(2).to_json())  # pages of two customers
            assert (await svc.scan_page(first)).customers == 2
            (following,) = queued_scan_pages(storage)  # the next page's cursor went through the queue
            assert (await svc.scan_page(following)).customers == 1
            records = await svc.ledger.list_records()
    assert {r.subscription_id.lower() for r in records} == {t.subscription_id for t in tenants}


_SHAPES: dict[str, dict[str, Any]] = {
    "country-only-in-company-profile": {"country_only_in_company_profile": True},
    "checkout-answers-bare-order": {"checkout_answers_bare_order": True},
    "bare-availability": {"availabilities_bare_object": True},
    "attestation-required": {"require_partner_attestation": True},
}


@pytest.mark.parametrize("switches", list(_SHAPES.values()), ids=list(_SHAPES))
async def test_a_new_commerce_purchase_with_learns_shapes_buys_once_and_completes(
        state: SandboxState, storage: str, switches: dict[str, Any]) -> None:
    t = Tenant(state, holders=2)
    with SandboxServer(state, SandboxConfig(**switches)) as srv:
        async with service(srv.url, storage) as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    (purchase,) = mine(state, t)
    assert purchase["via"] == "cart" and purchase["offer_id"] == DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]
    wanted = new_sku(DEMO_REPLACEMENT_OFFERS, t.offer)
    assert all(t.licenses(h) == {wanted} for h in t.holders) and t.old_status() == "suspended"


async def test_a_legacy_order_passes_a_service_that_requires_the_partner_attestation(state: SandboxState,
                                                                                     storage: str) -> None:
    t = Tenant(state)
    with SandboxServer(state, SandboxConfig(require_partner_attestation=True)) as srv:
        async with service(srv.url, storage, REPLACEMENT_OFFERS=json.dumps(LEGACY_REPLACEMENT_OFFERS)) as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    assert [p["via"] for p in mine(state, t)] == ["order"]


async def test_each_record_buys_the_availability_of_its_own_segment(state: SandboxState, storage: str) -> None:
    # Every SKU is listed in every segment, education first: a commercial customer must still buy commercial.
    commercial, faculty = Tenant(state), Tenant(state, offer=FACULTY)
    with SandboxServer(state, SandboxConfig(availabilities_in_all_segments=True)) as srv:
        async with service(srv.url, storage) as svc:
            await drive(svc, (await detect(svc)).purchase_messages)
            records = {r.customer_id.lower(): r for r in await svc.ledger.list_records()}
    assert {r.state for r in records.values()} == {"completed"}
    (bought,) = mine(state, commercial)
    assert bought["offer_id"] == DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]
    (taught,) = mine(state, faculty)
    assert taught["offer_id"] == DEMO_REPLACEMENT_OFFERS["sales"]["faculty"]
    asked = [r["query"] for r in state.requests() if r["path"].endswith("/availabilities")]
    assert sorted(q.split("targetSegment=")[1] for q in asked) == ["commercial", "education"]


async def test_a_transition_answered_without_its_target_is_followed_in_the_learn_shaped_history(
        state: SandboxState, storage: str) -> None:
    t = Tenant(state, holders=2)
    config = SandboxConfig(native_paths={t.customer_id: "transition_with_license_transfer"},
                           transition_answer_without_target=True, transition_history_as_learn_example=True)
    with SandboxServer(state, config) as srv:
        async with service(srv.url, storage, MIGRATION_PATH_POLICY="prefer_native") as svc:
            (act,) = (await detect(svc)).purchase_messages
            waiting = await svc.run(act)  # the POST's answer names no subscription yet
            pending = await svc.ledger.get(t.customer_id, t.subscription_id)
            assert pending is not None and pending.state == "native_pending" and pending.native_attempt == 1
            assert waiting.next_messages == []
            await drive(svc, [act])
            record = await svc.ledger.get(t.customer_id, t.subscription_id)
    assert record is not None and record.state == "completed", record
    (op,) = native_operations(state)
    assert record.new_subscription_id == op["to_subscription_id"]
    posts = [r for r in writes(state) if r["path"].lower().endswith("/transitions")]
    assert len(posts) == 1 and mine(state, t) == []
    wanted = new_sku(DEMO_REPLACEMENT_OFFERS, t.offer)
    assert all(t.licenses(h) == {wanted} for h in t.holders)
