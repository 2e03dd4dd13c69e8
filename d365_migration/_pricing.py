"""Partner prices for new-commerce license-based products, from Partner Center's price sheet — for ``plan``'s cost.

Learn, ``partner-center/developer/get-a-price-sheet``: ``GET https://api.partner.microsoft.com/v1.0/sales/
pricesheets(Market='{market}',PricesheetView='updatedlicensebased')/$value`` "returns the price list as a file stream
… either a .csv file or a zip compressed version of the .csv" (``Accept-Encoding: deflate`` asks for the compressed
one). It "only supports application user authentication" (App+User; roles Admin Agent or Sales Agent), on the
"Partner API" resource ``https://api.partner.microsoft.com`` — not the Partner Center API's audience, so the stored
refresh token is redeemed a second time for that scope (``PRICING_SCOPE``).

What a row means (``partner-center/pricing/pricing-and-offers``): ``UnitPrice`` is "the price the partner will pay"
per license **for the term being purchased** ("If a partner purchases an annual term with monthly pricing, they'll be
billed one-twelfth the total amount each monthly billing period"); ``ERP Price`` is the estimated retail price. Rows
are per market, term (``TermDuration``) and billing plan (``BillingPlan``), with effective dates; "sometimes line
items are duplicate … look to the latest date ranges". European markets carry the six European currencies.

There is no documented price API for legacy (GUID) license-based offers ("The price sheet and offer matrix APIs
supports pricing for updated new commerce license-based online services only"), and the catalog (products, SKUs,
availabilities) carries no price. So a legacy replacement is "price not available from Partner Center", and any
price is an estimate before promotions, proration and tax.

The safe reading where the docs are silent: columns are read by header name (the documented example and the portal
table list different columns); three documented date spellings are accepted; a row with a tier range is used only
when the quantity falls inside it; with several currencies for one market and none chosen, nothing is priced (the
partner's billing currency is not something the API tells).
"""

from __future__ import annotations

import csv
import io
import logging
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

import httpx

from ._exceptions import AuthenticationError, PartnerCenterError

__all__ = [
    "PRICE_SHEET_VIEW",
    "PRICING_ENDPOINT",
    "PRICING_SCOPE",
    "CostEstimate",
    "CostEstimator",
    "Price",
    "PriceSheet",
    "PriceSheetClient",
    "PriceSheetUnavailable",
    "billing_periods",
]

logger = logging.getLogger("d365_migration.pricing")

PRICING_ENDPOINT = "https://api.partner.microsoft.com"
PRICING_SCOPE = "https://api.partner.microsoft.com/.default"
PRICE_SHEET_VIEW = "updatedlicensebased"
_ZIP_MAGIC = b"PK\x03\x04"
_DATE_FORMATS = ("%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M", "%m/%d/%Y")
_TERM_MONTHS = re.compile(r"^P(?:(\d+)Y)?(?:(\d+)M)?$", re.IGNORECASE)


class PriceSheetUnavailable(PartnerCenterError):
    """The price sheet could not be had (not authorised, not served, unreadable). ``reason`` says why, in a line."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason, method="GET", path="/v1.0/sales/pricesheets")


def billing_periods(term_duration: str, billing_plan: str) -> int | None:
    """How many bills one term makes: P1Y billed monthly → 12, annually → 1; P3Y annually → 3; ``None`` when unknown."""
    match = _TERM_MONTHS.match(term_duration.strip())
    if not match or not any(match.groups()):
        return None
    months = int(match.group(1) or 0) * 12 + int(match.group(2) or 0)
    plan = _norm(billing_plan)
    if plan == "monthly":
        return months
    if plan == "annual":
        return months // 12 if months >= 12 and months % 12 == 0 else None
    if plan in ("onetime", "triennial", "biennial"):
        return 1
    return None


def _norm(text: str) -> str:
    return re.sub(r"[\s_-]", "", text).lower()


def _sku(text: str) -> str:
    """SKU ids are four digits ("0001"); spreadsheets drop the zeros."""
    text = text.strip()
    return text.zfill(4) if text.isdigit() else text.upper()


def _date(text: str) -> datetime | None:
    """The documented spellings: ``2/1/2019 12:00:00 AM`` (API example), ``2/1/2023 0:00`` (portal table),
    ``2021-10-01T00:00:00.0000000Z`` (effective-dates section). Placeholder years (1753, 9999) are kept as dates."""
    text = text.strip()
    if not text:
        return None
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    iso = re.sub(r"\.(\d{6})\d+", r".\1", iso)  # .NET writes seven fractional digits
    try:
        parsed = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def _money(text: str) -> Decimal | None:
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, AttributeError):
        return None
    return value if value.is_finite() else None


@dataclass(frozen=True)
class Price:
    """One price-sheet row: what the partner pays per license for one term."""

    product_id: str
    sku_id: str
    title: str
    term_duration: str
    billing_plan: str
    market: str
    currency: str
    unit_price: Decimal
    erp_price: Decimal | None = None
    tier_min: Decimal | None = None
    tier_max: Decimal | None = None
    effective_start: datetime | None = None
    effective_end: datetime | None = None

    def term_cost(self, quantity: int) -> Decimal:
        """The term's cost for ``quantity`` licenses ("Quantity * UnitPrice"; before promotions and tax)."""
        return self.unit_price * quantity

    def per_bill(self, quantity: int) -> Decimal | None:
        """What one bill of the term comes to (P1Y monthly: a twelfth); ``None`` when the term is not understood."""
        periods = billing_periods(self.term_duration, self.billing_plan)
        return None if not periods else self.term_cost(quantity) / periods

    def applies(self, quantity: int, at: datetime) -> bool:
        if self.effective_start is not None and at < self.effective_start:
            return False
        if self.effective_end is not None and at >= self.effective_end:
            return False
        if self.tier_min is not None and quantity < self.tier_min:
            return False
        return not (self.tier_max is not None and quantity > self.tier_max)


class PriceSheet:
    """The rows of one market's price sheet, looked up by product SKU, term and billing plan."""

    def __init__(self, market: str, rows: Iterable[Price]) -> None:
        self.market = market.upper()
        self._rows: dict[tuple[str, str], list[Price]] = {}
        for row in rows:
            self._rows.setdefault((row.product_id.upper(), row.sku_id), []).append(row)

    def __len__(self) -> int:
        return sum(len(v) for v in self._rows.values())

    @classmethod
    def parse(cls, market: str, data: bytes) -> PriceSheet:
        """A price sheet file: CSV, or a zip holding one CSV (a UTF-8 BOM is allowed).

        :raises PriceSheetUnavailable: not a price sheet (no ProductId/SkuId/UnitPrice columns, not CSV, a bad zip).
        """
        if data.startswith(_ZIP_MAGIC):
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    names = [n for n in archive.namelist() if n.lower().endswith(".csv")] or archive.namelist()
                    if not names:
                        raise PriceSheetUnavailable("the price sheet archive is empty")
                    data = archive.read(names[0])
            except zipfile.BadZipFile as exc:
                raise PriceSheetUnavailable(f"the price sheet archive is not readable ({exc})") from None
        text = data.decode("utf-8-sig", errors="replace")
        # The documented header ends in a typographic quote ("ERP Price“): in the header line only, read it as the
        # plain quote it stands for (a value may legitimately contain one).
        head, newline, rest = text.partition("\n")
        text = head.replace("“", '"').replace("”", '"') + newline + rest
        try:
            return cls._parse_rows(market, csv.reader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise PriceSheetUnavailable(f"the price sheet is not CSV ({exc})") from None

    @classmethod
    def _parse_rows(cls, market: str, reader: Iterator[list[str]]) -> PriceSheet:
        header = next(reader, None)
        if not header:
            raise PriceSheetUnavailable("the price sheet is empty")
        # By name, not position: the API example and the portal's field table list different columns.
        columns = {_norm(name): i for i, name in enumerate(header)}
        missing = [c for c in ("productid", "skuid", "unitprice") if c not in columns]
        if missing:
            raise PriceSheetUnavailable(f"the price sheet has no {', '.join(missing)} column")

        def cell(row: list[str], name: str) -> str:
            i = columns.get(name)
            return row[i].strip() if i is not None and i < len(row) else ""

        rows = []
        for raw in reader:
            price = _money(cell(raw, "unitprice"))
            if price is None or not cell(raw, "productid"):
                continue
            rows.append(Price(
                product_id=cell(raw, "productid").upper(), sku_id=_sku(cell(raw, "skuid")),
                title=cell(raw, "producttitle") or cell(raw, "skutitle"),
                term_duration=cell(raw, "termduration").upper(), billing_plan=cell(raw, "billingplan"),
                market=(cell(raw, "market") or market).upper(), currency=cell(raw, "currency").upper(),
                unit_price=price, erp_price=_money(cell(raw, "erpprice")),
                tier_min=_money(cell(raw, "pricingtierrangemin")), tier_max=_money(cell(raw, "pricingtierrangemax")),
                effective_start=_date(cell(raw, "effectivestartdate")),
                effective_end=_date(cell(raw, "effectiveenddate"))))
        return cls(market, rows)

    def price(self, product_id: str, sku_id: str, *, term_duration: str, billing_cycle: str, quantity: int,
              at: datetime, currency: str | None = None) -> Price | str:
        """The row that prices ``quantity`` licenses of ``product_id``/``sku_id`` bought now for this term and billing
        cycle (in ``currency`` where the market lists several); otherwise a short reason why there is none (not
        listed, several currencies and none chosen, …)."""
        candidates = self._rows.get((product_id.upper(), _sku(sku_id)), [])
        if not candidates:
            return f"{product_id}/{sku_id} is not in the {self.market} price sheet"
        term, plan = term_duration.upper(), _norm(billing_cycle)
        rows = [r for r in candidates if r.term_duration == term and _norm(r.billing_plan) == plan]
        if not rows:
            offered = sorted({f"{r.term_duration} {r.billing_plan}" for r in candidates})
            return f"no {term} {billing_cycle} price (offered: {', '.join(offered)})"
        # ``currency`` is the partner's billing currency: it picks among a European market's six currencies; a
        # market priced in one currency only is priced in that one.
        preferred = [r for r in rows if currency and r.currency == currency.upper()]
        rows = preferred or rows
        rows = [r for r in rows if r.applies(quantity, at)]
        if not rows:
            return f"no price in effect for {quantity} license(s) now"
        currencies = sorted({r.currency for r in rows})
        if len(currencies) > 1:
            return f"the {self.market} sheet prices it in {', '.join(currencies)}: choose one with --currency"
        # Overlapping rows: the latest effective start wins ("look to the latest date ranges").
        return max(rows, key=lambda r: r.effective_start or datetime.min.replace(tzinfo=UTC))


class PriceSheetClient:
    """``GET …/v1.0/sales/pricesheets(Market=…,PricesheetView='updatedlicensebased')/$value``, one sheet per market
    per client (the files are large: the documented example is 42 MB)."""

    def __init__(self, endpoint: str = PRICING_ENDPOINT, credential: Any = None, *,
                 timeout: httpx.Timeout | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._credential = credential
        self._http = httpx.AsyncClient(base_url=endpoint.rstrip("/"), timeout=timeout or httpx.Timeout(120.0),
                                       transport=transport, follow_redirects=False)
        self._sheets: dict[str, PriceSheet | PriceSheetUnavailable] = {}

    async def __aenter__(self) -> PriceSheetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def sheet(self, market: str) -> PriceSheet:
        """The current price sheet of ``market`` (a two-letter country code).

        :raises PriceSheetUnavailable: not authorised (App+User on the Partner API resource, Admin or Sales Agent),
            not served, or not readable; remembered for the market, so a plan asks once.
        """
        key = market.strip().upper()
        if key not in self._sheets:
            try:
                self._sheets[key] = await self._download(key)
            except PriceSheetUnavailable as exc:
                self._sheets[key] = exc
        found = self._sheets[key]
        if isinstance(found, PriceSheetUnavailable):
            raise found
        return found

    async def _download(self, market: str) -> PriceSheet:
        if not re.fullmatch(r"[A-Z]{2}", market):
            raise PriceSheetUnavailable(f"{market!r} is not a two-letter market")
        path = (f"/v1.0/sales/pricesheets(Market='{quote(market)}',PricesheetView='{PRICE_SHEET_VIEW}')/$value")
        headers = {"Accept-Encoding": "deflate", "Accept": "text/csv, application/octet-stream"}
        if self._credential is not None:
            try:
                headers["Authorization"] = f"Bearer {await self._credential.get_token()}"
            except AuthenticationError as exc:  # its message says what to run; never holds the token
                raise PriceSheetUnavailable(f"no token for the price sheet: {exc}") from None
        try:
            response = await self._http.get(path, headers=headers)
        except httpx.TransportError as exc:  # timeouts included
            raise PriceSheetUnavailable(f"the price sheet service is unreachable ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise PriceSheetUnavailable(_explain(response), status=response.status_code)
        sheet = PriceSheet.parse(market, response.content)
        logger.info("event=price_sheet market=%s rows=%d", market, len(sheet))
        return sheet


def _explain(response: httpx.Response) -> str:
    """One line for an error answer. The Partner API's error body is ``{"error": {"code", "message"}}``."""
    status = response.status_code
    detail = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        nested = body.get("error")
        inner: Mapping[str, Any] = nested if isinstance(nested, Mapping) else body
        code, message = inner.get("code"), inner.get("message") or inner.get("description")
        detail = " ".join(str(x) for x in (code, message) if x)
    hint = {401: "the token is not for https://api.partner.microsoft.com (App+User with MFA is required)",
            403: "the account needs the Admin agent or Sales agent role and a partner that can transact",
            404: "no price sheet for this market and view",
            400: "app-only tokens are not supported by the price sheet"}.get(status, "")
    return "; ".join(x for x in (f"HTTP {status}", detail[:200], hint) if x)


@dataclass
class CostEstimate:
    """What one migration's replacement costs for its term, or why that cannot be told."""

    amount: Decimal | None = None
    currency: str | None = None
    per_bill: Decimal | None = None
    price: Price | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.amount is None or self.price is None:
            return {"unavailable": self.note}
        return {"amount": str(self.amount), "currency": self.currency, "unitPrice": str(self.price.unit_price),
                "term": self.price.term_duration, "billingPlan": self.price.billing_plan,
                "perBill": str(self.per_bill) if self.per_bill is not None else None,
                "erpUnitPrice": str(self.price.erp_price) if self.price.erp_price is not None else None,
                "note": self.note}

    def label(self) -> str:
        if self.amount is None:
            return f"— ({self.note})"
        bill = f"; {self.per_bill:.2f} per bill" if self.per_bill is not None else ""
        return f"{self.amount:.2f} {self.currency} per {self.price.term_duration if self.price else 'term'}{bill}"


class CostEstimator:
    """``plan``'s cost per migration and in total: the partner's price from the customer's market's price sheet ×
    the quantity the migration will buy. Totals are kept per currency (markets bill in their own currency)."""

    def __init__(self, prices: PriceSheetClient | None, *, term_duration: str, billing_cycle: str,
                 currency: str | None = None, unavailable: str = "", now: datetime | None = None) -> None:
        self._prices = prices
        self._term = term_duration
        self._cycle = billing_cycle
        self._currency = currency
        self._unavailable = unavailable
        self._now = now or datetime.now(UTC)
        self.totals: dict[str, Decimal] = {}  # migrations the rollout would run now
        self.out_of_scope: dict[str, Decimal] = {}  # the rest: what going live for them would cost
        self.priced = 0
        self.unpriced = 0

    async def estimate(self, market: str | None, target: Any, quantity: int, *, in_scope: bool = True
                       ) -> CostEstimate:
        """``target`` is the migration's :class:`~d365_migration._settings.ReplacementTarget` (or ``None``);
        ``in_scope``: the rollout would run this migration now (it counts in :attr:`totals`)."""
        estimate = await self._estimate(market, target, quantity)
        if estimate.amount is not None and estimate.currency:
            self.priced += 1
            into = self.totals if in_scope else self.out_of_scope
            into[estimate.currency] = into.get(estimate.currency, Decimal(0)) + estimate.amount
        else:
            self.unpriced += 1
        return estimate

    async def _estimate(self, market: str | None, target: Any, quantity: int) -> CostEstimate:
        if self._prices is None:
            return CostEstimate(note=self._unavailable or "prices not requested")
        if target is None:
            return CostEstimate(note="no REPLACEMENT_OFFERS entry")
        if target.kind == "legacy":
            return CostEstimate(note="Partner Center has no price API for legacy offers")
        if not market:
            return CostEstimate(note="the customer's country is unknown or not readable")
        try:
            sheet = await self._prices.sheet(market)
        except PriceSheetUnavailable as exc:
            return CostEstimate(note=f"price sheet {market}: {exc.reason}")
        found = sheet.price(target.product_id, target.sku_id, term_duration=self._term, billing_cycle=self._cycle,
                            quantity=quantity, at=self._now, currency=self._currency)
        if isinstance(found, str):
            return CostEstimate(note=found)
        return CostEstimate(amount=found.term_cost(quantity), currency=found.currency,
                            per_bill=found.per_bill(quantity), price=found,
                            note="estimate before promotions, proration and tax")

    def summary(self) -> str:
        if not self.priced:
            return f"no migration could be priced ({self.unpriced} without a price)"

        def money(totals: Mapping[str, Decimal]) -> str:
            return ", ".join(f"{amount:.2f} {currency}" for currency, amount in sorted(totals.items())) or "nothing"

        outside = f"; customers not in the rollout's scope yet: {money(self.out_of_scope)}" if self.out_of_scope else ""
        rest = f"; {self.unpriced} without a price" if self.unpriced else ""
        return (f"replacements for one term each, in scope now: {money(self.totals)}{outside} ({self.priced} "
                f"migration(s) priced{rest}; partner prices from the price sheet, before promotions, proration and "
                "tax)")
