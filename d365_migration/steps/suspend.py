"""Runbook step 4 — suspend the old subscription, last, and only when that is safe.

Read top to bottom, for one ``reassigned`` record:

1. Re-check the precondition right before acting: the replacement is active (else block, old kept active) and no
   user holds the old SKU any more (else hand the record back to the license move — at most ``MAX_REASSIGN_TRIPS``
   times before a human must look).
2. The old subscription is already not active → completed, no PATCH sent.
3. PATCH the whole subscription resource with ``status: suspended`` and ``If-Match`` (a partial body would reset
   other fields); a changed ETag means re-read and try again. Verified suspended → ``completed``. ``400 800091``
   ("can't update subscription with suspended status", e.g. our earlier PATCH whose answer was lost) → re-read and
   complete if it is suspended.

Request ids follow the documented rule: the recorded ``suspend_attempt`` is bumped after every answer, so only a
PATCH whose answer was lost is re-sent with the same ``MS-RequestId``.
"""

from __future__ import annotations

import logging

from .._client import RequestAttempt
from .._exceptions import PreconditionFailedError, SubscriptionSuspendedError
from .._models import Subscription
from ._policy import ETAG_CHANGED_DELAY_SECONDS, MAX_REASSIGN_TRIPS
from ._routes import states_owned_by
from ._work import RetryLater, StepResult, Work

__all__ = ["run"]


async def run(work: Work) -> StepResult:
    """The suspension step for ``work.record``.

    :raises RetryLater: the subscription changed under the PATCH, or is not suspended yet after it.
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
    old_sku_id = record.old_sku_id.lower()
    if old_sku_id != (record.new_sku_id or "").lower():
        skus = {s.product_sku.id.lower(): s for s in await client.list_subscribed_skus(record.customer_id)}
        old = skus.get(old_sku_id)
        # Pooled SKU with named users: the holders left must be the other subscriptions' (fit in their units).
        others_units = (max(0, old.active_units - record.quantity)
                        if old is not None and record.named_users is not None else 0)
        if old is not None and old.consumed_units > others_units:
            trips = sum(1 for h in record.history if h.get("event") == "old_sku_still_used")
            if trips >= MAX_REASSIGN_TRIPS:
                await work.transition(
                    "blocked", "old_sku_keeps_returning",
                    f"{old.consumed_units} user(s) still hold the old SKU after {trips} passes (is someone "
                    "assigning it again, or another subscription of the same product?); old kept active")
                return work.stop("blocked")
            # Someone gave a user the old license again (or a move did not stick): move them first.
            await work.transition("reassigning", "old_sku_still_used",
                                  f"{old.consumed_units - others_units} user(s) still hold the old SKU")
            return work.hand_over("back to reassign")

    old_sub = await client.get_subscription(record.customer_id, record.subscription_id)
    if old_sub.status != "active":
        await work.transition("completed", "already_" + old_sub.status,
                              f"old subscription already {old_sub.status}; no PATCH sent")
        return work.stop("completed")
    try:
        updated = await _patch_suspended(work, old_sub)
    except PreconditionFailedError:
        raise RetryLater("old subscription changed while suspending; re-reading",
                         delay=ETAG_CHANGED_DELAY_SECONDS) from None
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
            raise RetryLater(f"old subscription still {check.status} after PATCH")
    await work.transition("completed", "old_suspended",
                          f"old subscription suspended; replacement {record.new_subscription_id}")
    return work.stop("completed")


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
    try:
        return await client.update_subscription(record.customer_id, old_sub, status="suspended", request_id=attempt)
    finally:
        if client.was_answered(attempt):
            await work.checkpoint(suspend_attempt=attempt.attempt + 1)
