"""Finding expiring retired-offer subscriptions (read-only).

A subscription is a candidate when its offer is in the retired-offer catalog, its status is ``active``,
``autoRenewEnabled`` is false and ``commitmentEndDate`` falls within the expiry window (year-9999 dates mean "no
end"). Anything else that matches the catalog is reported as *left alone*, with the reason, so a partner can see why.
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
from ._exceptions import PartnerCenterError
from ._models import Customer, Subscription

__all__ = [
    "Candidate",
    "CustomerScan",
    "LeftAlone",
    "evaluate",
    "scan_all",
    "scan_customer",
    "scan_page",
]


@dataclass(frozen=True)
class Candidate:
    customer: Customer
    subscription: Subscription
    offer: RetiredOffer


@dataclass(frozen=True)
class LeftAlone:
    customer_id: str
    subscription_id: str
    offer_name: str | None
    reason: str


@dataclass
class CustomerScan:
    customer: Customer
    candidates: list[Candidate] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    error: str | None = None


def evaluate(subscription: Subscription, catalog: RetiredOfferCatalog, *, now: datetime,
             window_days: int) -> RetiredOffer | str | None:
    """The retired offer if the subscription is a candidate; a reason string if it is a retired offer that must be
    left alone; ``None`` if it is not a retired offer at all."""
    offer = catalog.match(subscription.offer_id, subscription.offer_name)
    if offer is None:
        return None
    if subscription.status != "active":
        return f"status is {subscription.status}"
    if subscription.auto_renew is not False:
        return "auto-renew is on" if subscription.auto_renew else "auto-renew state unknown"
    end = subscription.commitment_end
    if end is None:
        return "no commitment end date"
    if end.year >= 9999:
        return "no real end date (year 9999)"
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
        verdict = evaluate(sub, catalog, now=now, window_days=window_days)
        if isinstance(verdict, RetiredOffer):
            result.candidates.append(Candidate(customer, sub, verdict))
        elif isinstance(verdict, str):
            result.left_alone.append(LeftAlone(customer.id, sub.id, sub.offer_name, verdict))
    return result


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
