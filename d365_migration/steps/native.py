"""Partner Center's native move — replaces runbook steps 2 and 3 (buy the replacement, move every user's license)
with ONE transition or upgrade *with license transfer*; the record then rejoins the runbook at step 4 (suspend).

Worked from the purchase queue (``native_pending`` / ``native_moving`` are routed to the purchase step, which hands
them here). Read top to bottom, for one record:

1. **Route** (:func:`route`, called by the purchase step for a ``detected`` record once the old subscription still
   qualifies and no replacement was bought by hand): under ``MIGRATION_PATH_POLICY`` ``prefer_native`` /
   ``native_only`` ask Partner Center (read-only eligibility calls, :func:`~d365_migration._native_path.choose_path`).
   A native path with license transfer to the configured product → the purchase step's pre-flight (a move creates and
   bills the replacement; a pooled SKU blocks, as the transfer could carry users the retiring subscription does not
   license) → ``native_pending``; none under ``native_only`` → ``blocked`` with the eligibility reasons verbatim,
   nothing bought; none under ``prefer_native`` → the runbook (``migration_path=runbook`` is recorded so the choice is
   not re-asked). Users named by an operator (``retry --users-file``) can only be moved by the runbook.
2. **Act once** (``native_pending``): the holders of the old SKU are written to the ledger (per-user rows) and the
   attempt (``native_attempted_at``, ``native_request_id``) is recorded BEFORE the POST; the ``MS-RequestId`` is a
   :class:`~d365_migration._client.RequestAttempt` (same id only to resend after a lost answer; the attempt number is
   bumped after every answer seen). After a lost answer, the subscription's transitions (``GET …/transitions``) or
   the subscription of the upgrade's target offer created since the attempt (and claimed by no other migration) are
   looked for; the same request is sent again only if nothing shows for ``LOST_WRITE_RESEND_WAIT_SECONDS`` and the old
   subscription is still active (once it is not, something happened and nothing is ever re-sent).
3. **Rejected** (Partner Center said no): if nothing changed (no transition, old subscription still active) and the
   policy is ``prefer_native`` the record falls back to the runbook (``detected``, ``migration_path=runbook``);
   otherwise ``blocked`` with Partner Center's code and text.
4. **Wait** (``native_moving``) for the transition's events / the new subscription to complete, measured on the
   injected clock from ``native_attempted_at`` up to ``PROVISIONING_TIMEOUT_MINUTES``; then ``blocked``.
5. **Verify**: every former holder of the old SKU has the new SKU and not the old one. A user who does not
   (``licenseErrors``, a failed ``SeatReassignment``) → ``blocked`` naming the users; the old subscription is left
   as it is (never suspended while a user lacks the product). All moved → ``purchased`` with both SKUs recorded: the
   license step finds nobody left on the old SKU, and the suspension step re-checks and suspends the old
   subscription if Partner Center left it active (or records it already suspended).

Learn: partner-center/developer/transition-a-new-commerce-subscription, get-transitions, transition-resources,
transition-a-subscription, upgrade-resources; MS-RequestId rule: partner-center/developer/headers.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from .._client import RequestAttempt
from .._exceptions import (
    ClientError,
    LookAgainLater,
    NotFoundError,
    PartnerCenterApiError,
    ProvisioningNotReadyError,
    ResponseLostError,
    ThrottledError,
    UncertainWriteError,
)
from .._ledger import UserOutcome
from .._models import Subscription, product_key, same_id
from .._native_client import Transition, UpgradeOption, UpgradeResult
from .._native_path import choose_path, parse_path_policy
from .._settings import ReplacementTarget, is_guid
from ._policy import CLOCK_SKEW
from ._preflight import preflight
from ._work import RetryLater, StepResult, Work

__all__ = ["NATIVE_STATES", "route", "run"]

NATIVE_STATES = frozenset({"native_pending", "native_moving"})

# A lost answer is looked for again this soon: the transitions list shows a transition as soon as it is created.
LOST_ANSWER_DELAY_SECONDS = 5

_HOLDER = "native_holder"  # per-user ledger outcome: held the old SKU right before the native move


def _target(work: Work) -> ReplacementTarget | None:
    return work.settings.replacement_offers.target(work.record.family or "", work.record.audience or "")


async def route(work: Work, old: Subscription) -> StepResult | None:
    """Called by the purchase step for a ``detected`` record once the old subscription ``old`` is known to still
    qualify (active, not auto-renewing, nothing bought by hand since detection), before it would buy: the native
    step's result when the record goes the native way or is blocked; ``None`` when the runbook buys — also after a
    refused native move fell back to it, in the same invocation (the purchase queue's function has no output binding
    to its own queue).

    :raises RetryLater: the native move is in progress, or its answer was lost.
    :raises PartnerCenterError: a read failed after the client's retries (eligibility failures count as "no path")."""
    record = work.record
    policy = parse_path_policy(work.settings.migration_path_policy)
    target = _target(work)
    if policy == "runbook_only" or record.migration_path == "runbook" or target is None:
        return None
    if record.named_users is not None:
        # Pooled SKU, and an operator named who belongs to the retiring subscription (`retry --users-file`): Partner
        # Center's license transfer moves whom it moves, so only the runbook can move exactly those users.
        why = ("an operator named the users who move (retry --users-file, pooled product SKU); a native license "
               "transfer cannot be limited to them")
        if policy == "native_only":
            await work.transition("blocked", "no_native_path",
                                  f"MIGRATION_PATH_POLICY=native_only but {why}; nothing bought. Set "
                                  "MIGRATION_PATH_POLICY=prefer_native (or runbook_only), then "
                                  "`python -m d365_migration retry`")
            return work.stop("blocked")
        await work.transition("detected", "path_runbook", why, migration_path="runbook")
        return None
    choice = await choose_path(work.client, record.customer_id, old, target, policy=policy)
    if choice.kind == "blocked":
        await work.transition("blocked", "no_native_path", choice.reason + "; nothing bought")
        return work.stop("blocked")
    if not choice.native:
        await work.transition("detected", "path_runbook", choice.reason, migration_path="runbook")
        return None
    quantity = old.quantity or record.quantity
    # A native move creates (and bills) the replacement as surely as a purchase: the same pre-flight first (users,
    # provisioning status and subscribed SKUs readable; the old SKU known; its holders fit the old quantity — more
    # holders means a pooled SKU, and the transfer could carry users the retiring subscription does not license).
    if not await preflight(work, old_quantity=quantity):
        return work.stop("blocked")
    native_target = (choice.transition.catalog_item_id if choice.transition is not None
                     else choice.upgrade.target_offer_id if choice.upgrade is not None else "")
    await work.transition("native_pending", "path_native", f"{choice.label}: {choice.reason}",
                          migration_path=choice.kind, native_target=native_target, quantity=quantity,
                          replacement_offer_id=native_target, purchase_started_at=work.now().isoformat())
    if work.record.native_attempted_at:
        # Chosen again after an operator's `retry`: a move an earlier attempt made is adopted, never asked for twice.
        if await _recover(work):
            return await run(work)
        await work.checkpoint(native_attempted_at=None, native_request_id=None, native_operation_id=None)
    return await run(work)


async def run(work: Work) -> StepResult | None:
    """The native step for a record in ``native_pending`` / ``native_moving``; ``None`` when a refused move fell
    back to the runbook (the caller, the purchase step, buys).

    :raises RetryLater: the move is still in progress, or an answer was lost and is looked for again.
    :raises PartnerCenterError: a call failed after the client's retries (the message is retried)."""
    if work.record.state == "native_pending":
        await _act_once(work)
    if work.record.state == "detected":
        return None
    if work.record.state != "native_moving":
        return work.stop(work.record.state)
    return await _wait_and_verify(work)


# ---------------------------------------------------------------------- act once


def _attempt(work: Work) -> RequestAttempt:
    record = work.record
    return RequestAttempt(str(record.migration_path), (record.customer_id, record.subscription_id),
                          record.native_attempt)


def _since_started(work: Work) -> timedelta:
    """Time since the move was sent, or since an operator's `retry` restarted the clock (``purchase_started_at``),
    whichever is later: the provisioning timeout counts from there."""
    record = work.record
    starts = [datetime.fromisoformat(t) for t in (record.native_attempted_at, record.purchase_started_at) if t]
    return work.now() - max(starts) if starts else timedelta(0)


async def _act_once(work: Work) -> None:
    record = work.record
    if record.native_attempted_at:
        # An earlier attempt got no answer we saw: find out what it did before ever sending again.
        if await _recover(work):
            return
        waited = work.now() - datetime.fromisoformat(record.native_attempted_at)
        if _attempt(work).request_id != record.native_request_id:
            # The attempt number moved on since this attempt was recorded, so Partner Center answered it — without
            # naming the target (transition-resources: toSubscriptionId may come later): the move exists, so it is
            # never asked for again — only looked for, until the provisioning timeout.
            if _since_started(work) > timedelta(minutes=work.settings.provisioning_timeout_minutes):
                await work.transition(
                    "blocked", "native_target_unknown",
                    f"Partner Center accepted the {record.migration_path} to {record.native_target} but names no "
                    f"target subscription after {work.settings.provisioning_timeout_minutes} min; nothing re-sent. "
                    "Check the subscription's transitions in Partner Center")
                return
            raise RetryLater("native move accepted; its target subscription is not named yet")
        old = await work.client.get_subscription(record.customer_id, record.subscription_id)
        if old.status != "active":
            # Something happened to the old subscription (Partner Center suspends it when the move begins): never
            # ask for the move again; look for what it created until the provisioning timeout.
            if _since_started(work) > timedelta(minutes=work.settings.provisioning_timeout_minutes):
                await work.transition(
                    "blocked", "native_lost_answer_unresolved",
                    f"the native move's answer was lost and the old subscription is now {old.status}, but no "
                    f"{record.migration_path} to {record.native_target} shows after "
                    f"{work.settings.provisioning_timeout_minutes} min; nothing re-sent. Check the subscription in "
                    "Partner Center")
                return
            raise RetryLater(f"native move's answer lost; old subscription {old.status}, looking for the move")
        resend_wait = timedelta(seconds=work.settings.lost_write_resend_wait_seconds)
        if waited < resend_wait:
            raise RetryLater("native move's answer lost; looking for it before anything is re-sent")
        work.log(logging.INFO, "event=native_resend nothing found %s after a lost answer; same MS-RequestId %s",
                 resend_wait, record.native_request_id)
    else:
        old_sku = record.old_sku_id or await _old_sku(work)  # pre-flight recorded it
        if old_sku is None:
            raise RetryLater("old subscription's product SKU not readable yet")
        await _record_holders(work, old_sku)
        await work.transition("native_pending", "native_attempt", f"MS-RequestId {_attempt(work).request_id}",
                              native_attempted_at=work.now().isoformat(),
                              native_request_id=_attempt(work).request_id, old_sku_id=old_sku)
    try:
        if work.record.migration_path == "native_upgrade":
            await _send_upgrade(work)
        else:
            await _send_transition(work)
    except (ResponseLostError, UncertainWriteError) as exc:
        raise RetryLater(f"native move's answer lost ({type(exc).__name__}); reading its state next",
                         delay=LOST_ANSWER_DELAY_SECONDS) from None
    except ClientError as exc:
        await _rejected(work, f"HTTP {exc.status} {exc.code or ''}: {exc.description}".strip())


async def _send_transition(work: Work) -> None:
    record = work.record
    options = await work.client.get_transition_options(record.customer_id, record.subscription_id)
    option = next((o for o in options if same_id(o.catalog_item_id, record.native_target or "")), None)
    quantity = (option.quantity if option and option.quantity else None) or record.quantity
    transition_type = option.transition_type if option else "transition_with_license_transfer"
    transition = await work.client.create_transition(
        record.customer_id, record.subscription_id, to_catalog_item_id=record.native_target or "",
        quantity=quantity, transition_type=transition_type, request_id=_attempt(work))
    if not transition.target_known:  # transition-resources: toSubscriptionId may come later; _recover reads it
        await work.checkpoint(native_attempt=work.record.native_attempt + 1)  # an answer was seen
        raise RetryLater("transition accepted; its target subscription is not named yet")
    await _started(work, transition.to_subscription_id, f"transition {transition.id}", transition.id)


async def _send_upgrade(work: Work) -> None:
    record = work.record
    options = await work.client.get_upgrade_options(record.customer_id, record.subscription_id)
    option: UpgradeOption | None = next(
        (o for o in options if same_id(o.target_offer_id, record.native_target or "")), None)
    if option is None or not option.is_eligible or not option.with_license_transfer:
        why = "; ".join(str(e) for e in option.errors) if option else "upgrade no longer offered"
        await _rejected(work, why or f"upgrade type is {option.upgrade_type if option else 'none'}")
        return
    result: UpgradeResult = await work.client.create_upgrade(record.customer_id, record.subscription_id, option,
                                                             request_id=_attempt(work))
    if result.errors or not result.target_subscription_id:
        await _rejected(work, "; ".join(str(e) for e in result.errors) or "no target subscription in the answer")
        return
    failures = "; ".join(str(e) for e in result.license_errors)
    await _started(work, result.target_subscription_id, "upgrade" + (f" (licenseErrors: {failures})"
                                                                      if failures else ""), None,
                   user_failures=failures or None)


async def _started(work: Work, new_subscription_id: str, what: str, operation_id: str | None,
                   **changes: object) -> None:
    """Partner Center answered: record the move and bump the attempt (an answer was seen)."""
    await work.transition("native_moving", "native_started", f"{what} → subscription {new_subscription_id}",
                          new_subscription_id=new_subscription_id, native_operation_id=operation_id,
                          native_attempt=work.record.native_attempt + 1, **changes)


async def _recover(work: Work) -> bool:
    """After a lost answer: the move Partner Center made for this record, if any, recorded as started (``True``).

    A transition is the source subscription's own history (``GET …/transitions``; one transition per source). An
    upgrade leaves no history to read, so it is the subscription of the upgrade's target offer that appeared since
    the attempt was recorded (the attempt is written before the POST) and that no other migration of the customer has
    recorded as its own."""
    record = work.record
    if record.migration_path == "native_transition":
        for t in await work.client.list_transitions(record.customer_id, record.subscription_id):
            if not same_id(t.from_subscription_id, record.subscription_id):
                continue
            if not t.to_subscription_id:
                if t.completed:
                    # Complete with no target named: converted in place, or an answer this app cannot read. Either
                    # way there is no replacement to verify users on: a human decides.
                    await work.transition(
                        "blocked", "native_target_unknown",
                        f"transition {t.id} is complete but names no target subscription; nothing re-sent. Check "
                        "the subscription in Partner Center")
                    return True
                continue
            if t.to_catalog_item_id and product_key(t.to_catalog_item_id) != product_key(record.native_target or ""):
                await work.transition(
                    "blocked", "native_other_transition",
                    f"the old subscription was transitioned to {t.to_catalog_item_id} (transition {t.id}), not to "
                    f"the configured {record.native_target}; check it in Partner Center")
                return True
            await _started(work, t.to_subscription_id, f"transition {t.id} (found after a lost answer)", t.id)
            work.log(logging.WARNING, "event=native_recovered transition=%s", t.id)
            return True
        return False
    found = await _upgraded_subscription(work)
    if found is not None:
        await _started(work, found.id, "upgrade (found after a lost answer)", None)
        work.log(logging.WARNING, "event=native_recovered subscription=%s", found.id)
        return True
    return False


async def _upgraded_subscription(work: Work) -> Subscription | None:
    """A subscription of the upgrade's target offer created since the attempt was recorded (upgrades carry no tag),
    that is not another migration's; ``None`` before any attempt."""
    record = work.record
    if not record.native_attempted_at:
        return None
    since = datetime.fromisoformat(record.native_attempted_at) - CLOCK_SKEW
    claimed = await work.claimed_by_others()
    wanted = product_key(record.native_target or "")
    for sub in await work.client.list_subscriptions(record.customer_id):
        if (not same_id(sub.id, record.subscription_id) and sub.id.lower() not in claimed
                and sub.product_key == wanted and sub.created is not None and sub.created >= since):
            return sub
    return None


async def _changed_anything(work: Work) -> bool:
    record = work.record
    if record.migration_path == "native_transition":
        if await work.client.list_transitions(record.customer_id, record.subscription_id):
            return True
    elif await _upgraded_subscription(work) is not None:
        return True
    old = await work.client.get_subscription(record.customer_id, record.subscription_id)
    return old.status != "active"


async def _rejected(work: Work, why: str) -> None:
    """Partner Center refused the move: back to the runbook only when nothing changed and the policy allows it. A
    refusal of a move re-sent after a lost answer may be Partner Center saying the first one happened: look first."""
    if work.record.native_attempt == 0 and await _recover(work):
        return
    attempt = work.record.native_attempt + 1  # an answer was seen
    if parse_path_policy(work.settings.migration_path_policy) == "native_only":
        await work.transition("blocked", "native_rejected",
                              f"MIGRATION_PATH_POLICY=native_only and Partner Center refused the native move: {why}",
                              native_attempt=attempt)
        return
    if await _changed_anything(work):
        await work.transition("blocked", "native_rejected_after_change",
                              f"Partner Center refused the native move but the subscription changed: {why}; "
                              "check it in Partner Center", native_attempt=attempt)
        return
    await work.transition("detected", "native_rejected_fallback", f"native move refused, nothing changed: {why}; "
                          "taking the three-step runbook", migration_path="runbook", native_attempt=attempt)


# ---------------------------------------------------------------------- wait, then verify


async def _wait_and_verify(work: Work) -> StepResult:
    record = work.record
    assert record.new_subscription_id
    transition: Transition | None = None
    if record.migration_path == "native_transition":
        history = await work.client.list_transitions(record.customer_id, record.subscription_id)
        transition = next((t for t in history if (record.native_operation_id
                                                  and same_id(t.id, record.native_operation_id))
                           or same_id(t.to_subscription_id, record.new_subscription_id)), None)
    try:
        new_sub = await work.client.get_subscription(record.customer_id, record.new_subscription_id)
    except NotFoundError:
        new_sub = None
    done = new_sub is not None and new_sub.status == "active" and (
        transition is None or transition.completed or transition.failed)
    if not done:
        timeout = work.settings.provisioning_timeout_minutes
        if _since_started(work) > timedelta(minutes=timeout):
            await work.transition(
                "blocked", "native_timeout",
                f"native move not complete {timeout} min after it was sent (subscription "
                f"{record.new_subscription_id} {new_sub.status if new_sub else 'not visible'}"
                f"{', transition ' + transition.status if transition else ''}); old kept as it is")
            return work.stop("blocked")
        raise RetryLater("native move in progress")
    return await _verify(work, transition)


async def _verify(work: Work, transition: Transition | None) -> StepResult:
    record, client = work.record, work.client
    old_sku = (record.old_sku_id or "").lower()
    new_sku = (record.new_sku_id or await _sku_of(work, record.new_subscription_id or "") or "").lower()
    if not old_sku or not new_sku:
        raise RetryLater("product SKUs not readable yet")
    outcomes = await work.deps.ledger.user_outcomes(record)
    holders = [o for o in outcomes if o.outcome in (_HOLDER, "moved", "failed")]
    failed: list[str] = []
    for holder in holders:
        skus = {lic.product_sku.id.lower() for lic in await client.get_user_licenses(record.customer_id,
                                                                                     holder.user_id)}
        who = f"{holder.user_principal_name or holder.user_id} ({holder.user_id})"
        if new_sku in skus and (old_sku not in skus or old_sku == new_sku):
            await work.deps.ledger.record_user(record, UserOutcome(holder.user_id, "moved", "native move",
                                                                   holder.user_principal_name))
            continue
        why = "still holds the old SKU" if old_sku in skus else "has neither product"
        failed.append(f"{who}: {why}")
        await work.deps.ledger.record_user(record, UserOutcome(holder.user_id, "failed", why,
                                                               holder.user_principal_name))
    if transition is not None and transition.failed and not failed:
        errors = "; ".join(str(e) for ev in transition.events for e in ev.errors) or transition.status
        failed.append(f"transition {transition.id} failed: {errors}")
    if failed:
        await work.transition(
            "blocked", "native_license_errors",
            f"{len(failed)} former holder(s) of the old SKU lack the new one after the native move: "
            + "; ".join(failed) + (f" (Partner Center licenseErrors: {record.user_failures})"
                                   if record.user_failures else "")
            + "; old subscription not suspended", users_failed=len(failed), new_sku_id=new_sku,
            users_moved=len(holders) - len(failed))
        return work.stop("blocked")
    # Back on the runbook at the license step: it finds nobody left on the old SKU (or moves whoever was given it
    # meanwhile) and hands over to the suspension, which suspends the old subscription if Partner Center left it
    # active. (The purchase queue's function can only hand over to the license step.)
    await work.transition("purchased", "native_verified",
                          f"{len(holders)} former holder(s) have the new SKU; {record.migration_path} complete",
                          new_sku_id=new_sku, users_moved=len(holders))
    return work.hand_over("native move verified")


# ---------------------------------------------------------------------- SKUs and holders


async def _sku_of(work: Work, subscription_id: str) -> str | None:
    try:
        status = await work.client.get_provisioning_status(work.record.customer_id, subscription_id)
    except ProvisioningNotReadyError:
        return None  # not readable yet: the caller falls back to the catalog or looks again
    except PartnerCenterApiError as exc:
        # Only a refusal (4xx) means "no SKU here": a 5xx, a 429 or a "look again" is not an answer.
        if exc.status >= 500 or isinstance(exc, (ThrottledError, LookAgainLater)):
            raise
        return None
    return status.sku_id if status.sku_id and is_guid(status.sku_id) else None


async def _old_sku(work: Work) -> str | None:
    record = work.record
    sku = await _sku_of(work, record.subscription_id)
    if sku:
        return sku
    offer = work.deps.catalog.match(record.offer_id, record.offer_name)
    parts = {p.lower() for p in (offer.sku_part_numbers if offer else ())}
    for subscribed in await work.client.list_subscribed_skus(record.customer_id) if parts else []:
        if (subscribed.product_sku.sku_part_number or "").lower() in parts:
            return subscribed.product_sku.id
    return None


async def _record_holders(work: Work, old_sku: str) -> None:
    """Write every current holder of the old SKU to the ledger (the list the verification checks)."""
    record, client = work.record, work.client
    async for user in client.list_users(record.customer_id):
        skus = {lic.product_sku.id.lower() for lic in await client.get_user_licenses(record.customer_id, user.id)}
        if old_sku.lower() in skus:
            await work.deps.ledger.record_user(record, UserOutcome(user.id, _HOLDER, "held the old SKU before the "
                                                                   "native move", user.user_principal_name))
