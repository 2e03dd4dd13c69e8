"""``offers`` (issue 11 item 2) through the real CLI against the sandbox's catalog routes (products → SKUs →
availabilities, in the documented shapes); and those routes themselves."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from d365_migration._settings import ReplacementOffers
from d365_migration.cli import main
from d365_tooling.sandbox import DEMO_REPLACEMENT_OFFERS, SandboxServer


@pytest.fixture
def env(sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SandboxServer:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PARTNER_CENTER_ENDPOINT", sandbox.url)
    monkeypatch.setenv("PARTNER_CENTER_AUTH", "none")
    monkeypatch.delenv("REPLACEMENT_TERM_DURATION", raising=False)
    monkeypatch.delenv("REPLACEMENT_BILLING_CYCLE", raising=False)
    return sandbox


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_offers_lists_the_replacements_for_every_family_and_audience(env: SandboxServer) -> None:
    code, text = cli("offers", "--country", "US", "--json")
    assert code == 0
    doc = json.loads(text)
    assert doc["country"] == "US" and doc["missing"] == []
    assert doc["prices"].startswith("not available")
    groups = {(g["family"], g["audience"]): g for g in doc["replacements"]}
    assert set(groups) == {(f, a) for f in DEMO_REPLACEMENT_OFFERS for a in DEMO_REPLACEMENT_OFFERS[f]}
    for (family, audience), group in groups.items():
        assert group["retiredOffers"] and all("Qualified Offer" in n for n in group["retiredOffers"])
        best = group["candidates"][0]
        # the sandbox's replacement for this family and audience, found through the catalog
        assert best["catalogItemId"] == DEMO_REPLACEMENT_OFFERS[family][audience]
        assert best["replacementOfferId"] == ":".join(best["catalogItemId"].split(":")[:2])
        assert best["segment"] == {"commercial": "commercial", "government": "government"}.get(audience, "education")
        assert best["prices"] is None and best["currency"] == "USD"
        assert {"duration": "P1Y", "billingCycle": "monthly"} in best["terms"] and best["offersConfiguredTerm"]
    # Sales Enterprise is a second choice for commercial sales; unrelated products never appear
    sales_titles = [c["productTitle"] for c in groups[("sales", "commercial")]["candidates"]]
    assert sales_titles[0] == "Dynamics 365 Sales Professional" and "Sales Enterprise" in sales_titles[1]
    every_title = {c["productTitle"] for g in doc["replacements"] for c in g["candidates"]}
    assert not any("Microsoft 365" in t or "Exchange" in t for t in every_title)
    assert doc["azd"].startswith("azd env set REPLACEMENT_OFFERS '") and doc["replacementOffers"]["sales"]


def test_json_for_azd_is_exactly_the_setting_value(env: SandboxServer) -> None:
    code, text = cli("offers", "--country", "us", "--json-for-azd", "--id-format", "catalog-item")
    assert code == 0 and text.count("\n") == 1
    parsed = ReplacementOffers.parse(text.strip())  # what the app setting accepts
    assert parsed.mapping == DEMO_REPLACEMENT_OFFERS
    code, text = cli("offers", "--country", "US", "--json-for-azd")
    value = json.loads(text)
    assert value["sales"]["commercial"] == ":".join(DEMO_REPLACEMENT_OFFERS["sales"]["commercial"].split(":")[:2])


def test_offers_is_read_only(env: SandboxServer) -> None:
    assert cli("offers", "--country", "US")[0] == 0
    requests = env.state.requests()
    assert requests and {r["method"] for r in requests} == {"GET"}
    assert all(r["path"].startswith("/v1/products") for r in requests)
    assert env.state.purchases() == [] and env.state.patches() == []


def test_table_output_names_ids_prices_and_the_azd_command(env: SandboxServer) -> None:
    code, text = cli("offers", "--country", "US")
    assert code == 0
    assert "CFQ7TTC0SB4X:0001" in text and "Prices: not available" in text
    assert "azd env set REPLACEMENT_OFFERS '{" in text


def test_a_country_without_government_pricing_says_what_is_missing(
        env: SandboxServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = cli("offers", "--country", "DE", "--json-for-azd")
    assert code == 0
    value = json.loads(text)
    assert "government" not in value["sales"] and "commercial" in value["sales"]
    err = capsys.readouterr().err
    assert "no replacement found in DE for sales.government" in err


def test_bad_country_is_a_clear_error(env: SandboxServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = cli("offers", "--country", "USA")
    assert code == 2 and "--country" in capsys.readouterr().err
    assert env.state.requests() == []


def get(server: SandboxServer, path: str) -> httpx.Response:
    return httpx.get(server.url + path, timeout=10)


def test_sandbox_catalog_routes_follow_the_documented_shapes(sandbox: SandboxServer) -> None:
    products = get(sandbox, "/v1/products?Country=us&TargetView=onlineservices")  # query names case-insensitive
    assert products.status_code == 200
    body: dict[str, Any] = products.json()
    assert body["attributes"]["objectType"] == "Collection" and body["totalCount"] == len(body["items"])
    product = next(p for p in body["items"] if p["id"] == "CFQ7TTC0SB4X")
    assert product["productType"] == {"id": "OnlineServicesNCE", "displayName": "OnlineServicesNCE"}
    assert product["links"]["skus"]["uri"] == "/products/CFQ7TTC0SB4X/skus?country=US"
    skus = get(sandbox, "/v1/products/CFQ7TTC0SB4X/skus?country=US").json()["items"]
    sku = next(s for s in skus if s["id"] == "0002")
    assert sku["productId"] == "CFQ7TTC0SB4X" and "Faculty" in sku["title"]
    assert {"minimumQuantity", "maximumQuantity", "supportedBillingCycles", "purchasePrerequisites",
            "dynamicAttributes", "links"} <= set(sku)
    avail = get(sandbox, "/v1/products/CFQ7TTC0SB4X/skus/0002/availabilities?country=US").json()["items"]
    assert [a["catalogItemId"] for a in avail] == [DEMO_REPLACEMENT_OFFERS["sales"]["faculty"]]
    assert avail[0]["segment"] == "education" and avail[0]["defaultCurrency"]["code"] == "USD"
    assert {"duration", "billingCycle", "cancellationPolicies"} <= set(avail[0]["terms"][0])
    assert "price" not in json.dumps(avail[0]).lower()  # the catalog carries no prices
    one = get(sandbox, f"/v1/products/CFQ7TTC0SB4X/skus/0002/availabilities/{avail[0]['id']}?country=US")
    assert one.status_code == 200 and one.json()["id"] == avail[0]["id"]
    # segment filter and country rules
    edu = get(sandbox, "/v1/products?country=US&targetView=OnlineServices&targetSegment=education").json()
    assert {p["id"] for p in edu["items"]} == {"CFQ7TTC0SB4X", "CFQ7TTC0CE7P"}
    de = get(sandbox, "/v1/products/CFQ7TTC0SB4X/skus/0004/availabilities?country=DE").json()
    assert de["items"] == []  # government pricing: US only
    assert get(sandbox, "/v1/products/CFQ7TTC0SB4X/skus/0001/availabilities?country=DE").json()["items"][0][
        "defaultCurrency"]["code"] == "EUR"


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/v1/products?targetView=OnlineServices", 400, 800002),
    ("/v1/products?country=US", 400, 800002),
    ("/v1/products?country=US&targetView=Nonsense", 403, 400036),
    ("/v1/products/NOPE?country=US", 404, 400013),
    ("/v1/products/CFQ7TTC0SB4X/skus/9999?country=US", 404, 400018),
    ("/v1/products/CFQ7TTC0SB4X/skus/0001/availabilities/NOPE?country=US", 404, 400019),
])
def test_sandbox_catalog_errors(sandbox: SandboxServer, path: str, status: int, code: int) -> None:
    response = get(sandbox, path)
    assert response.status_code == status
    assert response.json()["code"] == code
