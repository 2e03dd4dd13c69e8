"""Runbook step 1 — find the customers on a retired Qualified Offer whose subscription is about to end.

A detection run is started by the timer (:func:`start_run`) and scanned one customer page per invocation
(:func:`scan_page`): the next page is queued as soon as its cursor is known, each candidate is recorded in the ledger
(:func:`admit`, idempotent), and purchase messages go out for records still ``detected`` — at most
the purchase brake per run; the rest are parked ``blocked`` for an operator (:func:`brake`). The stored rollout
controls (``_gate``) decide: customers outside their scope are left alone, and in a dry run or while paused candidates
are recorded and nothing is queued (a paused run logs ``event=rollout_paused``; ``rollout resume`` queues them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from dataclasses import dataclass, field, replace

from .._client import PageRequest
from .._exceptions import ConcurrencyConflict, LedgerError, LookAgainLater
from .._ledger import MigrationRecord
from .._messages import RESCAN_COMMAND, SCAN_QUEUE, SCAN_RETRY_CHUNK, ScanMessage, StepMessage
from .._models import Customer
from .._rollout import RolloutControls
from .._scan import AUTO_RENEW_UNKNOWN, END_DATE_UNKNOWN, Candidate, CustomerScan, LeftAlone
from .._scan import scan_page as scan_customers
from ._gate import RESUME_COMMAND, customer_in_scope, load_controls
from ._policy import LEASE, SCAN_PAGE_BUDGET_SHARE, SCAN_PAGE_MAX, SCAN_PAGE_MIN
from ._routes import message_for
from ._work import Deps, log_record, save_transition

__all__ = ["DetectReport", "admit", "brake", "page_size", "scan_page", "start_run"]

logger = logging.getLogger("d365_migration.steps.detect")

# A customer whose subscriptions could not be read for a transient reason (5xx or throttling after the client's own
# retries, a Retry-After longer than it sleeps, a transport error) is read again by a delayed re-scan, at most this
# many times, PROVISIONING_POLL_SECONDS x 2^(n-1) apart (at least the Retry-After, at most the cap below): with the
# default 60 s poll, 1 + 2 + 4 + 8 + 16 = 31 minutes before it is reported with event=needs_attention.
# The same bound and delays apply when the customer page itself answers a Retry-After longer than the client sleeps
# (the message is put off; after that the host retries it and its last delivery is recorded failed).
SCAN_RETRIES = 5
SCAN_RETRY_MAX_DELAY_SECONDS = 3600
# A page another invocation is scanning is looked at again this much later (its claim lasts LEASE at most).
SCAN_BUSY_DELAY_SECONDS = 60


@dataclass
class DetectReport:
    """What one scanned page found and did; its purchase messages go out through the function's output binding."""

    customers: int = 0
    candidates: list[Candidate] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    new_records: int = 0
    purchase_messages: list[StepMessage] = field(default_factory=list)
    braked: int = 0
    out_of_scope: int = 0
    errors: list[str] = field(default_factory=list)  # "customer <id>: <error>" of every customer that failed
    retrying: list[str] = field(default_factory=list)  # ids of the customers handed to a delayed re-scan
    rescans: list[tuple[ScanMessage, int]] = field(default_factory=list)  # the re-scans queued, with their delay
    requeued: list[tuple[ScanMessage, int]] = field(default_factory=list)  # this message put off (page busy/unread)
    not_scanned: list[str] = field(default_factory=list)  # "<id>: <reason>" reported with event=needs_attention

    def bodies(self) -> list[str]:
        return [m.to_json() for m in self.purchase_messages]


def start_run(deps: Deps, run_id: str | None = None) -> ScanMessage:
    """The timer's job: start a detection run by queueing its first page."""
    run_id = run_id or deps.now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    logger.info("event=detect_started run=%s", run_id)
    return ScanMessage(run_id=run_id, page=0, cursor=None)


def page_size(deps: Deps) -> int:
    """Customers per scan invocation (see ``SCAN_PAGE_*`` in ``_policy``)."""
    per_second = deps.settings.requests_per_minute / 60.0
    share = per_second * deps.settings.invocation_budget_seconds / SCAN_PAGE_BUDGET_SHARE
    return int(max(SCAN_PAGE_MIN, min(SCAN_PAGE_MAX, share)))


async def scan_page(deps: Deps, message: ScanMessage, *, last_delivery: bool = False) -> DetectReport:
    """One page of a detection run (or one re-scan of some of its customers): queue the next page, record this
    page's candidates, re-scan later the customers that could not be read for a transient reason, report the ones
    that cannot be read, and return the report. A page already scanned in this run is not scanned again.

    ``last_delivery``: the host will not deliver this message again; a failure is then recorded in the ledger (the
    page's customers, when known, are listed by ``MigrationLedger.scan_failures`` and ``run``) before it is raised.

    :raises ValueError: the message's cursor is not a Partner Center collection (not ours).
    :raises PartnerCenterError: the customer page could not be read (the message is retried).
    """
    report = DetectReport()
    part = _part(message)
    # One owner per invocation: two deliveries of one message in one process must not both scan the page.
    owner = f"{deps.worker_id}:{uuid.uuid4().hex[:8]}"
    try:
        marker = await deps.ledger.claim_scan_page(message.run_id, message.page, owner, lease=LEASE, part=part)
    except ConcurrencyConflict as exc:
        # Another invocation holds the page: a duplicate delivery, or one that died (its lease runs out). Look again
        # later instead of dropping the message — if that invocation never finishes, this copy scans the page.
        logger.info("scan page %d%s of run %s is busy (%s); looking again in %ds", message.page, _shown(part),
                    message.run_id, exc, SCAN_BUSY_DELAY_SECONDS)
        await _put_off(deps, message, SCAN_BUSY_DELAY_SECONDS, report)
        return report
    if marker is not None and "done" in marker:
        logger.info("scan page %d%s of run %s was already scanned", message.page, _shown(part), message.run_id)
        return report
    customers: list[Customer] = [Customer(cid, company_name=name) for cid, name in message.customers]
    try:
        await _scan(deps, message, part, customers, report)
    except _PageUnreadable as put_off:
        # The page's customers could not be listed yet: read the page again later (the marker is released for
        # that), waiting as long as the service asked.
        logger.warning("event=scan_page_deferred run=%s page=%d wait=%d/%d delay=%ds reason=%r", message.run_id,
                       message.page, message.waits + 1, SCAN_RETRIES, put_off.delay, str(put_off.__cause__))
        await _release(deps, message, part, owner)
        await _put_off(deps, replace(message, waits=message.waits + 1), put_off.delay, report)
    except ValueError:
        raise  # not our cursor: poisoned at once by the adapter
    except Exception as exc:
        if last_delivery:
            await _record_page_failed(deps, message, part, customers, exc)
        else:
            await _release(deps, message, part, owner)  # the next delivery, on any instance, scans it
        raise
    return report


class _PageUnreadable(Exception):
    """The customer page could not be read yet (Retry-After too long); read it again ``delay`` seconds later."""

    def __init__(self, delay: int) -> None:
        super().__init__(f"look again in {delay}s")
        self.delay = delay


async def _put_off(deps: Deps, message: ScanMessage, delay: int, report: DetectReport) -> None:
    await deps.queues.send(SCAN_QUEUE, message.to_json(), delay_seconds=delay)
    report.requeued.append((message, delay))


async def _release(deps: Deps, message: ScanMessage, part: str, owner: str) -> None:
    try:
        await deps.ledger.release_scan_page(message.run_id, message.page, owner, part=part)
    except LedgerError as exc:  # its lease runs out by itself; the message's own failure is what matters
        logger.warning("could not release scan page %d%s of run %s: %s", message.page, _shown(part),
                       message.run_id, exc)


async def _scan(deps: Deps, message: ScanMessage, part: str, customers: list[Customer],
                report: DetectReport) -> None:
    """The body of :func:`scan_page`; ``customers`` is filled in as soon as the page's customers are known."""
    settings, client, ledger = deps.settings, deps.client, deps.ledger
    next_page: PageRequest | None = None
    following: ScanMessage | None = None
    if not message.retry:
        cursor = (PageRequest.from_json(message.cursor) if message.cursor
                  else client.first_customer_page(page_size(deps)))
        try:
            page_customers, next_page = await client.customer_page(cursor)
        except LookAgainLater as exc:
            # The service asked for a longer wait than the client sleeps (RetryAfterTooLongError): the host's own
            # redeliveries (visibilityTimeout apart) would all come too early. 5xx and transport errors after the
            # client's retries keep the host's redeliveries; the last one is recorded failed and raises the alert.
            if message.waits >= SCAN_RETRIES:
                raise
            raise _PageUnreadable(_backoff_seconds(deps, message.waits + 1, exc.retry_after)) from exc
        customers.extend(page_customers)
        following = ScanMessage(message.run_id, message.page + 1, next_page.to_json()) if next_page else None
    if following is not None:
        # Queue the next page now, not when this one is done: another worker can fetch and scan it while this
        # one reads its customers' subscriptions. Each page's marker keeps a redelivery from scanning twice.
        await deps.queues.send(SCAN_QUEUE, following.to_json())

    controls = await load_controls(deps)  # read before anything is queued; a failed read retries the page
    scans = await scan_customers(client, customers, deps.catalog, now=deps.now(),
                                 window_days=settings.expiry_window_days, concurrency=settings.max_concurrency)
    waiting: list[MigrationRecord] = []
    for scan in scans:
        # A re-scan queues purchases only for the records it creates: the page's own scan already queued the rest.
        waiting += await admit(deps, scan, report, controls=controls, queue_existing=not message.retry)
    if waiting and controls.paused:
        logger.warning("event=rollout_paused event=needs_attention run=%s page=%d waiting=%d reason=%r nothing "
                       "queued; the records stay detected. redrive=%r", message.run_id, message.page, len(waiting),
                       controls.pause_reason or "no reason given", RESUME_COMMAND)
        waiting = []
    granted = await ledger.reserve_purchases(message.run_id, len(waiting), controls.max_purchases_per_run)
    await brake(deps, waiting, granted, report, limit=controls.max_purchases_per_run)

    failed = await _rescan_or_report(deps, message, scans, report)
    await ledger.complete_scan_page(message.run_id, message.page,
                                    next_cursor=json.dumps(next_page.to_json()) if next_page else None,
                                    customers=len(customers), candidates=len(report.candidates), part=part,
                                    retrying=len(report.retrying), failed=failed)
    logger.info("event=scan_page run=%s page=%d%s customers=%d candidates=%d queued=%d retrying=%d not_scanned=%d",
                message.run_id, message.page, _shown(part), len(customers), len(report.candidates),
                len(report.purchase_messages), len(report.retrying), len(failed))
    if following is None and not message.retry:
        logger.info("event=detect_done run=%s pages=%d", message.run_id, message.page + 1)


async def _rescan_or_report(deps: Deps, message: ScanMessage, scans: list[CustomerScan],
                            report: DetectReport) -> list[tuple[str, str]]:
    """Queue a delayed re-scan of the customers whose subscriptions could not be read for a transient reason (while
    re-scans are left); report the others with ``event=needs_attention``. Returns the reported (customer id,
    reason) pairs. A customer whose subscriptions could not be read is never dropped silently: its expiring
    subscriptions would never be recorded, and its users lose access at expiry."""
    again = [s for s in scans if s.error and s.transient and message.retry < SCAN_RETRIES]
    final = [s for s in scans if s.error and s not in again]
    if again:
        delay = _rescan_delay(deps, message.retry + 1, again)
        for chunk in _chunks(again, SCAN_RETRY_CHUNK):
            follow_up = ScanMessage(message.run_id, message.page, None, retry=message.retry + 1,
                                    customers=tuple((s.customer.id, s.customer.company_name) for s in chunk))
            await deps.queues.send(SCAN_QUEUE, follow_up.to_json(), delay_seconds=delay)
            report.rescans.append((follow_up, delay))
        report.retrying += [s.customer.id for s in again]
        logger.warning("event=scan_retry run=%s page=%d retry=%d/%d delay=%ds customers=%s first_error=%r: their "
                       "subscriptions could not be read; they are read again then", message.run_id, message.page,
                       message.retry + 1, SCAN_RETRIES, delay, ",".join(s.customer.id for s in again), again[0].error)
    failed: list[tuple[str, str]] = []
    for scan in final:
        why = scan.error or ""
        if scan.transient:
            why = f"still failing after {message.retry} re-scans: {why}"
        failed.append((scan.customer.id, why))
        report.not_scanned.append(f"{scan.customer.id}: {why}")
        # Not silent: the alert rule fires, and `run` / MigrationLedger.scan_failures list the customer.
        logger.error("event=needs_attention kind=customer_not_scanned run=%s page=%d customer=%s name=%r reason=%r "
                     "its subscriptions were not checked in this run, so an expiring one would not be migrated. "
                     "redrive=%r", message.run_id, message.page, scan.customer.id, scan.customer.company_name, why,
                     RESCAN_COMMAND)
    return failed


def _rescan_delay(deps: Deps, retry: int, scans: list[CustomerScan]) -> int:
    return _backoff_seconds(deps, retry, max((s.retry_after or 0.0 for s in scans), default=0.0))


def _backoff_seconds(deps: Deps, attempt: int, retry_after: float | None) -> int:
    """``PROVISIONING_POLL_SECONDS`` doubled per attempt, at least the ``Retry-After`` the service sent
    (api-throttling-guidance: wait Retry-After before retrying), at most ``SCAN_RETRY_MAX_DELAY_SECONDS``."""
    backoff = deps.settings.provisioning_poll_seconds * 2 ** (attempt - 1)
    asked = math.ceil(retry_after) if isinstance(retry_after, (int, float)) else 0
    return int(min(SCAN_RETRY_MAX_DELAY_SECONDS, max(backoff, asked)))


def _chunks(items: list[CustomerScan], size: int) -> list[list[CustomerScan]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _part(message: ScanMessage) -> str:
    """The page marker's suffix of a re-scan: its number and a digest of the customers it names (two re-scans of
    the same customers share a marker, so a duplicate delivery is not scanned twice; different ones do not)."""
    if not message.retry:
        return ""
    ids = ",".join(sorted(cid.lower() for cid, _ in message.customers))
    return f"r{message.retry:02d}-{hashlib.sha256(ids.encode()).hexdigest()[:12]}"


def _shown(part: str) -> str:
    return f" ({part})" if part else ""


async def _record_page_failed(deps: Deps, message: ScanMessage, part: str, customers: list[Customer],
                              exc: Exception) -> None:
    """The message's last delivery failed: record the page failed with its customers (when known), so ``run`` and
    ``scan_failures`` name them. Best effort: the ledger may be what failed (the adapter logs the alert either way)."""
    reason = f"{type(exc).__name__}: {exc}"
    try:
        await deps.ledger.fail_scan_page(message.run_id, message.page, part=part, reason=reason,
                                         customers=[c.id for c in customers])
    except LedgerError as ledger_exc:
        logger.warning("could not record scan page %d%s of run %s as failed: %s", message.page, _shown(part),
                       message.run_id, ledger_exc)


async def admit(deps: Deps, scan: CustomerScan, report: DetectReport, *, controls: RolloutControls | None = None,
                queue_existing: bool = True) -> list[MigrationRecord]:
    """Record one customer's candidates (idempotently); return the records waiting for a purchase message (none in a
    dry run). ``controls``: the rollout controls in force (read from storage when not given). ``queue_existing``:
    also return records found already ``detected`` (a re-scan returns only the ones it created). A scan's error is
    only noted here; :func:`scan_page` re-scans or reports the customer.

    :raises LedgerError: the controls or the ledger could not be read.
    """
    if controls is None:
        controls = await load_controls(deps)
    report.customers += 1
    if scan.error:
        report.errors.append(f"customer {scan.customer.id}: {scan.error}")
        logger.warning("event=scan_error customer=%s transient=%s %s", scan.customer.id, scan.transient, scan.error)
    for x in scan.left_alone:
        unknown = x.reason.startswith(END_DATE_UNKNOWN) or x.reason == AUTO_RENEW_UNKNOWN
        if unknown and customer_in_scope(controls, x.customer_id):
            # An active retired-offer subscription whose end (or renewal) nobody can tell could expire any day
            # without being migrated: a person has to look it up, so say so where the alerts look.
            logger.warning("event=left_alone_unknown event=needs_attention customer=%s subscription=%s offer=%r: %s",
                           x.customer_id, x.subscription_id, x.offer_name, x.reason)
    report.left_alone.extend(scan.left_alone)
    for x in scan.left_alone:
        if x.unrecognised:
            logger.warning("event=unrecognised_offer customer=%s subscription=%s offer=%r: %s", x.customer_id,
                           x.subscription_id, x.offer_name, x.reason)
    waiting: list[MigrationRecord] = []
    for candidate in scan.candidates:
        if not customer_in_scope(controls, candidate.customer.id):
            report.out_of_scope += 1
            report.left_alone.append(LeftAlone(candidate.customer.id, candidate.subscription.id,
                                               candidate.subscription.offer_name,
                                               "customer excluded by the rollout's allow-list (`rollout set --allow`;"
                                               " first deploy: CUSTOMER_ALLOWLIST) or CUSTOMER_DENYLIST"))
            continue
        report.candidates.append(candidate)
        record, created = await deps.ledger.create_if_absent(_new_record(candidate))
        report.new_records += int(created)
        if created:
            log_record(record, logging.INFO, "event=detected offer=%r quantity=%d ends=%s",
                       record.offer_name, record.quantity, record.commitment_end)
        if controls.live and record.state == "detected" and (created or queue_existing):
            waiting.append(record)
    return waiting


async def brake(deps: Deps, waiting: list[MigrationRecord], granted: int, report: DetectReport, *,
                limit: int | None = None) -> None:
    """Queue the purchases this run may still make; park the rest ``blocked`` until an operator re-drives them.
    ``limit`` is the purchase brake in force (for the reason text; default ``MAX_PURCHASES_PER_RUN``)."""
    limit = deps.settings.max_purchases_per_run if limit is None else limit
    for i, record in enumerate(waiting):
        message = message_for(record)
        if i < granted and message is not None:
            report.purchase_messages.append(message)
            continue
        report.braked += 1
        reason = (f"safety brake: this run already queued MAX_PURCHASES_PER_RUN={limit} purchases (the rollout's "
                  "purchase brake); review, then re-drive with `python -m d365_migration retry` or raise the limit "
                  "with `rollout set --max-purchases N`")
        try:
            await save_transition(deps, record, "blocked", "purchase_brake", reason)
        except ConcurrencyConflict:
            logger.info("record changed while braking; leaving it as it is")


def _new_record(candidate: Candidate) -> MigrationRecord:
    sub = candidate.subscription
    return MigrationRecord(
        # Ids are kept as Partner Center returned them and sent back unchanged; they are only *compared*
        # case-insensitively (ledger keys are lower-cased in _ledger.record_key).
        customer_id=candidate.customer.id,
        subscription_id=sub.id,
        customer_name=candidate.customer.company_name,
        offer_id=sub.offer_id,
        offer_name=sub.offer_name,
        family=candidate.offer.family,
        audience=candidate.offer.audience,
        channel=candidate.offer.channel,
        quantity=sub.quantity,
        commitment_end=candidate.ends.isoformat() if candidate.ends else None,
    )
