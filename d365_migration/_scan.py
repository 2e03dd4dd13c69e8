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
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ._catalog import RetiredOffer, RetiredOfferCatalog
from ._client import PartnerCenterClient
from ._exceptions import (
    AccessDeniedError,
    LookAgainLater,
    MalformedResponseError,
    NotFoundError,
    PartnerCenterApiError,
    PartnerCenterError,
    ThrottledError,
    TransportError,
)
from ._models import Customer, Subscription

__all__ = [
    "AUTO_RENEW_UNKNOWN",
    "END_DATE_UNKNOWN",
    "UNRECOGNISED",
    "Candidate",
    "CustomerScan",
    "LeftAlone",
    "evaluate",
    "is_transient",
    "scan_all",
    "scan_customer",
    "scan_page",
]


logger = logging.getLogger("d365_migration.scan")

UNRECOGNISED = ("unrecognised: the name looks like a Dynamics 365 (Qualified Offer) but the retired-offer catalog "
                "does not list it; if it is one, add it with RETIRED_OFFERS_EXTRA")
END_DATE_UNKNOWN = "end date unknown"
AUTO_RENEW_UNKNOWN = "auto-renew state unknown"


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
    """One customer's scan. ``error`` says why (some of) its subscriptions could not be read; ``transient`` whether
    reading them again later may succeed, and ``retry_after`` how long the service asked us to wait first. The
    candidates found before an error are kept (recording them is idempotent)."""

    customer: Customer
    candidates: list[Candidate] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    error: str | None = None
    transient: bool = False
    retry_after: float | None = None

    def failed(self, exc: Exception, *, subscription_id: str | None = None) -> None:
        """Note a failure (the error lists every one); any permanent one makes the scan's failure permanent."""
        transient = is_transient(exc)
        where = f"subscription {subscription_id}: " if subscription_id else ""
        what = str(exc) if isinstance(exc, PartnerCenterError) else f"unexpected answer ({type(exc).__name__}: {exc})"
        if self.error is None:
            self.error, self.transient = where + what, transient
        else:
            self.error = (self.error + "; " + where + what)[:2000]
            self.transient = self.transient and transient
        wait = getattr(exc, "retry_after", None)
        if transient and isinstance(wait, (int, float)):
            self.retry_after = max(self.retry_after or 0.0, float(wait))


# 5xx, 408 and 429 outlasted the client's own retries: the service is busy or unwell, not refusing this customer.
_TRANSIENT_STATUS = frozenset({408, 429})


def is_transient(exc: BaseException) -> bool:
    """Whether a failed read may succeed later: throttling (incl. a ``Retry-After`` longer than the client sleeps),
    5xx/408 after the client's retries, transport errors, and an answer that is not the documented shape (an HTML
    gateway page, truncated JSON). Access refused (401/403), not found (404), other 4xx and answers our models cannot
    take are permanent: they need a person, not another read."""
    if isinstance(exc, (LookAgainLater, ThrottledError, TransportError, MalformedResponseError)):
        return True
    return isinstance(exc, PartnerCenterApiError) and (exc.status >= 500 or exc.status in _TRANSIENT_STATUS)


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
        return "auto-renew is on" if subscription.auto_renew else AUTO_RENEW_UNKNOWN
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
    """One customer's candidates and left-alone subscriptions. Never raises for this customer's answers: a failed
    or unreadable answer is the scan's ``error`` (with ``transient``), so the rest of the page is still scanned and
    the caller can read this customer again or report it — a customer is never skipped silently."""
    result = CustomerScan(customer)
    try:
        subscriptions = await client.list_subscriptions(customer.id)
    except Exception as exc:  # one customer's unreadable answer (or one our models choke on) must not stop the page
        _failed(result, exc)
        return result
    for sub in subscriptions:
        try:
            await _scan_subscription(client, customer, sub, catalog, now=now, window_days=window_days,
                                     into=result)
        except Exception as exc:  # the other subscriptions are still evaluated
            _failed(result, exc, subscription_id=sub.id)
    return result


def _failed(result: CustomerScan, exc: Exception, *, subscription_id: str | None = None) -> None:
    if not isinstance(exc, PartnerCenterError):  # a bug or an answer our models do not expect: keep the trace
        logger.warning("customer %s: unexpected %s while scanning", result.customer.id, type(exc).__name__,
                       exc_info=exc)
    result.failed(exc, subscription_id=subscription_id)


async def _scan_subscription(client: PartnerCenterClient, customer: Customer, sub: Subscription,
                             catalog: RetiredOfferCatalog, *, now: datetime, window_days: int,
                             into: CustomerScan) -> None:
    end_date, why_unknown = None, ""
    if not sub.end_date_known and isinstance(evaluate(sub, catalog, now=now, window_days=window_days), str):
        end_date, why_unknown = await _provisioning_end_date(client, customer.id, sub.id)
    verdict = evaluate(sub, catalog, now=now, window_days=window_days, end_date=end_date)
    if isinstance(verdict, RetiredOffer):
        into.candidates.append(Candidate(customer, sub, verdict, end_date if not sub.end_date_known else None))
    elif isinstance(verdict, str):
        if verdict.startswith(END_DATE_UNKNOWN) and why_unknown:
            verdict += f" (provisioning status: {why_unknown})"
        into.left_alone.append(LeftAlone(customer.id, sub.id, sub.offer_name, verdict,
                                         unrecognised=verdict == UNRECOGNISED))


async def _provisioning_end_date(client: PartnerCenterClient, customer_id: str,
                                 subscription_id: str) -> tuple[datetime | None, str]:
    """The provisioning status ``endDate`` of a subscription whose ``commitmentEndDate`` is not a real date, and,
    when there is none, why (read-only; a refused read leaves the end date unknown, never guessed).

    :raises PartnerCenterError: a transient failure (:func:`is_transient`, e.g. 5xx after the client's retries): the
        customer is read again later rather than its subscription being left alone as "end date unknown" for good.
    """
    try:
        status = await client.get_provisioning_status(customer_id, subscription_id)
    except AccessDeniedError as exc:
        return None, f"not readable ({exc.reason}: {exc.fix})"
    except PartnerCenterError as exc:
        # 404 800007 (ProvisioningNotReadyError, a LookAgainLater) is documented for a *new* subscription; on an
        # old one it means there is no provisioning information to wait for, so it stays "end date unknown"
        # (get-subscription-provisioning-status).
        if is_transient(exc) and not isinstance(exc, NotFoundError):
            raise
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
