"""Finding expiring retired-offer subscriptions (read-only).

A subscription is a candidate when its offer is in the retired-offer catalog, its status is ``active``,
``autoRenewEnabled`` is false and its end date falls within the expiry window. The end date is ``commitmentEndDate``;
when that is missing or the year-9999 placeholder, it is the provisioning status ``endDate``
(https://learn.microsoft.com/partner-center/developer/get-subscription-provisioning-status), and when neither gives
one the subscription is listed as "end date unknown". Anything else that matches the catalog is reported as *left
alone*, with the reason, so a partner can see why — and so is an offer whose name looks like a Dynamics "(Qualified
Offer)" but is not in the catalog (*unrecognised*, with its name): detection leaves nothing unexplained.
Pages of customers are streamed and each page's customers are read concurrently, so memory stays flat and the
client's rate limiter — not a one-at-a-time loop — sets the pace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ._catalog import RetiredOffer, RetiredOfferCatalog
from ._client import PartnerCenterClient
from ._exceptions import AccessDeniedError, PartnerCenterError
from ._models import Customer, Subscription

__all__ = [
    "END_DATE_UNKNOWN",
    "UNRECOGNISED",
    "Candidate",
    "CustomerScan",
    "LeftAlone",
    "evaluate",
    "scan_all",
    "scan_customer",
    "scan_page",
]


UNRECOGNISED = ("unrecognised: the name looks like a Dynamics 365 (Qualified Offer) but the retired-offer catalog "
                "does not list it; if it is one, add it with RETIRED_OFFERS_EXTRA")
END_DATE_UNKNOWN = "end date unknown"


@dataclass(frozen=True)
class Candidate:
    customer: Customer
    subscription: Subscription
    offer: RetiredOffer
    # The end date used: commitmentEndDate, or provisioning status endDate when that is the year-9999 placeholder.
    end_date: datetime | None = None

    @property
    def ends(self) -> datetime | None:
        return self.end_date or self.subscription.commitment_end


@dataclass(frozen=True)
class LeftAlone:
    customer_id: str
    subscription_id: str
    offer_name: str | None
    reason: str
    unrecognised: bool = False


@dataclass
class CustomerScan:
    customer: Customer
    candidates: list[Candidate] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    error: str | None = None


def evaluate(subscription: Subscription, catalog: RetiredOfferCatalog, *, now: datetime,
             window_days: int, end_date: datetime | None = None) -> RetiredOffer | str | None:
    """The retired offer if the subscription is a candidate; a reason string if it is a retired offer (or looks like
    one, :data:`UNRECOGNISED`) that must be left alone; ``None`` if it is not a retired offer at all. ``end_date``
    (provisioning status ``endDate``) stands in for a missing or year-9999 ``commitmentEndDate``."""
    match = catalog.classify(subscription.offer_id, subscription.offer_name)
    offer = match.offer
    if offer is None:
        return UNRECOGNISED if match.unrecognised else None
    if subscription.status != "active":
        return f"status is {subscription.status}"
    if subscription.auto_renew is not False:
        return "auto-renew is on" if subscription.auto_renew else "auto-renew state unknown"
    end = subscription.commitment_end if subscription.end_date_known else end_date
    if end is None or end.year >= 9999:
        shown = subscription.commitment_end.date().isoformat() if subscription.commitment_end else "missing"
        return (f"{END_DATE_UNKNOWN}: commitmentEndDate is {shown} and the provisioning status gives no endDate; "
                "check the subscription's end in Partner Center")
    if end < now - timedelta(days=1):
        return f"commitment ended {end.date().isoformat()}"
    if end > now + timedelta(days=window_days):
        return f"ends {end.date().isoformat()}, beyond the {window_days}-day window"
    return offer


async def scan_customer(client: PartnerCenterClient, customer: Customer, catalog: RetiredOfferCatalog, *,
                        now: datetime, window_days: int) -> CustomerScan:
    result = CustomerScan(customer)
    try:
        subscriptions = await client.list_subscriptions(customer.id)
    except PartnerCenterError as exc:
        result.error = str(exc)
        return result
    for sub in subscriptions:
        end_date, why_unknown = None, ""
        if not sub.end_date_known and isinstance(evaluate(sub, catalog, now=now, window_days=window_days), str):
            end_date, why_unknown = await _provisioning_end_date(client, customer.id, sub.id)
        verdict = evaluate(sub, catalog, now=now, window_days=window_days, end_date=end_date)
        if isinstance(verdict, RetiredOffer):
            result.candidates.append(Candidate(customer, sub, verdict, end_date if not sub.end_date_known else None))
        elif isinstance(verdict, str):
            if verdict.startswith(END_DATE_UNKNOWN) and why_unknown:
                verdict += f" (provisioning status: {why_unknown})"
            result.left_alone.append(LeftAlone(customer.id, sub.id, sub.offer_name, verdict,
                                               unrecognised=verdict == UNRECOGNISED))
    return result


async def _provisioning_end_date(client: PartnerCenterClient, customer_id: str,
                                 subscription_id: str) -> tuple[datetime | None, str]:
    """The provisioning status ``endDate`` of a subscription whose ``commitmentEndDate`` is not a real date, and,
    when there is none, why (read-only; a refused or failed read leaves the end date unknown, never guessed)."""
    try:
        status = await client.get_provisioning_status(customer_id, subscription_id)
    except AccessDeniedError as exc:
        return None, f"not readable ({exc.reason}: {exc.fix})"
    except PartnerCenterError as exc:
        return None, f"not readable ({exc})"
    return status.end_date, "" if status.end_date else "no endDate"


async def scan_page(client: PartnerCenterClient, customers: list[Customer], catalog: RetiredOfferCatalog, *,
                    now: datetime, window_days: int, concurrency: int) -> list[CustomerScan]:
    semaphore = asyncio.Semaphore(max(1, concurrency))

    async def one(customer: Customer) -> CustomerScan:
        async with semaphore:
            return await scan_customer(client, customer, catalog, now=now, window_days=window_days)

    return list(await asyncio.gather(*(one(c) for c in customers)))


async def scan_all(client: PartnerCenterClient, catalog: RetiredOfferCatalog, *, now: datetime, window_days: int,
                   concurrency: int = 16, page_size: int = 500) -> AsyncIterator[CustomerScan]:
    """Every customer's scan, page by page; the next page is fetched while this one's customers are read."""
    pages = client.customer_pages(page_size=page_size)
    next_page: asyncio.Task[list[Customer]] | None = asyncio.ensure_future(anext(pages))
    while next_page is not None:
        try:
            customers = await next_page
        except StopAsyncIteration:
            break
        next_page = asyncio.ensure_future(anext(pages))
        try:
            for scan in await scan_page(client, customers, catalog, now=now, window_days=window_days,
                                        concurrency=concurrency):
                yield scan
        except BaseException:
            next_page.cancel()
            raise
