"""The new-commerce catalog routes: products, SKUs and availabilities by country, in the documented shapes.

Learn (partner-center/developer/…): ``get-a-list-of-products`` (``GET /v1/products?country=&targetView=
[&targetSegment=]``; new-commerce products have ``productType.id`` ``OnlineServicesNCE``; 403 ``400036`` for a
target view that is not allowed), ``get-a-product-by-id`` (404 ``400013``), ``get-a-list-of-skus-for-a-product``,
``get-a-sku-by-id`` (404 ``400018``), ``get-a-list-of-availabilities-for-a-sku`` and ``get-an-availability-by-id``
(404 ``400019``), ``product-resources`` (Product, Sku, Availability with ``catalogItemId``, ``segment``, ``terms``
[``duration``, ``billingCycle``, ``cancellationPolicies``], ``defaultCurrency``). None of them carries a price:
partner prices are in the price sheet API (``get-a-price-sheet``), served by ``_prices``.

Products come from the sandbox catalog (``_catalog``): every new-commerce catalog item ``productId:skuId:
availabilityId``. Government availabilities exist only in the US; ``country`` is required (400 without it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ._catalog import CATALOG, CatalogItem
from ._state import SEGMENT_ORDER, ApiError, SandboxState, link, segment_of

JSON_CT = "application/json; charset=utf-8"
TARGET_VIEWS = ("Azure", "AzureReservations", "AzureReservationsVM", "AzureReservationsSQL",
                "AzureReservationsCosmosDb", "MicrosoftAzure", "OnlineServices", "Software", "SoftwareSUSELinux",
                "SoftwarePerpetual", "SoftwareSubscriptions")
SEGMENTS = ("commercial", "education", "government", "nonprofit")
_CURRENCY = {"US": ("USD", "$"), "GB": ("GBP", "£"), "CA": ("CAD", "$"), "AU": ("AUD", "$"), "JP": ("JPY", "¥")}
_EURO = {"DE", "FR", "NL", "IT", "ES", "BE", "AT", "IE", "FI", "PT"}


def _json(status: int, obj: Any) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type=JSON_CT)


def _collection(items: list[dict[str, Any]], self_uri: str) -> dict[str, Any]:
    return {"totalCount": len(items), "items": items, "links": {"self": link(self_uri)},
            "attributes": {"objectType": "Collection"}}


def _country(request: Request) -> str:
    q = {k.lower(): v for k, v in request.query_params.items()}
    country = (q.get("country") or "").strip().upper()
    if not re.fullmatch(r"[A-Z]{2}", country):
        raise ApiError(400, 800002, "Invalid request input: country is required (a two-letter country code).")
    return country


def _segment(request: Request) -> str | None:
    q = {k.lower(): v for k, v in request.query_params.items()}
    raw = q.get("targetsegment")
    if raw is None or not raw.strip():
        return None
    segment = raw.strip().lower()
    if segment not in SEGMENTS:
        raise ApiError(400, 800002, f"Invalid request input: targetSegment {raw!r} is not supported.")
    return segment


def _nce_items() -> list[tuple[str, str, str, CatalogItem]]:
    out = []
    for item in CATALOG.values():
        if item.kind == "nce" and item.purchasable:
            product_id, sku_id, availability_id = item.id.split(":")
            out.append((product_id, sku_id, availability_id, item))
    return sorted(out, key=lambda t: (t[0], t[1]))


def _segment_of(item: CatalogItem) -> str:
    return segment_of(item)


def _sold_in(item: CatalogItem, country: str) -> bool:
    return _segment_of(item) != "government" or country == "US"


def _product_title(product_id: str) -> str:
    items = [i for p, _, _, i in _nce_items() if p == product_id]
    commercial = [i for i in items if i.audience in (None, "commercial")]
    return (commercial or items)[0].sku.name


def _product_json(product_id: str, country: str) -> dict[str, Any]:
    return {
        "id": product_id,
        "title": _product_title(product_id),
        "description": f"{_product_title(product_id)} (sandbox catalog)",
        "productType": {"id": "OnlineServicesNCE", "displayName": "OnlineServicesNCE"},
        "isMicrosoftProduct": True,
        "publisherName": "Microsoft Corporation",
        "links": {"skus": link(f"/products/{product_id}/skus?country={country}"),
                  "self": link(f"/products/{product_id}?country={country}")},
    }


def _sku_json(product_id: str, sku_id: str, item: CatalogItem, country: str) -> dict[str, Any]:
    return {
        "id": sku_id,
        "productId": product_id,
        "title": item.sku.name,
        "description": item.sku.name,
        "minimumQuantity": 1,
        "maximumQuantity": 10000,
        "isTrial": False,
        "supportedBillingCycles": ["annual", "monthly"],
        "purchasePrerequisites": ["MicrosoftCustomerAgreement"],
        "inventoryVariables": [],
        "provisioningVariables": [],
        "actions": ["Refund"],
        "dynamicAttributes": {"isMicrosoftProduct": True, "hasConstraints": False, "isAddon": False,
                              "prerequisiteSkus": [], "upgradeTargetOffers": [], "provisioningId": item.sku.id},
        "links": {"availabilities": link(f"/products/{product_id}/skus/{sku_id}/availabilities?country={country}"),
                  "self": link(f"/products/{product_id}/skus/{sku_id}?country={country}")},
    }


def _terms(item: CatalogItem) -> list[dict[str, Any]]:
    cancellation = [{"refundOptions": [{"sequenceId": 0, "type": "Full", "expiresAfter": "P1D"},
                                       {"sequenceId": 1, "type": "Partial", "expiresAfter": "P7D"}]}]
    terms = [("P1Y", "Annual", "One-Year commitment for monthly/yearly billing"),
             ("P1Y", "Monthly", "One-Year commitment for monthly/yearly billing"),
             ("P1M", "Monthly", "One-Month commitment for monthly billing")]
    return [{"id": f"{item.id.split(':')[2].lower()}{i}", "duration": d, "description": text, "billingCycle": b,
             "cancellationPolicies": cancellation} for i, (d, b, text) in enumerate(terms)]


def _availability_json(product_id: str, sku_id: str, availability_id: str, item: CatalogItem,
                       country: str, segment: str | None = None) -> dict[str, Any]:
    code, symbol = _CURRENCY.get(country, ("EUR", "€") if country in _EURO else ("USD", "$"))
    return {
        "id": availability_id,
        "productId": product_id,
        "skuId": sku_id,
        "catalogItemId": f"{product_id}:{sku_id}:{availability_id}",
        "defaultCurrency": {"code": code, "symbol": symbol},
        "segment": segment or _segment_of(item),
        "country": country,
        "isPurchasable": True,
        "isRenewable": True,
        "renewalInstructions": [{"applicableTermIds": [t["id"] for t in _terms(item)],
                                 "renewalOptions": [{"renewToId": f"{product_id}:{sku_id}", "isAutoRenewable": True}]}],
        "terms": _terms(item),
        "links": {"self": link(f"/products/{product_id}/skus/{sku_id}/availabilities/{availability_id}"
                               f"?country={country}")},
    }


def _find(product_id: str, sku_id: str | None = None, availability_id: str | None = None
          ) -> list[tuple[str, str, str, CatalogItem]]:
    rows = [r for r in _nce_items() if r[0].lower() == product_id.lower()]
    if not rows:
        raise ApiError(404, 400013, f"Product {product_id} not found.")
    if sku_id is not None:
        rows = [r for r in rows if r[1].lower() == sku_id.lower()]
        if not rows:
            raise ApiError(404, 400018, f"Sku {sku_id} of product {product_id} not found.")
    if availability_id is not None:
        rows = [r for r in rows if r[2].lower() == availability_id.lower()]
        if not rows:
            raise ApiError(404, 400019, f"Availability {availability_id} not found.")
    return rows


def product_routes(state: SandboxState) -> list[Route]:
    """Routes for ``/v1/products…`` (add them to the partner router). Availability ids are the *current* ones
    (``state.availability_id``): with rotation on, they differ from the ids the catalog started with."""

    def api(fn: Callable[[Request], dict[str, Any]]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return _json(200, fn(request))
            except ApiError as err:
                return _json(err.status, err.body())
        return endpoint

    def p(request: Request, name: str) -> str:
        return str(request.path_params[name])

    def products(request: Request) -> dict[str, Any]:
        country = _country(request)
        q = {k.lower(): v for k, v in request.query_params.items()}
        view = q.get("targetview")
        if not view:
            raise ApiError(400, 800002, "Invalid request input: targetView is required.")
        if view.lower() not in {v.lower() for v in TARGET_VIEWS}:
            raise ApiError(403, 400036, "Access to the requested targetView is not allowed.")
        segment = _segment(request)
        ids: list[str] = []
        if view.lower() == "onlineservices":
            for product_id, _, _, item in _nce_items():
                if product_id not in ids and _sold_in(item, country) and (segment is None
                                                                          or _segment_of(item) == segment):
                    ids.append(product_id)
        uri = f"/products?country={country}&targetView={view}" + (f"&targetSegment={segment}" if segment else "")
        return _collection([_product_json(pid, country) for pid in ids], uri)

    def product(request: Request) -> dict[str, Any]:
        country = _country(request)
        product_id = _find(p(request, "pid"))[0][0]
        return _product_json(product_id, country)

    def skus(request: Request) -> dict[str, Any]:
        country = _country(request)
        segment = _segment(request)
        rows = _find(p(request, "pid"))
        items = [_sku_json(pid, sid, item, country) for pid, sid, _, item in rows
                 if _sold_in(item, country) and (segment is None or _segment_of(item) == segment)]
        return _collection(items, f"/products/{rows[0][0]}/skus?country={country}")

    def sku(request: Request) -> dict[str, Any]:
        country = _country(request)
        pid, sid, _, item = _find(p(request, "pid"), p(request, "sku"))[0]
        return _sku_json(pid, sid, item, country)

    def offered(row: tuple[str, str, str, CatalogItem], country: str, wanted: str | None
                ) -> list[tuple[str, str]]:
        """(segment, availability id) of one SKU in ``country``: its own segment's, plus — with
        ``availabilities_in_all_segments`` — the others' in :data:`SEGMENT_ORDER`; nonprofit only when asked for
        ("all segments except nonprofit will be returned if not included"), government only in the US."""
        pid, sid, aid, item = row
        ids = state.segment_availability_ids(pid, sid, aid, _segment_of(item))
        return [(segment, ids[segment]) for segment in SEGMENT_ORDER if segment in ids
                and (segment != "government" or country == "US")
                and (segment == wanted if wanted is not None else segment != "nonprofit")]

    def availabilities(request: Request) -> dict[str, Any]:
        country = _country(request)
        segment = _segment(request)
        rows = _find(p(request, "pid"), p(request, "sku"))
        items = [_availability_json(pid, sid, aid, item, country, seg)
                 for pid, sid, base, item in rows for seg, aid in offered((pid, sid, base, item), country, segment)]
        if len(items) == 1 and state.config.availabilities_bare_object:
            # get-a-list-of-availabilities-for-a-sku's new-commerce example answers the Availability itself.
            return items[0]
        return _collection(items, f"/products/{rows[0][0]}/skus/{rows[0][1]}/availabilities?country={country}")

    def availability(request: Request) -> dict[str, Any]:
        country = _country(request)
        wanted = p(request, "aid")
        for row in _find(p(request, "pid"), p(request, "sku")):
            for seg, aid in offered(row, country, None) + offered(row, country, "nonprofit"):
                if aid.lower() == wanted.lower():
                    return _availability_json(row[0], row[1], aid, row[3], country, seg)
        raise ApiError(404, 400019, f"Availability {wanted} not found.")

    base = "/v1/products"
    return [
        Route(base, api(products), methods=["GET"]),
        Route(f"{base}/{{pid}}", api(product), methods=["GET"]),
        Route(f"{base}/{{pid}}/skus", api(skus), methods=["GET"]),
        Route(f"{base}/{{pid}}/skus/{{sku}}", api(sku), methods=["GET"]),
        Route(f"{base}/{{pid}}/skus/{{sku}}/availabilities", api(availabilities), methods=["GET"]),
        Route(f"{base}/{{pid}}/skus/{{sku}}/availabilities/{{aid}}", api(availability), methods=["GET"]),
    ]
