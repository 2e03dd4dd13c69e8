"""Undo a replacement purchase inside Partner Center's cancellation window (``python -m d365_migration cancel``).

Partner Center cancels a new-commerce subscription when it is PATCHed (the whole resource) with ``status:
"deleted"``, and only within its cancellation window: 7 days (168 hours) from purchase, shown on the subscription as
``cancellationAllowedUntilDate``; "after this window has passed, subscriptions can no longer be canceled and the API
will throw an error" (Learn: partner-center/developer/cancel-an-azure-marketplace-subscription; the refund is
prorated: partner-center/customers/new-commerce-cancellation-policy). Legacy subscriptions have no such window.

This command cancels only what this tool bought, and only while that is safe:

* the ledger record must show the purchase (a new subscription id plus the cart or order this tool placed), and
  Partner Center's subscription must carry the record's tag in its friendly name or the recorded order id;
* no user may hold the new license yet, and the record must not be in another worker's hands;
* the old (Qualified Offer) subscription must still be active: it is left exactly as it is;
* the window is checked before the call (``cancellationAllowedUntilDate``, else creation + 168 h); Partner Center
  checks it again and its refusal is reported as is.

The record ends ``cancelled`` (final), with who cancelled and when in its history.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from ._client import PartnerCenterClient, deterministic_request_id
from ._exceptions import CancelRefused, ConcurrencyConflict, NotFoundError, PartnerCenterApiError
from ._ledger import MigrationLedger, MigrationRecord, utcnow
from ._models import Subscription, get_ci, parse_datetime

__all__ = [
    "CANCELLATION_WINDOW",
    "CancelOutcome",
    "cancel_replacement",
    "cancellation_deadline",
    "find_record",
    "is_new_commerce",
]

logger = logging.getLogger("d365_migration.cancel")

CANCELLATION_WINDOW = timedelta(hours=168)  # new commerce: 7 days from purchase (see the module docstring)
_LEASE = timedelta(minutes=5)
_MOVED_STATES = ("reassigning", "reassigned", "completed")


@dataclass(frozen=True)
class CancelOutcome:
    record: MigrationRecord
    cancelled_subscription_id: str
    window_ends: datetime | None
    already: bool = False  # it was cancelled before (a repeated command)


def cancellation_deadline(subscription: Subscription) -> datetime | None:
    """When the subscription's cancellation window closes: Partner Center's ``cancellationAllowedUntilDate``,
    else its creation date + 168 hours; ``None`` if neither is known."""
    until = parse_datetime(get_ci(subscription.raw, "cancellationAllowedUntilDate"))
    if until is not None:
        return until
    return subscription.created + CANCELLATION_WINDOW if subscription.created else None


def is_new_commerce(subscription: Subscription) -> bool:
    product_type = get_ci(subscription.raw, "productType")
    type_id = get_ci(product_type, "id") if isinstance(product_type, Mapping) else None
    return type_id == "OnlineServicesNCE" or ":" in (subscription.offer_id or "")


def find_record(records: list[MigrationRecord], target: str) -> MigrationRecord | None:
    """``target`` is ``<subscription>`` or ``<customer>/<subscription>``, where the subscription is the old one (the
    record's key) or the replacement this tool bought."""
    parts = target.strip().lower().split("/")
    sub = parts[-1]
    for record in records:
        if len(parts) > 1 and record.key[0] != parts[0]:
            continue
        if record.key[1] == sub or (record.new_subscription_id or "").lower() == sub:
            return record
    return None


async def cancel_replacement(ledger: MigrationLedger, client: PartnerCenterClient, target: str, *, by: str,
                             now: datetime | None = None) -> CancelOutcome:
    """Cancel the replacement this tool bought for ``target`` (see the module docstring for every check).

    :raises CancelRefused: not bought by this tool, window closed, users already moved, old subscription not active,
        record in flight, or Partner Center refused the cancellation (its code and text are in the message).
    :raises PartnerCenterError: Partner Center could not be reached.
    :raises LedgerError: the ledger could not be read or written.
    """
    record = find_record(await ledger.list_records(), target)
    if record is None:
        raise CancelRefused(f"no migration record for {target}: cancel only undoes replacements this tool bought")
    where = f"{record.customer_id}/{record.subscription_id}"
    new_id = record.new_subscription_id
    if record.state == "cancelled" and new_id:
        return CancelOutcome(record, new_id, None, already=True)
    if not new_id or not (record.cart_id or record.order_id):
        raise CancelRefused(f"record {where} ({record.state}) shows no replacement bought by this tool; "
                            "nothing to cancel")
    if record.state in _MOVED_STATES or record.users_moved:
        raise CancelRefused(f"record {where} is {record.state} and {record.users_moved} user(s) already hold the "
                            "new license: cancelling now would take the product away from them. Move them back "
                            "in Partner Center first, or keep the replacement")
    now = now or utcnow()
    if record.lease_owner and record.lease_until and datetime.fromisoformat(record.lease_until) > now:
        raise CancelRefused(f"record {where} is being worked on ({record.lease_owner} until {record.lease_until}); "
                            "pause with `rollout pause`, then try again in a few minutes")
    cid = record.customer_id
    try:
        new = await client.get_subscription(cid, new_id)
    except NotFoundError:
        raise CancelRefused(f"Partner Center has no subscription {new_id} for customer {cid}") from None
    ours = (record.tag in (new.friendly_name or "")) or (
        bool(record.order_id) and (new.order_id or "").lower() == (record.order_id or "").lower())
    if not ours:
        raise CancelRefused(f"subscription {new_id} carries neither this tool's tag ({record.tag}) nor its order id: "
                            "it was not bought by this tool, so cancel refuses it")
    deadline = cancellation_deadline(new)
    if new.status == "deleted":  # cancelled earlier, e.g. the answer to our PATCH was lost
        saved = await _record_cancelled(ledger, record, new_id, by, deadline, note="found already cancelled")
        return CancelOutcome(saved, new_id, deadline, already=True)
    if not is_new_commerce(new):
        raise CancelRefused(f"subscription {new_id} is a legacy subscription: Partner Center's cancellation window "
                            "is for new-commerce subscriptions only")
    if deadline is None:
        raise CancelRefused(f"subscription {new_id} shows neither cancellationAllowedUntilDate nor a creation date; "
                            "cannot tell whether the cancellation window is open")
    if now > deadline:
        raise CancelRefused(f"the cancellation window of subscription {new_id} closed at "
                            f"{deadline.isoformat(timespec='minutes')} (7 days after purchase); Partner Center no "
                            "longer accepts a cancellation. The replacement stays; see README 'Undo a purchase'")
    old = await client.get_subscription(cid, record.subscription_id)
    if old.status != "active":
        raise CancelRefused(f"the old subscription {record.subscription_id} is {old.status}: cancelling the "
                            "replacement would leave the customer without the product. Reactivate the old "
                            "subscription first")
    try:
        claimed = await ledger.claim(record, f"cancel:{by}", lease=_LEASE)
    except ConcurrencyConflict as exc:
        raise CancelRefused(f"record {where} changed while checking ({exc}); try again") from None
    try:
        cancelled = await client.update_subscription(cid, new, status="deleted",
                                                     request_id=deterministic_request_id("cancel", cid, new_id))
    except PartnerCenterApiError as exc:
        await ledger.save(claimed.transition(claimed.state, "cancel_rejected", f"{exc.code}: {exc.description}",
                                             lease_owner=None, lease_until=None))
        raise CancelRefused(f"Partner Center refused to cancel {new_id}: HTTP {exc.status} code {exc.code}: "
                            f"{exc.description}") from None
    except BaseException:
        await ledger.release(claimed)
        raise
    confirmed = cancelled if cancelled.status == "deleted" else await client.get_subscription(cid, new_id)
    if confirmed.status != "deleted":
        await ledger.release(claimed)
        raise CancelRefused(f"Partner Center accepted the cancellation of {new_id} but it shows {confirmed.status}; "
                            "run cancel again in a few minutes to record it")
    saved = await _record_cancelled(ledger, claimed, new_id, by, deadline)
    return CancelOutcome(saved, new_id, deadline)


async def _record_cancelled(ledger: MigrationLedger, record: MigrationRecord, new_id: str, by: str,
                            deadline: datetime | None, note: str = "") -> MigrationRecord:
    detail = f"replacement {new_id} cancelled by {by}; old subscription left active"
    if deadline:
        detail += f"; window ended {deadline.isoformat(timespec='minutes')}"
    if note:
        detail += f" ({note})"
    saved = await ledger.save(record.transition("cancelled", "replacement_cancelled", detail, reason=detail,
                                                lease_owner=None, lease_until=None))
    logger.warning("event=replacement_cancelled customer=%s subscription=%s new_subscription=%s by=%s",
                   record.customer_id, record.subscription_id, new_id, by)
    return saved
