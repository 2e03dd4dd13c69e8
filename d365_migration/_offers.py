"""Finding the replacement: which new-commerce products and SKUs in a country can replace each retired family and
audience, read from Partner Center's catalog (read-only; ``python -m d365_migration offers``).

Partner Center's catalog is products → SKUs → availabilities (Learn: partner-center/developer/get-a-list-of-products,
get-a-list-of-skus-for-a-product, get-a-list-of-availabilities-for-a-sku, product-resources). New-commerce products
have ``productType.id`` ``OnlineServicesNCE``; an availability's ``catalogItemId`` (``productId:skuId:
availabilityId``) is what a cart buys, and it may change over time, so ``REPLACEMENT_OFFERS`` can name the stable
``productId:skuId`` instead. Which products replace which family comes from ``retired_offers.json``
(``replacementProducts``, after the runbook's "Replacement options"); the audience comes from the SKU title (Faculty,
Students, Government) and the availability's ``segment`` (commercial, education, government).

Prices: the catalog resources carry none (an availability has only ``defaultCurrency``). Partner prices are in the
price sheet (Learn: partner-center/developer/get-a-price-sheet, ``GET https://api.partner.microsoft.com/v1.0/sales/
pricesheets(Market='US',PricesheetView='updatedlicensebased')/$value``, App+User with the Admin or Sales agent role,
a CSV file), which this command does not read: it says so instead of guessing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ._catalog import RetiredOfferCatalog, normalize_offer_name
from ._client import PartnerCenterClient
from ._models import SEGMENT_FOR_AUDIENCE, get_ci

__all__ = [
    "PRICES_NOT_AVAILABLE",
    "SEGMENT_FOR_AUDIENCE",
    "OfferCandidate",
    "Term",
    "audience_of_sku",
    "find_replacements",
    "replacement_offers_json",
    "replacement_titles",
]

logger = logging.getLogger("d365_migration.offers")

PRICES_NOT_AVAILABLE = ("not available: Partner Center's catalog (products, SKUs, availabilities) carries no prices. "
                        "See Partner Center > Pricing and offers, or the price sheet API (get-a-price-sheet, "
                        "PricesheetView=updatedlicensebased; App+User, Admin or Sales agent)")


@dataclass(frozen=True)
class Term:
    duration: str
    billing_cycle: str

    def to_json(self) -> dict[str, str]:
        return {"duration": self.duration, "billingCycle": self.billing_cycle}


@dataclass(frozen=True)
class OfferCandidate:
    family: str
    audience: str
    product_id: str
    product_title: str
    sku_id: str
    sku_title: str
    availability_id: str
    catalog_item_id: str
    segment: str | None
    terms: tuple[Term, ...]
    currency: str | None
    preference: int  # index in replacementProducts (0 = first choice)

    @property
    def replacement_id(self) -> str:
        """What to put in REPLACEMENT_OFFERS: the stable ``productId:skuId``."""
        return f"{self.product_id}:{self.sku_id}"

    def offers_term(self, duration: str, billing_cycle: str) -> bool:
        return any(t.duration.upper() == duration.upper() and t.billing_cycle.lower() == billing_cycle.lower()
                   for t in self.terms)

    def to_json(self) -> dict[str, Any]:
        return {"productId": self.product_id, "productTitle": self.product_title, "skuId": self.sku_id,
                "skuTitle": self.sku_title, "availabilityId": self.availability_id,
                "catalogItemId": self.catalog_item_id, "replacementOfferId": self.replacement_id,
                "segment": self.segment, "terms": [t.to_json() for t in self.terms], "currency": self.currency,
                "prices": None}


def replacement_titles() -> dict[str, list[str]]:
    """``replacementProducts`` from the packaged ``retired_offers.json``: family → product titles, preferred first."""
    doc = json.loads(resources.files(__package__).joinpath("retired_offers.json").read_text(encoding="utf-8"))
    raw = doc.get("replacementProducts") or {}
    return {k: [str(t) for t in v] for k, v in raw.items() if not k.startswith("$") and isinstance(v, list)}


def audience_of_sku(title: str) -> str:
    text = normalize_offer_name(title)
    words = set(text.split())
    if "faculty" in words:
        return "faculty"
    if words & {"student", "students"}:
        return "students"
    if words & {"government", "gcc"}:
        return "government"
    return "commercial"


def _str(obj: Any, key: str) -> str:
    value = get_ci(obj, key) if isinstance(obj, Mapping) else None
    return value.strip() if isinstance(value, str) else ""


def _terms(availability: Mapping[str, Any]) -> tuple[Term, ...]:
    raw = get_ci(availability, "terms")
    terms = []
    for t in raw if isinstance(raw, list) else []:
        duration, cycle = _str(t, "duration"), _str(t, "billingCycle")
        if duration:
            terms.append(Term(duration.upper(), cycle.lower()))
    return tuple(dict.fromkeys(terms))


async def find_replacements(client: PartnerCenterClient, catalog: RetiredOfferCatalog, country: str, *,
                            titles: Mapping[str, Sequence[str]] | None = None
                            ) -> dict[tuple[str, str], list[OfferCandidate]]:
    """For every (family, audience) of the retired-offer catalog, the purchasable new-commerce SKUs in ``country``
    whose product title names one of the family's replacement products; best first.

    :raises PartnerCenterError: a catalog call failed.
    :raises ValueError: ``country`` is not a two-letter code.
    """
    titles = titles or replacement_titles()
    wanted = sorted({(o.family, o.audience) for o in catalog})
    found: dict[tuple[str, str], list[OfferCandidate]] = {key: [] for key in wanted}
    products = await client.list_products(country, target_view="OnlineServices")
    nce = [p for p in products
           if _str(get_ci(p, "productType") or {}, "id").lower() == "onlineservicesnce" and _str(p, "id")]
    skus_cache: dict[str, list[Mapping[str, Any]]] = {}
    for family in sorted({f for f, _ in wanted}):
        for rank, name in enumerate(titles.get(family, [])):
            needle = normalize_offer_name(name)
            for product in nce:
                title = _str(product, "title")
                norm = normalize_offer_name(title)
                if "dynamics 365" not in norm or needle not in norm:
                    continue
                pid = _str(product, "id")
                if pid not in skus_cache:
                    skus_cache[pid] = await client.list_skus(pid, country)
                for sku in skus_cache[pid]:
                    sku_id, sku_title = _str(sku, "id"), _str(sku, "title") or title
                    audience = audience_of_sku(sku_title)
                    if (family, audience) not in found or not sku_id:
                        continue
                    for availability in await client.list_availability_documents(pid, sku_id, country):
                        if get_ci(availability, "isPurchasable") is False:
                            continue
                        segment = _str(availability, "segment").lower() or None
                        if segment is not None and segment != SEGMENT_FOR_AUDIENCE[audience]:
                            continue
                        aid = _str(availability, "id")
                        item_id = _str(availability, "catalogItemId") or f"{pid}:{sku_id}:{aid}"
                        currency = _str(get_ci(availability, "defaultCurrency") or {}, "code") or None
                        candidate = OfferCandidate(family, audience, pid, title, sku_id, sku_title, aid, item_id,
                                                   segment, _terms(availability), currency, rank)
                        if all(c.catalog_item_id != item_id for c in found[(family, audience)]):
                            found[(family, audience)].append(candidate)
    for key in found:
        found[key].sort(key=lambda c: (c.preference, c.product_title, c.sku_id))
    return found


def replacement_offers_json(found: Mapping[tuple[str, str], Sequence[OfferCandidate]], *,
                            id_format: str = "product-sku") -> dict[str, dict[str, str]]:
    """The ``REPLACEMENT_OFFERS`` value: the first (preferred) candidate of each family and audience."""
    mapping: dict[str, dict[str, str]] = {}
    for (family, audience), candidates in sorted(found.items()):
        if candidates:
            best = candidates[0]
            mapping.setdefault(family, {})[audience] = (
                best.catalog_item_id if id_format == "catalog-item" else best.replacement_id)
    return mapping
