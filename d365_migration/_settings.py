"""Settings, read once from the environment (app settings in Azure, local.settings.json locally).

Every setting the code reads is listed in ``APP_SETTINGS``; the infrastructure test checks that the Bicep
template sets each of them. A bad value raises :class:`ConfigurationError` naming the setting and the fix, so a
misconfigured app stops at start-up instead of doing something half-right.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from ._exceptions import ConfigurationError

__all__ = [
    "APP_SETTINGS",
    "AUDIENCES",
    "DEFAULT_AUTHORITY",
    "DEFAULT_DETECT_SCHEDULE",
    "DEFAULT_ENDPOINT",
    "FAMILIES",
    "AuthMode",
    "ReplacementOffers",
    "ReplacementTarget",
    "Settings",
    "is_catalog_item_id",
    "is_guid",
    "is_loopback_url",
    "is_product_sku_id",
    "load_settings",
]

#: Every app setting the code reads (besides the ``AzureWebJobsStorage__*`` family, which the host reads too).
APP_SETTINGS: tuple[str, ...] = (
    "PARTNER_CENTER_ENDPOINT",
    "PARTNER_CENTER_AUTH",
    "PARTNER_CENTER_TENANT_ID",
    "PARTNER_CENTER_CLIENT_ID",
    "PARTNER_CENTER_CLIENT_SECRET",
    "PARTNER_CENTER_REFRESH_TOKEN",
    "PARTNER_CENTER_AUTHORITY",
    "KEY_VAULT_URL",
    "AzureWebJobsStorage",
    "DRY_RUN",
    "MIGRATION_PATH_POLICY",
    "EXPIRY_WINDOW_DAYS",
    "REPLACEMENT_OFFERS",
    "REPLACEMENT_BILLING_CYCLE",
    "REPLACEMENT_TERM_DURATION",
    "REPLACEMENT_QUANTITY_POLICY",
    "DETECT_SCHEDULE",
    "RETIRED_OFFERS_EXTRA",
    "LEDGER_TABLE",
    "PROVISIONING_POLL_SECONDS",
    "PROVISIONING_TIMEOUT_MINUTES",
    "PROVISIONING_STATUS_WAIT_MINUTES",
    "SUBSCRIBED_SKU_WAIT_MINUTES",
    "FREE_UNITS_WAIT_MINUTES",
    "LOST_WRITE_RESEND_WAIT_SECONDS",
    "PARTNER_CENTER_REQUESTS_PER_MINUTE",
    "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE",
    "PARTNER_CENTER_MAX_CONCURRENCY",
    "PARTNER_CENTER_BUDGET_TABLE",
    "PARTNER_CENTER_BUDGET_BLOCK_SECONDS",
    "PARTNER_CENTER_FALLBACK_SHARE",
    "PARTNER_CENTER_TIMEOUT_SECONDS",
    "MAX_PURCHASES_PER_RUN",
    "CUSTOMER_ALLOWLIST",
    "CUSTOMER_DENYLIST",
    "INVOCATION_BUDGET_SECONDS",
)

DEFAULT_ENDPOINT = "https://api.partnercenter.microsoft.com"
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
DEFAULT_DETECT_SCHEDULE = "0 0 6 * * *"  # daily at 06:00 UTC
FAMILIES = ("sales", "customer_engagement")
AUDIENCES = ("commercial", "faculty", "students", "government")

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# productId:skuId:availabilityId, e.g. CFQ7TTC0LH18:0001:CFQ7TTC0K971
_CATALOG_ITEM = re.compile(r"^[A-Za-z0-9]{1,40}:[A-Za-z0-9]{1,20}:[A-Za-z0-9]{1,40}$")
# productId:skuId, e.g. CFQ7TTC0LH18:0001 — the availability is resolved at purchase time, because a catalog item id
# "can change over time … should only be accessed and used at the time of purchase" (product-resources,
# https://learn.microsoft.com/partner-center/developer/product-resources).
_PRODUCT_SKU = re.compile(r"^[A-Za-z0-9]{1,40}:[A-Za-z0-9]{1,20}$")

AuthMode = Literal["app-user", "none"]
#: How many seats the replacement is bought with (``REPLACEMENT_QUANTITY_POLICY``; see steps/_quantity.py):
#: ``old_quantity`` — the old subscription's quantity (seats nobody uses are bought again, for the new term);
#: ``license_holders`` — the number of users holding the old license (never fewer; at least 1).
QuantityPolicy = Literal["old_quantity", "license_holders"]
QUANTITY_POLICIES: tuple[QuantityPolicy, ...] = ("old_quantity", "license_holders")


def is_guid(value: str) -> bool:
    return bool(_GUID.match(value))


def is_catalog_item_id(value: str) -> bool:
    return bool(_CATALOG_ITEM.match(value))


def is_product_sku_id(value: str) -> bool:
    return bool(_PRODUCT_SKU.match(value))


@dataclass(frozen=True)
class ReplacementTarget:
    """One ``REPLACEMENT_OFFERS`` value, parsed: a legacy offer GUID (bought with ``POST /orders``), or a new-commerce
    product SKU whose current availability is resolved at purchase time. A full catalog item id is still accepted;
    its availability part is only a hint (``availability_id``) — resolve anyway, it may have rotated."""

    raw: str
    kind: Literal["legacy", "product_sku"]
    offer_id: str | None = None  # legacy
    product_id: str | None = None
    sku_id: str | None = None
    availability_id: str | None = None

    @property
    def product_key(self) -> str:
        """``productId:skuId`` or the legacy offer GUID, lower-case (what subscriptions and orders are matched on)."""
        return (self.offer_id or f"{self.product_id}:{self.sku_id}").lower()

    @classmethod
    def parse(cls, value: str) -> ReplacementTarget:
        """:raises ValueError: the value is none of the three accepted forms."""
        text = value.strip()
        if is_guid(text):
            return cls(text, "legacy", offer_id=text)
        if is_catalog_item_id(text):
            product, sku, availability = text.split(":")
            return cls(text, "product_sku", product_id=product, sku_id=sku, availability_id=availability)
        if is_product_sku_id(text):
            product, sku = text.split(":")
            return cls(text, "product_sku", product_id=product, sku_id=sku)
        raise ValueError(f"{value!r} is neither a legacy offer GUID, productId:skuId nor a catalog item id")


@dataclass(frozen=True)
class ReplacementOffers:
    """``REPLACEMENT_OFFERS``: family → audience → legacy offer GUID, ``productId:skuId`` (new commerce; the
    availability is resolved at purchase time) or a full catalog item id ``productId:skuId:availabilityId``."""

    mapping: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def lookup(self, family: str, audience: str) -> str | None:
        return self.mapping.get(family, {}).get(audience)

    def target(self, family: str, audience: str) -> ReplacementTarget | None:
        """The parsed entry for ``family.audience`` (validated at start-up, so parsing cannot fail here)."""
        raw = self.lookup(family, audience)
        return ReplacementTarget.parse(raw) if raw is not None else None

    @staticmethod
    def parse(raw: str | None) -> ReplacementOffers:
        name = "REPLACEMENT_OFFERS"
        example = '{"sales": {"commercial": "CFQ7TTC0XXXX:0001"}, "customer_engagement": {...}}'
        if raw is None or not raw.strip():
            return ReplacementOffers({})
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(name, f"is not valid JSON ({exc.msg} at position {exc.pos})",
                                     f"set it to JSON like {example}") from None
        if not isinstance(data, dict):
            raise ConfigurationError(name, "must be a JSON object keyed by family", f"e.g. {example}")
        mapping: dict[str, dict[str, str]] = {}
        for family, audiences in data.items():
            if family not in FAMILIES:
                raise ConfigurationError(name, f"unknown family {family!r}", f"use one of {', '.join(FAMILIES)}")
            if not isinstance(audiences, dict):
                raise ConfigurationError(name, f"{family} must map audiences to offer ids", f"e.g. {example}")
            mapping[family] = {}
            for audience, offer in audiences.items():
                if audience not in AUDIENCES:
                    raise ConfigurationError(name, f"unknown audience {family}.{audience}",
                                             f"use one of {', '.join(AUDIENCES)}")
                if not isinstance(offer, str) or not (is_guid(offer.strip()) or is_catalog_item_id(offer.strip())
                                                      or is_product_sku_id(offer.strip())):
                    raise ConfigurationError(
                        name, f"{family}.{audience} = {offer!r} is neither a legacy offer GUID nor a "
                        "new-commerce product SKU", "use productId:skuId (new commerce, e.g. CFQ7TTC0XXXX:0001), "
                        "a full productId:skuId:availabilityId, or a legacy offer GUID")
                mapping[family][audience] = offer.strip()
        return ReplacementOffers(mapping)


@dataclass(frozen=True)
class Settings:
    endpoint: str = DEFAULT_ENDPOINT
    auth: AuthMode = "app-user"
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    authority: str = DEFAULT_AUTHORITY
    key_vault_url: str | None = None
    storage_connection: str | None = field(default=None, repr=False)
    storage_queue_uri: str | None = None
    storage_table_uri: str | None = None
    storage_client_id: str | None = None
    dry_run: bool = True
    expiry_window_days: int = 60
    replacement_offers: ReplacementOffers = field(default_factory=ReplacementOffers)
    replacement_billing_cycle: str = "monthly"
    replacement_term_duration: str = "P1Y"
    replacement_quantity_policy: QuantityPolicy = "old_quantity"
    detect_schedule: str = DEFAULT_DETECT_SCHEDULE
    retired_offers_extra: str | None = None
    ledger_table: str = "migrations"
    provisioning_poll_seconds: int = 60
    provisioning_timeout_minutes: int = 24 * 60
    # Each wait of the license step by elapsed time, its own limit. Provisioning status "is updated every 15 minutes"
    # (get-subscription-provisioning-status): four refreshes before blocking; subscribed SKUs and free units follow it.
    provisioning_status_wait_minutes: int = 60
    subscribed_sku_wait_minutes: int = 60
    free_units_wait_minutes: int = 60
    # A write that may have been applied without us seeing the answer (a legacy order, a transition or upgrade) and
    # that Partner Center does not show yet is sent again (same MS-RequestId) only after this long: the documented
    # order-list lag ("an order can take up to 15 minutes to appear"), the safe reading for the native moves too.
    lost_write_resend_wait_seconds: int = 900
    requests_per_minute: int = 500
    license_requests_per_minute: int = 300
    max_concurrency: int = 16
    # The budgets above belong to the partner tenant and are shared by every instance through this table
    # (see _budget.py); a claim takes about this many seconds of a budget; while the table is unreachable an instance
    # paces itself at this share of each budget.
    budget_table: str = "partnercenterbudget"
    budget_block_seconds: float = 1.0
    fallback_share: float = 0.1
    timeout_seconds: int = 60  # per Partner Center request (connect: 10 s)
    max_purchases_per_run: int = 50
    customer_allowlist: frozenset[str] = frozenset()
    customer_denylist: frozenset[str] = frozenset()
    invocation_budget_seconds: int = 480
    # MIGRATION_PATH_POLICY (_native_path): runbook_only (default, the safe reading) | prefer_native | native_only.
    migration_path_policy: str = "runbook_only"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        return load_settings(os.environ if env is None else env)

    def customer_in_scope(self, customer_id: str) -> bool:
        cid = customer_id.lower()
        if cid in self.customer_denylist:
            return False
        return not self.customer_allowlist or cid in self.customer_allowlist


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(name, f"{raw!r} is not a boolean", "use true or false")


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigurationError(name, f"{raw!r} is not a whole number", f"use a number ≥ {minimum}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"≥ {minimum}"
        raise ConfigurationError(name, f"{value} is out of range", f"use a number {bound}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigurationError(name, f"{raw!r} is not a number", f"use a number between {minimum:g} and "
                                 f"{maximum:g}") from None
    if not minimum <= value <= maximum:  # also refuses nan
        raise ConfigurationError(name, f"{value:g} is out of range", f"use a number between {minimum:g} and "
                                 f"{maximum:g}")
    return value


def _table_name(env: Mapping[str, str], name: str, default: str) -> str:
    table = (env.get(name) or default).strip()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{2,62}", table):
        raise ConfigurationError(name, f"{table!r} is not a valid table name",
                                 "use 3-63 letters and digits, starting with a letter")
    return table


def _guid_set(env: Mapping[str, str], name: str) -> frozenset[str]:
    raw = env.get(name, "")
    items = [part.strip() for part in re.split(r"[,;\s]+", raw) if part.strip()]
    for item in items:
        if not is_guid(item):
            raise ConfigurationError(name, f"{item!r} is not a customer tenant id (GUID)",
                                     "list customer ids separated by commas")
    return frozenset(item.lower() for item in items)


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _endpoint(env: Mapping[str, str]) -> str:
    raw = (env.get("PARTNER_CENTER_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError("PARTNER_CENTER_ENDPOINT", f"{raw!r} is not an http(s) URL",
                                 f"use {DEFAULT_ENDPOINT}")
    if parts.scheme == "http" and not is_loopback_url(raw):
        raise ConfigurationError("PARTNER_CENTER_ENDPOINT", "plain http is allowed only for a loopback sandbox",
                                 "use https")
    if raw.endswith("/v1"):
        raw = raw[: -len("/v1")]
    return raw


def load_settings(env: Mapping[str, str]) -> Settings:
    endpoint = _endpoint(env)
    auth_raw = (env.get("PARTNER_CENTER_AUTH") or "app-user").strip().lower()
    if auth_raw not in ("app-user", "none"):
        raise ConfigurationError("PARTNER_CENTER_AUTH", f"unknown mode {auth_raw!r}",
                                 "use app-user (Secure Application Model) or none (loopback sandbox only)")
    auth: AuthMode = "none" if auth_raw == "none" else "app-user"
    if auth == "none" and not is_loopback_url(endpoint):
        raise ConfigurationError("PARTNER_CENTER_AUTH", "none is refused for a non-loopback endpoint "
                                 f"({urlsplit(endpoint).hostname})", "use app-user")
    replacement = ReplacementOffers.parse(env.get("REPLACEMENT_OFFERS"))
    billing_cycle = (env.get("REPLACEMENT_BILLING_CYCLE") or "monthly").strip().lower()
    if billing_cycle not in ("monthly", "annual", "triennial"):
        raise ConfigurationError("REPLACEMENT_BILLING_CYCLE", f"{billing_cycle!r} is not a billing cycle",
                                 "use monthly, annual or triennial")
    term = (env.get("REPLACEMENT_TERM_DURATION") or "P1Y").strip().upper()
    if not re.fullmatch(r"P\d+[MY]", term):
        raise ConfigurationError("REPLACEMENT_TERM_DURATION", f"{term!r} is not an ISO 8601 term", "use P1M or P1Y")
    quantity_policy = (env.get("REPLACEMENT_QUANTITY_POLICY") or "old_quantity").strip().lower().replace("-", "_")
    if quantity_policy not in QUANTITY_POLICIES:
        raise ConfigurationError("REPLACEMENT_QUANTITY_POLICY", f"{quantity_policy!r} is not a quantity policy",
                                 "use old_quantity (the old subscription's quantity) or license_holders (the users "
                                 "who hold the old license)")
    table = _table_name(env, "LEDGER_TABLE", "migrations")
    budget_table = _table_name(env, "PARTNER_CENTER_BUDGET_TABLE", "partnercenterbudget")
    if budget_table.lower() == table.lower():
        raise ConfigurationError("PARTNER_CENTER_BUDGET_TABLE", f"{budget_table!r} is the ledger's table",
                                 "give the shared request budget a table of its own (default partnercenterbudget)")
    authority = (env.get("PARTNER_CENTER_AUTHORITY") or DEFAULT_AUTHORITY).strip().rstrip("/")
    if urlsplit(authority).scheme != "https" and not is_loopback_url(authority):
        raise ConfigurationError("PARTNER_CENTER_AUTHORITY", "must be https", f"use {DEFAULT_AUTHORITY}")
    tenant_id = (env.get("PARTNER_CENTER_TENANT_ID") or "").strip() or None
    if tenant_id is not None and not is_guid(tenant_id):
        raise ConfigurationError("PARTNER_CENTER_TENANT_ID", "is not a GUID", "use the partner's Entra tenant id")
    return Settings(
        endpoint=endpoint,
        auth=auth,
        tenant_id=tenant_id,
        client_id=(env.get("PARTNER_CENTER_CLIENT_ID") or "").strip() or None,
        client_secret=env.get("PARTNER_CENTER_CLIENT_SECRET") or None,
        refresh_token=env.get("PARTNER_CENTER_REFRESH_TOKEN") or None,
        authority=authority,
        key_vault_url=(env.get("KEY_VAULT_URL") or "").strip() or None,
        storage_connection=env.get("AzureWebJobsStorage") or None,
        storage_queue_uri=env.get("AzureWebJobsStorage__queueServiceUri") or _account_uri(env, "queue"),
        storage_table_uri=env.get("AzureWebJobsStorage__tableServiceUri") or _account_uri(env, "table"),
        storage_client_id=env.get("AzureWebJobsStorage__clientId") or None,
        dry_run=_bool(env, "DRY_RUN", True),
        expiry_window_days=_int(env, "EXPIRY_WINDOW_DAYS", 60, minimum=1, maximum=3650),
        replacement_offers=replacement,
        replacement_billing_cycle=billing_cycle,
        replacement_term_duration=term,
        replacement_quantity_policy=quantity_policy,  # type: ignore[arg-type]  # checked above
        detect_schedule=(env.get("DETECT_SCHEDULE") or DEFAULT_DETECT_SCHEDULE).strip(),
        retired_offers_extra=env.get("RETIRED_OFFERS_EXTRA") or None,
        ledger_table=table,
        provisioning_poll_seconds=_int(env, "PROVISIONING_POLL_SECONDS", 60, minimum=0, maximum=3600),
        provisioning_timeout_minutes=_int(env, "PROVISIONING_TIMEOUT_MINUTES", 24 * 60, minimum=1),
        provisioning_status_wait_minutes=_int(env, "PROVISIONING_STATUS_WAIT_MINUTES", 60, minimum=1),
        subscribed_sku_wait_minutes=_int(env, "SUBSCRIBED_SKU_WAIT_MINUTES", 60, minimum=1),
        free_units_wait_minutes=_int(env, "FREE_UNITS_WAIT_MINUTES", 60, minimum=1),
        lost_write_resend_wait_seconds=_int(env, "LOST_WRITE_RESEND_WAIT_SECONDS", 900, minimum=1),
        requests_per_minute=_int(env, "PARTNER_CENTER_REQUESTS_PER_MINUTE", 500, minimum=1),
        license_requests_per_minute=_int(env, "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE", 300, minimum=1),
        max_concurrency=_int(env, "PARTNER_CENTER_MAX_CONCURRENCY", 16, minimum=1, maximum=256),
        budget_table=budget_table,
        budget_block_seconds=_float(env, "PARTNER_CENTER_BUDGET_BLOCK_SECONDS", 1.0, minimum=0.1, maximum=30.0),
        fallback_share=_float(env, "PARTNER_CENTER_FALLBACK_SHARE", 0.1, minimum=0.01, maximum=1.0),
        timeout_seconds=_int(env, "PARTNER_CENTER_TIMEOUT_SECONDS", 60, minimum=1, maximum=600),
        max_purchases_per_run=_int(env, "MAX_PURCHASES_PER_RUN", 50, minimum=0),
        customer_allowlist=_guid_set(env, "CUSTOMER_ALLOWLIST"),
        customer_denylist=_guid_set(env, "CUSTOMER_DENYLIST"),
        invocation_budget_seconds=_int(env, "INVOCATION_BUDGET_SECONDS", 480, minimum=10),
        migration_path_policy=_path_policy(env),
    )


def _path_policy(env: Mapping[str, str]) -> str:
    from ._native_path import parse_path_policy

    try:
        return parse_path_policy(env.get("MIGRATION_PATH_POLICY"))
    except ValueError as exc:
        raise ConfigurationError("MIGRATION_PATH_POLICY", str(exc),
                                 "use runbook_only, prefer_native or native_only") from None


def _account_uri(env: Mapping[str, str], service: str) -> str | None:
    account = env.get("AzureWebJobsStorage__accountName")
    return f"https://{account}.{service}.core.windows.net" if account else None
