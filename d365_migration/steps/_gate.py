"""The rollout gate: the stored rollout controls (``_rollout``) decide, right before money is spent, whether it may be.

* Detection records every candidate, but queues purchases only for customers in the rollout's scope, only while the
  app is live and not paused, and at most the purchase brake per run (``steps/detect.py``).
* The runner does nothing in a dry run, for every step (``steps/_runner.py``).
* The purchase step asks :func:`purchase_allowed` before a *new* purchase: paused, dry run or a customer out of scope
  → nothing is bought, the record stays ``detected`` and ``event=rollout_paused`` is logged with the reason and the
  command that resumes it. A record whose purchase is already under way (a cart, an order or an order attempt is
  recorded) finishes its purchase step: stopping between checkout and activation would leave a paid subscription
  unused. License moves and suspensions spend nothing, so a pause does not stop them (a dry run does).

The controls are read from storage on every call, not cached: a pause must stop purchases at once, on every
instance. A read that fails raises :class:`~d365_migration.LedgerError`, and nothing is bought.
"""

from __future__ import annotations

import logging

from .._ledger import MigrationRecord
from .._rollout import RolloutControls, RolloutStore, load_effective_controls
from ._work import Deps, Work, log_record

__all__ = ["RESUME_COMMAND", "blocked_by_controls", "customer_in_scope", "load_controls", "purchase_allowed",
           "purchase_under_way"]

logger = logging.getLogger("d365_migration.steps.gate")

RESUME_COMMAND = "python -m d365_migration rollout resume"


async def load_controls(deps: Deps) -> RolloutControls:
    """The rollout controls in force now (the first read stores the app settings as first-deploy defaults).

    :raises LedgerError: storage could not be read or written; the caller must not spend.
    """
    return await load_effective_controls(RolloutStore(deps.ledger.table_client), deps.settings)


def customer_in_scope(controls: RolloutControls, customer_id: str) -> bool:
    """Whether detection records ``customer_id``'s candidates. No customers chosen (an empty allow-list without *all
    customers*) is only possible in a dry run, which records every customer outside ``CUSTOMER_DENYLIST`` so the
    partner sees what going live would do; it buys nothing."""
    if not controls.allowlist and not controls.all_customers:
        return customer_id.strip().lower() not in controls.denylist
    return controls.customer_in_scope(customer_id)


def blocked_by_controls(controls: RolloutControls, customer_id: str) -> str | None:
    """Why ``controls`` forbid a new purchase for ``customer_id`` now, or ``None`` when they allow it."""
    if controls.dry_run:
        return "the rollout is in dry run"
    if controls.paused:
        return f"the rollout is paused ({controls.pause_reason or 'no reason given'})"
    if not controls.customer_in_scope(customer_id):
        return "the customer is not in the rollout's customers (allow-list or CUSTOMER_DENYLIST)"
    return None


def purchase_under_way(record: MigrationRecord) -> bool:
    """A cart, an order, an order attempt or a native transition/upgrade attempt is recorded: the purchase may
    already have happened in Partner Center."""
    return bool(record.cart_id or record.order_id or record.order_attempted_at or record.new_subscription_id
                or record.native_attempted_at)


async def purchase_allowed(work: Work) -> bool:
    """Whether the purchase step may go on for ``work.record`` (see the module docstring). When it may not, logs
    ``event=rollout_paused`` with the reason and the re-drive command, and leaves the record as it is.

    :raises LedgerError: the controls could not be read; nothing is bought.
    """
    record = work.record
    if purchase_under_way(record):
        return True
    controls = await load_controls(work.deps)
    why = blocked_by_controls(controls, record.customer_id)
    if why is None:
        return True
    log_record(record, logging.WARNING,
               "event=rollout_paused event=needs_attention state=%s reason=%r nothing bought; the record waits. "
               "redrive=%r (change the controls first if needed: `python -m d365_migration rollout show`)",
               record.state, why, RESUME_COMMAND)
    return False
