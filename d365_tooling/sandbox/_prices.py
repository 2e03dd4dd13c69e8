"""The partner price sheet (new-commerce license-based), as Learn documents it — ``get-a-price-sheet``.

``GET /v1.0/sales/pricesheets(Market='{market}',PricesheetView='updatedlicensebased')/$value[?timeline=&month=]`` on
the Partner API host answers ``200`` with ``Content-Type: application/octet-stream``, ``Content-Disposition:
attachment; filename=sheets.csv`` and the CSV (or, with ``Accept-Encoding: deflate``, "a zip compressed version of the
.csv"). Columns as in the page's example, in its order: ProductTitle, ProductId, SkuId, SkuTitle, Publisher,
SkuDescription, UnitOfMeasure, TermDuration, BillingPlan, Market, Currency, UnitPrice, PricingTierRangeMin,
PricingTierRangeMax, EffectiveStartDate, EffectiveEndDate, Tags, ERP Price; dates as the example writes them
(``2/1/2019 12:00:00 AM``). ``UnitPrice`` is the partner's price for the whole term (``pricing-and-offers``: "The
UnitPrice amount is for the term being purchased"); ``ERP Price`` the estimated retail price. Each SKU also has a
superseded row whose effective range has ended (the docs: "Sometimes line items are duplicate … look to the latest
date ranges"). European markets list the six European currencies. ``timeline=future`` answers 404 when there is no
future sheet (documented); ``timeline=history`` needs ``month=YYYYMM``.

Auth (``SandboxConfig.require_auth``): App+User only ("Application-only isn't yet supported"), and the token must be
for the Partner API resource ``https://api.partner.microsoft.com`` — a Partner Center API token answers 401 (reported
by partners; the page names no audience). ``SandboxConfig.price_sheet_available=False`` answers 404 for every market.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import zipfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ._catalog import CATALOG, CatalogItem
from ._faults import is_app_only, jwt_payload

__all__ = ["PRICE_SHEET_COLUMNS", "handle_price_sheet", "unit_price"]

PRICE_SHEET_COLUMNS = ("ProductTitle", "ProductId", "SkuId", "SkuTitle", "Publisher", "SkuDescription",
                       "UnitOfMeasure", "TermDuration", "BillingPlan", "Market", "Currency", "UnitPrice",
                       "PricingTierRangeMin", "PricingTierRangeMax", "EffectiveStartDate", "EffectiveEndDate", "Tags",
                       "ERP Price")
PARTNER_API_AUDIENCE = "https://api.partner.microsoft.com"
_EUROPEAN = {"DE", "FR", "NL", "IT", "ES", "BE", "AT", "IE", "FI", "PT", "DK", "SE", "NO", "CH", "GB"}
_EUROPEAN_CURRENCIES = ("EUR", "GBP", "DKK", "SEK", "NOK", "CHF")
_CURRENCY = {"US": "USD", "CA": "CAD", "AU": "AUD", "JP": "JPY"}
_RATE = {"USD": Decimal("1"), "EUR": Decimal("0.92"), "GBP": Decimal("0.79"), "DKK": Decimal("6.9"),
         "SEK": Decimal("10.5"), "NOK": Decimal("10.7"), "CHF": Decimal("0.88"), "CAD": Decimal("1.36"),
         "AUD": Decimal("1.52"), "JPY": Decimal("151")}
# (term, billing plan, term price as a multiple of the monthly list price): a P1Y term costs 12 months whichever way it
# is billed; a month-to-month term carries new commerce's premium.
_TERMS = (("P1M", "Monthly", Decimal("1.2")), ("P1Y", "Monthly", Decimal("12")), ("P1Y", "Annual", Decimal("12")),
          ("P3Y", "Annual", Decimal("36")), ("P3Y", "Monthly", Decimal("36")))
_PATH = re.compile(r"^/v1\.0/sales/pricesheets\(market='([^']*)',pricesheetview='([^']*)'\)/\$value$")


def _monthly_usd(item: CatalogItem) -> Decimal:
    """A made-up but stable monthly partner price in USD for a product SKU (20.00–79.00)."""
    digest = hashlib.sha256(item.id.split(":")[0].encode() + item.id.split(":")[1].encode()).digest()
    return Decimal(20 + digest[0] % 60)


def unit_price(catalog_item_id: str, term: str, billing_plan: str, currency: str = "USD") -> Decimal:
    """What the sandbox's price sheet says a license costs for one term (test-facing)."""
    item = CATALOG[catalog_item_id.lower()]
    factor = next(f for t, b, f in _TERMS if t == term.upper() and b.lower() == billing_plan.lower())
    return (_monthly_usd(item) * factor * _RATE[currency.upper()]).quantize(Decimal("0.01"))


def _date(moment: datetime) -> str:
    """As the documented example writes it: ``2/1/2019 12:00:00 AM``."""
    hour = moment.hour % 12 or 12
    return (f"{moment.month}/{moment.day}/{moment.year} {hour}:{moment.minute:02d}:{moment.second:02d} "
            f"{'AM' if moment.hour < 12 else 'PM'}")


def price_sheet_rows(market: str, now: datetime) -> list[dict[str, str]]:
    market = market.upper()
    currencies = _EUROPEAN_CURRENCIES if market in _EUROPEAN else (_CURRENCY.get(market, "USD"),)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    superseded_from, superseded_to = start - timedelta(days=400), start - timedelta(days=30)
    rows: list[dict[str, str]] = []
    for item in sorted((i for i in CATALOG.values() if i.is_nce), key=lambda i: i.id):
        product, sku, _ = item.id.split(":")
        for currency in currencies:
            for term, plan, _factor in _TERMS:
                price = unit_price(item.id, term, plan, currency)
                base = {"ProductTitle": item.name, "ProductId": product, "SkuId": sku, "SkuTitle": item.name,
                        "Publisher": "Microsoft Corporation", "SkuDescription": item.name, "UnitOfMeasure": "",
                        "TermDuration": term, "BillingPlan": plan, "Market": market, "Currency": currency,
                        "PricingTierRangeMin": "", "PricingTierRangeMax": "", "Tags": "License"}
                # An older price whose range has ended first, then the one in effect.
                rows.append({**base, "UnitPrice": str((price * Decimal("0.9")).quantize(Decimal("0.01"))),
                             "EffectiveStartDate": _date(superseded_from), "EffectiveEndDate": _date(superseded_to),
                             "ERP Price": str((price * Decimal("1.1")).quantize(Decimal("0.01")))})
                rows.append({**base, "UnitPrice": str(price), "EffectiveStartDate": _date(superseded_to),
                             "EffectiveEndDate": "11/30/9999 11:59:59 PM",
                             "ERP Price": str((price * Decimal("1.25")).quantize(Decimal("0.01")))})
    return rows


def _csv(rows: list[dict[str, str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PRICE_SHEET_COLUMNS, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _error(status: int, code: str, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    import json

    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return status, [(b"content-type", b"application/json; charset=utf-8")], body


def handle_price_sheet(path: str, query: dict[str, str], headers: dict[str, str], config: Any,
                       now: datetime) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """The answer to a price-sheet request (status, headers, body), or ``None`` when ``path`` is not one.
    ``path`` is lower-case; ``query`` and ``headers`` have lower-case keys."""
    match = _PATH.match(path)
    if match is None:
        return None
    market, view = match.group(1).upper(), match.group(2)
    if getattr(config, "require_auth", False):
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not token:
            return _error(401, "unauthenticated", "Invalid Authorization header")
        if is_app_only(token):
            return _error(400, "invalidRequest", "Application-only authentication is not supported.")
        audience = str((jwt_payload(token) or {}).get("aud", "")).rstrip("/")
        if audience != PARTNER_API_AUDIENCE:
            return _error(401, "unauthenticated", "Invalid Authorization header")
    if view not in ("azure_consumption", "azure_reservations", "updatedlicensebased", "marketplace", "software"):
        return _error(400, "invalidRequest", f"Unknown PricesheetView '{view}'.")
    if not re.fullmatch(r"[A-Z]{2}", market):
        return _error(400, "invalidRequest", f"Unknown Market '{market}'.")
    timeline = query.get("timeline", "current").lower()
    if timeline == "history" and not re.fullmatch(r"\d{6}", query.get("month", "")):
        return _error(400, "invalidRequest", "month (YYYYMM) is required for the history timeline.")
    if (timeline == "future" or view != "updatedlicensebased"
            or not getattr(config, "price_sheet_available", True)):
        return _error(404, "itemNotFound", "No price sheet is available for this request.")
    body = _csv(price_sheet_rows(market, now))
    disposition = b"attachment; filename=sheets.csv"
    if "deflate" in headers.get("accept-encoding", "").lower():
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("sheets.csv", body)
        body, disposition = archive.getvalue(), b"attachment; filename=sheets.zip"
    return 200, [(b"content-type", b"application/octet-stream"), (b"content-disposition", disposition)], body
