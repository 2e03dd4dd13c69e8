"""Partner prices and ``plan``'s cost (issue 11 item 2): the price sheet as Learn documents it (``get-a-price-sheet``,
``pricing-and-offers``), parsed by column name, against the sandbox's price sheet over real HTTP, and through the real
CLI."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from d365_migration._pricing import CostEstimator, PriceSheet, PriceSheetClient, PriceSheetUnavailable, billing_periods
from d365_migration._settings import ReplacementTarget
from d365_migration.cli import main
from d365_tooling.sandbox import (
    DEMO_REPLACEMENT_OFFERS,
    LEGACY_REPLACEMENT_OFFERS,
    SandboxConfig,
    SandboxServer,
    SandboxState,
    seed_world,
)
from d365_tooling.sandbox._faults import make_token
from d365_tooling.sandbox._prices import unit_price
from tests.steps._world import env_for

# The documented example (get-a-price-sheet) as the page prints it, the typographic quote closing the header too.
DOC_EXAMPLE = (
    '"ProductTitle","ProductId","SkuId","SkuTitle","Publisher","SkuDescription","UnitOfMeasure","TermDuration",'
    '"BillingPlan","Market","Currency","UnitPrice","PricingTierRangeMin","PricingTierRangeMax","EffectiveStartDate",'
    '"EffectiveEndDate","Tags","ERP Price“\n'
    '"Advanced Communications","CFQ7TTC0HDK0","0001","Advanced Communications","Microsoft Corporation","Advanced '
    'meetings, calling, workflow integration, and management tools for IT.","","P1Y","Annual","US","USD","115.2","",'
    '"","2/1/2019 12:00:00 AM","2/4/2021 8:35:31 PM","License","144"\n')
IN_2020 = datetime(2020, 6, 1, tzinfo=UTC)
SALES = DEMO_REPLACEMENT_OFFERS["sales"]["commercial"]


def test_the_documented_example_row_prices_a_term() -> None:
    sheet = PriceSheet.parse("US", DOC_EXAMPLE.encode())
    price = sheet.price("CFQ7TTC0HDK0", "0001", term_duration="P1Y", billing_cycle="annual", quantity=10, at=IN_2020)
    assert not isinstance(price, str), price
    assert price.unit_price == Decimal("115.2") and price.erp_price == Decimal("144") and price.currency == "USD"
    assert price.term_cost(10) == Decimal("1152.0") and price.per_bill(10) == Decimal("1152.0")
    # outside its effective range (it ended on 2/4/2021), the row prices nothing
    later = sheet.price("CFQ7TTC0HDK0", "0001", term_duration="P1Y", billing_cycle="annual", quantity=10,
                        at=datetime(2022, 1, 1, tzinfo=UTC))
    assert isinstance(later, str) and "no price in effect" in later
    monthly = sheet.price("CFQ7TTC0HDK0", "0001", term_duration="P1Y", billing_cycle="monthly", quantity=1,
                          at=IN_2020)
    assert isinstance(monthly, str) and "P1Y Annual" in monthly


def test_columns_are_read_by_name_in_any_order_with_extra_columns_zip_and_bom() -> None:
    rows = [{"Segment": "Commercial", "ERP Price": "60", "UnitPrice": "48", "Currency": "USD", "Market": "US",
             "BillingPlan": "Monthly", "TermDuration": "P1Y", "SkuId": "1", "ProductId": "CFQ7TTC0LH18",
             "EffectiveStartDate": "2021-10-01T00:00:00.0000000Z", "EffectiveEndDate": "11/30/9999 23:59",
             "ProductTitle": "Microsoft 365 Business Basic", "EndofSaleDate": ""}]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("sheets.csv", "\ufeff" + buffer.getvalue())
    sheet = PriceSheet.parse("US", archive.getvalue())
    price = sheet.price("cfq7ttc0lh18", "0001", term_duration="p1y", billing_cycle="monthly", quantity=3,
                        at=datetime(2026, 1, 1, tzinfo=UTC))
    assert not isinstance(price, str), price
    assert price.term_cost(3) == Decimal("144") and price.per_bill(3) == Decimal("12")  # billed a twelfth a month


def test_overlapping_rows_take_the_latest_start_and_tiers_bound_the_quantity() -> None:
    header = "ProductId,SkuId,TermDuration,BillingPlan,Currency,UnitPrice,PricingTierRangeMin,PricingTierRangeMax," \
             "EffectiveStartDate,EffectiveEndDate\n"
    body = header + (
        "CFQ7TTC0HD7P,0001,P1Y,Annual,USD,100,,,2021-10-01T00:00:00.0000000Z,9999-11-30T23:59:59.0000000Z\n"
        "CFQ7TTC0HD7P,0001,P1Y,Annual,USD,110,,,2021-11-01T00:00:00.0000000Z,9999-11-30T23:59:59.0000000Z\n"
        "CFQ7TTC0AAAA,0001,P1Y,Annual,USD,10,1,100,1/1/2020 0:00,\n"
        "CFQ7TTC0AAAA,0001,P1Y,Annual,USD,8,101,1000,1/1/2020 0:00,\n")
    sheet = PriceSheet.parse("US", body.encode())
    at = datetime(2022, 1, 1, tzinfo=UTC)
    latest = sheet.price("CFQ7TTC0HD7P", "0001", term_duration="P1Y", billing_cycle="annual", quantity=1, at=at)
    assert not isinstance(latest, str) and latest.unit_price == Decimal("110")
    small = sheet.price("CFQ7TTC0AAAA", "0001", term_duration="P1Y", billing_cycle="annual", quantity=50, at=at)
    large = sheet.price("CFQ7TTC0AAAA", "0001", term_duration="P1Y", billing_cycle="annual", quantity=500, at=at)
    assert not isinstance(small, str) and not isinstance(large, str)
    assert (small.unit_price, large.unit_price) == (Decimal("10"), Decimal("8"))


def test_several_currencies_in_one_market_price_nothing_until_one_is_chosen() -> None:
    body = ("ProductId,SkuId,TermDuration,BillingPlan,Currency,UnitPrice\n"
            "CFQ7TTC0LH18,0001,P1Y,Monthly,EUR,40\nCFQ7TTC0LH18,0001,P1Y,Monthly,GBP,35\n")
    sheet = PriceSheet.parse("DE", body.encode())
    kwargs: dict[str, Any] = {"term_duration": "P1Y", "billing_cycle": "monthly", "quantity": 2,
                              "at": datetime(2026, 1, 1, tzinfo=UTC)}
    ambiguous = sheet.price("CFQ7TTC0LH18", "0001", **kwargs)
    assert isinstance(ambiguous, str) and "EUR, GBP" in ambiguous and "--currency" in ambiguous
    chosen = sheet.price("CFQ7TTC0LH18", "0001", currency="gbp", **kwargs)
    assert not isinstance(chosen, str) and chosen.term_cost(2) == Decimal("70")
    us = PriceSheet.parse("US", b"ProductId,SkuId,TermDuration,BillingPlan,Currency,UnitPrice\n"
                                b"CFQ7TTC0LH18,0001,P1Y,Monthly,USD,50\n")
    only = us.price("CFQ7TTC0LH18", "0001", currency="EUR", **kwargs)  # one currency in the market: that one
    assert not isinstance(only, str) and only.currency == "USD"


@pytest.mark.parametrize("data", [b"", b"not,a,price,sheet\n1,2,3,4\n", b"PK\x03\x04broken"])
def test_something_that_is_not_a_price_sheet_is_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(PriceSheetUnavailable) as caught:
        PriceSheet.parse("US", data)
    assert caught.value.reason


@given(st.binary(max_size=400))
def test_any_bytes_parse_to_a_sheet_or_a_reason(data: bytes) -> None:
    try:
        sheet = PriceSheet.parse("US", data)
    except PriceSheetUnavailable as exc:
        assert exc.reason
    else:
        assert len(sheet) >= 0


def test_billing_periods_follow_the_term() -> None:
    assert billing_periods("P1Y", "Monthly") == 12 and billing_periods("P1Y", "annual") == 1
    assert billing_periods("P3Y", "Annual") == 3 and billing_periods("P1M", "monthly") == 1
    assert billing_periods("P1M", "Annual") is None and billing_periods("bogus", "Monthly") is None


# ---------------------------------------------------------------------------------------------------- over HTTP


async def test_the_sandbox_sheet_downloads_compressed_and_prices_the_replacement() -> None:
    with SandboxServer(SandboxState()) as server:
        async with PriceSheetClient(server.url) as prices:
            sheet = await prices.sheet("us")
            again = await prices.sheet("US")
    assert again is sheet  # one download per market
    requests = [r for r in server.state.requests() if "pricesheets" in r["path"].lower()]
    assert len(requests) == 1
    product, sku, _ = SALES.split(":")
    price = sheet.price(product, sku, term_duration="P1Y", billing_cycle="monthly", quantity=7,
                        at=datetime.now(UTC))
    assert not isinstance(price, str), price
    assert price.unit_price == unit_price(SALES, "P1Y", "Monthly")  # the row in effect, not the superseded one
    assert price.term_cost(7) == unit_price(SALES, "P1Y", "Monthly") * 7


async def test_a_partner_center_token_is_refused_and_the_reason_says_which_resource() -> None:
    config = SandboxConfig(require_auth=True)

    class Token:
        def __init__(self, audience: str) -> None:
            self.audience = audience

        async def get_token(self, *, force_refresh: bool = False) -> str:
            token = make_token()
            if self.audience == "partnercenter":
                return token
            import base64

            head, payload, sig = token.split(".")
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            claims["aud"] = "https://api.partner.microsoft.com"
            encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
            return f"{head}.{encoded}.{sig}"

    with SandboxServer(SandboxState(), config) as server:
        async with PriceSheetClient(server.url, Token("partnercenter")) as prices:
            with pytest.raises(PriceSheetUnavailable) as refused:
                await prices.sheet("US")
        async with PriceSheetClient(server.url, Token("partnerapi")) as prices:
            sheet = await prices.sheet("US")
    assert refused.value.status == 401 and "api.partner.microsoft.com" in refused.value.reason
    assert len(sheet) > 0


async def test_a_token_that_cannot_be_had_is_a_reason_not_a_crash() -> None:
    from d365_migration import AuthenticationError

    class NoToken:
        async def get_token(self, *, force_refresh: bool = False) -> str:
            raise AuthenticationError("the refresh token was revoked; run `python -m d365_migration login`")

    with SandboxServer(SandboxState()) as server:
        async with PriceSheetClient(server.url, NoToken()) as prices:
            costs = CostEstimator(prices, term_duration="P1Y", billing_cycle="monthly")
            estimate = await costs.estimate("US", ReplacementTarget.parse(SALES), 4)
    assert estimate.amount is None and "no token for the price sheet" in estimate.note and "login" in estimate.note
    assert costs.unpriced == 1 and not [r for r in server.state.requests() if "pricesheets" in r["path"].lower()]


async def test_the_estimator_totals_per_currency_and_names_what_it_could_not_price() -> None:
    with SandboxServer(SandboxState()) as server:
        async with PriceSheetClient(server.url) as prices:
            costs = CostEstimator(prices, term_duration="P1Y", billing_cycle="monthly")
            us = await costs.estimate("US", ReplacementTarget.parse(SALES), 4)
            gb = await costs.estimate("GB", ReplacementTarget.parse(SALES), 2)
            legacy = await costs.estimate("US", ReplacementTarget.parse(LEGACY_REPLACEMENT_OFFERS["sales"]
                                                                        ["commercial"]), 4)
    assert us.amount == unit_price(SALES, "P1Y", "Monthly") * 4 and us.currency == "USD"
    assert gb.amount is None and "choose one with --currency" in gb.note  # six European currencies
    assert legacy.amount is None and "no price API for legacy offers" in legacy.note
    assert costs.totals == {"USD": us.amount} and (costs.priced, costs.unpriced) == (1, 2)
    assert "1 migration(s) priced" in costs.summary() and "2 without a price" in costs.summary()


# ---------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def seeded(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[tuple[SandboxServer, Any]]:
    monkeypatch.chdir(tmp_path)
    state = SandboxState()
    manifest = seed_world(state, customers=6, seed=5)
    with SandboxServer(state, SandboxConfig()) as server:
        for k, v in env_for(server.url, storage).items():
            monkeypatch.setenv(k, v)
        yield server, manifest


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_plan_shows_the_cost_per_migration_and_in_total(seeded: Any) -> None:
    server, manifest = seeded
    with_work = sorted({em.customer_id.lower() for em in manifest.expected})
    german = with_work[0]
    server.state._customer(german).country = "DE"  # a European market: its sheet lists six currencies
    code, text = cli("plan", "--json", "--currency", "EUR")
    plan = json.loads(text)
    assert code == 0, text
    totals: dict[str, Decimal] = {}
    for m in plan["migrations"]:
        cost = m["cost"]
        currency = "EUR" if m["customerId"] == german else "USD"
        expected = unit_price(m["replacement"], "P1Y", "Monthly", currency) * m["quantityToBuy"]
        assert Decimal(cost["amount"]) == expected and cost["currency"] == currency, (m, cost)
        assert Decimal(cost["perBill"]) == expected / 12
        totals[currency] = totals.get(currency, Decimal(0)) + expected
    assert set(totals) == {"EUR", "USD"}
    # Nobody is in the rollout's scope yet (dry run, no allow-list): what going live would cost is shown apart.
    assert {m["action"] for m in plan["migrations"]} == {"skip: customer not in scope"}
    assert plan["cost"]["totals"] == {}
    assert plan["cost"]["outOfScopeTotals"] == {c: str(a) for c, a in sorted(totals.items())}
    assert plan["cost"]["priced"] == len(plan["migrations"])
    code, table = cli("plan", "--currency", "EUR")
    assert code == 0 and "cost (one term)" in table and "Cost: replacements for one term each" in table
    code, text = cli("plan", "--csv", "--currency", "EUR")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["subscriptionId"]: r["cost"] for r in rows} == {m["subscriptionId"]: m["cost"]["amount"]
                                                             for m in plan["migrations"]}


def test_plan_without_a_price_sheet_still_plans_and_says_why(seeded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = seeded
    server.config.price_sheet_available = False
    code, text = cli("plan", "--json")
    plan = json.loads(text)
    assert code == 0 and plan["migrations"]
    assert all("HTTP 404" in m["cost"]["unavailable"] for m in plan["migrations"])
    assert plan["cost"]["priced"] == 0
    code, text = cli("plan", "--json", "--no-prices")
    plan = json.loads(text)
    assert all(m["cost"] == {"unavailable": "prices not requested (--no-prices)"} for m in plan["migrations"])
    assert not [r for r in server.state.requests() if "pricesheets" in r["path"].lower()][1:]  # only the 404 run
    monkeypatch.setenv("REPLACEMENT_OFFERS", json.dumps(LEGACY_REPLACEMENT_OFFERS))
    server.config.price_sheet_available = True
    plan = json.loads(cli("plan", "--json")[1])
    assert {m["cost"]["unavailable"] for m in plan["migrations"]} == {
        "Partner Center has no price API for legacy offers"}


def test_a_customer_whose_profile_cannot_be_read_is_planned_without_a_price(seeded: Any) -> None:
    """The country comes from the customer's profile; a 403 there costs that customer its price, not the plan."""
    server, manifest = seeded
    locked = sorted({em.customer_id.lower() for em in manifest.expected})[0]
    server.config.profile_forbidden_customers = [locked]
    code, text = cli("plan", "--json")
    plan = json.loads(text)
    assert code == 0, text
    theirs = [m for m in plan["migrations"] if m["customerId"] == locked]
    others = [m for m in plan["migrations"] if m["customerId"] != locked]
    assert theirs and others
    assert all("country is unknown or not readable" in m["cost"]["unavailable"] for m in theirs)
    assert all("amount" in m["cost"] for m in others)
    assert plan["cost"]["unpriced"] == len(theirs) and plan["cost"]["priced"] == len(others)
    assert [r["status"] for r in server.state.requests()
            if r["method"] == "GET" and r["path"].lower().rstrip("/").endswith(f"/customers/{locked}")] == [403]
