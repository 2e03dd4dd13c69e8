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

from ._exceptions import MalformedResponseError

__all__ = [
    "Cart",
    "CheckoutResult",
    "Customer",
    "CustomerUser",
    "License",
    "Order",
    "OrderError",
    "OrderLineItem",
    "ProductSku",
    "ProvisioningStatus",
    "SubscribedSku",
    "Subscription",
    "get_ci",
    "parse_datetime",
    "same_id",
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


def _opt_bool(obj: Mapping[str, Any], key: str) -> bool | None:
    value = get_ci(obj, key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def parse_datetime(value: Any) -> datetime | None:
    """ISO 8601 (``Z`` or offset, with or without fractions) → aware UTC datetime; anything else → None."""
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
    return parsed.astimezone(UTC)


def same_id(a: str | None, b: str | None) -> bool:
    """GUIDs compare case-insensitively: the service returns both cases."""
    return a is not None and b is not None and a.strip().lower() == b.strip().lower()


@dataclass(frozen=True)
class Customer:
    id: str
    company_name: str | None = None
    domain: str | None = None

    @classmethod
    def parse(cls, data: Any) -> Customer:
        obj = _obj(data, "Customer")
        profile = get_ci(obj, "companyProfile")
        profile = profile if isinstance(profile, Mapping) else {}
        return cls(id=_req_str(obj, "id", "Customer"), company_name=_opt_str(profile, "companyName"),
                   domain=_opt_str(profile, "domain"))


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
        )


@dataclass(frozen=True)
class OrderLineItem:
    line_item_number: int
    offer_id: str | None
    quantity: int
    subscription_id: str | None
    friendly_name: str | None


@dataclass(frozen=True)
class Order:
    id: str
    status: str
    line_items: tuple[OrderLineItem, ...]

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
            ))
        return cls(id=_req_str(obj, "id", "Order"), status=(_opt_str(obj, "status") or "unknown").lower(),
                   line_items=tuple(parsed))


@dataclass(frozen=True)
class Cart:
    id: str
    status: str

    @classmethod
    def parse(cls, data: Any) -> Cart:
        obj = _obj(data, "Cart")
        return cls(id=_req_str(obj, "id", "Cart"), status=_opt_str(obj, "status") or "unknown")


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


@dataclass(frozen=True)
class ProvisioningStatus:
    sku_id: str | None
    status: str  # success | pending | failed | anything new

    @classmethod
    def parse(cls, data: Any) -> ProvisioningStatus:
        obj = _obj(data, "SubscriptionProvisioningStatus")
        return cls(sku_id=_opt_str(obj, "skuId"), status=(_opt_str(obj, "status") or "unknown").lower())


@dataclass(frozen=True)
class CustomerUser:
    id: str
    user_principal_name: str | None
    display_name: str | None
    usage_location: str | None

    @classmethod
    def parse(cls, data: Any) -> CustomerUser:
        obj = _obj(data, "CustomerUser")
        return cls(id=_req_str(obj, "id", "CustomerUser"), user_principal_name=_opt_str(obj, "userPrincipalName"),
                   display_name=_opt_str(obj, "displayName"), usage_location=_opt_str(obj, "usageLocation"))


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

    @classmethod
    def parse(cls, data: Any) -> SubscribedSku:
        obj = _obj(data, "SubscribedSku")
        return cls(
            product_sku=ProductSku.parse(get_ci(obj, "productSku"), "SubscribedSku.productSku"),
            available_units=_opt_int(obj, "availableUnits"),
            active_units=_opt_int(obj, "activeUnits"),
            consumed_units=_opt_int(obj, "consumedUnits"),
            total_units=_opt_int(obj, "totalUnits"),
        )
