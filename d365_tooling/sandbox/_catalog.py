"""The sandbox's product catalog: retired Qualified Offers, their replacements and a few unrelated products.

Every id here is made up (deterministic uuid5 / invented CFQ7TTC0 codes) except a few well-known Entra SKU ids of
unrelated products (Microsoft 365 E3, Power BI Pro, ...), which only serve as realistic distractors.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import d365_migration

_NS = uuid.UUID("5b0f7c1e-3d8a-4f51-9a0e-d365d365d365")
AUDIENCES: tuple[str, ...] = ("commercial", "faculty", "students", "government")
FAMILIES: tuple[str, ...] = ("sales", "customer_engagement")
_AUD_SUFFIX = {"commercial": "", "faculty": "_FAC", "students": "_STU", "government": "_GOV"}
_AUD_NAME = {
    "commercial": "",
    "faculty": " for Faculty",
    "students": " for Students",
    "government": " (Government Pricing)",
}


def _guid(*parts: str) -> str:
    return str(uuid.uuid5(_NS, "/".join(parts)))


@dataclass(frozen=True, slots=True)
class ProductSku:
    """An Entra product SKU as Partner Center shows it in licenses/subscribedskus (`productSku`)."""

    id: str
    sku_part_number: str
    name: str
    service_plans: tuple[tuple[str, str, str], ...] = ()  # (id, serviceName, displayName)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "skuPartNumber": self.sku_part_number,
            "targetType": "User",
            "licenseGroupId": "group1",
        }

    def service_plans_json(self, capability_status: str) -> list[dict[str, Any]]:
        return [
            {
                "id": pid,
                "displayName": display,
                "serviceName": service,
                "capabilityStatus": capability_status,
                "targetType": "User",
            }
            for pid, service, display in self.service_plans
        ]


@dataclass(frozen=True, slots=True)
class CatalogItem:
    """Something that can appear as a subscription's offerId: a legacy offer GUID or an NCE catalog item id."""

    id: str  # canonical spelling (legacy GUIDs upper-case, NCE ids as issued)
    name: str
    kind: str  # "legacy" | "nce"
    sku: ProductSku
    purchasable: bool = True
    retired: bool = False
    family: str | None = None
    channel: str | None = None
    audience: str | None = None
    role: str = "other"  # "retired" | "replacement" | "other"
    term_duration: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_nce(self) -> bool:
        return self.kind == "nce"


def _plans(part: str, *names: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((_guid("plan", part, n), n.upper().replace(" ", "_"), n) for n in names)


def _load_retired() -> list[dict[str, Any]]:
    path = Path(d365_migration.__file__).resolve().parent / "retired_offers.json"  # the app's catalog data
    data = json.loads(path.read_text(encoding="utf-8"))
    return list(data["offers"])


RETIRED_OFFER_DEFS: list[dict[str, Any]] = _load_retired()

# --- SKUs granted by the retired Qualified Offers: one per family x audience. -----------------------------------
QO_SKUS: dict[tuple[str, str], ProductSku] = {}
for _aud in AUDIENCES:
    QO_SKUS[("sales", _aud)] = ProductSku(
        id=_guid("sku", "qo", "sales", _aud),
        sku_part_number=f"D365_SALES_ENT_QO{_AUD_SUFFIX[_aud]}",
        name=f"Dynamics 365 for Sales Enterprise Edition (Qualified Offer){_AUD_NAME[_aud]}",
        service_plans=_plans(f"qo-sales-{_aud}", "Dynamics 365 for Sales", "Flow for Dynamics 365"),
    )
    QO_SKUS[("customer_engagement", _aud)] = ProductSku(
        id=_guid("sku", "qo", "ce", _aud),
        sku_part_number=f"D365_CE_PLAN_QO{_AUD_SUFFIX[_aud]}",
        name=f"Dynamics 365 Customer Engagement Plan Enterprise Edition (Qualified Offer){_AUD_NAME[_aud]}",
        service_plans=_plans(f"qo-ce-{_aud}", "Dynamics 365 Customer Engagement Plan", "Flow for Dynamics 365"),
    )

# --- Replacement SKUs (what the new subscription grants), one per family x audience. ------------------------------
REPLACEMENT_SKUS: dict[tuple[str, str], ProductSku] = {}
for _aud in AUDIENCES:
    REPLACEMENT_SKUS[("sales", _aud)] = ProductSku(
        id=_guid("sku", "repl", "sales", _aud),
        sku_part_number=f"D365_SALES_PRO{_AUD_SUFFIX[_aud]}",
        name=f"Dynamics 365 Sales Professional{_AUD_NAME[_aud]}",
        service_plans=_plans(f"repl-sales-{_aud}", "Dynamics 365 Sales Professional", "Power Automate for Dynamics"),
    )
    REPLACEMENT_SKUS[("customer_engagement", _aud)] = ProductSku(
        id=_guid("sku", "repl", "ce", _aud),
        sku_part_number=f"DYN365_ENTERPRISE_PLAN1{_AUD_SUFFIX[_aud]}",
        name=f"Dynamics 365 Customer Engagement Plan{_AUD_NAME[_aud]}",
        service_plans=_plans(f"repl-ce-{_aud}", "Dynamics 365 Customer Engagement Plan", "Power Automate for Dynamics"),
    )

_NCE_PRODUCT = {"sales": "CFQ7TTC0SB4X", "customer_engagement": "CFQ7TTC0CE7P"}
_NCE_SKU = {"commercial": "0001", "faculty": "0002", "students": "0003", "government": "0004"}
_NCE_AVAIL = {
    ("sales", "commercial"): "CFQ7TTC0K5DJ",
    ("sales", "faculty"): "CFQ7TTC0K5F1",
    ("sales", "students"): "CFQ7TTC0K5G2",
    ("sales", "government"): "CFQ7TTC0K5H3",
    ("customer_engagement", "commercial"): "CFQ7TTC0K7A1",
    ("customer_engagement", "faculty"): "CFQ7TTC0K7B2",
    ("customer_engagement", "students"): "CFQ7TTC0K7C3",
    ("customer_engagement", "government"): "CFQ7TTC0K7D4",
}

CATALOG: dict[str, CatalogItem] = {}  # key: lower-case id


def _add(item: CatalogItem) -> CatalogItem:
    CATALOG[item.id.lower()] = item
    return item


RETIRED_OFFERS: list[CatalogItem] = []
for _d in RETIRED_OFFER_DEFS:
    _fam, _aud2 = str(_d["family"]), str(_d["audience"])
    RETIRED_OFFERS.append(
        _add(
            CatalogItem(
                id=_guid("offer", "qo", str(_d["name"])).upper(),
                name=str(_d["name"]),
                kind="legacy",
                sku=QO_SKUS[(_fam, _aud2)],
                purchasable=False,
                retired=True,
                family=_fam,
                channel=str(_d["channel"]),
                audience=_aud2,
                role="retired",
            )
        )
    )

DEMO_REPLACEMENT_OFFERS: dict[str, dict[str, str]] = {f: {} for f in FAMILIES}
LEGACY_REPLACEMENT_OFFERS: dict[str, dict[str, str]] = {f: {} for f in FAMILIES}
for _fam in FAMILIES:
    for _aud in AUDIENCES:
        _sku = REPLACEMENT_SKUS[(_fam, _aud)]
        _nce_id = f"{_NCE_PRODUCT[_fam]}:{_NCE_SKU[_aud]}:{_NCE_AVAIL[(_fam, _aud)]}"
        _add(
            CatalogItem(
                id=_nce_id, name=_sku.name, kind="nce", sku=_sku, family=_fam, audience=_aud,
                role="replacement", term_duration="P1Y",
            )
        )
        DEMO_REPLACEMENT_OFFERS[_fam][_aud] = _nce_id
        _legacy_id = _guid("offer", "repl", _fam, _aud).upper()
        _add(
            CatalogItem(
                id=_legacy_id, name=_sku.name, kind="legacy", sku=_sku, family=_fam, audience=_aud,
                role="replacement",
            )
        )
        LEGACY_REPLACEMENT_OFFERS[_fam][_aud] = _legacy_id

# --- Unrelated products used as healthy distractors. --------------------------------------------------------------
SKU_M365_E3 = ProductSku("05e9a617-0261-4cee-bb44-138d3ef5d965", "SPE_E3", "Microsoft 365 E3", _plans("e3", "Exchange"))
SKU_POWER_BI_PRO = ProductSku(
    "f8a1db68-be16-40ed-86d5-cb42ce701560", "POWER_BI_PRO", "Power BI Pro", _plans("pbi", "Power BI Pro")
)
SKU_O365_E1 = ProductSku(
    "18181a46-0d4e-45cd-891e-60aabd171b4e", "STANDARDPACK", "Office 365 E1", _plans("e1", "Exchange")
)
SKU_EXCHANGE_P1 = ProductSku(
    "4b9405b0-7788-4568-add1-99614e613b69", "EXCHANGESTANDARD", "Exchange Online (Plan 1)", _plans("exo", "Exchange")
)
SKU_D365_SALES_ENT = ProductSku(
    "1e1a282c-9c54-43a2-9310-98ef728faace", "DYN365_ENTERPRISE_SALES", "Dynamics 365 Sales Enterprise Edition",
    _plans("d365se", "Dynamics 365 for Sales"),
)

M365_E3_NCE = _add(CatalogItem("CFQ7TTC0LFLX:0001:CFQ7TTC0LFK5", "Microsoft 365 E3", "nce", SKU_M365_E3,
                               term_duration="P1Y"))
EXCHANGE_P1_NCE = _add(CatalogItem("CFQ7TTC0LH16:0001:CFQ7TTC0K8ZD", "Exchange Online (Plan 1)", "nce",
                                   SKU_EXCHANGE_P1, term_duration="P1M"))
D365_SALES_ENT_NCE = _add(CatalogItem("CFQ7TTC0LGWX:0002:CFQ7TTC0J9Q1", "Dynamics 365 Sales Enterprise", "nce",
                                      SKU_D365_SALES_ENT, term_duration="P1Y"))
POWER_BI_PRO_LEGACY = _add(CatalogItem(_guid("offer", "pbi").upper(), "Power BI Pro", "legacy", SKU_POWER_BI_PRO))
O365_E1_LEGACY = _add(CatalogItem(_guid("offer", "e1").upper(), "Office 365 E1", "legacy", SKU_O365_E1))
D365_SALES_ENT_LEGACY = _add(CatalogItem(_guid("offer", "d365se").upper(), "Dynamics 365 for Sales Enterprise Edition",
                                         "legacy", SKU_D365_SALES_ENT, purchasable=False))

OTHER_PRODUCTS: tuple[CatalogItem, ...] = (
    M365_E3_NCE, EXCHANGE_P1_NCE, D365_SALES_ENT_NCE, POWER_BI_PRO_LEGACY, O365_E1_LEGACY,
)

ALL_SKUS: dict[str, ProductSku] = {item.sku.id.lower(): item.sku for item in CATALOG.values()}


def catalog_item(offer_id_or_catalog_item_id: str) -> CatalogItem | None:
    """The catalog entry for a legacy offer GUID or NCE catalog item id (case-insensitive), or None."""
    return CATALOG.get(offer_id_or_catalog_item_id.strip().lower())


def sku_for_offer(offer_id_or_catalog_item_id: str) -> ProductSku | None:
    """The product SKU granted by an offer / catalog item (case-insensitive), or None if unknown."""
    item = catalog_item(offer_id_or_catalog_item_id)
    return item.sku if item else None


def retired_offer_by_name(name: str) -> CatalogItem | None:
    for item in RETIRED_OFFERS:
        if item.name == name:
            return item
    return None


def product_mapping() -> dict[str, Any]:
    """A JSON-able description of the sandbox catalog (retired offers, replacements, SKUs)."""
    return {
        "retiredOffers": [
            {"offerId": i.id, "name": i.name, "family": i.family, "channel": i.channel, "audience": i.audience,
             "productSku": i.sku.to_json()}
            for i in RETIRED_OFFERS
        ],
        "replacements": {
            fam: {
                aud: {
                    "nceCatalogItemId": DEMO_REPLACEMENT_OFFERS[fam][aud],
                    "legacyOfferId": LEGACY_REPLACEMENT_OFFERS[fam][aud],
                    "productSku": REPLACEMENT_SKUS[(fam, aud)].to_json(),
                }
                for aud in AUDIENCES
            }
            for fam in FAMILIES
        },
        "otherProducts": [{"offerId": i.id, "name": i.name, "productSku": i.sku.to_json()} for i in OTHER_PRODUCTS],
    }
