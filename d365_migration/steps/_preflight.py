"""Pre-flight before spending (issue 10 item 1): prove the migration can finish before buying anything.

A new-commerce annual subscription can be cancelled only within a short window, so the purchase step first checks,
with the tool's own roles, everything the license move and the suspension will need:

1. the customer's users are readable (``GET /customers/{id}/users``: GDAP Directory Reader or better);
2. the old subscription's provisioning status is readable and the subscribed SKUs are readable;
3. the old subscription's product SKU is one the customer's subscribed SKUs LIST: the provisioning status ``skuId``
   when it is listed, else the one subscribed SKU with one of the catalog's SKU part numbers. Fail closed: the
   provisioning status page calls ``skuId`` only "a string that identifies the product SKU"
   (get-subscription-provisioning-status) and nothing says it is the ``productSku.id`` of ``subscribedskus``; an SKU
   the subscribed SKUs do not list has no holders the tool can count, move, or check before suspending, so the record
   blocks (naming the id) instead of buying;
4. the SKU is not pooled: ``subscribedskus`` pools one product SKU across subscriptions, so more holders
   (``consumedUnits``) than the OLD subscription's quantity, or more units in all (``totalUnits``, active + warning:
   get-a-list-of-available-licenses) than it, means another subscription grants the same SKU and the tool cannot tell
   who belongs to the retiring one — unless an operator named them (``retry <customer>/<subscription> --users-file
   users.txt``; at most the old quantity), and then only those move. The check uses the old quantity, never the
   quantity the replacement will be bought with (``REPLACEMENT_QUANTITY_POLICY=license_holders`` buys one seat per
   holder, which would hide the pool).

Any failure blocks the record with the exact missing role or fact and what to do; nothing is bought.
"""

from __future__ import annotations

from .._exceptions import AccessDeniedError, NotFoundError
from .._models import SubscribedSku
from .._settings import is_guid
from ._work import Work

__all__ = ["preflight"]


async def preflight(work: Work, *, old_quantity: int) -> SubscribedSku | None:
    """Check the migration can finish; record the old product SKU (``old_sku_id``, as ``subscribedskus`` lists it).
    Returns that subscribed SKU, or ``None`` after blocking the record.

    ``old_quantity`` is the OLD subscription's quantity (what the retiring subscription licenses).

    :raises LookAgainLater: Partner Center asked to look again later (the message is re-queued).
    :raises PartnerCenterError: a call failed after the client's retries (the message is retried).
    """
    record, client = work.record, work.client
    cid = record.customer_id
    try:
        await client.user_page(client.first_user_page(cid))
        try:
            status = await client.get_provisioning_status(cid, record.subscription_id)
            sku_id = status.sku_id if status.sku_id and is_guid(status.sku_id) else None
        except NotFoundError:
            sku_id = None  # no provisioning status for this subscription: fall back to the catalog
        subscribed = await client.list_subscribed_skus(cid)
    except AccessDeniedError as exc:
        await work.transition(
            "blocked", "preflight_access_denied",
            f"pre-flight: nothing bought — the tool cannot read what the migration needs ({exc.reason}, HTTP "
            f"{exc.status}{' code ' + exc.code if exc.code else ''} on {exc.method} {exc.path}). Fix: {exc.fix}; "
            "then `python -m d365_migration retry`")
        return None
    sku, why = _old_sku(work, sku_id, subscribed)
    if sku is None:
        await work.transition(
            "blocked", "preflight_sku_unknown",
            f"pre-flight: nothing bought — {why}. Without the old product SKU as the customer's subscribed SKUs list "
            "it, the tool cannot tell who holds the license, move them, or check before suspending that nobody "
            "still does. Add the SKU part number the old subscription grants (skuPartNumber in the customer's "
            "subscribed SKUs) to the offer's entry in RETIRED_OFFERS_EXTRA, then `python -m d365_migration retry`")
        return None
    if record.named_users is None and _pooled(sku, old_quantity):
        await work.transition(
            "blocked", "preflight_pooled_sku",
            f"pre-flight: nothing bought — {sku.consumed_units} users hold product SKU {sku.product_sku.id} "
            f"({sku.product_sku.name or sku.product_sku.sku_part_number}) and the customer has {sku.total_units} "
            f"units of it in all, but the old subscription accounts for only {old_quantity}: another subscription "
            "grants the same SKU. The tool will not move users the retiring subscription may not license. Name the "
            f"users who move (at most {old_quantity} user principal names, one a line): `python -m d365_migration "
            f"retry {record.customer_id}/{record.subscription_id} --users-file users.txt`; or remove the SKU from "
            "the users who belong to the other subscription, then `python -m d365_migration retry`")
        return None
    await work.checkpoint(old_sku_id=sku.product_sku.id.lower())
    return sku


def _pooled(sku: SubscribedSku, old_quantity: int) -> bool:
    """More holders, or more units in all (``totalUnits`` = active + warning), than the old subscription's quantity:
    another subscription of the customer grants the same product SKU."""
    return sku.consumed_units > old_quantity or sku.total_units > old_quantity


def _old_sku(work: Work, sku_id: str | None, subscribed: list[SubscribedSku]) -> tuple[SubscribedSku | None, str]:
    """The old subscription's product SKU among the subscribed SKUs, or ``None`` and why it cannot be told. Never
    an SKU the subscribed SKUs do not list (it would count no holders: the old subscription could be suspended while
    every user still holds it)."""
    by_id = {s.product_sku.id.lower(): s for s in subscribed}
    if sku_id and sku_id.lower() in by_id:
        return by_id[sku_id.lower()], ""
    record = work.record
    offer = work.deps.catalog.match(record.offer_id, record.offer_name)
    parts = sorted({p.lower() for p in (offer.sku_part_numbers if offer else ())})
    matches = [s for s in subscribed if (s.product_sku.sku_part_number or "").lower() in parts]
    if len(matches) == 1:
        return matches[0], ""
    named = (f"its provisioning status names product SKU {sku_id}, which is not among the customer's "
             f"{len(subscribed)} subscribed SKUs" if sku_id else "its provisioning status has no skuId")
    if not parts:
        by_parts = "the catalog lists no SKU part number for this offer"
    elif not matches:
        by_parts = f"no subscribed SKU has one of the catalog's SKU part numbers ({', '.join(parts)})"
    else:
        by_parts = (f"{len(matches)} subscribed SKUs match the catalog's SKU part numbers ("
                    + ", ".join(f"{s.product_sku.sku_part_number} {s.product_sku.id}" for s in matches)
                    + "), so which one is the old subscription's cannot be told")
    return None, (f"cannot tell the product SKU of the old subscription ({record.offer_name or record.offer_id}): "
                  f"{named}, and {by_parts}")
