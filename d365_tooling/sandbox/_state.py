"""In-memory Partner Center world: customers, subscriptions, orders, carts, users, licenses.

All reads and writes go through `SandboxState` under one re-entrant lock, so tests may read state from another
thread while the server runs. Every applied write is appended to the event log.
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ._catalog import ALL_SKUS, CATALOG, CatalogItem, ProductSku, catalog_item
from ._config import SandboxConfig

KNOWN_PATCH_STATUSES = {"active", "suspended", "deleted"}
#: Availability segments (product-resources), in the order ``availabilities_in_all_segments`` lists them:
#: education first, so a client that takes the first purchasable one buys the wrong segment.
SEGMENT_ORDER = ("education", "commercial", "government", "nonprofit")
_SEGMENT_LETTER = {"commercial": "C", "education": "E", "government": "G", "nonprofit": "N"}
_SEGMENT_OF_AUDIENCE = {"commercial": "commercial", "faculty": "education", "students": "education",
                        "government": "government"}


def segment_of(item: CatalogItem) -> str:
    """The availability segment of a catalog item's own SKU (by the audience it serves)."""
    return _SEGMENT_OF_AUDIENCE.get(item.audience or "commercial", "commercial")
# New-commerce license-based subscriptions can be cancelled within 7 days (168 hours) of purchase (Learn:
# partner-center/customers/new-commerce-cancellation-policy).
CANCELLATION_WINDOW_S = 7 * 24 * 3600


class ApiError(Exception):
    """A Partner Center error: HTTP status + `{"code", "description", "data", "source": "PartnerFD"}`."""

    def __init__(self, status: int, code: int, description: str, data: list[Any] | None = None) -> None:
        super().__init__(f"{status} {code} {description}")
        self.status = status
        self.code = code
        self.description = description
        self.data = data or []

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "description": self.description, "data": self.data, "source": "PartnerFD"}


def iso(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def iso_day(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT00:00:00Z")


def link(uri: str, method: str = "GET", headers: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"uri": uri, "method": method, "headers": headers or []}


def ci_get(obj: Any, key: str, default: Any = None) -> Any:
    """Case-insensitive dict lookup (request bodies may be PascalCase)."""
    if not isinstance(obj, dict):
        return default
    if key in obj:
        return obj[key]
    low = key.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return default


def ci_has(obj: Any, key: str) -> bool:
    return isinstance(obj, dict) and any(isinstance(k, str) and k.lower() == key.lower() for k in obj)


@dataclass(slots=True)
class User:
    id: str
    user_principal_name: str
    display_name: str
    first_name: str
    last_name: str
    usage_location: str | None
    skus: list[str] = field(default_factory=list)  # lower-case product SKU ids
    deleted_at: float | None = None  # soft-deleted (view-a-deleted-user): state "inactive", licenses released

    def to_json(self, customer_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "userPrincipalName": self.user_principal_name,
            "firstName": self.first_name,
            "lastName": self.last_name,
            "displayName": self.display_name,
            "usageLocation": self.usage_location,
            "userDomainType": "none",
            "state": "active" if self.deleted_at is None else "inactive",
            "links": {"self": link(f"/customers/{customer_id}/users/{self.id}")},
            "attributes": {"objectType": "CustomerUser"},
        }
        if self.deleted_at is not None:
            out["softDeletionTime"] = iso(self.deleted_at)
        return out


@dataclass(slots=True)
class Subscription:
    id: str
    offer_id: str
    offer_name: str
    friendly_name: str
    quantity: int
    status: str
    auto_renew: bool
    commitment_end: str  # ISO date-time string
    creation: float
    effective_start: str
    order_id: str
    sku_id: str  # lower-case
    is_nce: bool
    billing_cycle: str = "annual"
    term_duration: str | None = None
    etag_version: int = 1
    provisioned_at: float = 0.0
    listed_at: float = 0.0
    partner_id: str = ""  # indirect reseller of record
    provisioning_end: str | None = None  # provisioning status endDate when it differs from commitmentEndDate

    def etag(self) -> str:
        raw = json.dumps({"id": self.id, "version": self.etag_version}, separators=(",", ":"))
        return base64.b64encode(raw.encode()).decode()

    def to_json(self, customer_id: str) -> dict[str, Any]:
        base = f"/customers/{customer_id}/subscriptions/{self.id}"
        out: dict[str, Any] = {
            "id": self.id,
            "entitlementId": self.id,
            "offerId": self.offer_id,
            "offerName": self.offer_name,
            "friendlyName": self.friendly_name,
            "quantity": self.quantity,
            "unitType": "Licenses",
            "hasPurchasableAddons": False,
            "creationDate": iso(self.creation),
            "effectiveStartDate": self.effective_start,
            "commitmentEndDate": self.commitment_end,
            "status": self.status,
            "autoRenewEnabled": self.auto_renew,
            "isTrial": False,
            "billingType": "license",
            "billingCycle": self.billing_cycle,
            "isMicrosoftProduct": True,
            "partnerId": self.partner_id,
            "contractType": "subscription",
            "actions": ["Cancel", "Edit"] if self.status == "active" else [],
            "attentionNeeded": False,
            "actionTaken": False,
            "orderId": self.order_id,
            "suspensionReasons": ["CustomerCancellation"] if self.status == "suspended" else [],
        }
        if self.is_nce:
            product_id, sku_id, availability_id = [*self.offer_id.split(":"), "", ""][:3]
            out["productType"] = {"id": "OnlineServicesNCE", "displayName": "OnlineServicesNCE"}
            out["termDuration"] = self.term_duration or "P1Y"
            out["renewalTermDuration"] = self.term_duration or "P1Y" if self.auto_renew else ""
            out["commitmentEndDateTime"] = self.commitment_end.replace("T00:00:00Z", "T23:59:59Z")
            out["cancellationAllowedUntilDate"] = iso(self.creation + CANCELLATION_WINDOW_S)
            out["refundOptions"] = []
            out["links"] = {
                "product": link(f"/products/{product_id}?country=US"),
                "sku": link(f"/products/{product_id}/skus/{sku_id}?country=US"),
                "availability": link(
                    f"/products/{product_id}/skus/{sku_id}/availabilities/{availability_id}?country=US"
                ),
                "self": link(base),
            }
        else:
            if self.term_duration:
                out["termDuration"] = self.term_duration
            out["links"] = {"offer": link(f"/offers/{self.offer_id}?country=US"), "self": link(base)}
        out["attributes"] = {"etag": self.etag(), "objectType": "Subscription"}
        return out


@dataclass(slots=True)
class Order:
    id: str
    customer_id: str
    billing_cycle: str
    line_items: list[dict[str, Any]]  # lineItemNumber, offerId, quantity, friendlyName, termDuration, subscriptionId
    creation: float
    ready_at: float
    is_nce: bool
    cart_id: str | None = None
    status: str = "pending"

    def to_json(self) -> dict[str, Any]:
        base = f"/customers/{self.customer_id}/orders/{self.id}"
        items = []
        for li in self.line_items:
            item: dict[str, Any] = {
                "lineItemNumber": li["lineItemNumber"],
                "offerId": li["offerId"],
                "quantity": li["quantity"],
                "friendlyName": li["friendlyName"],
                "partnerIdOnRecord": li.get("partnerIdOnRecord") or "",
            }
            if li.get("termDuration"):
                item["termDuration"] = li["termDuration"]
            links: dict[str, Any] = {}
            if li.get("subscriptionId"):
                sid = li["subscriptionId"]
                item["subscriptionId"] = sid
                links["subscription"] = link(f"/customers/{self.customer_id}/subscriptions/{sid}")
                links["provisioningStatus"] = link(
                    f"/customers/{self.customer_id}/subscriptions/{sid}/provisioningstatus"
                )
            item["links"] = links
            items.append(item)
        return {
            "id": self.id,
            "alternateId": self.id.replace("-", "")[:12],
            "referenceCustomerId": self.customer_id,
            "billingCycle": self.billing_cycle,
            "currencyCode": "USD",
            "currencySymbol": "$",
            "lineItems": items,
            "creationDate": iso(self.creation),
            "status": self.status,
            "transactionType": "UserPurchase",
            "links": {
                "self": link(base),
                "provisioningStatus": link(f"{base}/provisioningstatus"),
            },
            "attributes": {"objectType": "Order"},
        }


@dataclass(slots=True)
class Cart:
    id: str
    customer_id: str
    line_items: list[dict[str, Any]]
    creation: float
    modified: float
    status: str = "Active"
    processing: bool = False
    checkout_result: dict[str, Any] | None = None
    lifetime_s: float = 7 * 86400  # cart-resources: carts expire 7 days after creation

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "creationTimestamp": iso(self.creation),
            "lastModifiedTimestamp": iso(self.modified),
            "expirationTimestamp": iso(self.creation + self.lifetime_s),
            "lastModifiedUser": "sandbox-agent@sandboxpartner.onmicrosoft.com",
            "lineItems": copy.deepcopy(self.line_items),
            "status": self.status,
            "links": {"self": link(f"/customers/{self.customer_id}/carts/{self.id}")},
            "attributes": {"objectType": "Cart"},
        }


@dataclass(slots=True)
class Customer:
    id: str
    domain: str
    company_name: str
    country: str = "US"
    users: dict[str, User] = field(default_factory=dict)  # key: lower-case id
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    orders: dict[str, Order] = field(default_factory=dict)
    carts: dict[str, Cart] = field(default_factory=dict)

    def to_json(self, *, country_in_company_profile: bool = False) -> dict[str, Any]:
        company: dict[str, Any] = {
            "tenantId": self.id,
            "domain": self.domain,
            "companyName": self.company_name,
            "links": {"self": link(f"/customers/{self.id}/profiles/company")},
            "attributes": {"objectType": "CustomerCompanyProfile"},
        }
        billing: dict[str, Any] = {"attributes": {"objectType": "CustomerBillingProfile"}}
        if country_in_company_profile:
            # get-a-customer-by-id's example: companyProfile.address {country, region, city, …}
            company["address"] = {"country": self.country, "city": "Redmond", "addressLine1": "1 Microsoft Way"}
        else:
            billing["defaultAddress"] = {"country": self.country}
        return {
            "id": self.id,
            "commerceId": self.id,
            "companyProfile": company,
            "billingProfile": billing,
            "relationshipToPartner": "reseller",
            "allowDelegatedAccess": True,
            "links": {"self": link(f"/customers/{self.id}")},
            "attributes": {"objectType": "Customer"},
        }


def _new_guid() -> str:
    return str(uuid.uuid4())


class SandboxState:
    """All sandbox data plus logs. Thread-safe (one RLock)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.lock = threading.RLock()
        self.clock = clock
        self.config = SandboxConfig()
        self._secret = secrets.token_hex(8)
        self._seed_params: dict[str, Any] | None = None
        self.manifest: Any = None  # the SeedManifest of the last seed_world()
        self.tick_hooks: list[Callable[[SandboxState], None]] = []  # e.g. native transitions completing (_transitions)
        self._clear()

    def _clear(self) -> None:
        self._customers: dict[str, Customer] = {}
        self._customer_ids: list[str] = []
        self._pending: list[Order] = []
        self._events: list[dict[str, Any]] = []
        self._requests: list[dict[str, Any]] = []
        self._purchases: list[dict[str, Any]] = []
        self._license_updates: list[dict[str, Any]] = []
        self._patches: list[dict[str, Any]] = []
        self._dedupe: dict[str, tuple[int, bytes, list[tuple[bytes, bytes]]]] = {}
        self._seen_writes: set[str] = set()
        # (customer, subscription) -> accepted (202) PATCH not applied yet: {"apply_at", "target", "rec"}
        self._pending_patches: dict[tuple[str, str], dict[str, Any]] = {}
        self._rotations: dict[tuple[str, str], int] = {}  # (product, sku) -> extra availability rotations
        # (time, lower-case product SKU id, +1/-1): every change of a SKU's consumed units, for consumed_units_lag_s
        self._consumed_changes: list[tuple[float, str, int]] = []
        self.native_ops: list[Any] = []  # _transitions.NativeOperation: transitions/upgrades performed

    # ------------------------------------------------------------------ building (seed / by hand)
    def add_customer(self, customer_id: str, domain: str, company_name: str, country: str = "US") -> Customer:
        with self.lock:
            c = Customer(customer_id, domain, company_name, country)
            self._customers[customer_id.lower()] = c
            self._customer_ids.append(customer_id.lower())
            return c

    def add_user(
        self, customer_id: str, user_id: str, upn: str, first: str, last: str, usage_location: str | None,
        skus: list[str] | None = None,
    ) -> User:
        with self.lock:
            c = self._customer(customer_id)
            u = User(user_id, upn, f"{first} {last}", first, last, usage_location, [s.lower() for s in skus or []])
            c.users[user_id.lower()] = u
            return u

    def add_subscription(
        self, customer_id: str, *, offer: CatalogItem, subscription_id: str | None = None, quantity: int,
        status: str = "active", auto_renew: bool = False, commitment_end: str, friendly_name: str = "",
        offer_name: str | None = None, offer_id: str | None = None, order_id: str | None = None,
        creation: float | None = None, billing_cycle: str | None = None,
    ) -> Subscription:
        with self.lock:
            c = self._customer(customer_id)
            now = self.clock()
            created = creation if creation is not None else now - 400 * 86400
            sid = subscription_id or _new_guid()
            sub = Subscription(
                id=sid,
                offer_id=offer_id or offer.id,
                offer_name=offer_name if offer_name is not None else offer.name,
                friendly_name=friendly_name,
                quantity=quantity,
                status=status,
                auto_renew=auto_renew,
                commitment_end=commitment_end,
                creation=created,
                effective_start=iso_day(datetime.fromtimestamp(created, tz=UTC)),
                order_id=order_id or (secrets.token_hex(6) if offer.is_nce else _new_guid().upper()),
                sku_id=offer.sku.id.lower(),
                is_nce=offer.is_nce,
                billing_cycle=billing_cycle or ("monthly" if offer.is_nce else "annual"),
                term_duration=offer.term_duration,
                provisioned_at=created,
                listed_at=created,
            )
            c.subscriptions[sid.lower()] = sub
            return sub

    # ------------------------------------------------------------------ helpers
    def _customer(self, customer_id: str) -> Customer:
        c = self._customers.get(customer_id.lower())
        if c is None:
            raise ApiError(404, 1000, f"Customer {customer_id} not found.")
        return c

    def _sub(self, c: Customer, subscription_id: str) -> Subscription:
        s = c.subscriptions.get(subscription_id.lower())
        if s is None or s.provisioned_at > self.clock():
            raise ApiError(404, 20003, f"Subscription with ID {subscription_id} not found.")
        return s

    def _user(self, c: Customer, user_id: str) -> User:
        u = c.users.get(user_id.lower())
        if u is None:
            raise ApiError(404, 60002, f"User object ID {user_id} isn't found.")
        return u

    def _live_user(self, c: Customer, user_id: str) -> User:
        """The user as the license routes see it: a soft-deleted user is not found (404 60002, error-codes)."""
        u = self._user(c, user_id)
        if u.deleted_at is not None:
            raise ApiError(404, 60002, f"User object ID {user_id} isn't found.")
        return u

    def _consumed_changed(self, sku_ids: list[str], delta: int) -> None:
        now = self.clock()
        self._consumed_changes.extend((now, sku_id, delta) for sku_id in sku_ids)

    def _event(self, kind: str, **data: Any) -> None:
        self._events.append({"type": kind, "time": self.clock(), **data})

    def tick(self) -> None:
        """Complete pending orders whose provisioning delay has passed (creates their subscriptions)."""
        with self.lock:
            self._apply_due_patches()
            for hook in self.tick_hooks:
                hook(self)
            if not self._pending:
                return
            now = self.clock()
            still: list[Order] = []
            for order in self._pending:
                if order.ready_at <= now:
                    self._provision(order)
                else:
                    still.append(order)
            self._pending = still

    # ------------------------------------------------------------------ catalog: availabilities (rotating)
    def availability_id(self, product_id: str, sku_id: str, base: str) -> str:
        """The current availability id of a new-commerce product SKU. product-resources: a catalog item id "can
        change over time"; with ``availabilities_rotated`` (or after :meth:`rotate_availability`) it differs from
        the one the catalog (and DEMO_REPLACEMENT_OFFERS) started with."""
        gen = self._rotations.get((product_id.lower(), sku_id.lower()), 0)
        gen += 1 if self.config.availabilities_rotated else 0
        return base if gen == 0 else base[:-4] + f"R{gen:03d}"

    def segment_availability_ids(self, product_id: str, sku_id: str, base: str, own_segment: str
                                 ) -> dict[str, str]:
        """With ``availabilities_in_all_segments``: the SKU's availability id in every segment (its own segment's
        is :meth:`availability_id`; the others derive from it); without: only its own."""
        current = self.availability_id(product_id, sku_id, base)
        ids = {own_segment: current}
        if self.config.availabilities_in_all_segments:
            for segment in SEGMENT_ORDER:
                if segment != own_segment:
                    ids[segment] = current[:-4] + _SEGMENT_LETTER[segment] + current[-3:]
        return ids

    def rotate_availability(self, product_id: str, sku_id: str) -> None:
        """By hand: the product SKU gets a new availability id (the old one goes stale)."""
        with self.lock:
            key = (product_id.lower(), sku_id.lower())
            self._rotations[key] = self._rotations.get(key, 0) + 1
            self._event("availability_rotated", product_id=product_id, sku_id=sku_id)

    def resolve_item(self, offer_id: str) -> tuple[CatalogItem | None, bool]:
        """(catalog entry, is_current) for a legacy offer GUID or a catalog item id of any availability."""
        item = catalog_item(offer_id)
        parts = offer_id.strip().split(":")
        if item is None and len(parts) == 3:
            prefix = f"{parts[0]}:{parts[1]}:".lower()
            item = next((i for i in CATALOG.values() if i.is_nce and i.id.lower().startswith(prefix)), None)
        if item is None or not item.is_nce or len(parts) != 3:
            return item, item is not None
        product, sku, base = item.id.split(":")
        current = self.segment_availability_ids(product, sku, base, segment_of(item)).values()
        return item, parts[2].lower() in {a.lower() for a in current}

    def _provision(self, order: Order) -> None:
        c = self._customers[order.customer_id.lower()]
        if self.config.order_final_status:
            # order-resources OrderStatus: the order ends cancelled / rejected / in error …; nothing is provisioned.
            order.status = self.config.order_final_status
            self._event("order_ended", customer_id=c.id, order_id=order.id, status=order.status)
            return
        for li in order.line_items:
            item, _ = self.resolve_item(li["offerId"])
            assert item is not None
            end = datetime.fromtimestamp(order.ready_at, tz=UTC) + timedelta(days=365)
            sub = self.add_subscription(
                c.id, offer=item, subscription_id=li["_subscriptionId"], quantity=li["quantity"], status="active",
                auto_renew=item.is_nce, commitment_end=iso_day(end), friendly_name=li["friendlyName"] or "",
                order_id=order.id, creation=order.ready_at, billing_cycle=order.billing_cycle,
                offer_id=li["offerId"],
            )
            sub.partner_id = str(li.get("partnerIdOnRecord") or "")
            if li.get("termDuration"):
                sub.term_duration = li["termDuration"]
            sub.provisioned_at = order.ready_at
            sub.listed_at = order.ready_at + float(self.config.list_lag_s)
            li["subscriptionId"] = sub.id
            purchase = li.get("_purchase")
            if isinstance(purchase, dict):
                purchase["subscription_ids"] = [sub.id]
                purchase["provisioned_at"] = order.ready_at
            self._event("subscription_provisioned", customer_id=c.id, subscription_id=sub.id, order_id=order.id)
        order.status = "completed"

    # ------------------------------------------------------------------ customers
    def list_customers(self, offset: int, size: int) -> tuple[list[dict[str, Any]], int | None]:
        with self.lock:
            ids = self._customer_ids[offset:offset + size]
            only_company = bool(self.config.country_only_in_company_profile)
            items = [self._customers[i].to_json(country_in_company_profile=only_company) for i in ids]
            nxt = offset + size if offset + size < len(self._customer_ids) else None
            return items, nxt

    def customer_json(self, customer_id: str) -> dict[str, Any]:
        with self.lock:
            return self._customer(customer_id).to_json(
                country_in_company_profile=bool(self.config.country_only_in_company_profile))

    def customer_ids(self) -> list[str]:
        with self.lock:
            return [self._customers[i].id for i in self._customer_ids]

    def make_token(self, kind: str, offset: int) -> str:
        raw = json.dumps({"k": kind, "o": offset, "s": self._secret}, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode()

    def read_token(self, kind: str, token: str) -> int:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()).decode())
            if data["k"] != kind or data["s"] != self._secret or int(data["o"]) < 0:
                raise ValueError("foreign token")
            return int(data["o"])
        except Exception as exc:
            raise ApiError(400, 800002, "Invalid request input: the continuation token is not valid.",
                           [str(exc)]) from None

    # ------------------------------------------------------------------ subscriptions
    def subscriptions_json(self, customer_id: str, order_id: str | None = None) -> list[dict[str, Any]]:
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            now = self.clock()
            lagging = c.orders.get(order_id.lower()) if order_id is not None else None
            if lagging is not None and self._order_lagging(lagging):
                # get-a-list-of-subscriptions-by-order: the order is not visible yet.
                raise ApiError(404, 20000, f"Order ID {order_id} not found.")
            out = []
            for s in c.subscriptions.values():
                if s.listed_at > now or s.provisioned_at > now:
                    continue
                if order_id is not None and s.order_id.lower() != order_id.lower():
                    continue
                out.append(s.to_json(c.id))
            return out

    def subscription_json(self, customer_id: str, subscription_id: str) -> dict[str, Any]:
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            return self._sub(c, subscription_id).to_json(c.id)

    def provisioning_status(self, customer_id: str, subscription_id: str) -> dict[str, Any]:
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            s = self._sub(c, subscription_id)
            # get-subscription-provisioning-status: "updated every 15 minutes"; a new subscription answers
            # 404 800007 ("unable to retrieve provisioning information") first, then "pending".
            age = self.clock() - s.provisioned_at
            lag = float(self.config.provisioning_status_lag_s)
            if lag and age < lag / 2:
                raise ApiError(404, 800007, f"Unable to retrieve provisioning information for subscription {s.id}.")
            pending = self.clock() < s.listed_at or (lag and age < lag)
            sku_id = ALL_SKUS[s.sku_id].id if s.sku_id in ALL_SKUS else s.sku_id
            if self.config.opaque_provisioning_sku_ids:
                # reference §12 #5: nothing says skuId equals subscribedskus productSku.id; here it does not.
                sku_id = str(uuid.uuid5(uuid.NAMESPACE_OID, "provisioning-sku/" + sku_id.lower()))
            return {
                "skuId": sku_id,
                "status": "pending" if pending else "success",
                "quantity": s.quantity,
                "endDate": s.provisioning_end or s.commitment_end,
                "attributes": {"objectType": "SubscriptionProvisioningStatus"},
            }

    def _apply_due_patches(self) -> None:
        now = self.clock()
        for key, pending in list(self._pending_patches.items()):
            if pending["apply_at"] > now:
                continue
            del self._pending_patches[key]
            c = self._customers.get(key[0])
            s = c.subscriptions.get(key[1]) if c is not None else None
            if c is None or s is None:
                continue
            s.status, s.quantity, s.friendly_name, s.auto_renew = pending["target"]
            s.etag_version += 1
            rec = {**pending["rec"], "time": pending["apply_at"], "accepted_at": pending["accepted_at"]}
            self._patches.append(rec)
            self._event("subscription_patched", **{k: v for k, v in rec.items() if k != "time"})

    def patch_subscription(
        self, customer_id: str, subscription_id: str, body: Any, if_match: str | None, *, defer_s: float = 0.0
    ) -> dict[str, Any] | None:
        """Apply a PATCH and return the subscription; with ``defer_s`` > 0, accept it (the route answers 202) and
        apply it that much later (update-a-subscription-by-id), returning None."""
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            s = self._sub(c, subscription_id)
            if (c.id.lower(), s.id.lower()) in self._pending_patches:
                raise ApiError(409, 800082, f"Subscription {s.id} is not ready to be updated. Try again after "
                                            "sometime.")
            saved = (s.status, s.quantity, s.friendly_name, s.auto_renew)
            if not isinstance(body, dict):
                raise ApiError(400, 800002, "Invalid request input: the body must be a Subscription object.")
            if if_match is not None and if_match.strip() and self.config.if_match_always_rejected:
                raise ApiError(412, 2055, "Etag is no longer valid", [f"If-Match {if_match.strip()!r} refused."])
            if if_match is not None and if_match.strip():
                sent = if_match.strip()
                if not self.config.etag_literal_match:  # else compared as sent (suspend-a-subscription example)
                    if sent.startswith("W/"):
                        sent = sent[2:]
                    sent = sent.strip().strip('"')
                if sent != s.etag():
                    raise ApiError(412, 2055, "Etag is no longer valid", [f"Subscription {s.id} was modified."])
            new_status_raw = ci_get(body, "status")
            new_status = str(new_status_raw).lower() if new_status_raw is not None else s.status
            if new_status_raw is not None and new_status not in KNOWN_PATCH_STATUSES | {s.status}:
                raise ApiError(400, 800002, f"Invalid request input: unknown subscription status {new_status_raw!r}.")
            before = s.to_json(c.id)
            changes: dict[str, list[Any]] = {}
            if s.status == "suspended":
                if new_status != "active":
                    raise ApiError(400, 800091, f"Can't update subscription {s.id} with suspended status.")
                changes["status"] = [s.status, "active"]
                s.status = "active"
            elif s.status == "deleted":
                raise ApiError(400, 2011, f"Subscription {s.id} with deleted status can't be updated.")
            elif s.status != "active":
                raise ApiError(400, 800096, f"Can't update the status for subscription {s.id} ({s.status}).")
            else:
                if new_status == "deleted":
                    self._check_cancellation_window(s)
                qty = ci_get(body, "quantity")
                if qty is not None:
                    if not isinstance(qty, int) or isinstance(qty, bool) or qty < 1:
                        raise ApiError(400, 800002, "Invalid request input: quantity must be a positive integer.")
                    if qty != s.quantity:
                        changes["quantity"] = [s.quantity, qty]
                fname = ci_get(body, "friendlyName")
                if fname is not None and fname != s.friendly_name:
                    changes["friendlyName"] = [s.friendly_name, str(fname)]
                # documented trap: a body without autoRenewEnabled silently turns auto-renew off
                auto = bool(ci_get(body, "autoRenewEnabled")) if ci_has(body, "autoRenewEnabled") else False
                if auto != s.auto_renew:
                    changes["autoRenewEnabled"] = [s.auto_renew, auto]
                if new_status != s.status and not self.config.patch_status_ignored:
                    changes["status"] = [s.status, new_status]
                elif new_status != s.status:
                    new_status = s.status  # answered 200 with the resource as it was (patch_status_ignored)
                # apply
                if "quantity" in changes:
                    s.quantity = int(changes["quantity"][1])
                if "friendlyName" in changes:
                    s.friendly_name = str(changes["friendlyName"][1])
                s.auto_renew = auto
                s.status = new_status
            rec = {
                "customer_id": c.id, "subscription_id": s.id, "time": self.clock(), "changes": changes,
                "before_status": before["status"], "after_status": s.status,
            }
            if defer_s > 0:
                target = (s.status, s.quantity, s.friendly_name, s.auto_renew)
                s.status, s.quantity, s.friendly_name, s.auto_renew = saved
                self._pending_patches[(c.id.lower(), s.id.lower())] = {
                    "apply_at": self.clock() + defer_s, "accepted_at": self.clock(), "target": target, "rec": rec}
                self._event("subscription_patch_accepted", customer_id=c.id, subscription_id=s.id,
                            after_status=target[0])
                return None
            s.etag_version += 1
            self._patches.append(rec)
            self._event("subscription_patched", **{k: v for k, v in rec.items() if k != "time"})
            return s.to_json(c.id)

    def _check_cancellation_window(self, s: Subscription) -> None:
        """PATCH ``status: deleted`` cancels a new-commerce subscription only inside its cancellation window (7 days
        = 168 hours from purchase, the ``cancellationAllowedUntilDate`` the subscription shows); after it, and for
        legacy subscriptions, "the API will throw an error". Learn: partner-center/developer/
        cancel-an-azure-marketplace-subscription and partner-center/customers/new-commerce-cancellation-policy."""
        if not s.is_nce:
            raise ApiError(400, 800096, f"Can't update the status for subscription {s.id}: only new-commerce "
                                        "subscriptions can be cancelled; suspend a legacy subscription instead.")
        if self.clock() > s.creation + CANCELLATION_WINDOW_S:
            raise ApiError(400, 800096, f"Can't update the status for subscription {s.id}: the cancellation window "
                                        f"ended at {iso(s.creation + CANCELLATION_WINDOW_S)}.")

    def age_subscription(self, customer_id: str, subscription_id: str, seconds: float) -> None:
        """Test/ops helper: make a subscription ``seconds`` older (its creation date and cancellation window move)."""
        with self.lock:
            s = self._sub(self._customer(customer_id), subscription_id)
            s.creation -= seconds
            s.etag_version += 1

    # ------------------------------------------------------------------ orders
    def _line_item_offer(self, offer_id: Any, *, cart: bool, stale_ok: bool = False) -> CatalogItem:
        item, current = self.resolve_item(str(offer_id)) if isinstance(offer_id, str) else (None, False)
        if item is not None and not current and not stale_ok:
            # product-resources: the availability id "can change over time"; the old one is no longer valid.
            raise ApiError(400, 800009, f"Error in Cart item(s): catalog item {offer_id} is not valid.",
                           [{"errorCode": "CatalogItemIdIsNotValid",
                             "errorDescription": "The availability is no longer valid; read the current one"}])
        if item is None:
            if cart:
                raise ApiError(400, 800009, f"Error in Cart item(s): catalog item {offer_id} is not valid.",
                               [{"errorCode": "CatalogItemIdIsNotValid", "errorDescription": "Catalog item not found"}])
            raise ApiError(400, 800004, f"Invalid offer ID {offer_id}.")
        if not item.purchasable:
            raise ApiError(403, 2091, f"The offer {item.id} is no longer available for purchase.")
        return item

    def _check_quantity(self, qty: Any) -> int:
        if not isinstance(qty, int) or isinstance(qty, bool) or qty < 1 or qty > 10000:
            raise ApiError(400, 800002, "Invalid request input: quantity must be an integer between 1 and 10000.")
        return qty

    def _place_order(
        self, c: Customer, items: list[dict[str, Any]], billing_cycle: str, *, is_nce: bool, cart_id: str | None,
        via: str,
    ) -> Order:
        now = self.clock()
        oid = secrets.token_hex(6) if is_nce else _new_guid()
        order = Order(oid, c.id, billing_cycle, [], now, now + float(self.config.provisioning_delay_s), is_nce, cart_id)
        for li in items:
            item, _ = self.resolve_item(li["offerId"])
            listed_name = li["friendlyName"]
            if is_nce and self.config.nce_product_friendly_names and item is not None:
                # checkout-a-cart / get-a-subscription-by-id examples: new commerce shows the product name.
                listed_name = item.name
            elif not is_nce and self.config.legacy_offer_friendly_names and item is not None:
                listed_name = item.name  # friendlyName is optional on an OrderLineItem; nothing says it is kept
            purchase = {
                "customer_id": c.id, "order_id": oid, "offer_id": li["offerId"], "quantity": li["quantity"],
                "friendly_name": li["friendlyName"], "listed_friendly_name": listed_name, "subscription_ids": [],
                "time": now, "via": via, "cart_id": cart_id, "provisioned_at": None,
                "reseller_partner_id": li.get("partnerIdOnRecord") or None,
            }
            self._purchases.append(purchase)
            order.line_items.append({**li, "friendlyName": listed_name, "_subscriptionId": _new_guid(),
                                     "_purchase": purchase})
        c.orders[oid.lower()] = order
        self._event("order_created", customer_id=c.id, order_id=oid, via=via, cart_id=cart_id,
                    line_items=[{"offerId": li["offerId"], "quantity": li["quantity"]} for li in items])
        if order.ready_at <= now:
            self._provision(order)
        else:
            self._pending.append(order)
        return order

    def _check_attestation(self, body: Any, what: str) -> None:
        """create-a-cart / create-an-order: ``PartnerOnRecordAttestationAccepted`` is "Required: Yes"."""
        if self.config.require_partner_attestation and ci_get(body, "PartnerOnRecordAttestationAccepted") is not True:
            raise ApiError(400, 800002, f"Invalid request input: PartnerOnRecordAttestationAccepted is required on "
                                        f"the {what} and must be true.")

    def create_order(self, customer_id: str, body: Any) -> dict[str, Any]:
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            self._check_attestation(body, "order")
            raw_items = ci_get(body, "lineItems")
            if not isinstance(raw_items, list) or not raw_items:
                raise ApiError(400, 800002, "Invalid request input: lineItems is required.")
            numbers = sorted(ci_get(li, "lineItemNumber", -1) for li in raw_items)
            if numbers != list(range(len(raw_items))):
                raise ApiError(400, 800071, "Line item number should be from 0 to count-1.")
            items = []
            for li in sorted(raw_items, key=lambda x: ci_get(x, "lineItemNumber")):
                item = self._line_item_offer(ci_get(li, "offerId"), cart=False)
                items.append({
                    "lineItemNumber": ci_get(li, "lineItemNumber"),
                    "offerId": str(ci_get(li, "offerId")),
                    "quantity": self._check_quantity(ci_get(li, "quantity")),
                    "friendlyName": str(ci_get(li, "friendlyName") or ""),
                    "termDuration": ci_get(li, "termDuration") or item.term_duration,
                    "partnerIdOnRecord": str(ci_get(li, "partnerIdOnRecord") or ""),
                })
            billing = str(ci_get(body, "billingCycle") or "monthly").lower()
            is_nce = all(self.resolve_item(i["offerId"])[0].is_nce for i in items)  # type: ignore[union-attr]
            order = self._place_order(c, items, billing, is_nce=is_nce, cart_id=None, via="order")
            return order.to_json()

    def _order_lagging(self, order: Order) -> bool:
        """purchase-new-commerce-license-based: an order "can take up to 15 minutes to appear" (order_list_lag_s)."""
        return order.creation + float(self.config.order_list_lag_s) > self.clock()

    def order_json(self, customer_id: str, order_id: str) -> dict[str, Any]:
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            o = c.orders.get(order_id.lower())
            if o is None or self._order_lagging(o):
                raise ApiError(404, 20000, f"Order ID {order_id} not found.")
            return o.to_json()

    def orders_json(self, customer_id: str) -> list[dict[str, Any]]:
        self.tick()
        with self.lock:
            return [o.to_json() for o in self._customer(customer_id).orders.values() if not self._order_lagging(o)]

    def order_provisioning_status(self, customer_id: str, order_id: str) -> list[dict[str, Any]]:
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            o = c.orders.get(order_id.lower())
            if o is None:
                raise ApiError(404, 20000, f"Order ID {order_id} not found.")
            done = o.status == "completed"
            return [
                {
                    "lineItemNumber": li["lineItemNumber"],
                    "status": "fulfilled" if done else "prefulfillmentPending",
                    "quantityProvisioningInformation": [
                        {"quantity": li["quantity"], "status": "fulfilled" if done else "pending"}
                    ],
                    "attributes": {"objectType": "OrderLineItemProvisioningStatus"},
                }
                for li in o.line_items
            ]

    # ------------------------------------------------------------------ carts
    def _cart_items(self, body: Any) -> list[dict[str, Any]]:
        raw_items = ci_get(body, "lineItems")
        if not isinstance(raw_items, list) or not raw_items:
            raise ApiError(400, 800002, "Invalid request input: lineItems is required.")
        items = []
        line_item_errors = self.config.stale_availability_mode == "line_item_error"
        for n, li in enumerate(raw_items):
            cid = ci_get(li, "catalogItemId")
            item = self._line_item_offer(cid, cart=True, stale_ok=line_item_errors)
            error = None
            if line_item_errors and not self.resolve_item(str(cid))[1]:
                error = {"errorCode": "CatalogItemIdIsNotValid",
                         "errorDescription": f"Catalog item {cid} is not valid: the availability has changed.",
                         "additionalInformation": {}}
            items.append({
                "id": ci_get(li, "id", n),
                "catalogItemId": str(cid),
                "friendlyName": str(ci_get(li, "friendlyName") or ""),
                "quantity": self._check_quantity(ci_get(li, "quantity")),
                "currencyCode": "USD",
                "billingCycle": str(ci_get(li, "billingCycle") or ("monthly" if item.is_nce else "annual")).lower(),
                "termDuration": ci_get(li, "termDuration") or item.term_duration,
                "participants": ci_get(li, "participants") or [],
                "provisioningContext": ci_get(li, "provisioningContext") or {},
                "orderGroup": "0",
                "addonItems": [],
                **({"error": error} if error else {}),
            })
        return items

    def create_cart(self, customer_id: str, body: Any) -> dict[str, Any]:
        with self.lock:
            c = self._customer(customer_id)
            self._check_attestation(body, "cart")
            items = self._cart_items(body)
            now = self.clock()
            cart = Cart(_new_guid(), c.id, items, now, now)
            c.carts[cart.id.lower()] = cart
            self._event("cart_created", customer_id=c.id, cart_id=cart.id)
            return cart.to_json()

    def _cart(self, c: Customer, cart_id: str) -> Cart:
        cart = c.carts.get(cart_id.lower())
        if cart is None:
            raise ApiError(404, 800008, f"Unable to retrieve cart ID {cart_id}.")
        return cart

    def cart_json(self, customer_id: str, cart_id: str) -> dict[str, Any]:
        with self.lock:
            return self._cart(self._customer(customer_id), cart_id).to_json()

    def update_cart(self, customer_id: str, cart_id: str, body: Any) -> dict[str, Any]:
        with self.lock:
            c = self._customer(customer_id)
            cart = self._cart(c, cart_id)
            if cart.status != "Active" or cart.processing:
                raise ApiError(400, 800065, f"Can't update an already submitted cart {cart.id}.")
            cart.line_items = self._cart_items(body)
            cart.modified = self.clock()
            self._event("cart_updated", customer_id=c.id, cart_id=cart.id)
            return cart.to_json()

    def begin_checkout(self, customer_id: str, cart_id: str) -> tuple[Cart, dict[str, Any] | None]:
        """Mark the cart as being processed. Returns (cart, replayed result or None)."""
        with self.lock:
            c = self._customer(customer_id)
            cart = self._cart(c, cart_id)
            expiry = float(self.config.cart_expiry_s or 0)
            if expiry and self.clock() - cart.creation > expiry:
                # An expired cart is gone: its checkout, a repeat of one that succeeded too, finds no cart.
                raise ApiError(404, 800008, f"Unable to retrieve cart ID {cart.id}.")
            if cart.checkout_result is not None:
                self._event("cart_checkout_replayed", customer_id=c.id, cart_id=cart.id)
                return cart, copy.deepcopy(cart.checkout_result)
            if cart.processing:
                raise ApiError(409, 800064, f"Cart {cart.id} is being processed by another request.")
            cart.processing = True
            return cart, None

    def finish_checkout(self, customer_id: str, cart: Cart) -> dict[str, Any]:
        with self.lock:
            c = self._customer(customer_id)
            try:
                for li in cart.line_items:
                    if li.get("error"):
                        raise ApiError(400, 800009, f"Error in Cart item(s): {li['error']['errorDescription']}",
                                       [li["error"]])
                    if not self.resolve_item(li["catalogItemId"])[1]:
                        raise ApiError(404, 400019, f"Availability not found for {li['catalogItemId']}.")
                items = [
                    {
                        "lineItemNumber": n, "offerId": li["catalogItemId"], "quantity": li["quantity"],
                        "friendlyName": li["friendlyName"], "termDuration": li.get("termDuration"),
                        "partnerIdOnRecord": _reseller(li.get("participants")),
                    }
                    for n, li in enumerate(cart.line_items)
                ]
                billing = str(cart.line_items[0].get("billingCycle") or "monthly")
                is_nce = all(self.resolve_item(i["offerId"])[0].is_nce for i in items)  # type: ignore[union-attr]
                order = self._place_order(c, items, billing, is_nce=is_nce, cart_id=cart.id, via="cart")
                errors = ([{"orderGroupId": "1", "code": 10006,
                            "description": "Unable to process the cart line items of order group 1."}]
                          if self.config.checkout_order_errors else [])
                result = {
                    "orders": [order.to_json()],
                    "orderErrors": copy.deepcopy(errors),
                    "attributes": {"objectType": "CartCheckoutResult"},
                }
                cart.checkout_result = {"order_ids": [order.id], "order_errors": errors}
                cart.status = "Ordered"
                cart.modified = self.clock()
                self._event("cart_checked_out", customer_id=c.id, cart_id=cart.id, order_ids=[order.id])
                return result
            finally:
                cart.processing = False

    def replay_checkout(self, customer_id: str, stored: dict[str, Any]) -> dict[str, Any]:
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            return {
                "orders": [c.orders[o.lower()].to_json() for o in stored["order_ids"]],
                "orderErrors": copy.deepcopy(stored.get("order_errors", [])),
                "attributes": {"objectType": "CartCheckoutResult"},
            }

    # ------------------------------------------------------------------ users & licenses
    def list_users(self, customer_id: str, offset: int, size: int) -> tuple[list[dict[str, Any]], int | None]:
        with self.lock:
            c = self._customer(customer_id)
            # The plain list shows active users; soft-deleted ones only with deleted_users_listed (view-a-deleted-user
            # documents a UserState filter for them).
            users = [u for u in c.users.values() if u.deleted_at is None or self.config.deleted_users_listed]
            listed = users[offset:offset + size]
            page = [u.to_json(c.id) for u in listed]
            doomed = {str(x).lower() for x in self.config.users_deleted_after_listing}
            for u in listed:
                if u.id.lower() in doomed and u.deleted_at is None:
                    self._soft_delete(c, u)  # deleted between this list and the licenses read that follows
            return page, (offset + size if offset + size < len(users) else None)

    def user_json(self, customer_id: str, user_id: str) -> dict[str, Any]:
        with self.lock:
            c = self._customer(customer_id)
            return self._user(c, user_id).to_json(c.id)

    def user_licenses_json(self, customer_id: str, user_id: str) -> list[dict[str, Any]]:
        with self.lock:
            c = self._customer(customer_id)
            u = self._live_user(c, user_id)
            out = []
            for sku_id in u.skus:
                sku = ALL_SKUS.get(sku_id) or ProductSku(sku_id, "UNKNOWN", "Unknown product")
                out.append({
                    "servicePlans": sku.service_plans_json("Assigned"),
                    "productSku": sku.to_json(),
                    "attributes": {"objectType": "License"},
                })
            return out

    def _sku_units(self, c: Customer) -> dict[str, dict[str, int]]:
        now = self.clock()
        lag = float(self.config.subscribed_skus_lag_s)
        units: dict[str, dict[str, int]] = {}
        for s in c.subscriptions.values():
            # The directory learns of a new subscription's units some time after it is provisioned.
            if s.provisioned_at > now or (lag and s.provisioned_at + lag > now):
                continue
            u = units.setdefault(s.sku_id, {"active": 0, "suspended": 0, "warning": 0, "consumed": 0})
            if s.status == "active":
                u["active"] += s.quantity
            elif s.status == "suspended":
                u["suspended"] += s.quantity
            elif s.status == "expired":
                u["warning"] += s.quantity
        for user in c.users.values():
            if user.deleted_at is not None:
                continue  # a deleted user's licenses are released
            for sku_id in user.skus:
                units.setdefault(sku_id, {"active": 0, "suspended": 0, "warning": 0, "consumed": 0})["consumed"] += 1
        return units

    def _reported_units(self, c: Customer) -> dict[str, dict[str, int]]:
        """:meth:`_sku_units` as subscribedskus shows them: consumed units lag license changes by
        ``consumed_units_lag_s`` (the license updates themselves check the real counts)."""
        units = self._sku_units(c)
        lag = float(self.config.consumed_units_lag_s)
        if lag:
            recent = self.clock() - lag
            for at, sku_id, delta in self._consumed_changes:
                if at > recent and sku_id in units:
                    units[sku_id]["consumed"] = max(0, units[sku_id]["consumed"] - delta)
        omitted = {str(x).lower() for x in self.config.subscribed_skus_omitted}
        return {k: v for k, v in units.items() if k not in omitted}

    def subscribed_skus_json(self, customer_id: str) -> list[dict[str, Any]]:
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            out = []
            for sku_id, u in self._reported_units(c).items():
                sku = ALL_SKUS.get(sku_id) or ProductSku(sku_id, "UNKNOWN", "Unknown product")
                total = u["active"] + u["warning"]
                out.append({
                    "availableUnits": max(0, total - u["consumed"]),
                    "activeUnits": u["active"],
                    "consumedUnits": u["consumed"],
                    "suspendedUnits": u["suspended"],
                    "totalUnits": total,
                    "warningUnits": u["warning"],
                    "productSku": sku.to_json(),
                    "servicePlans": sku.service_plans_json("Enabled"),
                    "capabilityStatus": "Enabled",
                    "attributes": {"objectType": "SubscribedSku"},
                })
            return out

    def license_update(self, customer_id: str, user_id: str, body: Any) -> dict[str, Any]:
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            u = self._live_user(c, user_id)
            if not isinstance(body, dict):
                raise ApiError(400, 800002, "Invalid request input: the body must be a LicenseUpdate object.")
            raw_assign = ci_get(body, "licensesToAssign") or []
            raw_remove = ci_get(body, "licensesToRemove") or []
            if not isinstance(raw_assign, list) or not isinstance(raw_remove, list):
                raise ApiError(400, 800002, "Invalid request input: licensesToAssign/licensesToRemove must be arrays.")
            assign: list[str] = []
            echo: list[dict[str, Any]] = []
            for a in raw_assign:
                sku_id = ci_get(a, "skuId")
                if not isinstance(sku_id, str) or not sku_id:
                    raise ApiError(400, 800002, "Invalid request input: licensesToAssign[].skuId is required.")
                assign.append(sku_id.lower())
                echo.append({"skuId": sku_id, "excludedPlans": ci_get(a, "excludedPlans")})
            remove = [str(r).lower() for r in raw_remove]
            new_skus = [s for s in u.skus if s not in remove]
            added = [s for s in dict.fromkeys(assign) if s not in new_skus]
            if added and not u.usage_location:
                raise ApiError(400, 60005,
                               f"License assignment failed for user {u.id}: the user has no usage location "
                               "(usageLocation). Set the user's usage location and try again.",
                               ["InvalidUsageLocationException : usageLocation is not set"])
            new_skus.extend(added)
            units = self._sku_units(c)
            for sku_id in added:
                un = units.get(sku_id, {"active": 0, "warning": 0, "consumed": 0, "suspended": 0})
                consumed_after = un["consumed"] - (1 if sku_id in u.skus else 0) + 1
                if consumed_after > un["active"] + un["warning"]:
                    raise ApiError(
                        400, 60012,
                        "We are sorry, it looks like you have run out of licenses. "
                        "Buy more licenses, and then try again.",
                        [f"LicenseQuotaExceededException : Subscription with Account {c.id} and SKU {sku_id} "
                         "does not have any available licenses left."],
                    )
            removed = [s for s in u.skus if s in remove]
            dropped: list[str] = []
            if added and self.config.license_assignments_dropped > 0:
                # the 201 below is answered, the removal applied, but the assignment does not stick
                self.config.license_assignments_dropped -= 1
                dropped, new_skus = added, [s for s in new_skus if s not in added]
            u.skus = new_skus
            self._consumed_changed([s for s in added if s not in dropped], +1)
            self._consumed_changed(removed, -1)
            warnings: list[dict[str, Any]] = []
            if self.config.license_warnings and added:
                # license-resources: LicenseUpdate.licenseWarnings [{code, message, servicePlans}] on success.
                sku = ALL_SKUS.get(added[0])
                plans = [p[1] for p in sku.service_plans[:1]] if sku else []
                warnings.append({"code": "DependentServicePlanDisabled",
                                 "message": "A service plan of the assigned license depends on a plan that is "
                                            "disabled for this user.", "servicePlans": plans})
            rec = {"customer_id": c.id, "user_id": u.id, "assigned": [s for s in added if s not in dropped],
                   "removed": removed, "requested_assign": assign, "requested_remove": remove, "time": self.clock(),
                   "warnings": warnings, "dropped": dropped}
            self._license_updates.append(rec)
            self._event("license_update", **{k: v for k, v in rec.items() if k != "time"})
            return {"licensesToAssign": echo, "licenseWarnings": warnings,
                    "attributes": {"objectType": "LicenseUpdate"}}

    # ------------------------------------------------------------------ test-facing reads
    def subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        """Every provisioned subscription of the customer (ignores list lag), as JSON."""
        self.tick()
        with self.lock:
            c = self._customer(customer_id)
            now = self.clock()
            return [s.to_json(c.id) for s in c.subscriptions.values() if s.provisioned_at <= now]

    def subscription(self, customer_id: str, subscription_id: str) -> dict[str, Any]:
        return self.subscription_json(customer_id, subscription_id)

    def users(self, customer_id: str) -> list[dict[str, Any]]:
        with self.lock:
            c = self._customer(customer_id)
            return [u.to_json(c.id) for u in c.users.values()]

    def user_licenses(self, customer_id: str, user_id: str) -> list[str]:
        """The product SKU ids the user holds (lower-case)."""
        with self.lock:
            return list(self._user(self._customer(customer_id), user_id).skus)

    def purchases(self) -> list[dict[str, Any]]:
        self.tick()
        with self.lock:
            return copy.deepcopy(self._purchases)

    def license_updates(self) -> list[dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(self._license_updates)

    def patches(self) -> list[dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(self._patches)

    def events(self) -> list[dict[str, Any]]:
        self.tick()
        with self.lock:
            return copy.deepcopy(self._events)

    def requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return copy.deepcopy(self._requests)

    def log_request(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self._requests.append(entry)

    def snapshot(self) -> dict[str, Any]:
        self.tick()
        with self.lock:
            customers = []
            for cid in self._customer_ids:
                c = self._customers[cid]
                customers.append({
                    **c.to_json(),
                    "users": [{**u.to_json(c.id), "licenses": list(u.skus)} for u in c.users.values()],
                    "subscriptions": [s.to_json(c.id) for s in c.subscriptions.values()
                                      if s.provisioned_at <= self.clock()],
                    "orders": [o.to_json() for o in c.orders.values()],
                    "carts": [ct.to_json() for ct in c.carts.values()],
                })
            return {
                "customers": customers,
                "purchases": copy.deepcopy(self._purchases),
                "licenseUpdates": copy.deepcopy(self._license_updates),
                "patches": copy.deepcopy(self._patches),
                "events": copy.deepcopy(self._events),
            }

    # ------------------------------------------------------------------ by-hand mutations (fault tests)
    def set_subscription_status(self, customer_id: str, subscription_id: str, status: str) -> None:
        with self.lock:
            c = self._customer(customer_id)
            s = self._sub(c, subscription_id)
            old = s.status
            s.status = status
            s.etag_version += 1
            self._event("by_hand_status", customer_id=c.id, subscription_id=s.id, before=old, after=status)

    def remove_user_license(self, customer_id: str, user_id: str, sku_id: str) -> None:
        with self.lock:
            c = self._customer(customer_id)
            u = self._user(c, user_id)
            if sku_id.lower() in u.skus:
                self._consumed_changed([sku_id.lower()], -1)
            u.skus = [s for s in u.skus if s != sku_id.lower()]
            self._event("by_hand_remove_license", customer_id=c.id, user_id=u.id, sku_id=sku_id.lower())

    def set_usage_location(self, customer_id: str, user_id: str, usage_location: str | None) -> None:
        """Fix (or break) a user's usage location by hand, as a partner would in the admin center."""
        with self.lock:
            c = self._customer(customer_id)
            u = self._user(c, user_id)
            u.usage_location = usage_location
            self._event("by_hand_usage_location", customer_id=c.id, user_id=u.id, usage_location=usage_location)

    def assign_user_license(self, customer_id: str, user_id: str, sku_id: str) -> None:
        """Give a user a license without any quota check."""
        with self.lock:
            c = self._customer(customer_id)
            u = self._user(c, user_id)
            if sku_id.lower() not in u.skus:
                u.skus.append(sku_id.lower())
                self._consumed_changed([sku_id.lower()], +1)
            self._event("by_hand_assign_license", customer_id=c.id, user_id=u.id, sku_id=sku_id.lower())

    def delete_user(self, customer_id: str, user_id: str) -> None:
        """Soft-delete a user by hand, as an admin would (view-a-deleted-user): state "inactive", licenses released
        (kept on the user, no longer consumed), the license routes answer 404 60002."""
        with self.lock:
            c = self._customer(customer_id)
            self._soft_delete(c, self._user(c, user_id))

    def _soft_delete(self, c: Customer, u: User) -> None:
        u.deleted_at = self.clock()
        self._consumed_changed(list(u.skus), -1)
        self._event("user_deleted", customer_id=c.id, user_id=u.id)

    def purchase_by_hand(
        self, customer_id: str, offer_or_catalog_id: str, quantity: int, friendly_name: str = ""
    ) -> dict[str, Any]:
        """Create an active subscription immediately (as if someone bought it in the portal). Returns it as JSON."""
        with self.lock:
            c = self._customer(customer_id)
            item = catalog_item(offer_or_catalog_id)
            if item is None:
                raise KeyError(offer_or_catalog_id)
            now = self.clock()
            end = datetime.fromtimestamp(now, tz=UTC) + timedelta(days=365)
            sub = self.add_subscription(
                c.id, offer=item, quantity=quantity, auto_renew=item.is_nce, commitment_end=iso_day(end),
                friendly_name=friendly_name, creation=now, offer_id=offer_or_catalog_id,
            )
            self._purchases.append({
                "customer_id": c.id, "order_id": sub.order_id, "offer_id": offer_or_catalog_id, "quantity": quantity,
                "friendly_name": friendly_name, "subscription_ids": [sub.id], "time": now, "via": "by_hand",
                "cart_id": None, "provisioned_at": now,
            })
            self._event("by_hand_purchase", customer_id=c.id, subscription_id=sub.id, offer_id=offer_or_catalog_id)
            return sub.to_json(c.id)

    # ------------------------------------------------------------------ dedupe / write tracking / reset
    def dedupe_get(self, request_id: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        with self.lock:
            return self._dedupe.get(request_id.lower())

    def dedupe_put(self, request_id: str, value: tuple[int, bytes, list[tuple[bytes, bytes]]]) -> None:
        with self.lock:
            self._dedupe[request_id.lower()] = value

    def first_time_write(self, key: str) -> bool:
        with self.lock:
            if key in self._seen_writes:
                return False
            self._seen_writes.add(key)
            return True

    def reset(self, *, customers: int | None = None, seed: int | None = None,
              reseed: Callable[..., Any] | None = None) -> None:
        """Wipe everything. Re-seed with ``reseed`` (``seed_world``, passed in so this module does not import the
        seeder that imports it) and the last seed_world parameters (or the given ones) if any."""
        with self.lock:
            params = dict(self._seed_params or {})
            self._clear()
            self.manifest = None
            if customers is not None:
                params["customers"] = customers
            if seed is not None:
                params["seed"] = seed
            if params and reseed is not None:
                reseed(self, **params)


def _reseller(participants: Any) -> str:
    """cart-resources: line item ``participants`` ``[{"key": "transaction_reseller", "value": <partner id>}]``."""
    for p in participants if isinstance(participants, list) else []:
        if str(ci_get(p, "key") or "").lower() == "transaction_reseller":
            return str(ci_get(p, "value") or "")
    return ""
