"""Building the service from settings, once per process (per event loop), and running one step for an adapter.

Function folders call :func:`run_detect` and :func:`run_step`; they only translate between the trigger/bindings and
these plain values. Messages that can never succeed go straight to ``<queue>-poison`` with the reason (no five
retries); a message that fails on its last allowed delivery marks its record ``failed`` before the host poisons it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._budget import counting_requests
from ._exceptions import ConcurrencyConflict, ConfigurationError, InvalidMessageError
from ._messages import QUEUE_FOR_STEP, SCAN_QUEUE, ScanMessage, Step, StepMessage
from ._settings import Settings

if TYPE_CHECKING:  # the heavy modules (httpx, Storage SDKs) load on first use, not at import: faster cold start
    from ._client import TokenSource
    from ._ledger import MigrationLedger
    from ._pipeline import MigrationService
    from ._queues import QueueSender

logger = logging.getLogger("d365_migration.app")

_services: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MigrationService] = weakref.WeakKeyDictionary()


def storage_clients(settings: Settings) -> tuple[MigrationLedger, QueueSender]:
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
    from ._pipeline import MigrationService

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
        **client_options,
    )
    ledger, queues = storage_clients(settings)
    return MigrationService(settings, client, ledger, queues, catalog)


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


async def run_scan(body: bytes) -> StepOutputs:
    """One page of a detection run: purchase messages for its candidates, and the next page's message."""
    try:
        message = ScanMessage.parse(body)
    except InvalidMessageError as exc:
        return _poisoned(exc, SCAN_QUEUE, body)
    try:
        with counting_requests() as costs:
            try:
                report = await get_service().scan_page(message)
            finally:
                _log_cost("scan", costs, f"run={message.run_id} page={message.page}")
    except ValueError as exc:  # a cursor that is not ours
        return _poisoned(exc, SCAN_QUEUE, body)
    outputs = StepOutputs()
    if report.purchase_messages:
        outputs.messages[QUEUE_FOR_STEP["purchase"]] = report.bodies()
    return outputs


async def run_step(step: Step, body: bytes, dequeue_count: int | None) -> StepOutputs:
    try:
        message = StepMessage.parse(body, expected_step=step)
    except InvalidMessageError as exc:
        return _poisoned(exc, QUEUE_FOR_STEP[step], body)
    service = get_service()
    handler = {"purchase": service.purchase, "reassign": service.reassign, "suspend": service.suspend}[step]
    try:
        with counting_requests() as costs:
            try:
                result = await handler(message)
            finally:
                _log_cost(step, costs, f"correlation={message.correlation_id}")
    except InvalidMessageError as exc:
        return _poisoned(exc, message.queue, body, message.correlation_id)
    except ConcurrencyConflict:
        raise  # another invocation changed the record: not this migration's failure, never mark it failed
    except Exception as exc:
        if (dequeue_count or 1) >= max_dequeue_count():
            # Last delivery: the host will move the message to <queue>-poison. Say why in the ledger first.
            logger.error("event=message_poisoned queue=%s correlation=%s after %s deliveries: %s", message.queue,
                         message.correlation_id, dequeue_count, exc)
            await service.fail(message, f"{type(exc).__name__}: {exc}")
        raise
    outputs = StepOutputs()
    for nxt in result.next_messages:
        outputs.messages.setdefault(nxt.queue, []).append(nxt.to_json())
    return outputs
