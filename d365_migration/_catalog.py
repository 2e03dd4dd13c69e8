"""The retired-offer catalog: which offers this tool migrates, and what each one is.

The catalog is data (``retired_offers.json``): the 24 editions and the 2 umbrella offers Microsoft's runbook lists.
A partner adds other retired offers with the ``RETIRED_OFFERS_EXTRA`` app setting (a JSON list of entries of the
same shape) without touching code.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ._exceptions import ConfigurationError
from ._settings import AUDIENCES, FAMILIES, is_guid

__all__ = [
    "CHANNELS",
    "OfferMatch",
    "RetiredOffer",
    "RetiredOfferCatalog",
    "looks_like_qualified_offer",
    "normalize_offer_name",
]

CHANNELS = ("CRMOL Basic", "From SA", "Add-On")


@dataclass(frozen=True)
class RetiredOffer:
    name: str
    family: str  # sales | customer_engagement
    audience: str  # commercial | faculty | students | government
    channel: str | None = None  # CRMOL Basic | From SA | Add-On, where the name says
    offer_ids: tuple[str, ...] = ()
    sku_part_numbers: tuple[str, ...] = ()


@dataclass(frozen=True)
class OfferMatch:
    """What the catalog makes of a subscription's offer: a retired offer (``offer``), or nothing — and then whether
    it *looks* like one (``unrecognised``: a Dynamics 365 / CRM "(Qualified Offer)" name the catalog does not list),
    so detection can report it by name instead of dropping it silently."""

    offer: RetiredOffer | None
    unrecognised: bool = False
    matched_by: str | None = None  # "offer_id" | "name"


def looks_like_qualified_offer(offer_name: str | None) -> bool:
    """A Dynamics/CRM offer named "… (Qualified Offer)" — the naming of the retired offers (Microsoft's runbook
    lists 24 editions and 2 umbrella offers; Microsoft publishes no offer GUIDs for them, so ``offerIds`` stay empty
    in the packaged catalog and partners add theirs with RETIRED_OFFERS_EXTRA)."""
    text = normalize_offer_name(offer_name or "")
    return "qualified offer" in text and any(w in text.split() for w in ("dynamics", "crm", "crmol", "d365"))


def normalize_offer_name(name: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form of an offer name."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").casefold()
    text = re.sub(r"[^a-z0-9]+", " ", text)
    return " ".join(text.split())


class RetiredOfferCatalog:
    """Matches a subscription's offer to a retired offer: by offer id when known, else by normalized name."""

    def __init__(self, offers: Iterable[RetiredOffer]) -> None:
        self._offers = tuple(offers)
        self._by_id: dict[str, RetiredOffer] = {}
        self._by_name: dict[str, RetiredOffer] = {}
        for offer in self._offers:
            for offer_id in offer.offer_ids:
                self._by_id[offer_id.lower()] = offer
            self._by_name[normalize_offer_name(offer.name)] = offer

    def __iter__(self) -> Iterator[RetiredOffer]:
        return iter(self._offers)

    def __len__(self) -> int:
        return len(self._offers)

    def match(self, offer_id: str | None, offer_name: str | None) -> RetiredOffer | None:
        return self.classify(offer_id, offer_name).offer

    def classify(self, offer_id: str | None, offer_name: str | None) -> OfferMatch:
        """By offer id when known, else by normalized name; when neither matches, say whether the name looks like a
        qualified offer the catalog does not know (report it as unrecognised, with its name)."""
        if offer_id:
            found = self._by_id.get(offer_id.strip().lower())
            if found is not None:
                return OfferMatch(found, matched_by="offer_id")
        if offer_name:
            by_name = self._by_name.get(normalize_offer_name(offer_name))
            if by_name is not None:
                return OfferMatch(by_name, matched_by="name")
        return OfferMatch(None, unrecognised=looks_like_qualified_offer(offer_name))

    @classmethod
    def load(cls, extra: str | None = None) -> RetiredOfferCatalog:
        """The packaged catalog plus ``extra`` (the ``RETIRED_OFFERS_EXTRA`` JSON, if any)."""
        raw = resources.files(__package__).joinpath("retired_offers.json").read_text(encoding="utf-8")
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as exc:  # a broken package is a deployment problem; say so
            raise ConfigurationError("retired_offers.json", f"is not valid JSON ({exc.msg})",
                                     "redeploy the package") from None
        offers = [_parse_entry(e, "retired_offers.json", i) for i, e in enumerate(_entries(doc, "retired_offers.json"))]
        if extra and extra.strip():
            try:
                extra_doc = json.loads(extra)
            except json.JSONDecodeError as exc:
                raise ConfigurationError("RETIRED_OFFERS_EXTRA", f"is not valid JSON ({exc.msg} at {exc.pos})",
                                         'use a JSON list like [{"name": "...", "family": "sales", '
                                         '"audience": "commercial"}]') from None
            offers += [_parse_entry(e, "RETIRED_OFFERS_EXTRA", i)
                       for i, e in enumerate(_entries(extra_doc, "RETIRED_OFFERS_EXTRA"))]
        return cls(offers)


def _entries(doc: Any, source: str) -> list[Any]:
    if isinstance(doc, Mapping):
        doc = doc.get("offers")
    if not isinstance(doc, list):
        raise ConfigurationError(source, "must be a list of offers (or an object with an 'offers' list)",
                                 'e.g. [{"name": "...", "family": "sales", "audience": "commercial"}]')
    return doc


def _parse_entry(entry: Any, source: str, index: int) -> RetiredOffer:
    where = f"entry {index}"
    if not isinstance(entry, Mapping):
        raise ConfigurationError(source, f"{where} is not an object", "each offer is a JSON object")
    name = entry.get("name")
    if not isinstance(name, str) or not normalize_offer_name(name):
        raise ConfigurationError(source, f"{where} has no name", "give each offer its exact offer name")
    family = entry.get("family")
    if family not in FAMILIES:
        raise ConfigurationError(source, f"{where} ({name}) has family {family!r}", f"use one of {FAMILIES}")
    audience = entry.get("audience", "commercial")
    if audience not in AUDIENCES:
        raise ConfigurationError(source, f"{where} ({name}) has audience {audience!r}", f"use one of {AUDIENCES}")
    channel = entry.get("channel")
    if channel is not None and channel not in CHANNELS:
        raise ConfigurationError(source, f"{where} ({name}) has channel {channel!r}", f"use one of {CHANNELS}")
    offer_ids = entry.get("offerIds") or []
    if not isinstance(offer_ids, list) or not all(isinstance(i, str) and is_guid(i) for i in offer_ids):
        raise ConfigurationError(source, f"{where} ({name}) offerIds must be a list of GUIDs", "or leave it empty")
    parts = entry.get("skuPartNumbers") or []
    if not isinstance(parts, list) or not all(isinstance(p, str) and p for p in parts):
        raise ConfigurationError(source, f"{where} ({name}) skuPartNumbers must be a list of strings",
                                 "or leave it empty")
    return RetiredOffer(name=name, family=family, audience=audience, channel=channel,
                        offer_ids=tuple(offer_ids), sku_part_numbers=tuple(parts))
