"""Partner Center resources as this tool needs them, parsed tolerantly.

Responses are documented camelCase, but keys are looked up case-insensitively; unknown fields are ignored and
unknown enum values (a subscription status Partner Center adds tomorrow) are kept as plain strings, so a scan never
crashes on data it does not know. Only fields the tool cannot work without (ids) raise
:class:`MalformedResponseError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ._exceptions import MalformedResponseError, PurchaseRejectedError

__all__ = [
    "FAR_FUTURE_YEAR",
    "SEGMENT_FOR_AUDIENCE",
    "Availability",
    "AvailabilityTerm",
    "Cart",
    "CartLineItemError",
    "CheckoutResult",
    "Customer",
    "CustomerUser",
    "License",
    "LicenseUpdateResult",
    "LicenseWarning",
    "Order",
    "OrderError",
    "OrderLineItem",
    "ProductSku",
    "ProvisioningStatus",
    "SubscribedSku",
    "Subscription",
    "UpdateAccepted",
    "collection_items",
    "get_ci",
    "parse_datetime",
    "product_key",
    "same_id",
    "segment_for_audience",
]


def get_ci(obj: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``obj[key]``, matching the key case-insensitively (camelCase documented, PascalCase seen)."""
    if key in obj:
        return obj[key]
    lowered = key.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == lowered:
            return v
    return default


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedResponseError(f"expected a JSON object for {what}, got {type(value).__name__}")
    return value


def _req_str(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = get_ci(obj, key)
    if not isinstance(value, str) or not value.strip():
        raise MalformedResponseError(f"{what} has no {key!r}")
    return value.strip()


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = get_ci(obj, key)
    if value is None:
        return None
    return str(value).strip() or None


def _opt_int(obj: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = get_ci(obj, key)
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return default
    return default


def _req_int(obj: Mapping[str, Any], key: str, what: str) -> int:
    """A count the tool's safety rests on: missing or not a whole number is a broken answer, never a zero."""
    value = get_ci(obj, key)
    parsed = _opt_int(obj, key, default=-1)
    if value is None or isinstance(value, bool) or parsed < 0:
        raise MalformedResponseError(f"{what} has no whole-number {key!r} (got {value!r})")
    return parsed


def _opt_bool(obj: Mapping[str, Any], key: str) -> bool | None:
    value = get_ci(obj, key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def parse_datetime(value: Any) -> datetime | None:
    """ISO 8601 (``Z`` or offset, with or without fractions) → aware UTC datetime; anything else → None. Never
    raises: a date that does not fit in UTC (``9999-12-31T23:59:59-08:00`` is after ``datetime.max`` once moved to
    UTC) is the documented far-future placeholder (:data:`FAR_FUTURE_YEAR`, subscription-resources) at the top end,
    and unknown (None) at the bottom (``0001-01-01T00:00:00+01:00``, .NET's unset date)."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python 3.11 parses up to 6 fractional digits; .NET sends 7.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest}" if digits else head + rest
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        return _FAR_FUTURE if parsed.year >= FAR_FUTURE_YEAR else None


def same_id(a: str | None, b: str | None) -> bool:
    """GUIDs compare case-insensitively: the service returns both cases."""
    return a is not None and b is not None and a.strip().lower() == b.strip().lower()


def product_key(offer_or_catalog_item_id: str) -> str:
    """What a purchase, subscription or native target is matched on: ``productId:skuId`` for new commerce (the
    availability part of a catalog item id rotates) or the legacy offer GUID; lower-case."""
    return ":".join(offer_or_catalog_item_id.strip().lower().split(":")[:2])


#: ``commitmentEndDate`` in this year or later is "a date far, far away in the future" (subscription-resources), not
#: a real end date; take the end from provisioning status ``endDate`` instead, or list it as "end date unknown".
FAR_FUTURE_YEAR = 9999
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


def _nested(obj: Mapping[str, Any], *keys: str) -> Any:
    value: Any = obj
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = get_ci(value, key)
    return value


@dataclass(frozen=True)
class Customer:
    id: str
    company_name: str | None = None
    domain: str | None = None
    # ISO 3166 alpha-2, when the answer has it: billingProfile.defaultAddress.country, else
    # companyProfile.address.country (both in get-a-customer-by-id's example; the company address is left out
    # without DAP/GDAP access, the billing profile may be left out too).
    country: str | None = None

    @classmethod
    def parse(cls, data: Any) -> Customer:
        obj = _obj(data, "Customer")
        profile = get_ci(obj, "companyProfile")
        profile = profile if isinstance(profile, Mapping) else {}
        return cls(id=_req_str(obj, "id", "Customer"), company_name=_opt_str(profile, "companyName"),
                   domain=_opt_str(profile, "domain"),
                   country=_country_code(_nested(obj, "billingProfile", "defaultAddress", "country"))
                   or _country_code(_nested(profile, "address", "country")))


def _country_code(value: Any) -> str | None:
    return value.strip().upper() if isinstance(value, str) and value.strip() else None


@dataclass(frozen=True)
class Subscription:
    id: str
    offer_id: str | None
    offer_name: str | None
    friendly_name: str | None
    quantity: int
    status: str  # lower-case; unknown values are kept as they are
    auto_renew: bool | None
    commitment_end: datetime | None
    order_id: str | None
    etag: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)
    created: datetime | None = None
    partner_id: str | None = None  # the indirect reseller of record (``partnerId``; "" → None)

    @property
    def end_date_known(self) -> bool:
        """False when ``commitmentEndDate`` is missing or the documented far-future placeholder (year 9999)."""
        return self.commitment_end is not None and self.commitment_end.year < FAR_FUTURE_YEAR

    @property
    def product_key(self) -> str | None:
        """New commerce: ``productId:skuId`` (lower-case; the availability part rotates); legacy: the offer GUID."""
        if not self.offer_id:
            return None
        return product_key(self.offer_id)

    @classmethod
    def parse(cls, data: Any) -> Subscription:
        obj = _obj(data, "Subscription")
        attributes = get_ci(obj, "attributes")
        etag = _opt_str(attributes, "etag") if isinstance(attributes, Mapping) else None
        end = parse_datetime(get_ci(obj, "commitmentEndDate")) or parse_datetime(get_ci(obj, "commitmentEndDateTime"))
        return cls(
            id=_req_str(obj, "id", "Subscription"),
            offer_id=_opt_str(obj, "offerId"),
            offer_name=_opt_str(obj, "offerName"),
            friendly_name=_opt_str(obj, "friendlyName"),
            quantity=_opt_int(obj, "quantity"),
            status=(_opt_str(obj, "status") or "unknown").lower(),
            auto_renew=_opt_bool(obj, "autoRenewEnabled"),
            commitment_end=end,
            order_id=_opt_str(obj, "orderId"),
            etag=etag,
            raw=dict(obj),
            created=parse_datetime(get_ci(obj, "creationDate")),
            partner_id=_opt_str(obj, "partnerId"),
        )


@dataclass(frozen=True)
class OrderLineItem:
    line_item_number: int
    offer_id: str | None
    quantity: int
    subscription_id: str | None
    friendly_name: str | None
    partner_id_on_record: str | None = None

    @property
    def product_key(self) -> str | None:
        """Like :attr:`Subscription.product_key`: ``productId:skuId`` or the legacy offer GUID, lower-case."""
        return product_key(self.offer_id) if self.offer_id else None


@dataclass(frozen=True)
class Order:
    id: str
    status: str
    line_items: tuple[OrderLineItem, ...]
    created: datetime | None = None

    def matches(self, offer_or_product: str, quantity: int, *, created_after: datetime | None = None) -> bool:
        """Does this order buy ``quantity`` of the offer (legacy GUID) or product SKU (``productId:skuId``, any
        availability), created after ``created_after``? The tag-free way to find a purchase after a lost answer:
        new commerce puts the product name, not ours, into the order's ``friendlyName`` (checkout-a-cart)."""
        key = product_key(offer_or_product)
        if created_after is not None and (self.created is None or self.created < created_after):
            return False
        return any(li.product_key == key and li.quantity == quantity for li in self.line_items)

    @classmethod
    def parse(cls, data: Any) -> Order:
        obj = _obj(data, "Order")
        items = get_ci(obj, "lineItems") or []
        parsed = []
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, Mapping):
                continue
            parsed.append(OrderLineItem(
                line_item_number=_opt_int(item, "lineItemNumber"),
                offer_id=_opt_str(item, "offerId"),
                quantity=_opt_int(item, "quantity"),
                subscription_id=_opt_str(item, "subscriptionId"),
                friendly_name=_opt_str(item, "friendlyName"),
                partner_id_on_record=_opt_str(item, "partnerIdOnRecord"),
            ))
        return cls(id=_req_str(obj, "id", "Order"), status=(_opt_str(obj, "status") or "unknown").lower(),
                   line_items=tuple(parsed), created=parse_datetime(get_ci(obj, "creationDate")))


@dataclass(frozen=True)
class CartLineItemError:
    """A cart line item's ``error`` (cart-resources: ``{errorCode, errorDescription, additionalInformation}``);
    ``errorCode`` arrives as a name (``CatalogItemIdIsNotValid``) or a number (10001), kept as text."""

    line_item_id: str | None
    code: str | None
    description: str


@dataclass(frozen=True)
class Cart:
    id: str
    status: str
    line_item_errors: tuple[CartLineItemError, ...] = ()

    @classmethod
    def parse(cls, data: Any) -> Cart:
        obj = _obj(data, "Cart")
        errors = []
        items = get_ci(obj, "lineItems")
        for item in items if isinstance(items, list) else []:
            error = get_ci(item, "error") if isinstance(item, Mapping) else None
            if isinstance(error, Mapping) and error:
                errors.append(CartLineItemError(
                    line_item_id=_opt_str(item, "id"), code=_opt_str(error, "errorCode"),
                    description=_opt_str(error, "errorDescription") or "cart line item error"))
        return cls(id=_req_str(obj, "id", "Cart"), status=_opt_str(obj, "status") or "unknown",
                   line_item_errors=tuple(errors))


@dataclass(frozen=True)
class OrderError:
    order_group_id: str | None
    code: str | None
    description: str


@dataclass(frozen=True)
class CheckoutResult:
    orders: tuple[Order, ...]
    order_errors: tuple[OrderError, ...]

    @classmethod
    def parse(cls, data: Any) -> CheckoutResult:
        obj = _obj(data, "CartCheckoutResult")
        if _is_bare_order(obj):
            # checkout-a-cart's new-commerce example answers the Order itself, not a CartCheckoutResult.
            return cls(orders=(Order.parse(obj),), order_errors=())
        orders = get_ci(obj, "orders") or []
        errors = get_ci(obj, "orderErrors") or []
        return cls(
            orders=tuple(Order.parse(o) for o in (orders if isinstance(orders, list) else [])),
            order_errors=tuple(
                OrderError(order_group_id=_opt_str(e, "orderGroupId"), code=_opt_str(e, "code"),
                           description=_opt_str(e, "description") or "")
                for e in (errors if isinstance(errors, list) else []) if isinstance(e, Mapping)
            ),
        )

    def rejection(self) -> PurchaseRejectedError | None:
        """The ``orderErrors`` as one business failure carrying Partner Center's first code and every text, or None
        (checkout-a-cart: a checkout can answer 201 with ``orderErrors`` and no order)."""
        if not self.order_errors:
            return None
        first = self.order_errors[0]
        text = "; ".join(f"order group {e.order_group_id}: {e.code}: {e.description}" for e in self.order_errors)
        return PurchaseRejectedError(201, first.code, text, stage="order_errors", method="POST", path="checkout")


def _is_bare_order(obj: Mapping[str, Any]) -> bool:
    """An Order where a CartCheckoutResult was expected: no ``orders``/``orderErrors``, and ``objectType`` Order
    or the Order's own ``id`` and ``lineItems``."""
    if get_ci(obj, "orders") is not None or get_ci(obj, "orderErrors") is not None:
        return False
    attributes = get_ci(obj, "attributes")
    kind = get_ci(attributes, "objectType") if isinstance(attributes, Mapping) else None
    if isinstance(kind, str):
        return kind.strip().lower() == "order"
    return get_ci(obj, "id") is not None and isinstance(get_ci(obj, "lineItems"), list)


@dataclass(frozen=True)
class ProvisioningStatus:
    sku_id: str | None
    status: str  # success | pending | failed | anything new
    quantity: int | None = None
    end_date: datetime | None = None  # ``endDate``: a real end when ``commitmentEndDate`` shows year 9999

    @classmethod
    def parse(cls, data: Any) -> ProvisioningStatus:
        obj = _obj(data, "SubscriptionProvisioningStatus")
        quantity = get_ci(obj, "quantity")
        return cls(sku_id=_opt_str(obj, "skuId"), status=(_opt_str(obj, "status") or "unknown").lower(),
                   quantity=_opt_int(obj, "quantity") if quantity is not None else None,
                   end_date=parse_datetime(get_ci(obj, "endDate")))


@dataclass(frozen=True)
class AvailabilityTerm:
    duration: str | None  # ISO 8601, e.g. P1Y
    billing_cycle: str | None  # lower-case; the service sends "Monthly"/"Annual"
    description: str | None


#: The availability ``segment`` each audience of the retired-offer catalog buys (product-resources: "Commercial,
#: Education, Government, NonProfit"; create-a-cart: "Ensure availability of the catalog item is for the correct
#: segment"). Faculty and students buy education availabilities; nothing here buys nonprofit.
SEGMENT_FOR_AUDIENCE: Mapping[str, str] = {"commercial": "commercial", "faculty": "education",
                                           "students": "education", "government": "government"}


def segment_for_audience(audience: str | None) -> str:
    """The ``targetSegment`` for a record's audience; none recorded → commercial (the catalog's default audience).

    :raises ValueError: an audience the catalog does not know (it validates them when it loads)."""
    key = (audience or "commercial").strip().lower()
    if key not in SEGMENT_FOR_AUDIENCE:
        raise ValueError(f"audience {audience!r} has no availability segment (known: {sorted(SEGMENT_FOR_AUDIENCE)})")
    return SEGMENT_FOR_AUDIENCE[key]


@dataclass(frozen=True)
class Availability:
    """A purchasable form of a product SKU (product-resources). ``catalog_item_id`` is what a cart buys; it "can
    change over time" and is read at purchase time."""

    id: str
    product_id: str | None
    sku_id: str | None
    catalog_item_id: str
    is_purchasable: bool
    segment: str | None
    country: str | None
    terms: tuple[AvailabilityTerm, ...]

    def in_segment(self, segment: str | None) -> bool:
        """Is this availability for ``segment`` (case-insensitive: the docs spell it ``Commercial`` and
        ``commercial``)? One that does not say its segment is taken at the word of the ``targetSegment`` filter."""
        if not segment or not self.segment:
            return True
        return self.segment.strip().lower() == segment.strip().lower()

    def offers(self, term_duration: str, billing_cycle: str) -> bool:
        """Can this availability be bought for ``term_duration`` billed ``billing_cycle``? A term without a
        ``billingCycle`` (older answers) matches on duration alone."""
        for term in self.terms:
            if (term.duration or "").upper() != term_duration.upper():
                continue
            if term.billing_cycle is None or term.billing_cycle == billing_cycle.lower():
                return True
        return False

    @classmethod
    def parse(cls, data: Any) -> Availability:
        obj = _obj(data, "Availability")
        terms = []
        raw_terms = get_ci(obj, "terms")
        for term in raw_terms if isinstance(raw_terms, list) else []:
            if isinstance(term, Mapping):
                cycle = _opt_str(term, "billingCycle")
                terms.append(AvailabilityTerm(duration=_opt_str(term, "duration"),
                                              billing_cycle=cycle.lower() if cycle else None,
                                              description=_opt_str(term, "description")))
        purchasable = _opt_bool(obj, "isPurchasable")
        return cls(id=_req_str(obj, "id", "Availability"), product_id=_opt_str(obj, "productId"),
                   sku_id=_opt_str(obj, "skuId"), catalog_item_id=_req_str(obj, "catalogItemId", "Availability"),
                   is_purchasable=purchasable is not False, segment=_opt_str(obj, "segment"),
                   country=_opt_str(obj, "country"), terms=tuple(terms))


@dataclass(frozen=True)
class UpdateAccepted:
    """``202 Accepted`` to a subscription PATCH: no body, a ``Location`` to read (update-a-subscription-by-id).
    The change is not confirmed until a GET shows it (:meth:`PartnerCenterClient.confirm_subscription_status`)."""

    subscription_id: str
    requested_status: str
    location: str | None


@dataclass(frozen=True)
class LicenseWarning:
    code: str | None
    message: str
    service_plans: tuple[str, ...] = ()


@dataclass(frozen=True)
class LicenseUpdateResult:
    """A successful ``licenseupdates`` answer; ``warnings`` are its ``licenseWarnings`` (keep them with the user)."""

    warnings: tuple[LicenseWarning, ...] = ()

    @classmethod
    def parse(cls, data: Any) -> LicenseUpdateResult:
        if not isinstance(data, Mapping):
            return cls()
        raw = get_ci(data, "licenseWarnings")
        warnings = []
        for item in raw if isinstance(raw, list) else []:
            if isinstance(item, Mapping):
                plans = get_ci(item, "servicePlans")
                warnings.append(LicenseWarning(
                    code=_opt_str(item, "code"), message=_opt_str(item, "message") or "",
                    service_plans=tuple(str(p) for p in plans) if isinstance(plans, list) else ()))
        return cls(tuple(warnings))


@dataclass(frozen=True)
class CustomerUser:
    id: str
    user_principal_name: str | None
    display_name: str | None
    usage_location: str | None
    # ``state``: ``active`` or ``inactive`` (user-resources; a soft-deleted user is inactive, view-a-deleted-user);
    # lower-case, None when the answer has no state.
    state: str | None = None

    @property
    def is_active(self) -> bool:
        """An answer without ``state`` (older shapes) counts as active; any other value than ``active`` does not."""
        return self.state is None or self.state == "active"

    @classmethod
    def parse(cls, data: Any) -> CustomerUser:
        obj = _obj(data, "CustomerUser")
        state = _opt_str(obj, "state")
        return cls(id=_req_str(obj, "id", "CustomerUser"), user_principal_name=_opt_str(obj, "userPrincipalName"),
                   display_name=_opt_str(obj, "displayName"), usage_location=_opt_str(obj, "usageLocation"),
                   state=state.lower() if state else None)


@dataclass(frozen=True)
class ProductSku:
    id: str
    name: str | None
    sku_part_number: str | None

    @classmethod
    def parse(cls, data: Any, what: str) -> ProductSku:
        obj = _obj(data, what)
        return cls(id=_req_str(obj, "id", what), name=_opt_str(obj, "name"),
                   sku_part_number=_opt_str(obj, "skuPartNumber"))


@dataclass(frozen=True)
class License:
    product_sku: ProductSku

    @classmethod
    def parse(cls, data: Any) -> License:
        obj = _obj(data, "License")
        return cls(product_sku=ProductSku.parse(get_ci(obj, "productSku"), "License.productSku"))


@dataclass(frozen=True)
class SubscribedSku:
    product_sku: ProductSku
    available_units: int
    active_units: int
    consumed_units: int
    total_units: int
    # get-a-list-of-available-licenses' example also carries these (units in a grace period / suspended)
    warning_units: int = 0
    suspended_units: int = 0

    @classmethod
    def parse(cls, data: Any) -> SubscribedSku:
        obj = _obj(data, "SubscribedSku")
        return cls(
            product_sku=ProductSku.parse(get_ci(obj, "productSku"), "SubscribedSku.productSku"),
            available_units=_opt_int(obj, "availableUnits"),
            active_units=_opt_int(obj, "activeUnits"),
            # Who holds the SKU: the suspension's gate ("nobody holds the old SKU") reads it; a missing count must
            # fail closed, not read as zero holders.
            consumed_units=_req_int(obj, "consumedUnits", "SubscribedSku"),
            total_units=_opt_int(obj, "totalUnits"),
            warning_units=_opt_int(obj, "warningUnits"),
            suspended_units=_opt_int(obj, "suspendedUnits"),
        )


def collection_items(body: Any, what: str, path: str, *, bare_key: str | None = None,
                     item_keys: tuple[str, ...] = ()) -> list[Any]:
    """The ``items`` of a Partner Center collection answer (none → ``[]``).

    ``item_keys``: other names the list is documented under (get-transitions' example: ``transition``).
    ``bare_key``: a field only the resource itself has (an Availability's ``catalogItemId``); an answer carrying it
    and no ``items`` is that one resource, not a collection — some Learn examples answer a bare object
    (get-a-list-of-availabilities-for-a-sku, new commerce).

    :raises MalformedResponseError: the answer is not an object, or ``items`` is not a list.
    """
    if not isinstance(body, Mapping):
        raise MalformedResponseError(f"{what} response is not a JSON object", method="GET", path=path)
    items = get_ci(body, "items")
    for key in item_keys:
        if items is None:
            items = get_ci(body, key)
    if items is None:
        if bare_key is not None and get_ci(body, bare_key) is not None:
            return [body]
        return []
    if not isinstance(items, list):
        raise MalformedResponseError(f"{what} 'items' is not a list", method="GET", path=path)
    return items
