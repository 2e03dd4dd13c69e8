"""Runtime configuration of the sandbox (mutable while the server runs)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FaultConfig:
    """Injected faults. All randomness comes from `random.Random(seed)`, so a run is reproducible."""

    seed: int = 0
    error_rate: float = 0.0  # 500/503 with an error body, BEFORE acting
    lose_response_rate: float = 0.0  # writes: apply, then answer 500 or drop the connection
    lose_first_write_response: bool = False  # the first response of every distinct write is lost (after applying)
    reset_rate: float = 0.0  # drop the connection without acting
    timeout_rate: float = 0.0  # sleep `timeout_s` before handling
    timeout_s: float = 30.0
    # The injected 500/503 answers carry ``Retry-After: <n>`` (seconds; 0 = no header). The client must wait at
    # least that long before its next try (api-throttling-guidance: wait Retry-After, then retry).
    error_retry_after_s: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def reseed(self, seed: int | None = None) -> None:
        if seed is not None:
            self.seed = seed
        self.rng = random.Random(self.seed)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rng"}


@dataclass
class SandboxConfig:
    """How the sandbox behaves. Every documented Partner Center behaviour below can be switched; see
    :data:`DEMO_BEHAVIOURS` (on in ``make demo``, the current steps handle them) and :data:`PENDING_BEHAVIOURS`
    (documented, realistic, but off by default until the steps handle them)."""

    latency_ms: float = 0.0
    require_auth: bool = False
    requests_per_minute: int | None = None  # customers/subscriptions/orders/carts (one shared budget)
    license_requests_per_minute: int | None = None  # users/licenses/subscribedskus/licenseupdates
    provisioning_delay_s: float = 0.0
    list_lag_s: float = 0.0
    dedupe_request_ids: bool = False
    checkout_duration_s: float = 0.0  # how long a checkout is "being processed" (409 800064 window)
    # --- documented behaviours (Microsoft Learn pages cited where each is implemented)
    # The last page still carries a continuation; following it answers 400 code 2000 (end of data).
    customer_paging_ends_in_2000: bool = False
    users_paging_ends_in_2000: bool = False
    # New commerce: order line items and subscriptions carry the product name as friendlyName, not the cart's.
    nce_product_friendly_names: bool = False
    # PATCH subscription answers 202 Accepted + Location, no body; the change shows after patch_apply_delay_s, and
    # another PATCH meanwhile answers 409 800082.
    patch_accepted: bool = False
    patch_apply_delay_s: float = 2.0
    # Every new-commerce product SKU's current availability differs from the one in DEMO_REPLACEMENT_OFFERS; a stale
    # availability answers 400 800009 ("cart_error") or a cart line-item error ("line_item_error"); a cart whose
    # availability rotated before checkout answers 404 400019.
    availabilities_rotated: bool = False
    stale_availability_mode: str = "cart_error"
    # A new subscription's provisioning status answers 404 800007 for the first half of this lag, then "pending".
    provisioning_status_lag_s: float = 0.0
    # A new subscription's units show in subscribedskus (and can be assigned) only this long after provisioning.
    subscribed_skus_lag_s: float = 0.0
    # GDAP relationship without directory roles: users, licenses, subscribedskus, licenseupdates and provisioning
    # status answer 403 900308 for these customer ids.
    gdap_missing_roles_customers: list[str] = field(default_factory=list)
    # License updates for these customers answer 401 900421 (no MFA claim) / 403 900309 (Conditional Access).
    mfa_missing_customers: list[str] = field(default_factory=list)
    conditional_access_customers: list[str] = field(default_factory=list)
    # With require_auth: an App+User token without "mfa" in its amr claim answers 401 900421 everywhere.
    require_mfa_claim: bool = False
    # Successful license updates carry a licenseWarnings entry.
    license_warnings: bool = False
    # Answer 429 with this Retry-After (seconds) to the first `long_retry_after_times` requests whose path contains
    # `long_retry_after_path` (lower-case); 0 = off.
    long_retry_after_s: int = 0
    long_retry_after_path: str = ""
    long_retry_after_times: int = 1
    # Detection's per-customer failures (error-codes lists 503 Service unavailable, 403 20002 "No commerce
    # relationship between partner and customer" and 404 60003 "Tenant not found"): GET …/customers/{id}/subscriptions
    # for the customer ids in `subscriptions_unavailable_customers` answers 503 800003 to the first
    # `subscriptions_unavailable_times` requests of each (0 = every request); for the ids in
    # `subscriptions_forbidden_customers` it answers 403 20002 and for `subscriptions_missing_customers` 404 60003.
    subscriptions_unavailable_customers: list[str] = field(default_factory=list)
    subscriptions_unavailable_times: int = 0
    subscriptions_forbidden_customers: list[str] = field(default_factory=list)
    subscriptions_missing_customers: list[str] = field(default_factory=list)
    # GET …/customers/{id} (the customer's profile: its country, for prices and availabilities) answers 403 20002
    # for these customer ids.
    profile_forbidden_customers: list[str] = field(default_factory=list)
    # Native migration paths (_transitions): customer id -> "none" | "transition_with_license_transfer" |
    # "transition_only" | "upgrade_with_license_transfer" | "upgrade_only" for its retired subscriptions (default:
    # none, as nothing documents a path for them); users whose license transfer fails; completion delay; whether
    # Partner Center leaves the old subscription active after the move.
    native_paths: dict[str, str] = field(default_factory=dict)
    native_license_error_users: list[str] = field(default_factory=list)
    native_completion_s: float = 0.0
    native_source_left_active: bool = False
    # The partner price sheet (get-a-price-sheet, _prices): served for every market unless switched off (404, as for a
    # market or timeline with no sheet).
    price_sheet_available: bool = True
    # --- license move and suspension (steps/reassign.py, steps/suspend.py)
    # subscribedskus leaves out these product SKU ids (lower-case), e.g. a world where the id a subscription's
    # provisioning status names is not a productSku.id of get-a-list-of-available-licenses: the SKU is invisible there.
    subscribed_skus_omitted: list[str] = field(default_factory=list)
    # user-resources: CustomerUser.state is "active" or "inactive"; view-a-deleted-user lists soft-deleted users with
    # the UserState=Inactive filter. With this switch the plain users list returns soft-deleted users too (state
    # "inactive", softDeletionTime): a fake need not filter them. Their licenses and license updates answer 404 60002.
    deleted_users_listed: bool = False
    # These user ids are soft-deleted right after a users page listing them is served: the licenses read that follows
    # answers 404 60002 "User object ID isn't found" (error-codes).
    users_deleted_after_listing: list[str] = field(default_factory=list)
    # subscribedskus consumedUnits (and availableUnits) reflect a license change only this many seconds after it:
    # get-a-list-of-available-licenses promises no read-your-writes, and provisioning status "is updated every 15
    # minutes" (get-subscription-provisioning-status) and shows "pending" during license changes.
    consumed_units_lag_s: float = 0.0
    # Stricter than documented: the next N license updates that assign a SKU answer 201 and apply the removal, but the
    # assignment silently does not stick (the SDK's licenseupdates CreateAsync is asynchronous and provisioning status
    # is "pending" during license changes; assign-licenses-to-a-user documents no failure after the 201).
    license_assignments_dropped: int = 0
    # Every PATCH that carries If-Match answers 412 2055 "Etag is no longer valid" (error-codes), e.g. a fake that
    # compares the header byte for byte with an ETag it expects unquoted (suspend-a-subscription's example sends
    # If-Match: <etag>, test-and-debug says ETags are sent in double quotes).
    if_match_always_rejected: bool = False
    # --- purchase-side behaviours (off by default; the purchase step handles each: tests/steps/test_purchase_docs.py)
    # get-subscription-provisioning-status calls ``skuId`` only "a string that identifies the product SKU"; nothing
    # documents that it equals subscribedskus ``productSku.id`` (reference §12 #5, [UNCLEAR]). On: every provisioning
    # status answers an opaque GUID (stable per SKU) that is no subscribed SKU's id.
    opaque_provisioning_sku_ids: bool = False
    # purchase-new-commerce-license-based: "an order can take up to 15 minutes to appear in the customer's order
    # list". For this long after it is created an order is missing from GET …/orders, and GET …/orders/{id} and
    # GET …/subscriptions?order_id={id} (get-a-list-of-subscriptions-by-order) answer 404 20000 "Order ID not
    # found"; the customer's subscription list is not delayed.
    order_list_lag_s: float = 0.0
    # Legacy orders' line items and subscriptions show the offer's name as friendlyName, not the one sent:
    # friendlyName is optional on an OrderLineItem (order-resources) and nothing documents that it is kept, so the
    # migration's tag is only a convenience (as it is for new commerce, nce_product_friendly_names).
    legacy_offer_friendly_names: bool = False
    # checkout-a-cart: a CartCheckoutResult carries ``orders`` and ``orderErrors`` side by side. On: a checkout
    # answers its order AND one orderErrors entry (another order group failed); a repeated checkout replays both.
    checkout_order_errors: bool = False
    # order-resources (OrderStatus): an order can end "cancelled", "pending_review", "po_review_rejected",
    # "partial_success", "error", … instead of "completed". Non-empty: every order ends in this status (spelled as
    # given) when it would complete, and provisions nothing. "" = orders complete and provision.
    order_final_status: str = ""
    # cart-resources: "Carts expire 7 days after creation" (the example's expirationTimestamp is ~15 minutes after it,
    # [UNCLEAR]). Non-zero: a cart is gone this many seconds after creation — any checkout of it, a repeat of one that
    # succeeded included, answers 404 800008 "Unable to retrieve cart ID" (error-codes) instead of the replay.
    cart_expiry_s: float = 0.0
    # Stricter than documented: a PATCH that changes a subscription's status answers 200 with the subscription as it
    # was (status unchanged) — update-a-subscription-by-id documents 200 with the updated resource, or 202 + Location
    # while it is pending; a client must confirm the change by reading, and must not re-send it without end.
    patch_status_ignored: bool = False
    # --- shapes Learn's own examples show (what a fake written from the docs may answer)
    # links.next.uri absolute on the sandbox's own host (the SDK calls it "exactly as given"), and/or with a path
    # prefix of this spelling ("/v1", "/V1"; "" = the documented relative "/customers?…"). An absolute link always
    # carries a /v1 prefix (next_link_v1_prefix or "/v1").
    absolute_next_links: bool = False
    next_link_v1_prefix: str = ""
    # A customer's country only in companyProfile.address.country, no billingProfile.defaultAddress
    # (get-a-customer-by-id's example has both; the billing profile may be left out).
    country_only_in_company_profile: bool = False
    # checkout-a-cart's new-commerce example answers the bare Order, not a CartCheckoutResult {orders, orderErrors}.
    checkout_answers_bare_order: bool = False
    # get-a-list-of-availabilities-for-a-sku's new-commerce example: a list of one availability answers the bare
    # Availability, not a collection.
    availabilities_bare_object: bool = False
    # create-a-cart / create-an-order: "PartnerOnRecordAttestationAccepted | Boolean | Yes": carts and orders
    # without it set to true answer 400 800002 (Invalid request input).
    require_partner_attestation: bool = False
    # get-a-list-of-availabilities-for-a-sku: without targetSegment "all segments except nonprofit will be
    # returned"; product-resources: Availability.segment Commercial | Education | Government | NonProfit. Every
    # new-commerce SKU also has an availability in each other segment (its own catalog item id; education listed
    # first; government only in the US; nonprofit only when asked for); targetSegment filters them.
    availabilities_in_all_segments: bool = False
    # transition-a-new-commerce-subscription / transition-resources: the POST answer carries no toSubscriptionId
    # ("only populated if the subscription changes"); the history (get-transitions) names it.
    transition_answer_without_target: bool = False
    # get-transitions' example: the history is listed under "transition" (no "items"), each with "operationId"
    # and no fromSubscriptionId, and its events are a log — "Started " (trailing space as printed) and later a
    # second entry of the same name "Completed" (or "Failed").
    transition_history_as_learn_example: bool = False
    # suspend-a-subscription's example sends If-Match: <etag> as the GET returned it; with this on If-Match is
    # compared literally, so only that form matches (a quoted ETag answers 412 2055, test-and-debug notwithstanding).
    etag_literal_match: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)

    @classmethod
    def realistic(cls, *, include_pending: bool = False, **overrides: Any) -> SandboxConfig:
        """Documented behaviours on: :data:`DEMO_BEHAVIOURS`, plus :data:`PENDING_BEHAVIOURS` when
        ``include_pending`` (what an independent Partner Center written from the docs may do)."""
        config = cls()
        for name, value in DEMO_BEHAVIOURS.items():
            setattr(config, name, value)
        if include_pending:
            for name, value in PENDING_BEHAVIOURS.items():
                setattr(config, name, value)
        for name, value in overrides.items():
            if not hasattr(config, name):
                raise TypeError(f"unknown SandboxConfig field {name!r}")
            setattr(config, name, value)
        return config

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "faults"}
        out["faults"] = self.faults.to_json()
        return out

    def apply_patch(self, patch: dict[str, Any]) -> None:
        """Apply a (partial) JSON patch, e.g. `{"latency_ms": 5, "faults": {"error_rate": 0.1}}`."""
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in patch.items():
            if key == "faults":
                if not isinstance(value, dict):
                    raise ValueError("faults must be an object")
                fnames = {f.name for f in dataclasses.fields(self.faults)} - {"rng"}
                for fk, fv in value.items():
                    if fk not in fnames:
                        raise ValueError(f"unknown fault field {fk!r}")
                    setattr(self.faults, fk, fv)
                if "seed" in value:
                    self.faults.reseed()
            elif key in names:
                setattr(self, key, value)
            else:
                raise ValueError(f"unknown config field {key!r}")


#: Documented behaviours the current steps already survive: ``make demo`` runs with them on.
DEMO_BEHAVIOURS: dict[str, Any] = {
    "customer_paging_ends_in_2000": True,
    "users_paging_ends_in_2000": True,
    "license_warnings": True,
    "patch_accepted": True,
    "patch_apply_delay_s": 1.0,
    # handled by the steps since issue 10's step work: purchases found by order (not tag), availabilities resolved at
    # purchase time, waits measured in time
    "nce_product_friendly_names": True,
    "availabilities_rotated": True,
    "provisioning_status_lag_s": 20.0,
    "subscribed_skus_lag_s": 10.0,
    # handled by the client since the Learn-shapes audit (findings 5, 7, 8, 18, 19)
    "absolute_next_links": True,
    "next_link_v1_prefix": "/V1",
    "country_only_in_company_profile": True,
    "checkout_answers_bare_order": True,
    "availabilities_bare_object": True,
    "require_partner_attestation": True,
    "availabilities_in_all_segments": True,
    # the suspension sends the ETag quoted, then as received, after a refusal right after a fresh GET
    "etag_literal_match": True,
    # handled by the steps since the same audit: the order list's lag (404 20000 on the order and on
    # subscriptions?order_id), legacy names in place of ours, orders answered with orderErrors beside them,
    # soft-deleted users in the users list, license changes showing in subscribed SKUs seconds later, transitions
    # answered without their target and listed as get-transitions prints them
    "order_list_lag_s": 3.0,
    "legacy_offer_friendly_names": True,
    "checkout_order_errors": True,
    "deleted_users_listed": True,
    "consumed_units_lag_s": 2.0,
    "transition_answer_without_target": True,
    "transition_history_as_learn_example": True,
}

#: Documented, realistic behaviours the current steps do not handle yet: none left (kept for the next ones).
PENDING_BEHAVIOURS: dict[str, Any] = {}
