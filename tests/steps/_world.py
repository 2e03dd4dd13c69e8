"""Shared by the step tests: hand-built worlds in the Partner Center sandbox, a service over Azurite, and drivers
that run the steps the way Azure does (detection through ``start_scan`` + ``scan_page``; steps through the runner).

No host: detect → purchase → reassign → suspend are driven by hand (the next step's messages are what a step
returns), so every rule of the runbook can be pinned to one step. Worlds are built by hand (one customer, one
expiring Qualified Offer subscription, a few users) unless the test is about the seeded distractors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient, TextBase64DecodePolicy

from d365_migration import MigrationService, Settings, StepMessage, build_service
from d365_migration._ledger import correlation_id_for
from d365_migration._messages import SCAN_QUEUE, ScanMessage
from d365_migration._rollout import RolloutStore, go_live
from d365_migration.steps import DetectReport
from d365_tooling.sandbox import DEMO_REPLACEMENT_OFFERS as DEMO_REPLACEMENT_OFFERS
from d365_tooling.sandbox import RETIRED_OFFERS, SandboxState, sku_for_offer
from d365_tooling.sandbox._catalog import CatalogItem

SALES = next(o for o in RETIRED_OFFERS if o.family == "sales" and o.audience == "commercial")
CE = next(o for o in RETIRED_OFFERS if o.family == "customer_engagement" and o.audience == "commercial")
WRITES = {"POST", "PATCH", "PUT", "DELETE"}


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


class Clock:
    """The service's injected clock: real time plus however far a test has moved it."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


@contextlib.asynccontextmanager
async def service(url: str, storage: str, *, clock: Callable[[], datetime] | None = None,
                  client_options: dict[str, Any] | None = None, **overrides: str) -> AsyncIterator[MigrationService]:
    settings = Settings.from_env(env_for(url, storage, **overrides))
    svc = build_service(settings, max_attempts=2, backoff_base=0.01, **(client_options or {}))
    if not settings.dry_run and not settings.customer_allowlist:
        # DRY_RUN=false alone no longer goes live (issue 11): go live for every customer the way a partner does.
        await go_live(RolloutStore(svc.ledger.table_client), settings, by="tests", all_customers=True)
    if clock is not None:
        svc = MigrationService(svc.settings, svc.client, svc.ledger, svc.queues, svc.deps.catalog, clock=clock)
    try:
        yield svc
    finally:
        await svc.aclose()


def queue(storage: str, name: str) -> QueueClient:
    return QueueClient.from_connection_string(storage, name, message_decode_policy=TextBase64DecodePolicy())


def queued_scan_pages(storage: str) -> list[ScanMessage]:
    """Take every message off ``scan-customers`` (the pages ``scan_page`` queued)."""
    with queue(storage, SCAN_QUEUE) as q:
        try:
            received = list(q.receive_messages(max_messages=32))
        except ResourceNotFoundError:
            return []
        for message in received:
            q.delete_message(message)
    return [ScanMessage.parse(m.content) for m in received]


async def detect(svc: MigrationService) -> DetectReport:
    """One detection run the way Azure runs it: the timer's first page (``start_scan``), then ``scan_page`` for it
    and for every page it queued on ``scan-customers``. Returns the pages' reports merged."""
    storage = svc.settings.storage_connection
    assert storage
    merged = DetectReport()
    pending = [svc.start_scan()]
    while pending:
        report = await svc.scan_page(pending.pop(0))
        for f in dataclasses.fields(DetectReport):
            mine, theirs = getattr(merged, f.name), getattr(report, f.name)
            setattr(merged, f.name, mine + theirs)
        pending += queued_scan_pages(storage)
    return merged


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
        result = await svc.run(msg)
        todo.extend(result.next_messages)
    return left


def msg_for(step: str, customer_id: str, subscription_id: str, poll: int = 0) -> StepMessage:
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
