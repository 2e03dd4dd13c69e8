"""Partner Center's native move — replaces runbook steps 2 and 3 (buy the replacement, move every user's license)
with ONE transition or upgrade *with license transfer*; the record then rejoins the runbook at step 4 (suspend).

Worked from the purchase queue (``native_pending`` / ``native_moving`` are routed to the purchase step, which hands
them here). Read top to bottom, for one record:

1. **Route** (:func:`route`, called by the purchase step before it would buy, record ``detected``): under
   ``MIGRATION_PATH_POLICY`` ``prefer_native`` / ``native_only`` ask Partner Center (read-only eligibility calls,
   :func:`~d365_migration._native_path.choose_path`). A native path with license transfer to the configured product →
   ``native_pending``; none under ``native_only`` → ``blocked`` with the eligibility reasons verbatim, nothing bought;
   none under ``prefer_native`` → the runbook (``migration_path=runbook`` is recorded so the choice is not re-asked).
2. **Act once** (``native_pending``): the holders of the old SKU are written to the ledger (per-user rows) and the
   attempt (``native_attempted_at``, ``native_request_id``) is recorded BEFORE the POST; the ``MS-RequestId`` is a
   :class:`~d365_migration._client.RequestAttempt` (same id only to resend after a lost answer; the attempt number is
   bumped after every answer seen). After a lost answer, the subscription's transitions (``GET …/transitions``) or
   its subscriptions (upgrade) are read first; only if nothing shows is the same request sent again.
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
from .._exceptions import ClientError, NotFoundError, PartnerCenterApiError, ResponseLostError, UncertainWriteError
from .._ledger import UserOutcome
from .._models import Subscription, same_id
from .._native_client import Transition, UpgradeOption, UpgradeResult
from .._native_path import choose_path, parse_path_policy
from .._settings import ReplacementTarget, is_guid
from ._work import RetryLater, StepResult, Work

__all__ = ["NATIVE_STATES", "route", "run"]

NATIVE_STATES = frozenset({"native_pending", "native_moving"})

# A lost answer is looked for again this soon: the transitions list shows a transition as soon as it is created.
LOST_ANSWER_DELAY_SECONDS = 5

_HOLDER = "native_holder"  # per-user ledger outcome: held the old SKU right before the native move


def _product_key(item_id: str) -> str:
    return ":".join(item_id.strip().lower().split(":")[:2])


def _target(work: Work) -> ReplacementTarget | None:
    return work.settings.replacement_offers.target(work.record.family or "", work.record.audience or "")


async def route(work: Work) -> StepResult | None:
    """Called by the purchase step before it would buy (record ``detected``) and for a record on the native path:
    the native step's result when the record goes (or went) the native way or is blocked; ``None`` when the runbook
    buys — also after a refused native move fell back to it, in the same invocation (the purchase queue's function
    has no output binding to its own queue).

    :raises RetryLater: the native move is in progress, or its answer was lost.
    :raises PartnerCenterError: reading the old subscription failed (eligibility failures count as "no path")."""
    record = work.record
    if record.state in NATIVE_STATES:
        return await run(work)
    if record.state != "detected":
        return None
    policy = parse_path_policy(work.settings.migration_path_policy)
    target = _target(work)
    if policy == "runbook_only" or record.migration_path == "runbook" or target is None:
        return None
    old = await work.client.get_subscription(record.customer_id, record.subscription_id)
    if old.status != "active" or old.auto_renew:
        return None  # the purchase step blocks it with its own words (no longer qualifies)
    choice = await choose_path(work.client, record.customer_id, old, target, policy=policy)
    if choice.kind == "blocked":
        await work.transition("blocked", "no_native_path", choice.reason + "; nothing bought")
        return work.stop("blocked")
    if not choice.native:
        await work.transition("detected", "path_runbook", choice.reason, migration_path="runbook")
        return None
    native_target = (choice.transition.catalog_item_id if choice.transition is not None
                     else choice.upgrade.target_offer_id if choice.upgrade is not None else "")
    await work.transition("native_pending", "path_native", f"{choice.label}: {choice.reason}",
                          migration_path=choice.kind, native_target=native_target,
                          quantity=old.quantity or record.quantity,
                          replacement_offer_id=native_target, purchase_started_at=work.now().isoformat())
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


async def _act_once(work: Work) -> None:
    record = work.record
    if record.native_attempted_at:
        # An earlier attempt got no answer we saw: find out what it did before ever sending again.
        if await _recover(work):
            return
        work.log(logging.INFO, "event=native_resend nothing found after a lost answer; same MS-RequestId %s",
                 record.native_request_id)
    else:
        old_sku = await _old_sku(work)
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
    """After a lost answer: the move Partner Center made, if any, recorded as started. ``True`` when found."""
    record = work.record
    if record.migration_path == "native_transition":
        for t in await work.client.list_transitions(record.customer_id, record.subscription_id):
            if same_id(t.from_subscription_id, record.subscription_id) and t.to_subscription_id:
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
    """A subscription of the upgrade's target offer created since detection (upgrades carry no tag)."""
    record = work.record
    detected = datetime.fromisoformat(record.created_at) if record.created_at else None
    for sub in await work.client.list_subscriptions(record.customer_id):
        if (not same_id(sub.id, record.subscription_id) and sub.offer_id
                and _product_key(sub.offer_id) == _product_key(record.native_target or "")
                and (detected is None or sub.created is None or sub.created >= detected - timedelta(minutes=5))):
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
    """Partner Center refused the move: back to the runbook only when nothing changed and the policy allows it."""
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
        transition = next((t for t in history if (record.native_operation_id and t.id == record.native_operation_id)
                           or same_id(t.to_subscription_id, record.new_subscription_id)), None)
    try:
        new_sub = await work.client.get_subscription(record.customer_id, record.new_subscription_id)
    except NotFoundError:
        new_sub = None
    done = new_sub is not None and new_sub.status == "active" and (
        transition is None or transition.completed or transition.failed)
    if not done:
        timeout = work.settings.provisioning_timeout_minutes
        started = datetime.fromisoformat(record.native_attempted_at or work.now().isoformat())
        if work.now() - started > timedelta(minutes=timeout):
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
    except PartnerCenterApiError as exc:
        if exc.status >= 500:
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
