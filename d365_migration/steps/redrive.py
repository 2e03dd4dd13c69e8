"""Runbook re-drive — an operator fixed the cause of a ``blocked`` or ``failed`` record; resume it where it stopped.

Read top to bottom:

1. Find the record (``<subscription>`` or ``<customer>/<subscription>``, case-insensitive). Only ``blocked`` and
   ``failed`` records are re-driven; anything else is left alone, so running it twice is safe.
2. Partner Center refused the purchase (order or checkout rejected): nothing was bought, so forget the purchase
   attempt and buy again with the current ``REPLACEMENT_OFFERS`` (the tag search still prevents a second purchase).
3. Pick the state to resume at from what is recorded: no replacement yet → the purchase (``purchasing`` if a cart or
   order exists, else ``detected``); a replacement → the license move (``reassigning`` once SKUs are known).
4. Save that state (lease cleared, a fresh provisioning clock for a purchase, ``--buy-anyway`` remembered, the
   operator's list of who moves for a pooled SKU — ``--users-file``, never more than the old quantity) and queue
   the message of the step that owns it (:data:`~d365_migration.steps.STEP_FOR_STATE`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from .._ledger import MigrationLedger, MigrationRecord, utcnow
from .._messages import StepMessage
from .._queues import QueueSender
from ._routes import message_for, owner_of
from .purchase import FAILED_ORDER_EVENTS, REPEAT_CHECKOUT_REFUSED

__all__ = ["REFUSED_PURCHASE_EVENTS", "RedriveResult", "resume_state", "run"]

#: Last events meaning Partner Center refused the purchase (or ended its order cancelled, PO review rejected or in
#: error: order-resources), so nothing usable was bought and a re-drive buys anew.
REFUSED_PURCHASE_EVENTS = frozenset({"order_rejected", "checkout_rejected", "checkout_order_errors",
                                     *(f"purchase_rejected_{stage}" for stage in (
                                         "cart", "cart_line_item", "checkout", "order_errors", "order",
                                         "availability")), *FAILED_ORDER_EVENTS})


@dataclass(frozen=True)
class RedriveResult:
    """What a re-drive did: ``record`` is ``None`` when no record matched; ``message`` is ``None`` when the record
    was not blocked or failed (nothing to re-drive)."""

    target: str
    record: MigrationRecord | None = None
    previous_state: str | None = None
    message: StepMessage | None = None
    refused: str | None = None  # bad operator input: nothing was changed

    @property
    def exit_code(self) -> int:
        return 2 if self.record is None or self.refused else 0

    def describe(self) -> str:
        record = self.record
        if record is None:
            return f"no record for {self.target}"
        if self.refused:
            return f"not re-driven {record.customer_id}/{record.subscription_id}: {self.refused}"
        if self.message is None:
            return f"record {record.customer_id}/{record.subscription_id} is {record.state}; nothing to re-drive"
        return (f"re-driven {record.customer_id}/{record.subscription_id}: {self.previous_state} → {record.state}; "
                f"queued {self.message.queue}")


# The replacement was seen active (runbook) or the native move verified: only then do the later steps resume.
_REPLACEMENT_READY_EVENTS = frozenset({"replacement_active", "native_verified"})
# Blocks of a native move that was sent and may exist (steps/native.py): re-driven, it is looked for, not re-sent.
_NATIVE_MOVE_NOT_FOUND_EVENTS = frozenset({"native_target_unknown", "native_lost_answer_unresolved"})


def _last_stop_event(record: MigrationRecord) -> str | None:
    """The event that stopped the record (the last one that is not an operator's own)."""
    return next((str(h.get("event")) for h in reversed(record.history) if h.get("event") != "retry"), None)


def resume_state(record: MigrationRecord) -> str:
    """The working state a stopped record resumes at, from what it has recorded.

    A recorded ``new_subscription_id`` alone does not mean the replacement is ready (a purchase that timed out while
    provisioning, a native move blocked before its verification): such a record resumes where that is checked — the
    purchase (which finds the recorded subscription, buys nothing) or the native move's wait and verification. A
    history trimmed to its last entries resumes there too; that only costs a re-check."""
    ready = any(h.get("event") in _REPLACEMENT_READY_EVENTS for h in record.history)
    if record.new_subscription_id and ready:
        return "reassigning" if record.old_sku_id else "purchased"
    if (record.migration_path or "").startswith("native"):
        # A named target: wait for the move and verify it. A move sent but never found (its answer lost, or accepted
        # without a target): look for it again, on a fresh clock, and never ask twice. Otherwise (refused): choose
        # again from a fresh look (steps/native.route also adopts a move an earlier attempt made).
        if record.new_subscription_id:
            return "native_moving"
        if record.native_attempted_at and _last_stop_event(record) in _NATIVE_MOVE_NOT_FOUND_EVENTS:
            return "native_pending"
        return "detected"
    if record.new_subscription_id or record.cart_id or record.order_id or record.order_attempted_at:
        return "purchasing"
    return "detected"


async def run(ledger: MigrationLedger, queues: QueueSender, target: str, *, buy_anyway: bool = False,
                  moving_users: Sequence[str] | None = None, clock: Callable[[], datetime] = utcnow) -> RedriveResult:
    """Re-drive the ``blocked`` or ``failed`` record ``target`` names. Safe to run twice. ``moving_users`` (user
    principal names) says which holders of a pooled product SKU belong to the retiring subscription: only they move,
    and there may not be more of them than the old subscription's quantity.

    :raises ConcurrencyConflict: the record changed while being re-driven (run it again).
    :raises LedgerError: the ledger could not be read or written.
    """
    wanted = target.lower().split("/")
    matches = [r for r in await ledger.list_records()
               if r.key[1] == wanted[-1] and (len(wanted) == 1 or r.key[0] == wanted[0])]
    if not matches:
        return RedriveResult(target)
    record = matches[0]
    if record.state not in ("failed", "blocked"):
        return RedriveResult(target, record)
    previous = record.state
    named = record.moving_users
    if moving_users is not None:
        upns = sorted({u.strip().lower() for u in moving_users if u.strip()})
        bad = [u for u in upns if "@" not in u]
        if not upns or bad:
            problem = "it is empty" if not upns else "not UPNs: " + ", ".join(bad[:5])
            return RedriveResult(target, record, refused="the users file must list user principal names "
                                 f"(name@domain), one a line; {problem}")
        if len(upns) > record.quantity:
            return RedriveResult(target, record, refused=f"the users file names {len(upns)} users but the old "
                                 f"subscription accounts for only {record.quantity}; list at most that many")
        named = json.dumps(upns)
    last_event = record.history[-1].get("event") if record.history else None
    refused = previous == "failed" and last_event in REFUSED_PURCHASE_EVENTS
    # A repeat checkout refused after a lost answer: only the operator can say nothing was bought (--buy-anyway).
    if refused or (buy_anyway and last_event == REPEAT_CHECKOUT_REFUSED):
        record = replace(record, replacement_offer_id=None, cart_id=None, order_id=None, order_attempted_at=None,
                         purchase_started_at=None)
    state = resume_state(record)
    now = clock()
    # A re-driven purchase gets a fresh provisioning clock; the recorded cart/order ids stay, so nothing is bought
    # twice.
    restarted = now.isoformat() if owner_of(state) == "purchase" and record.purchase_started_at else None
    updated = await ledger.save(replace(
        record, lease_owner=None, lease_until=None, buy_anyway=record.buy_anyway or buy_anyway,
        wait_kind=None, wait_started_at=None, wait_starts=None,  # an operator's retry starts every wait afresh
        purchase_started_at=restarted or record.purchase_started_at, moving_users=named,
    ).transition(state, "retry", f"re-driven by an operator from {previous}"
                 + (f"; {len(json.loads(named))} named users move" if named and moving_users is not None else ""),
                 at=now))
    message = message_for(updated)
    assert message is not None, "a resume state is always owned by a step"
    await queues.send(message.queue, message.to_json())
    return RedriveResult(target, updated, previous, message)
