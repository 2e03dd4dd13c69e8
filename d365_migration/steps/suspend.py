"""Runbook step 4 — suspend the old subscription, last, and only when that is safe.

Read top to bottom, for one ``reassigned`` record:

1. Re-check the precondition right before acting, failing closed:

   * the replacement is active (else block, old kept active);
   * the old SKU is LISTED in the customer's subscribed SKUs (else wait by time, then block: a SKU we cannot see is
     not one nobody holds);
   * nobody holds it any more: ``consumedUnits`` is 0, or within the other subscriptions' units of a pooled SKU
     whose users an operator named. Else hand the record back to the license move — at most ``MAX_REASSIGN_TRIPS``
     hand-backs that really moved someone; when the license move found nobody to move, the units lag the moves, so
     wait by time for them instead (then block);
   * the new SKU's ``consumedUnits`` covers every user recorded as moved (a pooled new SKU may show more): a move
     whose assignment did not stick shows here. Else wait by time, then block.

2. The old subscription's status: ``suspended``/``deleted`` (and ``expired``/``disabled``: no longer billing) →
   completed, no PATCH sent; ``pending`` → wait; anything else but ``active`` → block with the status.
3. PATCH the whole subscription resource with ``status: suspended`` and ``If-Match`` (a partial body would reset
   other fields); a changed ETag means re-read and try again — sending the ETag quoted and as received in turn, with
   a growing wait, and blocked (``etag_rejected``) after ``ETAG_REJECTIONS_MAX`` rejections in a row, each right
   after a fresh GET. Verified suspended →
   ``completed``. ``400 800091`` ("can't update subscription with suspended status", e.g. our earlier PATCH whose
   answer was lost) → re-read and complete if it is suspended. A PATCH answered but not showing (the subscription
   still reads active) → looked at again, re-sent at most once per ``LOST_WRITE_RESEND_WAIT_SECONDS``, blocked
   (``suspension_not_applied``) after ``PROVISIONING_TIMEOUT_MINUTES``.

Request ids follow the documented rule: the recorded ``suspend_attempt`` is bumped after every answer, so only a
PATCH whose answer was lost is re-sent with the same ``MS-RequestId``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from .._client import EtagForm, RequestAttempt
from .._exceptions import PreconditionFailedError, SubscriptionSuspendedError
from .._models import SubscribedSku, Subscription
from ._policy import (
    ETAG_CHANGED_DELAY_SECONDS,
    ETAG_REJECTED_BACKOFF,
    ETAG_REJECTIONS_MAX,
    MAX_REASSIGN_TRIPS,
)
from ._routes import states_owned_by
from ._waits import HANDED_BACK, handed_back_without_moves, in_wait, trips, wait_then_block, waited_too_long
from ._work import RetryLater, StepResult, Work

__all__ = ["NO_LONGER_BILLING", "run"]

#: Old-subscription statuses that need no suspension. subscription-lifecycle: a suspended legacy subscription is not
#: billed; deleted is the end of every path; an NCE subscription past its term is expired (auto-renew off), then
#: disabled, then deleted — its term is over, nothing renews. subscription-resources lists the statuses (none,
#: active, pending, suspended, expired, disabled, deleted). A status outside these and ``active``/``pending``
#: (``none``, one Partner Center adds tomorrow) blocks: the safe reading is "not known to be stopped".
NO_LONGER_BILLING = frozenset({"suspended", "deleted", "expired", "disabled"})

_ETAG_STALE = "etag_stale"  # history: one 412/2055 answer to the suspension PATCH
# wait kind and history event: a suspension PATCH was answered but the subscription does not read suspended
NOT_SUSPENDED_YET = "suspension_not_visible"


async def run(work: Work) -> StepResult:
    """The suspension step for ``work.record``.

    :raises RetryLater: the subscription changed under the PATCH, is not suspended yet after it, or a precondition
        is not visible yet.
    :raises PartnerCenterError: a call failed after the client's retries (the message is retried).
    """
    record, client = work.record, work.client
    if record.state not in states_owned_by("suspend") or not record.new_subscription_id or not record.old_sku_id:
        # A stale or duplicate message (the record moved on, or went back to reassigning): nothing to do here;
        # the step that owns the record's current state has its own message.
        work.log(logging.INFO, "suspend message ignored: record is %s", record.state)
        return work.stop("stale message")

    new_sub = await client.get_subscription(record.customer_id, record.new_subscription_id)
    if new_sub.status != "active":
        await work.transition("blocked", "replacement_not_active",
                              f"replacement {new_sub.id} is {new_sub.status}; old kept active")
        return work.stop("blocked")
    if record.old_sku_id.lower() != (record.new_sku_id or "").lower():
        stopped = await _licenses_checked(work)
        if stopped is not None:
            return stopped
    old_sub = await client.get_subscription(record.customer_id, record.subscription_id)
    stopped = await _status_checked(work, old_sub)
    if stopped is not None:
        return stopped
    if in_wait(work.record, NOT_SUSPENDED_YET):
        # A suspension PATCH was answered but the subscription still reads active: look, don't ask again, until the
        # re-send wait since the last one is over (the same wait as any write whose effect we cannot see yet). Also
        # when another wait came in between: that one is over, this one is not.
        if await waited_too_long(work, NOT_SUSPENDED_YET, work.settings.provisioning_timeout_minutes):
            return await _not_applied(work, old_sub.status)
        last_seen = next((h["at"] for h in reversed(work.record.history) if h.get("event") == NOT_SUSPENDED_YET),
                         None)  # a history trimmed to its last entries may not hold it any more: the wait's start
        last = datetime.fromisoformat(last_seen or work.record.wait_started_at or work.now().isoformat())
        if work.now() - last < timedelta(seconds=work.settings.lost_write_resend_wait_seconds):
            raise RetryLater(f"old subscription still {old_sub.status} after the suspension was answered")
    elif work.record.wait_kind:
        await work.checkpoint(wait_kind=None, wait_started_at=None)  # every wait is over: a next one starts afresh
    try:
        updated = await _patch_suspended(work, old_sub)
    except PreconditionFailedError as exc:
        return await _etag_rejected(work, exc)
    except SubscriptionSuspendedError as exc:
        # 400 800091: the subscription is suspended already — typically our own earlier PATCH, applied without us
        # seeing the answer. Re-read: complete if suspended, else say what Partner Center answered.
        check = await client.get_subscription(record.customer_id, record.subscription_id)
        if check.status != "suspended":
            await work.transition("blocked", "suspend_refused",
                                  f"Partner Center refused the suspension (HTTP {exc.status} code {exc.code}): "
                                  f"{exc.description}; the subscription reads {check.status}")
            return work.stop("blocked")
        await work.transition("completed", "old_suspended",
                              f"old subscription suspended (400 {exc.code} on a repeated PATCH: already suspended); "
                              f"replacement {record.new_subscription_id}")
        return work.stop("completed")
    if updated.status != "suspended":
        check = await client.get_subscription(record.customer_id, record.subscription_id)
        if check.status != "suspended":
            # Answered, not applied (or not visible yet): re-sent at most once per LOST_WRITE_RESEND_WAIT_SECONDS,
            # and never for longer than PROVISIONING_TIMEOUT_MINUTES in all.
            if await waited_too_long(work, NOT_SUSPENDED_YET, work.settings.provisioning_timeout_minutes):
                return await _not_applied(work, check.status)
            await work.transition(work.record.state, NOT_SUSPENDED_YET,
                                  f"PATCH answered but the subscription reads {check.status}; looking again, "
                                  "re-sending only after LOST_WRITE_RESEND_WAIT_SECONDS")
            raise RetryLater(f"old subscription still {check.status} after PATCH")
    await work.transition("completed", "old_suspended",
                          f"old subscription suspended; replacement {record.new_subscription_id}")
    return work.stop("completed")


# ---------------------------------------------------------------------- 1. nobody left on the old SKU


async def _licenses_checked(work: Work) -> StepResult | None:
    """The license precondition; ``None`` when it holds, else how the step ends (blocked, or handed back).

    :raises RetryLater: waiting (by time) for the old SKU to be listed, for its units to drop, or for the new SKU's
        units to show the moves.
    """
    record = work.record
    assert record.old_sku_id
    skus = {s.product_sku.id.lower(): s for s in await work.client.list_subscribed_skus(record.customer_id)}
    old = skus.get(record.old_sku_id.lower())
    limit = work.settings.subscribed_sku_wait_minutes
    if old is None:
        await wait_then_block(
            work, "old_sku_listed", limit, event="old_sku_not_listed",
            detail=f"the old SKU {record.old_sku_id} is not in the customer's subscribed SKUs after {limit} min "
            "(SUBSCRIBED_SKU_WAIT_MINUTES): nobody can tell whether a user still holds it, so the old subscription "
            "stays active. Check which product SKU it grants (Partner Center → the customer → Licenses), then "
            "`python -m d365_migration retry`",
            waiting=f"old SKU {record.old_sku_id} not in the customer's subscribed SKUs")
        return work.stop("blocked")
    # Pooled SKU with named users: the holders left must be the other subscriptions' (fit in their units). Their
    # ACTIVE units, deliberately not totalUnits: units in warning or suspended may not be there tomorrow, and the
    # stricter count only ever makes the suspension wait, never suspend a subscription someone still needs.
    others_units = max(0, old.active_units - record.quantity) if record.named_users is not None else 0
    if old.consumed_units > others_units:
        return await _old_sku_held(work, old.consumed_units - others_units, limit)
    return await _moves_visible(work, skus.get((record.new_sku_id or "").lower()), limit)


async def _old_sku_held(work: Work, held: int, limit: int) -> StepResult:
    """``held`` units of the old SKU are consumed: hand the record back to the license move, or wait for the units
    when the license move just found nobody to move.

    :raises RetryLater: waiting for lagging units, within ``SUBSCRIBED_SKU_WAIT_MINUTES``.
    """
    record = work.record
    if handed_back_without_moves(record):
        # get-a-list-of-available-licenses promises no read-your-writes: the license move read every user's licenses
        # and nobody holds the old SKU, so the reported units lag. Wait by time rather than bounce.
        await wait_then_block(
            work, "old_sku_consumed", limit, event="old_sku_still_consumed",
            detail=f"the customer's subscribed SKUs still show {held} unit(s) of the old SKU consumed {limit} min "
            "(SUBSCRIBED_SKU_WAIT_MINUTES) after the license move found nobody holding it (a user it cannot see, "
            "e.g. an inactive or unlisted user, or a group-based assignment?); old kept active. Remove the old "
            "product from them, then `python -m d365_migration retry`",
            waiting=f"{held} unit(s) of the old SKU still reported consumed; nobody left to move")
        return work.stop("blocked")
    done = trips(record)
    if done >= MAX_REASSIGN_TRIPS:
        return await _block(
            work, "old_sku_keeps_returning",
            f"{held} user(s) hold the old SKU again after {done} passes that moved users (is someone assigning it "
            "again, or another subscription of the same product?); old kept active")
    # Someone gave a user the old license again (or a move did not stick): move them first.
    await work.transition("reassigning", HANDED_BACK, f"{held} user(s) still hold the old SKU",
                          wait_kind=None, wait_started_at=None)
    return work.hand_over("back to reassign")


async def _moves_visible(work: Work, new: SubscribedSku | None, limit: int) -> StepResult | None:
    """Every user recorded as moved holds a unit of the new SKU: its ``consumedUnits`` is at least their number (a
    cheap necessary check; a pooled new SKU may show more). A license update answered 201 whose assignment did not
    stick (the SDK's license update is asynchronous; provisioning status is "pending" during license changes,
    get-subscription-provisioning-status) shows here before the old subscription goes.

    :raises RetryLater: waiting for the new SKU's units, within ``SUBSCRIBED_SKU_WAIT_MINUTES``.
    """
    record = work.record
    outcomes = await work.deps.ledger.user_outcomes(record)
    moved = sum(1 for o in outcomes if o.outcome in ("moved", "skipped"))
    consumed = new.consumed_units if new is not None else 0
    if consumed >= moved:
        return None
    await wait_then_block(
        work, "new_sku_consumed", limit, event="moves_not_visible",
        detail=f"{moved} user(s) were moved to the new SKU {record.new_sku_id} but the customer's subscribed SKUs "
        f"show only {consumed} of its units consumed after {limit} min (SUBSCRIBED_SKU_WAIT_MINUTES): a license "
        "assignment may not have stuck; old kept active. Check the moved users' licenses in Partner Center, then "
        "`python -m d365_migration retry`",
        waiting=f"new SKU shows {consumed} unit(s) consumed for {moved} moved user(s) yet")
    return work.stop("blocked")


# ---------------------------------------------------------------------- 2. the old subscription's status


async def _status_checked(work: Work, old_sub: Subscription) -> StepResult | None:
    """``None`` when the old subscription is active (suspend it), else how the step ends.

    :raises RetryLater: the old subscription is ``pending``, within ``PROVISIONING_TIMEOUT_MINUTES``.
    """
    status = old_sub.status
    if status == "active":
        return None
    if status in NO_LONGER_BILLING:
        await work.transition("completed", "already_" + status, f"old subscription already {status}; no PATCH sent")
        return work.stop("completed")
    if status == "pending":
        # Partner Center is working on the subscription (subscription-resources: pending): look again, by time.
        limit = work.settings.provisioning_timeout_minutes
        await wait_then_block(work, "old_subscription_pending", limit, event="old_subscription_pending",
                              detail=f"the old subscription is still pending after {limit} min "
                              "(PROVISIONING_TIMEOUT_MINUTES); check it in Partner Center, then "
                              "`python -m d365_migration retry`", waiting="old subscription is pending")
        return work.stop("blocked")
    return await _block(work, "old_status_unexpected",
                        f"the old subscription reads status {status!r}, neither active nor one that stops billing "
                        f"({', '.join(sorted(NO_LONGER_BILLING))}); nothing was sent. Check it in Partner Center, "
                        "then `python -m d365_migration retry`")


# ---------------------------------------------------------------------- 3. the PATCH


async def _etag_rejected(work: Work, exc: PreconditionFailedError) -> StepResult:
    """412 / 2055 to a PATCH sent right after a fresh GET. Once is someone changing the subscription meanwhile: re-read
    at once. In a row, it is the If-Match itself Partner Center refuses: wait longer each time, then block.

    :raises RetryLater: fewer than ``ETAG_REJECTIONS_MAX`` rejections in a row so far.
    """
    rejections = _etag_rejections(work) + 1
    answer = f"HTTP {exc.status} code {exc.code}: {exc.description}"
    if rejections >= ETAG_REJECTIONS_MAX:
        return await _block(
            work, "etag_rejected",
            f"Partner Center refused the suspension's If-Match {rejections} times in a row, each right after a "
            f"fresh GET ({answer}); old kept active. Something keeps changing the subscription, or its ETag is not "
            "accepted as sent: look at the subscription in Partner Center (pending changes, another tool), "
            "then `python -m d365_migration retry`")
    delay = ETAG_CHANGED_DELAY_SECONDS * ETAG_REJECTED_BACKOFF ** (rejections - 1)
    await work.transition(work.record.state, _ETAG_STALE,
                          f"{answer} ({rejections} of {ETAG_REJECTIONS_MAX} in a row); re-reading in {delay}s")
    raise RetryLater(f"old subscription changed while suspending ({rejections} in a row); re-reading in {delay}s",
                     delay=delay)


def _etag_rejections(work: Work) -> int:
    """The ETag rejections at the end of the record's history (any other event in between starts a new count)."""
    count = 0
    for entry in reversed(work.record.history):
        if entry.get("event") != _ETAG_STALE:
            break
        count += 1
    return count


async def _patch_suspended(work: Work, old_sub: Subscription) -> Subscription:
    """PATCH ``status: suspended`` with the record's current request attempt; after any answer (success, 202,
    409, 412, 400 …) the recorded attempt is bumped, so the next PATCH gets a new ``MS-RequestId``.

    :raises PreconditionFailedError: the ETag is stale.
    :raises SubscriptionSuspendedError: ``400 800091``.
    :raises UpdatePendingError: an update is still pending, or the 202 is not visible yet.
    """
    record, client = work.record, work.client
    attempt = RequestAttempt("suspend", (record.customer_id, record.subscription_id), record.suspend_attempt)
    while client.was_answered(attempt):  # an answer this process saw but the ledger does not hold yet
        attempt = attempt.next()
    # test-and-debug: "ETags … in double quotation marks"; suspend-a-subscription's example sends If-Match as the GET
    # returned it. After a refusal right after a fresh GET, the other form is tried (alternating) before the cap.
    etag_form: EtagForm = "as_received" if _etag_rejections(work) % 2 else "quoted"
    try:
        return await client.update_subscription(record.customer_id, old_sub, status="suspended", request_id=attempt,
                                                etag_form=etag_form)
    finally:
        if client.was_answered(attempt):
            await work.checkpoint(suspend_attempt=attempt.attempt + 1)


async def _not_applied(work: Work, status: str) -> StepResult:
    limit = work.settings.provisioning_timeout_minutes
    return await _block(work, "suspension_not_applied",
                        f"Partner Center answered the suspension PATCH but the old subscription still reads {status} "
                        f"after {limit} min (PROVISIONING_TIMEOUT_MINUTES); check it in Partner Center, then "
                        "`python -m d365_migration retry`")


async def _block(work: Work, event: str, detail: str) -> StepResult:
    """Stop the record as ``blocked`` (old kept active); a re-drive starts every wait afresh."""
    await work.transition("blocked", event, detail, wait_kind=None, wait_started_at=None)
    return work.stop("blocked")
