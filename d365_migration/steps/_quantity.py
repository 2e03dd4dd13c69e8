"""How many seats the replacement is bought with: ``REPLACEMENT_QUANTITY_POLICY``.

* ``old_quantity`` (default, the runbook's behaviour): the old subscription's quantity. Every seat the customer had
  is there on day one, including seats nobody uses — which the customer pays for again, for the whole new term (a
  12-month commitment for 10 seats when 7 users hold the license costs 3 unused seats for a year).
* ``license_holders``: one seat per user who holds the old license right before the purchase, read from the
  customer's subscribed SKUs (``consumedUnits`` of the old product SKU, the licenses assigned to users: SubscribedSku,
  https://learn.microsoft.com/dotnet/api/microsoft.store.partnercenter.models.licenses.subscribedsku). Never fewer
  than the holders, so every user can be moved; at least 1. Cheaper, but seats for future users must be added later.
  The holders are read by the pre-flight (which blocks before buying when the old SKU is unknown or pooled); with a
  pooled SKU whose movers an operator named, the old quantity is bought.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._client import PartnerCenterClient
from .._exceptions import PartnerCenterApiError, ThrottledError
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


def replacement_quantity(work: Work, old: Subscription, *, holders: int) -> tuple[int, str]:
    """The quantity to buy for ``work.record`` under the configured policy, and a note saying how it was chosen.
    ``holders`` is the old product SKU's ``consumedUnits`` as the pre-flight read it (it is not pooled then, so
    they are all the old subscription's users)."""
    record = work.record
    old_quantity = old.quantity or record.quantity
    policy = work.settings.replacement_quantity_policy
    if policy == "old_quantity":
        return old_quantity, f"old subscription's quantity {old_quantity} (REPLACEMENT_QUANTITY_POLICY=old_quantity)"
    if record.named_users is not None:
        # A pooled SKU whose movers an operator named: the pool's holders include the other subscription's users,
        # so they are no measure; the old quantity covers every named user (at most that many can be named).
        return old_quantity, (f"pooled product SKU with named users: old quantity {old_quantity} "
                              "(REPLACEMENT_QUANTITY_POLICY=license_holders)")
    quantity = max(1, holders)
    return quantity, (f"{holders} user(s) hold the old license: {quantity} seat(s) instead of {old_quantity} "
                      "(REPLACEMENT_QUANTITY_POLICY=license_holders)")


async def count_holders(client: PartnerCenterClient, customer_id: str, subscription_id: str, *,
                        sku_id: str | None = None, part_numbers: Iterable[str] = (),
                        skus: list[SubscribedSku] | None = None) -> int | None:
    """Users holding ``subscription_id``'s product SKU (its ``consumedUnits``): the SKU ``sku_id`` names (else the
    subscription's provisioning status ``skuId``) when the subscribed SKUs list it, else the one subscribed SKU with
    one of the catalog's part numbers; ``None`` when it cannot be told.

    :raises PartnerCenterError: a read failed after the client's retries.
    """
    if not sku_id:
        try:
            status = await client.get_provisioning_status(customer_id, subscription_id)
            sku_id = status.sku_id if status.sku_id and is_guid(status.sku_id) else None
        except PartnerCenterApiError as exc:
            if isinstance(exc, ThrottledError) or exc.status >= 500:
                raise
    if skus is None:
        skus = await client.list_subscribed_skus(customer_id)
    if sku_id:
        # A provisioning status skuId is only "a string that identifies the product SKU"
        # (get-subscription-provisioning-status): one the subscribed SKUs do not list falls back to the catalog.
        match = next((s for s in skus if s.product_sku.id.lower() == sku_id.lower()), None)
        if match is not None:
            return match.consumed_units
    return holders_by_part_numbers(skus, part_numbers)
