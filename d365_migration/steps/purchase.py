"""Runbook step 2 — buy the replacement subscription, once, and wait until it is active.

Read top to bottom, for one record:

1. Already bought (the record is past ``purchasing``)? Hand the record on.
2. Is there a ``REPLACEMENT_OFFERS`` entry for the record's family and audience? If not, block.
3. First time here (``detected``): does the old subscription still qualify (active, not auto-renewing), and is there
   no untagged subscription of the replacement bought by hand since detection? Otherwise block, nothing bought.
4. Recover what an earlier attempt may have done without us seeing the answer: an order carrying our tag, or of the
   replacement's product and quantity created since the attempt; for a lost legacy order also a subscription of the
   offer created since the attempt (the order list can lag the subscription list). Nothing another migration of the
   customer recorded is taken.
5. Find the replacement (by recorded id, order, or friendly-name tag); only if there is none and no order, buy:
   new commerce through a cart (recorded before checkout; checkout is idempotent per cart), legacy through an order
   (recorded before sending; re-sent with the same MS-RequestId only after the order list's documented lag). Every
   order a checkout returns is recorded first, also when ``orderErrors`` come with it.
6. Not active yet → an order Partner Center ended (cancelled, PO review rejected, error; partial success with
   nothing provisioned) is recorded ``failed`` with its status at once; otherwise look again later
   (:class:`RetryLater`) until ``PROVISIONING_TIMEOUT_MINUTES``; active → record it (``purchased``) and hand the
   record to the license move.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from .._client import RequestAttempt
from .._exceptions import (
    ConflictError,
    NoAvailabilityError,
    NotFoundError,
    PartnerCenterApiError,
    PartnerCenterError,
    PurchaseRejectedError,
    TransportError,
)
from .._ledger import MigrationRecord
from .._models import CheckoutResult, Order, Subscription, product_key, same_id, segment_for_audience
from .._settings import ReplacementTarget
from . import native
from ._gate import purchase_allowed
from ._policy import (
    CHECKOUT_IN_PROGRESS_DELAY_SECONDS,
    CLOCK_SKEW,
    ORDER_IN_PROGRESS_DELAY_SECONDS,
)
from ._preflight import preflight
from ._quantity import replacement_quantity
from ._routes import states_owned_by
from ._work import RetryLater, StepResult, Work

__all__ = ["CHECKOUT_SENT", "FAILED_ORDER_EVENTS", "REPEAT_CHECKOUT_REFUSED", "friendly_name", "run"]

CHECKOUT_SENT = "checkout_sent"  # history: a checkout of the cart named in the detail was sent
REPEAT_CHECKOUT_REFUSED = "repeat_checkout_refused"  # blocked: a repeat checkout was refused after a lost answer

# order-resources (OrderStatus): after these an order never provisions what it bought — "cancelled", "po review
# rejected", "error (repurchase)". Learn's examples spell multi-word statuses with underscores ("pending_po_upload",
# "po_upload_complete": pending-po-upload, po-upload-complete-status), the enum table with spaces: statuses are
# compared on letters and digits only. Event names are those `retry` treats as "nothing bought" (steps/redrive.py).
_FAILED_ORDER_STATUSES = {"cancelled": "order_cancelled", "canceled": "order_cancelled",
                          "poreviewrejected": "order_po_review_rejected", "error": "order_error"}
# "partial success (repurchase unfulfilled items)": a migration's order has one line item, so with no subscription
# to show for it, that item is the unfulfilled one. Recorded failed, but `retry` never buys again by itself (a
# subscription may still show), so it is not one of FAILED_ORDER_EVENTS.
_PARTIAL_SUCCESS = "partialsuccess"
# Every other status (pending, pending review, pending PO upload, PO upload complete, suspended, unknown, new values)
# is still under way or waits for a person: the purchase waits, up to PROVISIONING_TIMEOUT_MINUTES.

#: Last events of a purchase Partner Center ended with nothing provisioned (``retry`` buys again).
FAILED_ORDER_EVENTS = frozenset(_FAILED_ORDER_STATUSES.values())


async def run(work: Work) -> StepResult:
    """The purchase step for ``work.record``.

    :raises RetryLater: the replacement is not active yet, or Partner Center is still processing the order.
    :raises PartnerCenterError: a call failed after the client's retries (the message is retried).
    """
    record = work.record
    if record.state not in states_owned_by("purchase"):
        return work.hand_over("already purchased")
    # The rollout gate comes first: a native transition or upgrade spends money too (it creates the replacement).
    if not await purchase_allowed(work):  # paused, dry run or out of scope: nothing bought, the record waits
        return work.stop("rollout paused")
    if record.state in native.NATIVE_STATES:  # Partner Center's own move is under way (steps/native.py)
        moved = await native.run(work)
        if moved is not None:
            return moved  # (None: the move was refused with nothing changed; the runbook buys below)
    record = work.record

    replacement = work.settings.replacement_offers.lookup(record.family or "", record.audience or "")
    if replacement is None:
        await work.transition(
            "blocked", "no_replacement",
            f"no REPLACEMENT_OFFERS entry for {record.family}.{record.audience}; add one, then "
            "`python -m d365_migration retry`")
        return work.stop("blocked")

    listed: list[Subscription] | None = None
    if record.state == "detected":
        qualified = await _check_still_qualifies(work, replacement)
        if qualified is None:
            return work.stop("blocked")
        old, listed = qualified
        # MIGRATION_PATH_POLICY: Partner Center's own move instead of buying, decided only now that the old
        # subscription still qualifies and nothing was bought by hand; None → the runbook buys.
        routed = await native.route(work, old)
        if routed is not None:
            return routed
        if not await _start_purchase(work, replacement, old):
            return work.stop("blocked")

    await _recover_order(work)
    new_sub, order = await _find_replacement(work, listed)
    if new_sub is None and not work.record.order_id and not work.record.new_subscription_id:
        offer = work.record.replacement_offer_id or replacement
        try:
            if ":" in offer:
                order = await _buy_through_cart(work, offer)
            else:
                order = await _buy_through_order(work, offer)
        except PurchaseRejectedError as exc:
            await _record_rejection(work, exc)
        if work.record.is_final:
            return work.stop(work.record.state)
        new_sub, seen = await _find_replacement(work)
        order = seen or order

    if new_sub is None or new_sub.status != "active":
        if order is not None and await _order_ended(work, order, new_sub):
            return work.stop("failed")
        timeout = work.settings.provisioning_timeout_minutes
        started = datetime.fromisoformat(work.record.purchase_started_at or work.now().isoformat())
        if work.now() - started > timedelta(minutes=timeout):
            await work.transition(
                "failed", "provisioning_timeout",
                f"replacement not active {timeout} min after purchase (order {work.record.order_id}, cart "
                f"{work.record.cart_id}); check the order in Partner Center")
            return work.stop("failed")
        status = f" (order {order.id} {order.status})" if order is not None else ""
        raise RetryLater(f"replacement subscription {new_sub.status if new_sub else 'not visible yet'}{status}")

    await work.transition("purchased", "replacement_active", f"new subscription {new_sub.id}",
                          new_subscription_id=new_sub.id)
    return work.hand_over("purchased")


def friendly_name(record: MigrationRecord) -> str:
    """The replacement's friendly name; it carries the record's tag, so the purchase can be recognised later."""
    return f"Replacement for {(record.offer_name or 'retired offer')[:60]} [{record.tag}]"


async def _check_still_qualifies(work: Work, replacement: str) -> tuple[Subscription, list[Subscription]] | None:
    """Right before buying (or moving natively): the old subscription must still qualify (a human may have renewed
    or suspended it since detection) and no untagged replacement may have appeared. Returns the old subscription and
    the customer's subscriptions (read once for both this check and the tagged search), or ``None`` after blocking
    the record."""
    record = work.record
    # One listing of the customer's subscriptions carries the old one's status and auto-renew and serves both
    # replacement checks (one GET fewer per migration).
    listed = await work.client.list_subscriptions(record.customer_id)
    old = next((s for s in listed if same_id(s.id, record.subscription_id)), None)
    if old is None:
        old = await work.client.get_subscription(record.customer_id, record.subscription_id)
    if old.status != "active" or old.auto_renew:
        why = (f"old subscription is now {old.status}" if old.status != "active"
               else "old subscription was set to auto-renew")
        await work.transition("blocked", "no_longer_qualifies", why + " (changed since detection); nothing bought")
        return None
    untagged = None if record.buy_anyway else _untagged_replacement(record, replacement, listed)
    if untagged is not None:
        # Another migration of this customer may have bought the same product (new commerce names it after the
        # product, not our tag): what the customer's other records own is theirs, not a purchase made by hand.
        untagged = _untagged_replacement(record, replacement, listed, await work.claimed_by_others())
    if untagged is not None:
        await work.transition(
            "blocked", "untagged_replacement_exists",
            f"subscription {untagged.id} of the replacement offer appeared after detection without this "
            f"migration's tag; nothing bought. If it IS this migration's replacement, add [{record.tag}] to "
            "its friendly name and re-drive with `python -m d365_migration retry`; if not, re-drive with "
            "`retry --buy-anyway`")
        return None
    return old, listed


async def _start_purchase(work: Work, replacement: str, old: Subscription) -> bool:
    """Prove the migration can finish (pre-flight, against the OLD subscription's quantity), choose the quantity,
    then record the purchase as started. ``False`` after blocking the record (nothing bought)."""
    old_sku = await preflight(work, old_quantity=old.quantity or work.record.quantity)
    if old_sku is None:
        return False
    quantity, how = replacement_quantity(work, old, holders=old_sku.consumed_units)
    await work.transition("purchasing", "purchase_started", f"buying {replacement} x{quantity}: {how}",
                          replacement_offer_id=replacement, quantity=quantity,
                          purchase_started_at=work.now().isoformat(), reseller_partner_id=old.partner_id or None)
    return True


def _untagged_replacement(record: MigrationRecord, replacement: str, listed: list[Subscription],
                          claimed: frozenset[str] = frozenset()) -> Subscription | None:
    """A subscription of the replacement product created after detection without our tag, and not recorded by
    another migration of the customer (``claimed``: order and subscription ids): probably bought by hand for this
    very migration. Buying again would make the customer pay twice, so a human decides."""
    detected = datetime.fromisoformat(record.created_at) if record.created_at else None
    wanted = product_key(replacement)
    for sub in listed:
        if (sub.product_key == wanted and sub.status in ("active", "pending")
                and record.tag not in (sub.friendly_name or "")
                and sub.id.lower() not in claimed and (sub.order_id or "").lower() not in claimed
                and (detected is None or sub.created is None or sub.created >= detected)):
            return sub
    return None


async def _find_replacement(work: Work, listed: list[Subscription] | None = None
                            ) -> tuple[Subscription | None, Order | None]:
    """The replacement already bought for this record, if any: by recorded id, order id or friendly-name tag; and
    the record's order as just read (``None`` when not read or not visible yet). ``listed`` is the customer's
    subscriptions if the caller has just read them."""
    record, client = work.record, work.client
    if record.new_subscription_id:
        try:
            return await client.get_subscription(record.customer_id, record.new_subscription_id), None
        except NotFoundError:
            pass
    order: Order | None = None
    if record.order_id:
        order, subs = await _subscriptions_of_order(work)
        if subs:
            return subs[0], order
    if listed is None:
        listed = await client.list_subscriptions(record.customer_id)
    for sub in listed:
        if not same_id(sub.id, record.subscription_id) and record.tag in (sub.friendly_name or ""):
            return sub, order
    return None, order


async def _subscriptions_of_order(work: Work) -> tuple[Order | None, list[Subscription]]:
    """The record's order (``None`` while not visible) and the subscriptions it created so far."""
    record, client = work.record, work.client
    assert record.order_id
    try:
        order: Order | None = await client.get_order(record.customer_id, record.order_id)
    except NotFoundError:
        order = None  # orders can take minutes to appear
    found: list[Subscription] = []
    ids = [li.subscription_id for li in order.line_items if li.subscription_id] if order else []
    for sub_id in ids:
        try:
            found.append(await client.get_subscription(record.customer_id, sub_id))
        except NotFoundError:
            continue
    if not found:
        try:
            by_order = await client.list_subscriptions(record.customer_id, order_id=record.order_id)
        except NotFoundError:
            # get-a-list-of-subscriptions-by-order answers 404 20000 "Order ID not found" while the order is not
            # visible yet ("an order can take up to 15 minutes to appear": purchase-new-commerce-license-based):
            # nothing to show yet, not a failure — the caller waits up to PROVISIONING_TIMEOUT_MINUTES.
            by_order = []
        found = [s for s in by_order if not same_id(s.id, record.subscription_id)]
    return order, found


async def _order_ended(work: Work, order: Order, new_sub: Subscription | None) -> bool:
    """Record ``failed`` when Partner Center ended the record's order without an active replacement (order-resources
    OrderStatus), on the first sight of that status instead of waiting out PROVISIONING_TIMEOUT_MINUTES. ``False``
    when the order is still under way."""
    key = "".join(ch for ch in order.status.lower() if ch.isalnum())
    event = _FAILED_ORDER_STATUSES.get(key)
    if event is None and not (key == _PARTIAL_SUCCESS and new_sub is None):
        return False
    shown = f"its subscription {new_sub.id} is {new_sub.status}" if new_sub else "it provisioned no subscription"
    if event is not None:
        advice = ("nothing usable was bought. Check the order in Partner Center; `python -m d365_migration retry` "
                  "buys again")
    else:
        event = "order_partial_success"
        advice = ("its one line item was not fulfilled (partial success: repurchase unfulfilled items). Check the "
                  "order in Partner Center; `python -m d365_migration retry` looks for its subscription again and "
                  "never buys again by itself")
    await work.transition(
        "failed", event, f"Partner Center ended order {order.id} as {order.status!r} and {shown}: {advice}")
    return True


async def _recover_order(work: Work) -> None:
    """After an answer we did not see (checkout or order), find the order and record it. New commerce does not keep
    our friendly name (order line items carry the product name; checkout-a-cart), so the tag is only a convenience:
    the source of truth is an order of the replacement's product with the record's quantity, created after the
    recorded attempt (orders "can take up to 15 minutes to appear", hence the caller's waits)."""
    record = work.record
    if record.order_id or record.new_subscription_id or not (record.cart_id or record.order_attempted_at):
        return
    orders = await work.client.list_orders(record.customer_id)
    found = next((o for o in orders if any(record.tag in (li.friendly_name or "") for li in o.line_items)), None)
    since = record.order_attempted_at or record.purchase_started_at
    if found is None and record.replacement_offer_id and since:
        after = datetime.fromisoformat(since) - CLOCK_SKEW
        claimed = await work.claimed_by_others()  # another migration's order of the same product is not ours
        found = next((o for o in orders if o.id.lower() not in claimed
                      and o.matches(record.replacement_offer_id, record.quantity, created_after=after)), None)
        lost_legacy_order = found is None and bool(record.order_attempted_at) and not record.cart_id
        if lost_legacy_order and await _adopt_lost_order_subscription(work, after, claimed):
            return
    if found is not None:
        await work.transition("purchasing", "order_found", f"order {found.id}", order_id=found.id,
                              purchase_attempt=record.purchase_attempt + 1)


async def _adopt_lost_order_subscription(work: Work, after: datetime, claimed: frozenset[str]) -> bool:
    """A legacy order whose answer was lost and that the order list does not show (yet): the order list can lag the
    subscription list by up to 15 minutes (purchase-new-commerce-license-based), and a resend after that wait would
    buy twice. A subscription of the offer with the record's quantity, created since the attempt, that no other
    migration of the customer recorded, is the order's: record it (and its order) instead of ever re-sending. A
    subscription without a creation date is never adopted (it could be older than the attempt)."""
    record = work.record
    assert record.replacement_offer_id
    wanted = product_key(record.replacement_offer_id)
    candidates = sorted(
        (s for s in await work.client.list_subscriptions(record.customer_id)
         if s.product_key == wanted and s.quantity == record.quantity and s.status in ("active", "pending")
         and not same_id(s.id, record.subscription_id) and s.created is not None and s.created >= after
         and s.id.lower() not in claimed and (s.order_id or "").lower() not in claimed),
        key=lambda s: s.created or after)
    if not candidates:
        return False
    sub = candidates[0]
    await work.transition(
        "purchasing", "order_found",
        f"subscription {sub.id} (order {sub.order_id or 'not named'}) of {record.replacement_offer_id} "
        f"x{record.quantity}, created {sub.created.isoformat() if sub.created else '?'} after the order attempt "
        "whose answer was lost; the order list does not show it yet. Adopted; nothing re-sent",
        order_id=sub.order_id or None, new_subscription_id=sub.id, purchase_attempt=record.purchase_attempt + 1)
    return True


async def _record_rejection(work: Work, exc: PurchaseRejectedError) -> None:
    """A business failure of the purchase: recorded with Partner Center's code and text on the first delivery. No
    availability for the configured term and billing cycle is a configuration problem (``blocked``); anything else
    Partner Center refused is ``failed``. The next attempt (after ``retry``) gets new request ids."""
    code = f" code {exc.code}" if exc.code else ""
    text = (f"Partner Center refused the purchase at {exc.stage} (HTTP {exc.status}{code}): {exc.description}; "
            "nothing was bought")
    if isinstance(exc, NoAvailabilityError):
        await work.transition("blocked", "no_availability",
                              text + ". Check REPLACEMENT_TERM_DURATION / REPLACEMENT_BILLING_CYCLE and "
                              "REPLACEMENT_OFFERS, then `python -m d365_migration retry`",
                              purchase_attempt=work.record.purchase_attempt + 1)
        return
    await work.transition("failed", f"purchase_rejected_{exc.stage}", text,
                          purchase_attempt=work.record.purchase_attempt + 1)


def _resend_wait(work: Work) -> timedelta:
    return timedelta(seconds=work.settings.lost_write_resend_wait_seconds)


def _attempt(work: Work, operation: str, *key: str) -> RequestAttempt:
    """The request id of the next attempt, by the documented rule: the recorded attempt number (bumped after every
    answer), moved past any id this process already saw answered (a duplicate delivery racing the ledger)."""
    attempt = RequestAttempt(operation, (work.record.customer_id, *key), work.record.purchase_attempt)
    while work.client.was_answered(attempt):
        attempt = attempt.next()
    return attempt


async def _current_catalog_item(work: Work, offer: str) -> str:
    """The catalog item to buy now: ``productId:skuId`` (or a full id, whose availability is only a hint) resolved
    against the current availabilities for the customer's country and the configured term and billing cycle —
    "This ID can change over time … should only be accessed and used at the time of purchase"
    (https://learn.microsoft.com/partner-center/developer/product-resources).

    :raises NoAvailabilityError: nothing purchasable matches.
    """
    target = ReplacementTarget.parse(offer)
    assert target.product_id and target.sku_id
    customer = await work.client.get_customer(work.record.customer_id)
    if not customer.country:
        raise NoAvailabilityError(0, None, "the customer's billing profile and company profile name no country, so no "
                                  "availability can be chosen", stage="availability")
    availability = await work.client.resolve_availability(
        target.product_id, target.sku_id, country=customer.country,
        term_duration=work.settings.replacement_term_duration,
        billing_cycle=work.settings.replacement_billing_cycle, segment=segment_for_audience(work.record.audience))
    return availability.catalog_item_id


async def _buy_through_cart(work: Work, offer: str) -> Order | None:
    """New commerce: cart (recorded before checkout), then checkout (idempotent per cart). Returns the order the
    checkout answered (``None`` when it named none)."""
    record, client = work.record, work.client
    if not record.cart_id:
        catalog_item_id = await _current_catalog_item(work, offer)
        cart = await client.create_cart(
            record.customer_id, catalog_item_id, record.quantity,
            billing_cycle=work.settings.replacement_billing_cycle,
            term_duration=work.settings.replacement_term_duration,
            friendly_name=friendly_name(record), reseller_partner_id=record.reseller_partner_id,
            request_id=_attempt(work, "cart", record.subscription_id))
        # Recorded BEFORE checkout: a crash after this point resumes with the same cart, and checkout is
        # idempotent per cart, so the purchase happens at most once. The answer was seen: the next write gets a new id.
        record = await work.transition("purchasing", "cart_created", f"cart {cart.id} ({catalog_item_id})",
                                       cart_id=cart.id, purchase_attempt=record.purchase_attempt + 1)
    cart_id = record.cart_id
    assert cart_id
    # Recorded BEFORE the first checkout of this cart: a later checkout of it is a repeat after an answer we did not
    # see, and a refusal of a repeat does not mean nothing was bought.
    repeat = _checkout_sent(record)
    if not repeat:
        record = await work.transition("purchasing", CHECKOUT_SENT, f"cart {cart_id}")
    try:
        result = await client.checkout_cart(record.customer_id, cart_id, request_id=_attempt(work, "checkout", cart_id))
    except PurchaseRejectedError as exc:
        if repeat:
            await _repeat_checkout_refused(work, exc)
            return None
        raise
    except ConflictError as exc:
        if exc.code in ("800064", "800060"):
            # An answer: the next checkout gets a new MS-RequestId (headers page). With the same id a Partner Center
            # that replays answers by id would say "being processed" for ever.
            await work.checkpoint(purchase_attempt=work.record.purchase_attempt + 1)
            raise RetryLater(f"checkout in progress ({exc.code})", delay=CHECKOUT_IN_PROGRESS_DELAY_SECONDS) from None
        raise
    except PartnerCenterError as exc:
        if isinstance(exc, PartnerCenterApiError) and exc.code == "800065":
            # already submitted: the purchase happened; find what it created
            raise RetryLater("cart already checked out; waiting for its subscription") from None
        if isinstance(exc, TransportError) or exc.maybe_applied:
            # No answer (a lost response, a 5xx to the POST): the next poll (PROVISIONING_POLL_SECONDS) looks for the
            # order and checks the same cart out again, as a repeat — not a failure of the migration.
            raise RetryLater(f"checkout got no answer ({type(exc).__name__}); looking again") from None
        raise
    return await _record_checkout(work, result)


def _checkout_sent(record: MigrationRecord) -> bool:
    """Was a checkout of the record's current cart already sent?"""
    detail = f"cart {record.cart_id}"
    return any(h.get("event") == CHECKOUT_SENT and h.get("detail") == detail for h in record.history)


async def _repeat_checkout_refused(work: Work, exc: PurchaseRejectedError) -> None:
    """A checkout whose answer we never saw was sent again and refused (e.g. ``404 800008``: the cart expired —
    cart-resources). The first one may have bought the replacement: its order can take up to 15 minutes to show
    (purchase-new-commerce-license-based), so the refusal is no proof that nothing was bought. A subscription of the
    product with the quantity, created since the purchase started and no other migration's, is adopted; otherwise
    the record stops for a human — never "nothing was bought", which would let a re-drive buy again."""
    record = work.record
    started = datetime.fromisoformat(record.purchase_started_at or work.now().isoformat()) - CLOCK_SKEW
    if record.replacement_offer_id and await _adopt_lost_order_subscription(work, started,
                                                                           await work.claimed_by_others()):
        return
    code = f" code {exc.code}" if exc.code else ""
    await work.transition(
        "blocked", REPEAT_CHECKOUT_REFUSED,
        f"the checkout of cart {record.cart_id} got no answer we saw, and checking it out again was refused (HTTP "
        f"{exc.status}{code}: {exc.description}). The first checkout may have bought the replacement "
        f"({record.replacement_offer_id} x{record.quantity}) without it showing yet. Check the customer's orders in "
        f"Partner Center: if it was bought, add [{record.tag}] to the new subscription's friendly name and "
        "`python -m d365_migration retry`; if nothing was bought, `retry --buy-anyway` buys anew",
        purchase_attempt=record.purchase_attempt + 1)


async def _record_checkout(work: Work, result: CheckoutResult) -> Order | None:
    """Record what a checkout answered. Orders first: a CartCheckoutResult can carry ``orders`` and ``orderErrors``
    side by side (checkout-a-cart), and an order that came back means the purchase (may have) happened — its id is
    never lost, and the record goes on with it (its subscription, its status and the provisioning timeout decide).
    Only ``orderErrors`` with no order at all are a refused purchase.

    :raises PurchaseRejectedError: ``orderErrors`` and no order.
    """
    record = work.record
    errors = result.rejection()
    if not result.orders:
        if errors is not None:
            raise errors
        order_id = None
        detail = "no order in the checkout's answer; looking for it"
    else:
        order_id = result.orders[0].id
        detail = f"order {order_id}"
        if len(result.orders) > 1:
            detail += " (also orders " + ", ".join(o.id for o in result.orders[1:]) + ")"
        if errors is not None:
            detail += f"; Partner Center also answered orderErrors: {errors.description}"
            work.log(logging.WARNING, "event=checkout_order_errors order=%s %s", order_id, errors.description)
    await work.transition("purchasing", "checked_out", detail, order_id=order_id,
                          purchase_attempt=record.purchase_attempt + 1)
    return result.orders[0] if result.orders else None


async def _buy_through_order(work: Work, offer_id: str) -> Order | None:
    """Legacy: one order, recorded as attempted before it is sent. Returns the order Partner Center answered."""
    record = work.record
    if record.order_id:
        return None
    request_id = _attempt(work, "order", record.subscription_id)
    if record.order_attempted_at:
        # A previous attempt may have been applied without us seeing the answer (_recover_order found no order
        # with our tag). Orders can take up to 15 minutes to show in the order list, so wait that long
        # (LOST_WRITE_RESEND_WAIT_SECONDS) before sending the same request (same MS-RequestId) again.
        if work.now() - datetime.fromisoformat(record.order_attempted_at) < _resend_wait(work):
            raise RetryLater("waiting to see whether the earlier order went through")
    else:
        record = await work.transition("purchasing", "order_attempt", f"MS-RequestId {request_id}",
                                       order_attempted_at=work.now().isoformat())
    try:
        order = await work.client.create_order(
            record.customer_id, offer_id, record.quantity, friendly_name=friendly_name(record),
            billing_cycle="monthly", request_id=request_id, partner_id_on_record=record.reseller_partner_id)
    except ConflictError as exc:
        if exc.code == "800060":  # "your order is in progress": treat as possibly succeeded
            raise RetryLater("order in progress (800060)", delay=ORDER_IN_PROGRESS_DELAY_SECONDS) from None
        raise
    except PartnerCenterError as exc:
        if isinstance(exc, TransportError) or exc.maybe_applied:
            # The order may have been placed (or, never sent, was not): the attempt is recorded, so the next poll
            # (PROVISIONING_POLL_SECONDS) looks for it (_recover_order) and re-sends only after
            # LOST_WRITE_RESEND_WAIT_SECONDS. Not a failure.
            raise RetryLater(f"order got no answer ({type(exc).__name__}); looking for it before anything is "
                             "re-sent") from None
        raise
    await work.transition("purchasing", "ordered", f"order {order.id}", order_id=order.id,
                          purchase_attempt=record.purchase_attempt + 1)
    return order
