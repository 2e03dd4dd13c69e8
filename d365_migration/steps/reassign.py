"""Runbook step 3 — move every user's license from the old product SKU to the new one.

Read top to bottom, for one record whose replacement is active:

1. Know both SKUs: the old and the new subscription's product SKU (from provisioning status, else the catalog's SKU
   part numbers against the customer's subscribed SKUs); wait while they are not readable yet. The same SKU on both
   sides means nobody needs moving.
2. Before the first page, the old SKU must be listed in the customer's subscribed SKUs: the suspension can only
   check that nobody holds a SKU it can see, so a pass over a SKU that is not there never ends in "all moved" (it
   waits, then blocks; the old subscription stays active).
3. Page by page through the customer's users: find who holds the old SKU, check the new SKU has room for them, and
   move each with ONE license update that assigns the new SKU and removes the old one together (a user is never
   without the product). Each page's progress and the next page's cursor are saved, so thousands of users resume
   where the last invocation stopped.
   Users whose ``state`` is not active (soft-deleted, user-resources) are not touched; a user deleted meanwhile
   (``404 60002``) is recorded as ``gone``; any other refusal of one user's licenses is that user's failure.
   With a pooled SKU (also granted by another subscription), only the users an operator named move
   (``retry … --users-file``).
4. Any user who could not be moved blocks the record (the old subscription stays active); otherwise ``reassigned``
   and the record goes on to the suspension.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta

from .._client import PageRequest, RequestAttempt
from .._exceptions import (
    LookAgainLater,
    NotFoundError,
    PartnerCenterApiError,
    ProvisioningNotReadyError,
    ThrottledError,
)
from .._ledger import UserOutcome
from .._models import CustomerUser, same_id
from .._settings import is_guid
from ._routes import states_owned_by
from ._waits import MOVED_AGAIN, handed_back_without_moves, wait_then_block
from ._work import RetryLater, StepResult, Work

__all__ = ["run"]


#: error-codes: ``404 60002`` "User object ID isn't found" — the user was deleted since the users page was read.
USER_NOT_FOUND = "60002"


async def run(work: Work) -> StepResult:
    """The license step for ``work.record``.

    :raises RetryLater: SKUs or free units are not visible yet, or the invocation budget is used up.
    :raises PartnerCenterError: a call failed after the client's retries (the message is retried).
    """
    record = work.record
    if record.state == "reassigned":
        return work.hand_over("already reassigned")
    if record.state not in states_owned_by("reassign") or not record.new_subscription_id:
        work.log(logging.INFO, "reassign message ignored: record is %s", record.state)
        return work.stop("stale message")

    started = work.now()
    if not (record.old_sku_id and record.new_sku_id) and not await _resolve_skus(work):
        return work.stop("blocked")
    old_sku, new_sku = work.record.old_sku_id, work.record.new_sku_id
    assert old_sku and new_sku
    if same_id(old_sku, new_sku):
        await work.transition("reassigned", "same_sku",
                              "old and new subscription grant the same product SKU; no user needs moving")
        return work.hand_over("reassigned")

    if not work.record.users_cursor and not await _old_sku_listed(work, old_sku):
        return work.stop("blocked")
    budget = timedelta(seconds=work.settings.invocation_budget_seconds)
    page: PageRequest | None = (PageRequest.from_json(json.loads(work.record.users_cursor))
                                if work.record.users_cursor else work.client.first_user_page(record.customer_id))
    while page is not None:
        if work.now() - started > budget:
            raise RetryLater("invocation budget reached; continuing from the saved users page", delay=0)
        page = await _move_page(work, page, old_sku, new_sku)
        if work.record.is_final:
            return work.stop("blocked")

    if work.record.users_failed:
        await work.transition(
            "blocked", "user_license_failed",
            f"{work.record.users_failed} user(s) could not be moved, so the old subscription stays active: "
            + (work.record.user_failures or "")[:700], users_failed=0, user_failures=None)
        return work.stop("blocked")
    nobody = (" (nobody held the old SKU any more when the suspension's check sent the record back: the reported "
              "units lag the moves)" if handed_back_without_moves(work.record) else "")
    await work.transition("reassigned", "licenses_moved",
                          f"{work.record.users_moved} moved, {work.record.users_skipped} already on the new SKU"
                          + nobody, wait_kind=None, wait_started_at=None)
    return work.hand_over("reassigned")


async def _old_sku_listed(work: Work, old_sku: str) -> bool:
    """Is the old SKU in the customer's subscribed SKUs? Waits (by time) while it is not; ``False`` after blocking.

    The old subscription is active, so its SKU must be listed (get-a-list-of-available-licenses lists every SKU the
    customer subscribes to). An id that is not there is not one the suspension's "nobody holds it" check can see —
    e.g. a provisioning-status ``skuId`` that is not a ``productSku.id`` (get-subscription-provisioning-status only
    calls it "the subscription s.k.u id") — so moving "everybody" on it proves nothing: fail closed.

    :raises RetryLater: not listed yet, within ``SUBSCRIBED_SKU_WAIT_MINUTES``.
    """
    record = work.record
    listed = {s.product_sku.id.lower() for s in await work.client.list_subscribed_skus(record.customer_id)}
    if old_sku.lower() in listed:
        return True
    limit = work.settings.subscribed_sku_wait_minutes
    await wait_then_block(
        work, "old_sku_listed", limit, event="old_sku_not_listed",
        detail=f"the old subscription's SKU {old_sku} is not in the customer's subscribed SKUs after {limit} min "
        "(SUBSCRIBED_SKU_WAIT_MINUTES), so nobody can tell whether every user was moved; nobody was moved and the "
        "old subscription stays active. Check which product SKU the old subscription grants (Partner Center → the "
        "customer → Licenses), then `python -m d365_migration retry`",
        waiting=f"old SKU {old_sku} not in the customer's subscribed SKUs")
    return False


async def _resolve_skus(work: Work) -> bool:
    """Record both product SKUs; ``False`` after blocking the record.

    :raises RetryLater: a SKU is not readable yet.
    """
    record = work.record
    assert record.new_subscription_id
    old_sku = record.old_sku_id or await _sku_of(work, record.subscription_id, old=True)
    try:
        new_sku = record.new_sku_id or await _sku_of(work, record.new_subscription_id, old=False)
        pending = "" if new_sku else "has no skuId yet"
    except ProvisioningNotReadyError:
        new_sku, pending = None, "answers 404 800007 (not refreshed yet)"
    if not new_sku:
        # Provisioning status "is updated every 15 minutes" (get-subscription-provisioning-status).
        limit = work.settings.provisioning_status_wait_minutes
        await wait_then_block(
            work, "provisioning_status", limit, event="provisioning_status_unavailable",
            detail=f"the replacement's provisioning status {pending} after {limit} min "
            "(PROVISIONING_STATUS_WAIT_MINUTES); check the subscription in Partner Center, then "
            "`python -m d365_migration retry`", waiting=f"replacement's provisioning status {pending}")
        return False
    if not old_sku:
        await work.transition("blocked", "sku_unknown", "cannot tell the product SKU of the old subscription")
        return False
    await work.transition("reassigning", "skus_resolved", f"old {old_sku} → new {new_sku}", old_sku_id=old_sku,
                          new_sku_id=new_sku, wait_kind=None, wait_started_at=None)
    return True


async def _sku_of(work: Work, subscription_id: str, *, old: bool) -> str | None:
    """The product SKU a subscription grants, from its provisioning status (the old one: else the catalog).

    :raises ProvisioningNotReadyError: the new subscription's provisioning status is not available yet.
    """
    record, client = work.record, work.client
    try:
        status = await client.get_provisioning_status(record.customer_id, subscription_id)
        if status.sku_id and is_guid(status.sku_id) and status.status != "pending":
            return status.sku_id
    except ProvisioningNotReadyError:
        if not old:
            raise
    except PartnerCenterApiError as exc:
        # Only a refusal (4xx) means "no SKU here, ask the catalog": a 5xx, a 429 or a "look again" is not an answer.
        if exc.status >= 500 or isinstance(exc, (ThrottledError, LookAgainLater)):
            raise
    if old:
        offer = work.deps.catalog.match(record.offer_id, record.offer_name)
        parts = {p.lower() for p in (offer.sku_part_numbers if offer else ())}
        if parts:
            for sku in await client.list_subscribed_skus(record.customer_id):
                if (sku.product_sku.sku_part_number or "").lower() in parts:
                    return sku.product_sku.id
    return None


@dataclass(frozen=True)
class _Holder:
    user_id: str
    upn: str | None
    has_new: bool  # already holds the new SKU: only the old one is removed


@dataclass
class _PageScan:
    """What one users page holds: the old SKU's holders, and the users whose licenses could not be read."""

    holders: list[_Holder] = field(default_factory=list)
    gone: list[tuple[CustomerUser, PartnerCenterApiError]] = field(default_factory=list)  # 404 60002
    unreadable: list[tuple[CustomerUser, PartnerCenterApiError]] = field(default_factory=list)  # any other 4xx
    inactive: int = 0  # state is not active: not touched


@dataclass
class _PageMoves:
    moved: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return self.moved + self.skipped


def _is_user_gone(exc: PartnerCenterApiError) -> bool:
    return isinstance(exc, NotFoundError) and exc.code == USER_NOT_FOUND


def _is_retried(exc: PartnerCenterApiError) -> bool:
    """5xx and 429 after the client's retries: no answer about the user seen; the message is retried."""
    return exc.status >= 500 or exc.status == 429


async def _move_page(work: Work, page: PageRequest, old_sku: str, new_sku: str) -> PageRequest | None:
    """Move the holders of one users page; save the progress and the next page's cursor; return that cursor.
    Blocks the record (and returns ``None``) when the new SKU has too few free units."""
    record, client = work.record, work.client
    users, next_page = await client.user_page(page)
    scan = await _holders(work, users, old_sku, new_sku)
    need_units = sum(1 for h in scan.holders if not h.has_new)
    if need_units and not await _room_for(work, new_sku, need_units):
        return None
    recorded = [h.user_id for h in scan.holders] + [u.id for u, _ in scan.gone + scan.unreadable]
    answers = await work.deps.ledger.user_answers(record, recorded) if recorded else {}
    moves = _PageMoves()
    for user, exc in scan.gone:
        await _record_gone(work, user.id, user.user_principal_name, exc, answers.get(user.id.lower(), 0))
    for user, exc in scan.unreadable:
        moves.failures.append(f"{user.user_principal_name or user.id}: licenses unreadable: {exc.description} "
                              f"(HTTP {exc.status} code {exc.code})")
        await work.deps.ledger.record_user(record, UserOutcome(user.id, "failed", f"licenses unreadable: {exc}",
                                                               user.user_principal_name,
                                                               answers=answers.get(user.id.lower(), 0)))
    for holder in scan.holders:
        await _move_user(work, holder, old_sku, new_sku, answers.get(holder.user_id.lower(), 0), moves)
    if scan.inactive:
        work.log(logging.INFO, "event=inactive_users_skipped count=%d (state is not active)", scan.inactive)
    latest = work.record
    changes = dict(
        users_moved=latest.users_moved + moves.moved, users_skipped=latest.users_skipped + moves.skipped,
        users_failed=latest.users_failed + len(moves.failures),
        user_failures="; ".join(x for x in (latest.user_failures, *moves.failures) if x) or None,
        users_cursor=json.dumps(next_page.to_json()) if next_page else None, wait_kind=None, wait_started_at=None)
    if moves.changed and handed_back_without_moves(latest):
        # The suspension sent the record back and this pass really changed someone's licenses: one trip.
        await work.transition(latest.state, MOVED_AGAIN,
                              f"{moves.changed} user(s) held the old SKU again after it was handed back", **changes)
    else:
        await work.checkpoint(**changes)
    return next_page


async def _room_for(work: Work, new_sku: str, need_units: int) -> bool:
    """Does the new SKU have ``need_units`` free units? Waits (by time) while it is not listed or too small;
    ``False`` after blocking.

    :raises RetryLater: not listed yet, or too few units free yet.
    """
    skus = {s.product_sku.id.lower(): s for s in await work.client.list_subscribed_skus(work.record.customer_id)}
    listed = skus.get(new_sku.lower())
    if listed is None:
        # subscribedskus lags a new subscription: wait for the SKU to be listed at all, by its own clock.
        limit = work.settings.subscribed_sku_wait_minutes
        await wait_then_block(
            work, "subscribed_sku", limit, event="new_sku_not_listed",
            detail=f"the new SKU {new_sku} is not in the customer's subscribed SKUs {limit} min after the "
            "replacement became active (SUBSCRIBED_SKU_WAIT_MINUTES); check the subscription in Partner Center, then "
            "`python -m d365_migration retry`",
            waiting=f"new SKU not in subscribed SKUs yet ({need_units} users to move)")
        return False
    available = listed.available_units
    if available < need_units:
        limit = work.settings.free_units_wait_minutes
        await wait_then_block(
            work, "free_units", limit, event="not_enough_licenses",
            detail=f"{need_units} users hold the old SKU but only {available} units of the new SKU are free after "
            f"{limit} min (FREE_UNITS_WAIT_MINUTES); buy more, then `python -m d365_migration retry`",
            waiting=f"{need_units} users to move but {available} units of the new SKU free yet")
        return False
    return True


async def _move_user(work: Work, holder: _Holder, old_sku: str, new_sku: str, answers: int,
                     moves: _PageMoves) -> None:
    """One license update: assign the new SKU (unless held) and remove the old one together; record the outcome."""
    record = work.record
    attempt = _license_attempt(work, holder.user_id, answers)
    try:
        answer = await work.client.update_user_licenses(
            record.customer_id, holder.user_id, assign=[] if holder.has_new else [new_sku], remove=[old_sku],
            request_id=attempt)
    except PartnerCenterApiError as exc:
        if _is_retried(exc):
            raise  # no answer seen (the client's retries ran out): the next delivery re-sends the same id
        if _is_user_gone(exc):
            await _record_gone(work, holder.user_id, holder.upn, exc, attempt.attempt + 1)
            return
        moves.failures.append(f"{holder.upn or holder.user_id}: {exc.description} (code {exc.code})")
        await work.deps.ledger.record_user(record, UserOutcome(holder.user_id, "failed", str(exc), holder.upn,
                                                               answers=attempt.attempt + 1))
        return
    moves.moved += not holder.has_new
    moves.skipped += holder.has_new
    # licenseWarnings come with a successful update: kept with the user's outcome for the operator.
    warned = "; ".join(f"license warning {w.code}: {w.message}" for w in answer.warnings) or None
    await work.deps.ledger.record_user(record, UserOutcome(holder.user_id, "skipped" if holder.has_new else "moved",
                                                           warned, holder.upn, answers=attempt.attempt + 1))


async def _record_gone(work: Work, user_id: str, upn: str | None, exc: PartnerCenterApiError, answers: int) -> None:
    """404 60002: the user was deleted after the users page was read. Nothing to move (a deleted user's licenses are
    released); the suspension's consumed-units check still sees anyone who holds the old SKU."""
    work.log(logging.WARNING, "event=user_gone user=%s %s", upn or user_id, exc)
    await work.deps.ledger.record_user(work.record, UserOutcome(user_id, "gone", f"user not found: {exc}", upn,
                                                                answers=answers))


def _license_attempt(work: Work, user_id: str, answers: int) -> RequestAttempt:
    """The MS-RequestId of this user's next license update, by the documented rule (headers page: the same id only
    to retry after a timeout or lost answer; a new one after any response): the attempt number is the count of
    answers recorded with the user's outcome, moved past any id this process already saw answered (an answer whose
    outcome was not recorded yet, e.g. an access stop or a duplicate delivery)."""
    record = work.record
    attempt = RequestAttempt("license", (record.customer_id, record.subscription_id, user_id.lower()), answers)
    while work.client.was_answered(attempt):
        attempt = attempt.next()
    return attempt


async def _holders(work: Work, users: list[CustomerUser], old_sku: str, new_sku: str) -> _PageScan:
    """The users on this page who hold the old SKU (and whether they hold the new one already), and those whose
    licenses could not be read. Licenses are read concurrently; the client paces them.

    :raises PartnerCenterError: a 5xx, 429 or transport failure after the client's retries, or access denied.
    """
    semaphore = asyncio.Semaphore(work.settings.max_concurrency)
    customer_id = work.record.customer_id
    named = work.record.named_users  # pooled SKU: the operator said who belongs to the retiring subscription
    inactive = 0

    async def inspect(user: CustomerUser) -> _Holder | PartnerCenterApiError | None:
        nonlocal inactive
        if named is not None and (user.user_principal_name or "").lower() not in named:
            return None
        if not user.is_active:
            # user-resources: state active|inactive; an inactive (soft-deleted) user's licenses are released and
            # a license update could only fail.
            inactive += 1
            return None
        try:
            async with semaphore:
                licenses = await work.client.get_user_licenses(customer_id, user.id)
        except PartnerCenterApiError as exc:
            if _is_retried(exc):
                raise
            return exc
        skus = {lic.product_sku.id.lower() for lic in licenses}
        if old_sku.lower() not in skus:
            return None
        return _Holder(user.id, user.user_principal_name, new_sku.lower() in skus)

    found = await asyncio.gather(*(inspect(u) for u in users))
    scan = _PageScan(inactive=inactive)
    for user, result in zip(users, found, strict=True):  # in page order
        if isinstance(result, _Holder):
            scan.holders.append(result)
        elif isinstance(result, PartnerCenterApiError):
            (scan.gone if _is_user_gone(result) else scan.unreadable).append((user, result))
    return scan
