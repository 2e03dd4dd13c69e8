"""The runbook's steps, one module each, around one per-invocation :class:`Work` object.

::

    steps/
      detect.py     1. find expiring Qualified Offer subscriptions: start a run, scan a page, admit, brake
      purchase.py   2. buy the replacement once and wait until it is active
      reassign.py   3. move every user's license from the old SKU to the new one
      suspend.py    4. suspend the old subscription, last
      redrive.py    an operator resumes a blocked or failed record where it stopped
      _routes.py    the one table: record state → the step that owns it
      _runner.py    the frame around steps 2-4: load, DRY_RUN, claim, release, re-queue, fail on last delivery
      _work.py      Deps (injected once, with the clock), Work (one claimed record), StepResult, RetryLater
      _policy.py    policy constants, each with its reason

A record step is ``async def run(work: Work) -> StepResult``: it reads ``work.record``, calls Partner Center through
``work.client``, records each decision with ``await work.transition(state, event, detail, **changes)`` and ends with
``work.hand_over(note)`` (queue the step that owns the new state) or ``work.stop(note)``. Waiting is
``raise RetryLater(why)``. The fault-injection harness and tracing hook in with :func:`observe_steps`.
"""

from __future__ import annotations

from ._policy import LEASE, MAX_REASSIGN_TRIPS, ORDER_LIST_LAG
from ._routes import STEP_FOR_STATE, message_for, owner_of, states_owned_by
from ._runner import StepFunction, StepObserver, StepRunner, observe_steps
from ._service import STEP_HANDLERS, MigrationService
from ._work import Deps, RetryLater, StepResult, Work
from .detect import DetectReport
from .redrive import RedriveResult

__all__ = [
    "LEASE",
    "MAX_REASSIGN_TRIPS",
    "ORDER_LIST_LAG",
    "STEP_FOR_STATE",
    "STEP_HANDLERS",
    "Deps",
    "DetectReport",
    "MigrationService",
    "RedriveResult",
    "RetryLater",
    "StepFunction",
    "StepObserver",
    "StepResult",
    "StepRunner",
    "Work",
    "message_for",
    "observe_steps",
    "owner_of",
    "states_owned_by",
]
