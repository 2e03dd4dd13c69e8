"""Building the service from settings, once per process (per event loop), and running one step for an adapter.

Function folders call :func:`run_detect`, :func:`run_scan`, :func:`run_step` and :func:`run_status`; they only
translate between the trigger/bindings and these plain values. ``status`` needs only the ledger: it never builds the
Partner Center client or its credential, so the page still works when those are broken.

Messages that can never succeed go straight to ``<queue>-poison`` with the reason (no five retries); a message that
fails on its last allowed delivery marks its record ``failed`` before the host poisons it (``steps/_runner.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._budget import counting_requests
from ._exceptions import ConfigurationError, InvalidMessageError
from ._messages import QUEUE_FOR_STEP, RESCAN_COMMAND, SCAN_QUEUE, ScanMessage, Step, StepMessage
from ._settings import Settings

if TYPE_CHECKING:  # the heavy modules (httpx, Storage SDKs) load on first use, not at import: faster cold start
    from ._client import TokenSource
    from ._ledger import MigrationLedger, MigrationRecord
    from ._queues import QueueSender
    from .steps import MigrationService

__all__ = [
    "StepOutputs",
    "build_credential",
    "build_service",
    "forget_services",
    "get_service",
    "max_dequeue_count",
    "open_storage",
    "read_records",
    "run_detect",
    "run_scan",
    "run_status",
    "run_step",
    "storage_clients",
]

logger = logging.getLogger("d365_migration.app")

#: How a detection run whose page failed is re-driven (detection is idempotent: recorded candidates are not doubled).
_services: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MigrationService] = weakref.WeakKeyDictionary()
# The status page's own ledger per loop: it must not depend on the Partner Center side being buildable.
_status_ledgers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Settings, MigrationLedger]] = (
    weakref.WeakKeyDictionary())


def storage_clients(settings: Settings) -> tuple[MigrationLedger, QueueSender]:
    """The ledger and the queue sender for ``settings``' storage account.

    :raises ConfigurationError: no storage connection is configured.
    """
    from ._ledger import MigrationLedger
    from ._queues import QueueSender

    if settings.storage_connection:
        return (MigrationLedger.from_connection_string(settings.storage_connection, settings.ledger_table),
                QueueSender.from_connection_string(settings.storage_connection))
    if settings.storage_queue_uri and settings.storage_table_uri:
        from azure.identity import DefaultAzureCredential  # heavy; only in Azure

        credential = DefaultAzureCredential(managed_identity_client_id=settings.storage_client_id)
        return (MigrationLedger.from_endpoint(settings.storage_table_uri, credential, settings.ledger_table),
                QueueSender.from_endpoint(settings.storage_queue_uri, credential))
    raise ConfigurationError("AzureWebJobsStorage", "no storage connection is configured",
                             "set AzureWebJobsStorage (a connection string) or AzureWebJobsStorage__queueServiceUri "
                             "and __tableServiceUri with a managed identity")


def build_credential(settings: Settings) -> TokenSource | None:
    if settings.auth == "none":
        return None
    from ._auth import build_credential as build  # msal is only needed for app-user

    return build(settings)


def build_service(settings: Settings, **client_options: Any) -> MigrationService:
    from ._budget import build_pacers
    from ._catalog import RetiredOfferCatalog
    from ._client import PartnerCenterClient
    from .steps import MigrationService

    catalog = RetiredOfferCatalog.load(settings.retired_offers_extra)
    credential = build_credential(settings)
    import httpx

    client_options.setdefault("timeout", httpx.Timeout(float(settings.timeout_seconds),
                                                       connect=min(10.0, float(settings.timeout_seconds))))
    # Every instance and function draws from the same two budgets, kept in the app's storage account.
    client_options.setdefault("limiters", build_pacers(settings))
    client = PartnerCenterClient(
        settings.endpoint, credential,
        requests_per_minute=settings.requests_per_minute,
        license_requests_per_minute=settings.license_requests_per_minute,
        max_concurrency=settings.max_concurrency,
        # The steps follow the documented MS-RequestId rule (a recorded attempt, bumped after every answer), so a
        # reused id is a bug: refuse to send it.
        strict_request_ids=client_options.pop("strict_request_ids", True),
        **client_options,
    )
    ledger, queues = storage_clients(settings)
    return MigrationService(settings, client, ledger, queues, catalog)


@contextlib.asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[tuple[MigrationLedger, QueueSender]]:
    """The ledger and queue sender for one command (CLI, demo), closed afterwards."""
    ledger, queues = storage_clients(settings)
    try:
        yield ledger, queues
    finally:
        ledger.close()
        queues.close()


async def read_records(settings: Settings) -> list[MigrationRecord]:
    """Every migration record in the ledger (no Partner Center involved)."""
    async with open_storage(settings) as (ledger, _queues):
        return await ledger.list_records()


def get_service(env: Mapping[str, str] | None = None) -> MigrationService:
    """The process's service for the running event loop (httpx pools are bound to a loop)."""
    loop = asyncio.get_running_loop()
    service = _services.get(loop)
    if service is None:
        settings = Settings.from_env(env)
        service = build_service(settings)
        _services[loop] = service
        logger.info("d365_migration ready: endpoint=%s auth=%s dry_run=%s", settings.endpoint, settings.auth,
                    settings.dry_run)
    return service


def forget_services() -> None:
    """Drop the per-loop services and status ledgers and the cached host.json limit; the next invocation builds
    them again from the environment (tests, and a host that reloads its settings)."""
    _services.clear()
    _status_ledgers.clear()
    _host_json_max_dequeue_count.cache_clear()


def max_dequeue_count() -> int:
    """``extensions.queues.maxDequeueCount``: the app-setting override if set, else host.json (default 5)."""
    override = os.environ.get("AzureFunctionsJobHost__extensions__queues__maxDequeueCount")
    if override and override.isdigit():
        return int(override)
    return _host_json_max_dequeue_count()


@lru_cache(maxsize=1)
def _host_json_max_dequeue_count() -> int:
    host_json = Path(__file__).resolve().parent.parent / "host.json"
    try:
        data = json.loads(host_json.read_text(encoding="utf-8"))
        return int(data["extensions"]["queues"]["maxDequeueCount"])
    except (OSError, KeyError, TypeError, ValueError):
        return 5


@dataclass
class StepOutputs:
    """What the adapter writes: messages per target queue, and a poison message for unprocessable input."""

    messages: dict[str, list[str]] = field(default_factory=dict)
    poison: str | None = None


def _poisoned(reason: Exception, queue: str, body: bytes, correlation_id: str | None = None) -> StepOutputs:
    """Straight to ``<queue>-poison`` with the reason: no retry can fix this message."""
    logger.error("event=message_poisoned queue=%s correlation=%s reason=%s", queue, correlation_id, reason)
    return StepOutputs(poison=json.dumps({"reason": str(reason), "queue": queue,
                                          "body": body[:4096].decode("utf-8", "replace")}))


def _log_cost(step: str, costs: Mapping[str, int], what: str) -> None:
    """What one invocation spent of each Partner Center budget (``make bench`` adds these up per migration)."""
    logger.info("event=step_cost step=%s %s commerce=%d license=%d", step, what, costs.get("commerce", 0),
                costs.get("license", 0))


async def run_detect() -> str:
    """The timer: start a detection run (its first customer page goes to ``scan-customers``)."""
    return get_service().start_scan().to_json()


async def run_scan(body: bytes, *, dequeue_count: int | None = None) -> StepOutputs:
    """One page of a detection run: purchase messages for its candidates, and the next page's message.

    :raises Exception: whatever the page could not handle; the host retries the message. On its last delivery the
        failure is logged with the alert markers (``event=message_poisoned``, ``event=needs_attention``) first.
    """
    try:
        message = ScanMessage.parse(body)
    except InvalidMessageError as exc:
        return _poisoned(exc, SCAN_QUEUE, body)
    last_delivery = (dequeue_count or 1) >= max_dequeue_count()
    try:
        with counting_requests() as costs:
            try:
                report = await get_service().scan_page(message, last_delivery=last_delivery)
            finally:
                _log_cost("scan", costs, f"run={message.run_id} page={message.page}")
    except ValueError as exc:  # a cursor that is not ours
        return _poisoned(exc, SCAN_QUEUE, body)
    except Exception as exc:
        if last_delivery:
            # The host moves the message to scan-customers-poison after this: the customers of this page (and the
            # pages after it) are not scanned in this run. Say so where the deployed alerts look (a re-scan names
            # its customers; the page is also recorded failed in the ledger, which `run` reports).
            logger.error("event=message_poisoned event=needs_attention kind=scan_page_failed queue=%s run=%s "
                         "page=%d retry=%d customers=%s reason=%r redrive=%r", SCAN_QUEUE, message.run_id,
                         message.page, message.retry, ",".join(c for c, _ in message.customers) or "-",
                         f"{type(exc).__name__}: {exc}", RESCAN_COMMAND)
        raise
    outputs = StepOutputs()
    if report.purchase_messages:
        outputs.messages[QUEUE_FOR_STEP["purchase"]] = report.bodies()
    return outputs


async def run_step(step: Step, body: bytes, dequeue_count: int | None) -> StepOutputs:
    """One record step for a queue-triggered function: the next steps' messages, or a poison message.

    :raises Exception: whatever the step could not handle; the host retries the message (on its last delivery the
        record is marked failed first).
    """
    try:
        message = StepMessage.parse(body, expected_step=step)
    except InvalidMessageError as exc:
        return _poisoned(exc, QUEUE_FOR_STEP[step], body)
    last_delivery = (dequeue_count or 1) >= max_dequeue_count()
    try:
        with counting_requests() as costs:
            try:
                result = await get_service().run(message, last_delivery=last_delivery)
            finally:
                _log_cost(step, costs, f"correlation={message.correlation_id}")
    except InvalidMessageError as exc:
        return _poisoned(exc, message.queue, body, message.correlation_id)
    outputs = StepOutputs()
    for nxt in result.next_messages:
        outputs.messages.setdefault(nxt.queue, []).append(nxt.to_json())
    return outputs


def _status_ledger() -> tuple[Settings, MigrationLedger]:
    from ._ledger import MigrationLedger

    loop = asyncio.get_running_loop()
    cached = _status_ledgers.get(loop)
    if cached is None:
        settings = Settings.from_env()
        if settings.storage_connection:
            ledger = MigrationLedger.from_connection_string(settings.storage_connection, settings.ledger_table)
        else:
            ledger, queues = storage_clients(settings)
            queues.close()
        cached = _status_ledgers[loop] = (settings, ledger)
    return cached


async def run_status() -> dict[str, Any]:
    """The ``status`` page's document: read from the ledger only (no Partner Center client, no credential).

    :raises ConfigurationError: no storage connection is configured.
    """
    from ._status import load_status

    settings, ledger = _status_ledger()
    return await load_status(ledger, dry_run=settings.dry_run, settings=settings)
