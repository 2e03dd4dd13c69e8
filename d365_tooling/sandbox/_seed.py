"""Deterministic generated worlds: expected migrations plus distractors that must be left alone."""

from __future__ import annotations

import random
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from ._catalog import (
    D365_SALES_ENT_LEGACY,
    D365_SALES_ENT_NCE,
    DEMO_REPLACEMENT_OFFERS,
    EXCHANGE_P1_NCE,
    M365_E3_NCE,
    O365_E1_LEGACY,
    POWER_BI_PRO_LEGACY,
    RETIRED_OFFERS,
    CatalogItem,
    ProductSku,
)
from ._state import SandboxState, User

WINDOW_DAYS = 60

# Reasons a qualified-offer subscription must NOT be migrated (one or more of each is seeded).
QO_DISTRACTOR_KINDS: tuple[str, ...] = (
    "expires_after_window",
    "auto_renew_enabled",
    "already_suspended",
    "status_expired",
    "status_disabled",
    "status_unknown",
    "far_future_end_date",
)

_FIRST = ("Ada", "Ben", "Chloe", "Dev", "Elif", "Femi", "Gita", "Hugo", "Ines", "Jon", "Kai", "Lena", "Mo", "Nia",
          "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vik", "Wen", "Xena", "Yusuf", "Zoe")
_LAST = ("Adams", "Berg", "Costa", "Diaz", "Evans", "Fischer", "Garcia", "Hansen", "Ito", "Jensen", "Khan", "Larsen",
         "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Silva", "Tanaka", "Ueda", "Vogel", "Weber", "Young", "Zhou")
_WORDS = ("Contoso", "Fabrikam", "Northwind", "Tailspin", "Adatum", "Litware", "Proseware", "Wingtip", "Fourth",
          "Alpine", "Blue", "Coho", "Lucerne", "Margie", "Trey", "Wide", "Woodgrove", "Humongous", "Relecloud")
_COUNTRIES = ("US", "GB", "DE", "NL", "FR", "DK", "CA", "AU")


@dataclass(frozen=True)
class ExpectedMigration:
    customer_id: str
    subscription_id: str
    offer_id: str
    offer_name: str  # canonical name from retired_offers.json (the subscription may spell it differently)
    offer_name_as_listed: str
    family: str
    channel: str
    audience: str
    quantity: int
    commitment_end_date: str
    old_sku_id: str
    replacement_catalog_item_id: str
    user_ids: tuple[str, ...]  # users holding the old SKU
    reseller_partner_id: str = ""  # the old subscription's partnerId (indirect reseller); the purchase must carry it
    end_date_source: str = "commitmentEndDate"  # or "provisioningStatus" (commitmentEndDate shows year 9999)


@dataclass(frozen=True)
class PooledSku:
    """The old subscription's product SKU is also granted by another subscription of the customer (subscribedskus
    pools them): only ``quantity`` of the holders belong to the retiring subscription."""

    customer_id: str
    subscription_id: str  # the expected migration
    other_subscription_id: str  # the other subscription granting the same SKU
    sku_id: str
    holders: tuple[str, ...]  # every user holding the SKU (both subscriptions)


@dataclass(frozen=True)
class Distractor:
    customer_id: str
    subscription_id: str
    reason: str
    offer_name: str


@dataclass
class SeedManifest:
    seed: int
    today: str
    customers: list[str] = field(default_factory=list)
    expected: list[ExpectedMigration] = field(default_factory=list)
    distractors: list[Distractor] = field(default_factory=list)
    users_without_usage_location: list[tuple[str, str]] = field(default_factory=list)  # (customer_id, user_id)
    pooled: list[PooledSku] = field(default_factory=list)
    unrecognised: list[Distractor] = field(default_factory=list)  # qualified-offer-looking names not in the catalog

    def expected_subscription_ids(self) -> set[str]:
        return {e.subscription_id.lower() for e in self.expected}

    def distractor_subscription_ids(self) -> set[str]:
        return {d.subscription_id.lower() for d in self.distractors}

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "today": self.today,
            "customers": list(self.customers),
            "expected": [{**asdict(e), "user_ids": list(e.user_ids)} for e in self.expected],
            "distractors": [asdict(d) for d in self.distractors],
            "usersWithoutUsageLocation": [list(x) for x in self.users_without_usage_location],
            "pooled": [{**asdict(x), "holders": list(x.holders)} for x in self.pooled],
            "unrecognised": [asdict(d) for d in self.unrecognised],
        }


def _guid(rng: random.Random, upper: bool = False) -> str:
    s = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return s.upper() if upper else s


def _vary_name(rng: random.Random, name: str) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return name.replace(" ", "  ", 1)
    if kind == 1:
        return name.upper()
    if kind == 2:
        return f" {name.lower()} "
    return name.replace("(Qualified Offer)", "(qualified offer)")


def seed_world(
    state: SandboxState,
    *,
    customers: int = 20,
    seed: int = 1,
    today: date | None = None,
    users_per_customer: tuple[int, int] = (2, 8),
    indirect_resellers: bool = False,
    pooled_skus: bool = False,
    unrecognised_offers: bool = False,
    hidden_end_dates: bool = False,
) -> SeedManifest:
    """Fill `state` with a generated world and return what a correct migration run must (not) touch.

    The keyword switches add documented situations (drawn from their own random stream, so the rest of the world is
    the same with or without them):

    * ``indirect_resellers``: some expected subscriptions name an indirect reseller (``partnerId``);
    * ``pooled_skus``: one expected subscription's product SKU is also granted by another subscription of the
      customer, with more holders than the retiring subscription's quantity;
    * ``unrecognised_offers``: a "(Qualified Offer)" subscription whose offer the catalog does not list;
    * ``hidden_end_dates``: one expected subscription shows ``commitmentEndDate`` 9999-12-31 (the documented
      placeholder) while its provisioning status ``endDate`` carries the real, near end.
    """
    rng = random.Random(seed)
    today = today or datetime.now(UTC).date()
    day0 = datetime.combine(today, time(0, 0), tzinfo=UTC)

    def end_in(days: int) -> str:
        return (day0 + timedelta(days=days)).strftime("%Y-%m-%dT00:00:00Z")

    manifest = SeedManifest(seed=seed, today=today.isoformat())
    n = max(1, customers)
    # Expected qualified subscriptions: every retired offer at least once, then ~60% of further customers.
    expected_plan: list[list[CatalogItem]] = [[] for _ in range(n)]
    offers = list(RETIRED_OFFERS)
    order = offers[:]
    rng.shuffle(order)
    total_expected = max(len(offers), int(n * 0.6))
    for e in range(total_expected):
        offer = order[e % len(order)] if e < len(order) else rng.choice(offers)
        c = e % n
        for attempt in range(n):  # one expected subscription per old SKU and customer (SKUs pool per customer)
            cand = (c + attempt) % n
            if all(o.sku.id != offer.sku.id for o in expected_plan[cand]):
                expected_plan[cand].append(offer)
                break
    distractor_kinds: list[list[str]] = [[] for _ in range(n)]
    for k, kind_name in enumerate(QO_DISTRACTOR_KINDS):  # every kind at least once
        distractor_kinds[k % n].append(kind_name)
    for i in range(len(QO_DISTRACTOR_KINDS), n):
        if rng.random() < 0.25:
            distractor_kinds[i].append(rng.choice(QO_DISTRACTOR_KINDS))
    no_usage_customer = next((i for i in range(n) if expected_plan[i]), None)
    upper_seq = 0

    for ci in range(n):
        cid = _guid(rng)
        word = _WORDS[ci % len(_WORDS)]
        state.add_customer(cid, f"{word.lower()}{ci}.onmicrosoft.com", f"{word} {ci} Ltd")
        manifest.customers.append(cid)
        domain = f"{word.lower()}{ci}.onmicrosoft.com"
        plan = expected_plan[ci]
        lo, hi = users_per_customer
        n_users = rng.randint(lo, hi) if plan else rng.randint(1, 3)
        user_ids: list[str] = []
        user_objs: list[User] = []
        for ui in range(n_users):
            uid = _guid(rng)
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            loc: str | None = rng.choice(_COUNTRIES)
            if ci == no_usage_customer and ui == 0:
                loc = None
                manifest.users_without_usage_location.append((cid, uid))
            user_objs.append(state.add_user(cid, uid, f"{first.lower()}.{last.lower()}{ui}@{domain}", first, last, loc))
            user_ids.append(uid)

        used_skus = {o.sku.id for o in plan}
        # ---- expected migrations
        for offer in plan:
            holders = [u for u in range(n_users) if rng.random() < 0.7] or [0]
            if ci == no_usage_customer and 0 not in holders:
                holders.insert(0, 0)
            for u in holders:
                user_objs[u].skus.append(offer.sku.id.lower())
            qty = len(holders) + rng.randint(0, 4)
            upper_seq += 1
            sid = _guid(rng, upper=upper_seq % 4 == 0)
            offer_id = offer.id if upper_seq % 3 else offer.id.lower()
            listed = _vary_name(rng, offer.name) if upper_seq % 5 == 0 else offer.name
            end = end_in(rng.randint(1, WINDOW_DAYS - 2))
            state.add_subscription(cid, offer=offer, subscription_id=sid, quantity=qty, status="active",
                                   auto_renew=False, commitment_end=end, offer_name=listed, offer_id=offer_id,
                                   friendly_name=rng.choice(["", f"{word} CRM", "D365 QO"]))
            manifest.expected.append(ExpectedMigration(
                customer_id=cid, subscription_id=sid, offer_id=offer_id, offer_name=offer.name,
                offer_name_as_listed=listed, family=str(offer.family), channel=str(offer.channel),
                audience=str(offer.audience), quantity=qty, commitment_end_date=end, old_sku_id=offer.sku.id,
                replacement_catalog_item_id=DEMO_REPLACEMENT_OFFERS[str(offer.family)][str(offer.audience)],
                user_ids=tuple(user_ids[u] for u in holders),
            ))
        # ---- qualified-offer distractors (a SKU not used by this customer's expected migrations)
        for kind in distractor_kinds[ci]:
            candidates = [o for o in RETIRED_OFFERS if o.sku.id not in used_skus]
            if not candidates:
                continue
            offer = rng.choice(candidates)
            used_skus.add(offer.sku.id)
            status, auto, end = "active", False, end_in(rng.randint(1, WINDOW_DAYS - 2))
            if kind == "expires_after_window":
                end = end_in(rng.randint(WINDOW_DAYS + 15, 400))
            elif kind == "auto_renew_enabled":
                auto = True
            elif kind == "already_suspended":
                status = "suspended"
            elif kind == "status_expired":
                status = "expired"
            elif kind == "status_disabled":
                status = "disabled"
            elif kind == "status_unknown":
                status = "pendingDeletion"
            elif kind == "far_future_end_date":
                end = "9999-12-31T00:00:00Z"
            holders = [u for u in range(n_users) if rng.random() < 0.4] if status == "active" else []
            for u in holders:
                user_objs[u].skus.append(offer.sku.id.lower())
            sid = _guid(rng, upper=rng.random() < 0.3)
            state.add_subscription(cid, offer=offer, subscription_id=sid, quantity=len(holders) + rng.randint(1, 3),
                                   status=status, auto_renew=auto, commitment_end=end,
                                   offer_name=_vary_name(rng, offer.name) if rng.random() < 0.3 else offer.name)
            manifest.distractors.append(Distractor(cid, sid, kind, offer.name))
        # ---- healthy non-qualified subscriptions
        others = [M365_E3_NCE, POWER_BI_PRO_LEGACY, O365_E1_LEGACY, EXCHANGE_P1_NCE, D365_SALES_ENT_NCE]
        picks = rng.sample(others, rng.randint(1, 2))
        if ci % 7 == 3:
            picks.append(D365_SALES_ENT_LEGACY)  # legacy, not a Qualified Offer, expiring soon, no auto-renew
        for prod in picks:
            holders = [u for u in range(n_users) if rng.random() < 0.5]
            for u in holders:
                user_objs[u].skus.append(prod.sku.id.lower())
            sid = _guid(rng, upper=rng.random() < 0.2)
            if prod is D365_SALES_ENT_LEGACY:
                auto, end, reason = False, end_in(rng.randint(1, WINDOW_DAYS - 2)), "not_qualified_offer_expiring"
            elif prod.is_nce:
                auto, end, reason = True, end_in(rng.randint(1, 365)), "nce_subscription"
            else:
                auto, end, reason = rng.random() < 0.7, end_in(rng.randint(1, 365)), "not_qualified_offer"
            state.add_subscription(cid, offer=prod, subscription_id=sid, quantity=len(holders) + rng.randint(0, 5) or 1,
                                   auto_renew=auto, commitment_end=end)
            manifest.distractors.append(Distractor(cid, sid, reason, prod.name))

    extra = random.Random(seed * 7919 + 17)
    if indirect_resellers:
        _seed_resellers(state, manifest, extra)
    if hidden_end_dates:
        _seed_hidden_end_date(state, manifest)
    if pooled_skus:
        _seed_pooled(state, manifest, extra, end_in)
    if unrecognised_offers:
        _seed_unrecognised(state, manifest, extra, end_in)
    state._seed_params = {"customers": customers, "seed": seed, "today": today,
                          "users_per_customer": users_per_customer, "indirect_resellers": indirect_resellers,
                          "pooled_skus": pooled_skus, "unrecognised_offers": unrecognised_offers,
                          "hidden_end_dates": hidden_end_dates}
    state.manifest = manifest
    return manifest


def _seed_resellers(state: SandboxState, manifest: SeedManifest, rng: random.Random) -> None:
    for i, em in enumerate(manifest.expected):
        if i == 0 or rng.random() < 0.3:
            partner_id = str(rng.randint(1_000_000, 9_999_999))
            with state.lock:
                state._customer(em.customer_id).subscriptions[em.subscription_id.lower()].partner_id = partner_id
            manifest.expected[i] = replace(em, reseller_partner_id=partner_id)


def _seed_hidden_end_date(state: SandboxState, manifest: SeedManifest) -> None:
    if not manifest.expected:
        return
    em = manifest.expected[-1]
    with state.lock:
        sub = state._customer(em.customer_id).subscriptions[em.subscription_id.lower()]
        sub.provisioning_end = sub.commitment_end
        sub.commitment_end = "9999-12-31T00:00:00Z"
    manifest.expected[-1] = replace(em, end_date_source="provisioningStatus")


def _seed_pooled(state: SandboxState, manifest: SeedManifest, rng: random.Random, end_in: Any) -> None:
    if not manifest.expected:
        return
    em = manifest.expected[0]
    sku = em.old_sku_id.lower()
    other_offer = next(o for o in RETIRED_OFFERS if o.sku.id.lower() == sku and o.id.lower() != em.offer_id.lower())
    with state.lock:
        c = state._customer(em.customer_id)
        extra_holders = [u for u in c.users.values() if sku not in u.skus]
        if not extra_holders:
            u = state.add_user(c.id, _guid(rng), f"pooled.user@{c.domain}", "Pooled", "User", "US")
            extra_holders = [u]
        for u in extra_holders:
            u.skus.append(sku)
        sid = _guid(rng)
        state.add_subscription(c.id, offer=other_offer, subscription_id=sid, quantity=len(extra_holders),
                               auto_renew=False, commitment_end=end_in(300), offer_name=other_offer.name)
        holders = tuple(u.id for u in c.users.values() if sku in u.skus)
    manifest.pooled.append(PooledSku(em.customer_id, em.subscription_id, sid, sku, holders))
    manifest.distractors.append(Distractor(em.customer_id, sid, "pooled_sku_other_subscription", other_offer.name))


def _seed_unrecognised(state: SandboxState, manifest: SeedManifest, rng: random.Random, end_in: Any) -> None:
    customer_id = manifest.customers[0]
    sku = ProductSku(str(uuid.UUID(int=rng.getrandbits(128), version=4)), "D365_MKTG_QO",
                     "Dynamics 365 for Marketing (Qualified Offer)")
    item = CatalogItem(id=str(uuid.UUID(int=rng.getrandbits(128), version=4)).upper(),
                       name="Dynamics 365 for Marketing Enterprise Edition (Qualified Offer)", kind="legacy", sku=sku,
                       purchasable=False, retired=True)
    sid = _guid(rng)
    state.add_subscription(customer_id, offer=item, subscription_id=sid, quantity=3, auto_renew=False,
                           commitment_end=end_in(20))
    d = Distractor(customer_id, sid, "unrecognised_qualified_offer", item.name)
    manifest.unrecognised.append(d)
    manifest.distractors.append(d)
