"""The retired-offer catalog: complete, classified, matched by id or normalized name, extensible as data."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from d365_migration import ConfigurationError, RetiredOfferCatalog, normalize_offer_name

RUNBOOK_NAMES_COUNT = 26


def test_catalog_holds_every_offer_of_the_runbook() -> None:
    catalog = RetiredOfferCatalog.load()
    assert len(catalog) == RUNBOOK_NAMES_COUNT
    editions = [o for o in catalog if o.channel is not None]
    assert len(editions) == 24
    combos = {(o.family, o.channel, o.audience) for o in editions}
    assert len(combos) == 24  # 2 families x 3 channels x 4 audiences, each exactly once
    umbrella = [o for o in catalog if o.channel is None]
    assert {o.family for o in umbrella} == {"sales", "customer_engagement"}


@pytest.mark.parametrize("name,family,channel,audience", [
    ("Dynamics 365 for Sales Enterprise Edition (Government Pricing) Add-On for CRM Basic (Qualified Offer)",
     "sales", "Add-On", "government"),
    ("Dynamics 365 Customer Engagement Plan Enterprise Edition From SA for CRM Basic (Qualified Offer) for Students",
     "customer_engagement", "From SA", "students"),
    ("Dynamics 365 for Sales Enterprise Edition CRMOL Basic (Qualified Offer) for Faculty",
     "sales", "CRMOL Basic", "faculty"),
])
def test_classification(name: str, family: str, channel: str, audience: str) -> None:
    offer = RetiredOfferCatalog.load().match(None, name)
    assert offer is not None
    assert (offer.family, offer.channel, offer.audience) == (family, channel, audience)


def test_name_match_is_normalized_but_not_fuzzy() -> None:
    catalog = RetiredOfferCatalog.load()
    assert catalog.match(None, "  dynamics 365 FOR sales enterprise edition crmol basic  (qualified offer) ")
    assert catalog.match(None, "Dynamics 365 for Sales Professional") is None
    # "for Faculty" must not match the commercial edition
    faculty = catalog.match(None, "Dynamics 365 for Sales Enterprise Edition CRMOL Basic (Qualified Offer) for Faculty")
    assert faculty is not None and faculty.audience == "faculty"


def test_match_by_offer_id_first_case_insensitive() -> None:
    extra = json.dumps([{"name": "Some Retired Thing", "family": "sales", "audience": "commercial",
                         "offerIds": ["ABCDEF01-2345-6789-ABCD-EF0123456789"]}])
    catalog = RetiredOfferCatalog.load(extra)
    assert len(catalog) == RUNBOOK_NAMES_COUNT + 1
    found = catalog.match("abcdef01-2345-6789-abcd-ef0123456789", "a different display name")
    assert found is not None and found.name == "Some Retired Thing"


@pytest.mark.parametrize("extra", [
    "{broken", '[{"family": "sales"}]', '[{"name": "x", "family": "marketing"}]',
    '[{"name": "x", "family": "sales", "audience": "nonprofit"}]',
    '[{"name": "x", "family": "sales", "offerIds": ["not-a-guid"]}]', '"just a string"',
])
def test_malformed_extra_catalog_names_the_setting(extra: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetiredOfferCatalog.load(extra)
    assert info.value.setting == "RETIRED_OFFERS_EXTRA"


@given(st.text(max_size=200))
def test_normalize_is_idempotent_and_plain(text: str) -> None:
    once = normalize_offer_name(text)
    assert normalize_offer_name(once) == once
    assert re.fullmatch(r"[a-z0-9 ]*", once)


@given(st.sampled_from([o.name for o in RetiredOfferCatalog.load()]),
       st.lists(st.sampled_from(["upper", "lower", "spaces", "punct"]), max_size=3))
def test_every_catalog_name_survives_cosmetic_changes(name: str, changes: list[str]) -> None:
    catalog = RetiredOfferCatalog.load()
    varied = name
    for change in changes:
        varied = {"upper": varied.upper(), "lower": varied.lower(), "spaces": varied.replace(" ", "   "),
                  "punct": varied.replace("(", " ( ").replace(")", " ) ")}[change]
    found = catalog.match(None, varied)
    assert found is not None and found.name == name


@given(st.text(max_size=120), st.one_of(st.none(), st.text(max_size=40)))
def test_matcher_never_crashes(name: str, offer_id: str | None) -> None:
    RetiredOfferCatalog.load().match(offer_id, name)
