"""Runbook step 3 — move every user's license from the old product SKU to the new one.

Read top to bottom, for one record whose replacement is active:

1. Know both SKUs: the old and the new subscription's product SKU (from provisioning status, else the catalog's SKU
   part numbers against the customer's subscribed SKUs); wait while they are not readable yet. The same SKU on both
   sides means nobody needs moving.
2. Page by page through the customer's users: find who holds the old SKU, check the new SKU has room for them, and
   move each with ONE license update that assigns the new SKU and removes the old one together (a user is never
   without the product). Each page's progress and the next page's cursor are saved, so thousands of users resume
   where the last invocation stopped.
   With a pooled SKU (also granted by another subscription), only the users an operator named move
   (``retry … --users-file``).
3. Any user who could not be moved blocks the record (the old subscription stays active); otherwise ``reassigned``
   and the record goes on to the suspension.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta

from .._client import PageRequest, RequestAttempt
from .._exceptions import PartnerCenterApiError, ProvisioningNotReadyError
from .._ledger import UserOutcome
from .._models import CustomerUser, same_id
from .._settings import is_guid
from ._routes import states_owned_by
from ._work import RetryLater, StepResult, Work

__all__ = ["run"]


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
    await work.transition("reassigned", "licenses_moved",
                          f"{work.record.users_moved} moved, {work.record.users_skipped} already on the new SKU")
    return work.hand_over("reassigned")


async def _waited_too_long(work: Work, kind: str, limit_minutes: int) -> bool:
    """Start (or continue) the wait named ``kind``, measured by the injected clock; True once it has lasted longer
    than ``limit_minutes``. Each wait has its own start, so a slow SKU never eats the free-units wait."""
    record, now = work.record, work.now()
    if record.wait_kind != kind or not record.wait_started_at:
        await work.checkpoint(wait_kind=kind, wait_started_at=now.isoformat())
        return False
    return now - datetime.fromisoformat(record.wait_started_at) > timedelta(minutes=limit_minutes)


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
        if await _waited_too_long(work, "provisioning_status", limit):
            await work.transition(
                "blocked", "provisioning_status_unavailable",
                f"the replacement's provisioning status {pending} after {limit} min "
                "(PROVISIONING_STATUS_WAIT_MINUTES); check the subscription in Partner Center, then "
                "`python -m d365_migration retry`")
            return False
        raise RetryLater(f"replacement's provisioning status {pending}")
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
        if exc.status >= 500:
            raise
    if old:
        offer = work.deps.catalog.match(record.offer_id, record.offer_name)
        parts = {p.lower() for p in (offer.sku_part_numbers if offer else ())}
        if parts:
            for sku in await client.list_subscribed_skus(record.customer_id):
                if (sku.product_sku.sku_part_number or "").lower() in parts:
                    return sku.product_sku.id
    return None


async def _move_page(work: Work, page: PageRequest, old_sku: str, new_sku: str) -> PageRequest | None:
    """Move the holders of one users page; save the progress and the next page's cursor; return that cursor.
    Blocks the record (and returns ``None``) when the new SKU has too few free units."""
    record, client = work.record, work.client
    users, next_page = await client.user_page(page)
    holders = await _holders(work, users, old_sku, new_sku)
    need_units = sum(1 for _, _, has_new in holders if not has_new)
    if need_units:
        skus = {s.product_sku.id.lower(): s for s in await client.list_subscribed_skus(record.customer_id)}
        listed = skus.get(new_sku.lower())
        available = listed.available_units if listed is not None else 0
        if listed is None:
            # subscribedskus lags a new subscription: wait for the SKU to be listed at all, by its own clock.
            limit = work.settings.subscribed_sku_wait_minutes
            if await _waited_too_long(work, "subscribed_sku", limit):
                await work.transition(
                    "blocked", "new_sku_not_listed",
                    f"the new SKU {new_sku} is not in the customer's subscribed SKUs {limit} min after the "
                    "replacement became active (SUBSCRIBED_SKU_WAIT_MINUTES); check the subscription in Partner "
                    "Center, then `python -m d365_migration retry`")
                return None
            raise RetryLater(f"new SKU not in subscribed SKUs yet ({need_units} users to move)")
        if available < need_units:
            limit = work.settings.free_units_wait_minutes
            if await _waited_too_long(work, "free_units", limit):
                await work.transition(
                    "blocked", "not_enough_licenses",
                    f"{need_units} users hold the old SKU but only {available} units of the new SKU are free "
                    f"after {limit} min (FREE_UNITS_WAIT_MINUTES); buy more, then `python -m d365_migration retry`")
                return None
            raise RetryLater(f"{need_units} users to move but {available} units of the new SKU free yet")
    moved = skipped = 0
    failures: list[str] = []
    answers = await work.deps.ledger.user_answers(record, [user_id for user_id, _, _ in holders]) if holders else {}
    for user_id, upn, has_new in holders:
        attempt = _license_attempt(work, user_id, answers.get(user_id.lower(), 0))
        try:
            answer = await client.update_user_licenses(
                record.customer_id, user_id, assign=[] if has_new else [new_sku], remove=[old_sku],
                request_id=attempt)
        except PartnerCenterApiError as exc:
            if exc.status >= 500 or exc.status == 429:
                raise  # no answer seen (the client's retries ran out): the next delivery re-sends the same id
            failures.append(f"{upn or user_id}: {exc.description} (code {exc.code})")
            await work.deps.ledger.record_user(record, UserOutcome(user_id, "failed", str(exc), upn,
                                                                   answers=attempt.attempt + 1))
            continue
        moved += not has_new
        skipped += has_new
        # licenseWarnings come with a successful update: kept with the user's outcome for the operator.
        warned = "; ".join(f"license warning {w.code}: {w.message}" for w in answer.warnings) or None
        await work.deps.ledger.record_user(record, UserOutcome(user_id, "skipped" if has_new else "moved", warned,
                                                               upn, answers=attempt.attempt + 1))
    latest = work.record
    await work.checkpoint(
        users_moved=latest.users_moved + moved, users_skipped=latest.users_skipped + skipped,
        users_failed=latest.users_failed + len(failures),
        user_failures="; ".join(x for x in (latest.user_failures, *failures) if x) or None,
        users_cursor=json.dumps(next_page.to_json()) if next_page else None, wait_kind=None, wait_started_at=None)
    return next_page


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


async def _holders(work: Work, users: list[CustomerUser], old_sku: str,
                   new_sku: str) -> list[tuple[str, str | None, bool]]:
    """(user id, UPN, already has the new SKU) of the users on this page who hold the old SKU. Licenses are read
    concurrently; the client paces them."""
    semaphore = asyncio.Semaphore(work.settings.max_concurrency)
    customer_id = work.record.customer_id
    named = work.record.named_users  # pooled SKU: the operator said who belongs to the retiring subscription

    async def inspect(user: CustomerUser) -> tuple[str, str | None, bool] | None:
        if named is not None and (user.user_principal_name or "").lower() not in named:
            return None
        async with semaphore:
            licenses = await work.client.get_user_licenses(customer_id, user.id)
        skus = {lic.product_sku.id.lower() for lic in licenses}
        if old_sku.lower() not in skus:
            return None
        return user.id, user.user_principal_name, new_sku.lower() in skus

    found = await asyncio.gather(*(inspect(u) for u in users))
    return [h for h in found if h is not None]
