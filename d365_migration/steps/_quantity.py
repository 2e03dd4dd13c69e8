"""How many seats the replacement is bought with: ``REPLACEMENT_QUANTITY_POLICY``.

* ``old_quantity`` (default, the runbook's behaviour): the old subscription's quantity. Every seat the customer had
  is there on day one, including seats nobody uses — which the customer pays for again, for the whole new term (a
  12-month commitment for 10 seats when 7 users hold the license costs 3 unused seats for a year).
* ``license_holders``: one seat per user who holds the old license right before the purchase, read from the
  customer's subscribed SKUs (``consumedUnits`` of the old product SKU, the licenses assigned to users: SubscribedSku,
  https://learn.microsoft.com/dotnet/api/microsoft.store.partnercenter.models.licenses.subscribedsku). Never fewer
  than the holders, so every user can be moved; at least 1. Cheaper, but seats for future users must be added later.
  When the old SKU or its holders cannot be read, the old quantity is bought (never fewer than needed) and the
  record's history says so.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._client import PartnerCenterClient
from .._exceptions import NotFoundError, PartnerCenterApiError
from .._models import SubscribedSku, Subscription
from .._settings import is_guid
from ._work import Work

__all__ = ["POLICY_TEXT", "count_holders", "holders_by_part_numbers", "replacement_quantity"]

#: What each policy buys and costs, for ``plan`` and the demo report.
POLICY_TEXT = {
    "old_quantity": "the replacement is bought at the old subscription's quantity (unused seats are paid again for "
                    "the new term)",
    "license_holders": "the replacement is bought with one seat per user holding the old license at purchase time "
                       "(never fewer; seats for future users are added later)",
}


def holders_by_part_numbers(skus: list[SubscribedSku], part_numbers: Iterable[str]) -> int | None:
    """``consumedUnits`` of the one subscribed SKU with one of ``part_numbers``; ``None`` when not exactly one."""
    parts = {p.lower() for p in part_numbers}
    matches = [s for s in skus if (s.product_sku.sku_part_number or "").lower() in parts]
    return matches[0].consumed_units if len(matches) == 1 else None


async def replacement_quantity(work: Work, old: Subscription) -> tuple[int, str]:
    """The quantity to buy for ``work.record`` under the configured policy, and a note saying how it was chosen.

    :raises PartnerCenterError: a read failed after the client's retries (the message is retried; nothing bought).
    """
    record = work.record
    old_quantity = old.quantity or record.quantity
    policy = work.settings.replacement_quantity_policy
    if policy == "old_quantity":
        return old_quantity, f"old subscription's quantity {old_quantity} (REPLACEMENT_QUANTITY_POLICY=old_quantity)"
    holders = await _holders_of_old_sku(work)
    if holders is None:
        return old_quantity, (f"license holders unknown (old SKU not readable): old quantity {old_quantity} "
                              "(REPLACEMENT_QUANTITY_POLICY=license_holders)")
    quantity = max(1, holders)
    return quantity, (f"{holders} user(s) hold the old license: {quantity} seat(s) instead of {old_quantity} "
                      "(REPLACEMENT_QUANTITY_POLICY=license_holders)")


async def _holders_of_old_sku(work: Work) -> int | None:
    """Users holding the old subscription's product SKU (``consumedUnits``), or ``None`` when the SKU is unknown."""
    record = work.record
    offer = work.deps.catalog.match(record.offer_id, record.offer_name)
    return await count_holders(work.client, record.customer_id, record.subscription_id,
                               sku_id=record.old_sku_id, part_numbers=offer.sku_part_numbers if offer else ())


async def count_holders(client: PartnerCenterClient, customer_id: str, subscription_id: str, *,
                        sku_id: str | None = None, part_numbers: Iterable[str] = (),
                        skus: list[SubscribedSku] | None = None) -> int | None:
    """Users holding ``subscription_id``'s product SKU (its ``consumedUnits``): the SKU from ``sku_id``, else the
    subscription's provisioning status, else the catalog's part numbers; ``None`` when it cannot be told.

    :raises PartnerCenterError: a read failed after the client's retries.
    """
    if not sku_id:
        try:
            status = await client.get_provisioning_status(customer_id, subscription_id)
            sku_id = status.sku_id if status.sku_id and is_guid(status.sku_id) else None
        except (NotFoundError, PartnerCenterApiError) as exc:
            if isinstance(exc, PartnerCenterApiError) and exc.status >= 500:
                raise
    if skus is None:
        skus = await client.list_subscribed_skus(customer_id)
    if sku_id:
        match = next((s for s in skus if s.product_sku.id.lower() == sku_id.lower()), None)
        return match.consumed_units if match else None
    return holders_by_part_numbers(skus, part_numbers)
