"""Runbook step 1 — find the customers on a retired Qualified Offer whose subscription is about to end.

A detection run is started by the timer (:func:`start_run`) and scanned one customer page per invocation
(:func:`scan_page`): the next page is queued as soon as its cursor is known, each candidate is recorded in the ledger
(:func:`admit`, idempotent), and purchase messages go out for records still ``detected`` — at most
the purchase brake per run; the rest are parked ``blocked`` for an operator (:func:`brake`). The stored rollout
controls (``_gate``) decide: customers outside their scope are left alone, and in a dry run or while paused candidates
are recorded and nothing is queued (a paused run logs ``event=rollout_paused``; ``rollout resume`` queues them).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field

from .._client import PageRequest
from .._exceptions import ConcurrencyConflict
from .._ledger import MigrationRecord
from .._messages import SCAN_QUEUE, ScanMessage, StepMessage
from .._rollout import RolloutControls
from .._scan import Candidate, CustomerScan, LeftAlone
from .._scan import scan_page as scan_customers
from ._gate import RESUME_COMMAND, customer_in_scope, load_controls
from ._policy import LEASE, SCAN_PAGE_BUDGET_SHARE, SCAN_PAGE_MAX, SCAN_PAGE_MIN
from ._routes import message_for
from ._work import Deps, log_record, save_transition

__all__ = ["DetectReport", "admit", "brake", "page_size", "scan_page", "start_run"]

logger = logging.getLogger("d365_migration.steps.detect")


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
    errors: list[str] = field(default_factory=list)

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


async def scan_page(deps: Deps, message: ScanMessage) -> DetectReport:
    """One page of a detection run: queue the next page, record this page's candidates and return the report. A
    page already scanned in this run is not scanned again.

    :raises ValueError: the message's cursor is not a Partner Center collection (not ours).
    :raises PartnerCenterError: the customer page could not be read (the message is retried).
    """
    settings, client, ledger = deps.settings, deps.client, deps.ledger
    report = DetectReport()
    try:
        marker = await ledger.claim_scan_page(message.run_id, message.page, deps.worker_id, lease=LEASE)
    except ConcurrencyConflict as exc:
        logger.info("scan page %d of run %s skipped: %s", message.page, message.run_id, exc)
        return report
    if marker is not None and "done" in marker:
        logger.info("scan page %d of run %s was already scanned", message.page, message.run_id)
        return report

    cursor = (PageRequest.from_json(message.cursor) if message.cursor
              else client.first_customer_page(page_size(deps)))
    customers, next_page = await client.customer_page(cursor)
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
        waiting += await admit(deps, scan, report, controls=controls)
    if waiting and controls.paused:
        logger.warning("event=rollout_paused event=needs_attention run=%s page=%d waiting=%d reason=%r nothing "
                       "queued; the records stay detected. redrive=%r", message.run_id, message.page, len(waiting),
                       controls.pause_reason or "no reason given", RESUME_COMMAND)
        waiting = []
    granted = await ledger.reserve_purchases(message.run_id, len(waiting), controls.max_purchases_per_run)
    await brake(deps, waiting, granted, report, limit=controls.max_purchases_per_run)

    await ledger.complete_scan_page(message.run_id, message.page,
                                    next_cursor=json.dumps(next_page.to_json()) if next_page else None,
                                    customers=len(customers), candidates=len(report.candidates))
    logger.info("event=scan_page run=%s page=%d customers=%d candidates=%d queued=%d", message.run_id,
                message.page, len(customers), len(report.candidates), len(report.purchase_messages))
    if following is None:
        logger.info("event=detect_done run=%s pages=%d", message.run_id, message.page + 1)
    return report


async def admit(deps: Deps, scan: CustomerScan, report: DetectReport, *,
                controls: RolloutControls | None = None) -> list[MigrationRecord]:
    """Record one customer's candidates (idempotently); return the records waiting for a purchase message (none in a
    dry run). ``controls``: the rollout controls in force (read from storage when not given).

    :raises LedgerError: the controls or the ledger could not be read.
    """
    if controls is None:
        controls = await load_controls(deps)
    report.customers += 1
    if scan.error:
        report.errors.append(f"customer {scan.customer.id}: {scan.error}")
        logger.warning("event=scan_error customer=%s %s", scan.customer.id, scan.error)
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
        if controls.live and record.state == "detected":
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
