"""What every step works with: the injected dependencies (:class:`Deps`), one claimed record in one invocation
(:class:`Work`), and what a step returns (:class:`StepResult`) or raises to wait (:class:`RetryLater`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from .._catalog import RetiredOfferCatalog
from .._client import PartnerCenterClient
from .._ledger import MigrationLedger, MigrationRecord
from .._messages import StepMessage
from .._queues import QueueSender
from .._settings import Settings
from ._routes import message_for

__all__ = ["Deps", "RetryLater", "StepResult", "Work", "log_record", "save_transition"]

logger = logging.getLogger("d365_migration.steps")


@dataclass(frozen=True)
class Deps:
    """Everything a step talks to, built once per process and injected. ``clock`` is the only source of "now" for
    every step (tests move it instead of back-dating ledger fields)."""

    settings: Settings
    client: PartnerCenterClient
    ledger: MigrationLedger
    queues: QueueSender
    catalog: RetiredOfferCatalog
    clock: Callable[[], datetime]
    worker_id: str

    def now(self) -> datetime:
        return self.clock()


class RetryLater(Exception):
    """The step cannot finish now but will later (provisioning pending, budget used up): the runner releases the
    record and re-queues the message ``delay`` seconds later (default: ``PROVISIONING_POLL_SECONDS``)."""

    def __init__(self, why: str, *, delay: int | None = None) -> None:
        self.why = why
        self.delay = delay
        super().__init__(why)


@dataclass
class StepResult:
    """What a step hands back: the next step's messages (written by the function's output binding), the record as
    it ended, and a short note for logs and tests."""

    next_messages: list[StepMessage] = field(default_factory=list)
    record: MigrationRecord | None = None
    note: str = ""

    def bodies(self) -> list[str]:
        return [m.to_json() for m in self.next_messages]


def log_record(record: MigrationRecord, level: int, text: str, *args: object) -> None:
    logger.log(level, "[%s] customer=%s subscription=%s " + text, record.correlation_id, record.customer_id,
               record.subscription_id, *args)


def _waits_over(changes: dict[str, Any]) -> dict[str, Any]:
    """A step that clears its wait (``wait_kind=None``) made progress: every wait of the episode is over."""
    if "wait_kind" in changes and changes["wait_kind"] is None:
        changes.setdefault("wait_starts", None)
    return changes


async def save_transition(deps: Deps, record: MigrationRecord, state: str, event: str, detail: str | None = None,
                          **changes: Any) -> MigrationRecord:
    """Save ``record`` moved to ``state`` (one history entry dated by the injected clock) and log it.

    :raises ConcurrencyConflict: the record changed since it was read.
    """
    updated = await deps.ledger.save(record.transition(state, event, detail, at=deps.now(), **_waits_over(changes)))
    level = logging.WARNING if state in ("blocked", "failed") else logging.INFO
    marker = {"failed": "event=record_failed ", "blocked": "event=record_blocked event=needs_attention "}.get(state, "")
    if state == "blocked":
        # A block can come after the purchase: the customer pays for old and new until someone looks.
        log_record(updated, level, "%sstate=%s step_event=%s reason=%r redrive=%r", marker, state, event, detail or "",
                   f"python -m d365_migration retry {updated.customer_id}/{updated.subscription_id}")
        return updated
    log_record(updated, level, "%sstate=%s step_event=%s %s", marker, state, event, detail or "")
    return updated


class Work:
    """One claimed record in one invocation of one step.

    ``work.record`` is always the latest saved version: :meth:`transition` and :meth:`checkpoint` save, log and
    keep it current, so a step never juggles copies and the runner always releases the record as it really is.
    """

    def __init__(self, deps: Deps, message: StepMessage, record: MigrationRecord) -> None:
        self.deps = deps
        self.message = message
        self.record = record

    @property
    def settings(self) -> Settings:
        return self.deps.settings

    @property
    def client(self) -> PartnerCenterClient:
        return self.deps.client

    def now(self) -> datetime:
        return self.deps.now()

    async def transition(self, state: str, event: str, detail: str | None = None, **changes: Any) -> MigrationRecord:
        """Move the record to ``state`` with one history entry; save, log, and keep ``work.record`` current.

        :raises ConcurrencyConflict: someone else changed the record meanwhile (the runner re-queues the message).
        """
        self.record = await save_transition(self.deps, self.record, state, event, detail, **changes)
        return self.record

    async def checkpoint(self, **changes: Any) -> MigrationRecord:
        """Save progress inside a state (no history entry): counters, a page cursor.

        :raises ConcurrencyConflict: someone else changed the record meanwhile.
        """
        self.record = await self.deps.ledger.save(replace(self.record, updated_at=self.now().isoformat(),
                                                          **_waits_over(changes)))
        return self.record

    def log(self, level: int, text: str, *args: object) -> None:
        log_record(self.record, level, text, *args)

    async def claimed_by_others(self) -> frozenset[str]:
        """The order and subscription ids (lower-case) that the customer's *other* migrations have recorded.

        A purchase or native move found without our tag (by product, quantity and time) must not be one another
        migration of the same customer already owns: two retiring subscriptions of one customer often have the
        same replacement, and adopting the other's would leave one of them with no seats of its own.
        """
        claimed: set[str] = set()
        for other in await self.deps.ledger.customer_records(self.record.customer_id):
            if other.key == self.record.key:
                continue
            claimed.update(i.lower() for i in (other.order_id, other.new_subscription_id) if i)
        return frozenset(claimed)

    # --- how a step ends

    def hand_over(self, note: str) -> StepResult:
        """Done here: queue the step that owns the record's state now (none once it is final)."""
        message = message_for(self.record)
        return StepResult([message] if message else [], self.record, note)

    def stop(self, note: str) -> StepResult:
        """Done here and nothing to queue: a stale or duplicate message, or a final state."""
        return StepResult([], self.record, note)
