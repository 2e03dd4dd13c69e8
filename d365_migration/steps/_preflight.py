"""Pre-flight before spending (issue 10 item 1): prove the migration can finish before buying anything.

A new-commerce annual subscription can be cancelled only within a short window, so the purchase step first checks,
with the tool's own roles, everything the license move and the suspension will need:

1. the customer's users are readable (``GET /customers/{id}/users``: GDAP Directory Reader or better);
2. the old subscription's provisioning status is readable and the subscribed SKUs are readable;
3. the old subscription's product SKU is known (provisioning status ``skuId``, else the catalog's SKU part numbers
   against the customer's subscribed SKUs);
4. the users holding that SKU fit the quantity the replacement will be bought with. More holders than the old
   subscription's quantity means the SKU is pooled with another subscription of the customer (``subscribedskus``
   pools one product SKU across subscriptions) and the tool cannot tell who belongs to the retiring one — unless an
   operator named them (``retry <customer>/<subscription> --users-file users.txt``; at most the old quantity), and
   then only those move.

Any failure blocks the record with the exact missing role or fact and what to do; nothing is bought.
"""

from __future__ import annotations

from .._exceptions import AccessDeniedError, NotFoundError
from .._models import ProductSku, SubscribedSku
from .._settings import is_guid
from ._work import Work

__all__ = ["preflight"]


async def preflight(work: Work, *, quantity: int) -> bool:
    """Check the migration can finish; record the old product SKU. ``False`` after blocking the record.

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
        return False
    sku = _old_sku(work, sku_id, subscribed)
    if sku is None:
        await work.transition(
            "blocked", "preflight_sku_unknown",
            f"pre-flight: nothing bought — cannot tell the product SKU of the old subscription "
            f"({record.offer_name or record.offer_id}): its provisioning status has no skuId and no subscribed SKU "
            "matches the catalog's SKU part numbers. Add the offer's SKU part number to RETIRED_OFFERS_EXTRA, then "
            "`python -m d365_migration retry`")
        return False
    holders = sku.consumed_units
    if holders > quantity and record.named_users is None:
        await work.transition(
            "blocked", "preflight_pooled_sku",
            f"pre-flight: nothing bought — {holders} users hold product SKU {sku.product_sku.id} "
            f"({sku.product_sku.name or sku.product_sku.sku_part_number}) but the old subscription accounts for "
            f"only {quantity} (the customer has {sku.total_units} units of it in all: another subscription grants "
            "the same SKU). The tool will not move users the retiring subscription does not license. Name the "
            f"users who move (at most {quantity} user principal names, one a line): `python -m d365_migration "
            f"retry {record.customer_id}/{record.subscription_id} --users-file users.txt`; or remove the SKU from "
            "the users who belong to the other subscription, then `python -m d365_migration retry`")
        return False
    await work.checkpoint(old_sku_id=sku.product_sku.id.lower())
    return True


def _old_sku(work: Work, sku_id: str | None, subscribed: list[SubscribedSku]) -> SubscribedSku | None:
    by_id = {s.product_sku.id.lower(): s for s in subscribed}
    if sku_id:
        return by_id.get(sku_id.lower()) or SubscribedSku(ProductSku(sku_id, None, None), 0, 0, 0, 0)
    offer = work.deps.catalog.match(work.record.offer_id, work.record.offer_name)
    parts = {p.lower() for p in (offer.sku_part_numbers if offer else ())}
    return next((s for s in subscribed if (s.product_sku.sku_part_number or "").lower() in parts), None)

