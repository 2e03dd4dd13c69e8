"""What the license step and the suspension share: waits measured in time, and the trail the two steps leave for each
other in the record's history. (Throttling that outlasted the client's retries is the runner's: steps/_runner.py.)

The trail: when the suspension finds the old SKU still consumed it hands the record back (event
``old_sku_still_used``); the license step's first page after that which changes someone's licenses says so once
(``moved_again``). A hand-back followed by no ``moved_again`` means the license step found nobody to move: the units
Partner Center reports lag the moves (get-a-list-of-available-licenses promises no read-your-writes), so the
suspension then waits by time instead of handing the record back again. Only hand-backs that moved someone count
towards ``MAX_REASSIGN_TRIPS``. An operator's ``retry`` starts the count afresh.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from .._ledger import MigrationRecord
from ._work import RetryLater, Work

__all__ = [
    "HANDED_BACK",
    "MOVED_AGAIN",
    "handed_back_without_moves",
    "in_wait",
    "trips",
    "wait_then_block",
    "waited_too_long",
]

HANDED_BACK = "old_sku_still_used"  # suspend → reassign: the old SKU is still consumed
MOVED_AGAIN = "moved_again"  # reassign, after a hand-back: this pass changed someone's licenses
_RESTART = "retry"  # an operator re-drove the record (steps/redrive.py)


async def waited_too_long(work: Work, kind: str, limit_minutes: int) -> bool:
    """Start (or continue) the wait named ``kind``, measured by the injected clock; True once it has lasted longer
    than ``limit_minutes``. Each wait has its own start, so a slow SKU never eats the free-units wait; a wait met
    again before the step made progress (answers flapping between two waits) continues from its first start, so it
    still ends. The step clears them all (``wait_kind=None``) when it moves on."""
    record, now = work.record, work.now()
    starts = _wait_starts(record)
    started = (starts.get(kind) or (record.wait_started_at if record.wait_kind == kind else None)
               or now.isoformat())
    if record.wait_kind != kind or starts.get(kind) != started:  # a wait begun or met again: record it current
        starts[kind] = started
        await work.checkpoint(wait_kind=kind, wait_started_at=started, wait_starts=json.dumps(starts))
    return now - datetime.fromisoformat(started) > timedelta(minutes=limit_minutes)


def in_wait(record: MigrationRecord, kind: str) -> bool:
    """Has the wait ``kind`` started since the step last made progress (whichever wait is the current one)?"""
    return record.wait_kind == kind or kind in _wait_starts(record)


def _wait_starts(record: MigrationRecord) -> dict[str, str]:
    try:
        starts = json.loads(record.wait_starts or "{}")
    except json.JSONDecodeError:  # unreadable: start afresh (a wait restarts; nothing is skipped)
        return {}
    return {str(k): str(v) for k, v in starts.items()} if isinstance(starts, dict) else {}


async def wait_then_block(work: Work, kind: str, limit_minutes: int, *, event: str, detail: str,
                          waiting: str) -> None:
    """Wait for ``kind`` by time: :class:`RetryLater` (``waiting``) until the wait has lasted ``limit_minutes``; then
    the record is ``blocked`` with ``event`` and ``detail`` (every wait cleared, so a re-drive starts them afresh) and
    this returns.

    :raises RetryLater: the wait is not over.
    """
    if not await waited_too_long(work, kind, limit_minutes):
        raise RetryLater(waiting)
    await work.transition("blocked", event, detail, wait_kind=None, wait_started_at=None)


def _since_restart(record: MigrationRecord) -> list[str]:
    events = [str(h.get("event", "")) for h in record.history]
    if _RESTART in events:
        events = events[len(events) - events[::-1].index(_RESTART):]
    return events


def handed_back_without_moves(record: MigrationRecord) -> bool:
    """True when the suspension handed the record back and the license step has changed nobody's licenses since."""
    for event in reversed(_since_restart(record)):
        if event == MOVED_AGAIN:
            return False
        if event == HANDED_BACK:
            return True
    return False


def trips(record: MigrationRecord) -> int:
    """Hand-backs (since the last operator retry) after which the license step really moved someone again."""
    return _since_restart(record).count(MOVED_AGAIN)
