"""The one routing table: which step owns a record in each state.

A record in a working state belongs to exactly one step; a final state (``completed``, ``blocked``, ``failed``)
belongs to none (only an operator's re-drive moves it on). The steps use this table to hand a record to the next
step after a transition, re-drive uses it to pick the queue for the state it resumes at, and the function adapters
dispatch by step name through :data:`d365_migration.steps.STEP_HANDLERS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .._ledger import MigrationRecord
from .._messages import Step, StepMessage

__all__ = ["STEP_FOR_STATE", "message_for", "owner_of", "states_owned_by"]

#: record state → the step whose queue a record in that state is worked on from.
STEP_FOR_STATE: Mapping[str, Step] = MappingProxyType({
    "detected": "purchase",
    "purchasing": "purchase",
    "purchased": "reassign",
    "reassigning": "reassign",
    "reassigned": "suspend",
    # Partner Center's native move (steps/native.py) is worked from the purchase queue: it replaces the purchase.
    "native_pending": "purchase",
    "native_moving": "purchase",
})


def owner_of(state: str) -> Step | None:
    """The step that owns a record in ``state``; ``None`` for a final state."""
    return STEP_FOR_STATE.get(state)


def states_owned_by(step: Step) -> frozenset[str]:
    return frozenset(state for state, owner in STEP_FOR_STATE.items() if owner == step)


def message_for(record: MigrationRecord) -> StepMessage | None:
    """The message that hands ``record`` to the step owning its current state (``None`` when it is final)."""
    step = owner_of(record.state)
    if step is None:
        return None
    return StepMessage(step=step, customer_id=record.customer_id, subscription_id=record.subscription_id,
                       correlation_id=record.correlation_id)
