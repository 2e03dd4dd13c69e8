"""The runner around every record step: the same frame for purchase, reassign and suspend.

In order: set the correlation id; load the record (none → the message is invalid); the stored rollout controls say
dry run → do nothing (``_gate``); a final record → nothing to do; claim the record (busy → look again later); run the
step on a :class:`Work`; release the claim. :class:`RetryLater` and a conflicting change both become the same message
re-queued with a delay. On the message's last allowed delivery an unexpected error marks the record ``failed`` with
the error before the host moves the message to the poison queue, so the ledger always says why.

Observers (:func:`observe_steps`) are the one public seam into a running step: each one's ``around_step(work)``
async context manager is entered after the claim and exited after the step body, in the invocation's context. The
fault-injection harness (``d365_tooling/faults.py``) uses it to change the world right before a step runs; tracing
could use it the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Protocol

from .._context import current_correlation_id
from .._exceptions import (
    AccessDeniedError,
    ConcurrencyConflict,
    InvalidMessageError,
    LookAgainLater,
    ThrottledError,
)
from .._ledger import MigrationRecord
from .._messages import StepMessage
from ._gate import load_controls
from ._policy import FAIL_ATTEMPTS, LEASE, busy_delay_seconds
from ._work import Deps, RetryLater, StepResult, Work, log_record, save_transition

__all__ = ["StepFunction", "StepObserver", "StepRunner", "observe_steps"]

logger = logging.getLogger("d365_migration.steps")

StepFunction = Callable[[Work], Awaitable[StepResult]]


class StepObserver(Protocol):
    def around_step(self, work: Work) -> AbstractAsyncContextManager[None]:
        """Entered right before the step body runs on a claimed record, exited right after it (also on errors)."""
        ...


_observers: list[StepObserver] = []


@contextlib.contextmanager
def observe_steps(observer: StepObserver) -> Iterator[None]:
    """Let ``observer`` wrap every step run in this process while the block runs."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


@contextlib.asynccontextmanager
async def _observed(work: Work) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for observer in list(_observers):
            await stack.enter_async_context(observer.around_step(work))
        yield


async def _stop_or_wait(work: Work, step: StepFunction) -> StepResult:
    """Run ``step``; the three kinds of Partner Center answer that are not the migration's failure end here.

    * ``AccessDeniedError`` (401/403: MFA, Conditional Access, app-only token, GDAP roles): every other call of the
      same kind would fail the same way, so the record stops ONCE as ``blocked`` with the fix (the roles by name), on
      the first delivery — never one failure per user, never the poison queue, and nothing after it (no suspension).
    * ``LookAgainLater`` (an update still pending, provisioning status not ready, a ``Retry-After`` longer than the
      client sleeps): the same message comes back later, after the service's ``retry_after`` when it gave one.
    * ``ThrottledError`` (429 still answered after the client's own retries): the partner's request budget is spent,
      which says nothing about the migration — "wait for the time in Retry-After, then retry"
      (partner-center/developer/api-throttling-guidance). The same message comes back after ``Retry-After``, so a
      busy hour never spends the message's deliveries and never poisons it. (One place for every record step.)
    """
    try:
        return await step(work)
    except AccessDeniedError as exc:
        latest = await work.deps.ledger.get(work.record.customer_id, work.record.subscription_id)
        if latest is not None:
            work.record = latest
        if work.record.is_final:
            return work.stop(f"already {work.record.state}")
        await work.transition(
            "blocked", "access_denied",
            f"Partner Center refused access ({exc.reason}, HTTP {exc.status}"
            f"{' code ' + exc.code if exc.code else ''}) on {exc.method} {exc.path}: {exc.description}. "
            f"Fix: {exc.fix}; then `python -m d365_migration retry`. Nothing further was done")
        return work.stop("blocked: access denied")
    except LookAgainLater as exc:
        delay = None if exc.retry_after is None else max(1, int(exc.retry_after + 0.999))
        raise RetryLater(f"Partner Center says look again later: {exc}", delay=delay) from None
    except ThrottledError as exc:
        raise RetryLater(f"Partner Center still throttled the call after the client's retries: {exc}",
                         delay=max(1, math.ceil(exc.retry_after))) from None


class StepRunner:
    """Runs record steps for one process. It remembers which of this process's invocations are running, so a lease
    left by one that crashed can be taken at once instead of waiting for it to expire."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._running: set[str] = set()

    async def run(self, message: StepMessage, step: StepFunction, *, last_delivery: bool = False) -> StepResult:
        """Run ``step`` for the record ``message`` names.

        :raises InvalidMessageError: the ledger has no record for the message (no retry can help).
        :raises ConcurrencyConflict: from the lease release only; the step's own conflicts are re-queued.
        """
        try:
            return await self._run(message, step)
        except (InvalidMessageError, ConcurrencyConflict):
            raise  # poisoned by the adapter / not this migration's failure: never mark the record failed
        except Exception as exc:
            if last_delivery:
                # The host moves the message to <queue>-poison after this; say why in the ledger first.
                logger.error("event=message_poisoned queue=%s correlation=%s on its last delivery: %s",
                             message.queue, message.correlation_id, exc)
                await self.fail(message, f"{type(exc).__name__}: {exc}")
            raise

    async def _run(self, message: StepMessage, step: StepFunction) -> StepResult:
        deps = self.deps
        current_correlation_id.set(message.correlation_id)
        record = await self._load(message)
        # The stored rollout controls decide (a re-deploy's DRY_RUN does not); read on every message so a change
        # applies at once. A read that fails raises: nothing is done, the message is retried.
        controls = await load_controls(deps)
        if controls.dry_run:
            log_record(record, logging.WARNING, "the rollout is in dry run: the %s step does nothing", message.step)
            return StepResult(record=record, note="dry run")
        if record.is_final:
            log_record(record, logging.INFO, "already %s; nothing to do", record.state)
            return StepResult(record=record, note=f"already {record.state}")
        # One owner per invocation, not per process: two deliveries of the same message in one process must not
        # both hold the lease.
        owner = f"{deps.worker_id}:{uuid.uuid4().hex[:8]}"
        busy_delay = busy_delay_seconds(deps.settings.provisioning_poll_seconds)
        try:
            record = await deps.ledger.claim(record, owner, lease=LEASE, dead_owners=self._is_dead_owner,
                                             now=deps.now())
        except ConcurrencyConflict as exc:
            # Another invocation has it. Look again later rather than burn this message's retries.
            await self._delay(message, f"busy: {exc}", busy_delay)
            return StepResult(record=record, note="busy")
        work = Work(deps, message, record)
        self._running.add(owner)
        try:
            async with _observed(work):
                result = await _stop_or_wait(work, step)
        except RetryLater as wait:
            await self._release(work.record, owner)
            await self._delay(message, wait.why, wait.delay)
            return StepResult(record=work.record, note=wait.why)
        except ConcurrencyConflict as exc:
            # Someone else changed the record while this step worked (a lease that ran out, a duplicate, an
            # operator). Nothing is wrong with the migration: re-read it later and carry on from what is recorded.
            await self._release(work.record, owner)
            await self._delay(message, f"record changed meanwhile: {exc}", busy_delay)
            return StepResult(record=work.record, note="conflict")
        except BaseException:
            await self._release(work.record, owner)
            raise
        finally:
            self._running.discard(owner)
        if result.record is not None and result.record.lease_owner:
            result.record = await deps.ledger.release(result.record)
        return result

    async def _load(self, message: StepMessage) -> MigrationRecord:
        record = await self.deps.ledger.get(message.customer_id, message.subscription_id)
        if record is None:
            raise InvalidMessageError(
                f"no ledger record for customer {message.customer_id} subscription {message.subscription_id}")
        return record

    async def _delay(self, message: StepMessage, why: str, delay: int | None) -> None:
        seconds = self.deps.settings.provisioning_poll_seconds if delay is None else delay
        await self.deps.queues.send(message.queue, message.next_poll().to_json(), delay_seconds=seconds)
        logger.info("[%s] %s: looking again in %ss (poll %d)", message.correlation_id, why, seconds,
                    message.poll + 1)

    def _is_dead_owner(self, owner: str) -> bool:
        """A lease left by an invocation of this process that is no longer running (it crashed before releasing)."""
        return owner.startswith(self.deps.worker_id + ":") and owner not in self._running

    async def _release(self, record: MigrationRecord, owner: str) -> None:
        try:
            latest = await self.deps.ledger.get(record.customer_id, record.subscription_id)
            if latest is not None and latest.lease_owner == owner:
                await self.deps.ledger.release(latest)
        except Exception:  # the lease expires by itself; never mask the real error
            logger.debug("could not release lease", exc_info=True)

    async def fail(self, message: StepMessage, error: str) -> None:
        """The message is going to the poison queue: record it as failed (unless already final)."""
        ledger = self.deps.ledger
        record = await ledger.get(message.customer_id, message.subscription_id)
        if record is None or record.is_final:
            return
        for _ in range(FAIL_ATTEMPTS):
            try:
                await save_transition(self.deps, replace(record, lease_owner=None, lease_until=None), "failed",
                                      f"{message.step}_gave_up", error[:900])
                return
            except ConcurrencyConflict:
                record = await ledger.get(message.customer_id, message.subscription_id)
                if record is None or record.is_final:
                    return
