"""The runbook as four steps: detect → purchase → reassign licenses → suspend the old subscription.

Each step is *re-entrant*: it reads the ledger, does only what is still missing, records before it acts, and hands
the next step its message only after its own work is recorded. A duplicate or late delivery therefore finds the work
done and just passes the baton again. Safety rules, in the order the runbook demands them:

* never buy twice — a deterministic ``MS-RequestId`` per logical operation, the cart id recorded *before* checkout
  (checkout is idempotent per cart), and a look at the customer's subscriptions for a replacement already bought for
  this record (its friendly name carries the record's tag) before any purchase;
* never cut a user off — one license update assigns the new SKU and removes the old one together;
* never suspend early — the suspend step re-checks that the replacement is active and no user holds the old SKU.

This module does not import ``azure.functions``: the function folders are thin adapters around it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from ._catalog import RetiredOfferCatalog
from ._client import PageRequest, PartnerCenterClient, deterministic_request_id
from ._context import current_correlation_id
from ._exceptions import (
    ConcurrencyConflict,
    ConflictError,
    InvalidMessageError,
    NotFoundError,
    PartnerCenterApiError,
    PreconditionFailedError,
    TransportError,
)
from ._ledger import MigrationLedger, MigrationRecord, UserOutcome, utcnow
from ._messages import SCAN_QUEUE, ScanMessage, StepMessage
from ._models import CustomerUser, Order, Subscription, same_id
from ._queues import QueueSender
from ._scan import Candidate, CustomerScan, LeftAlone, scan_all
from ._scan import scan_page as scan_customers_page
from ._settings import Settings, is_guid

logger = logging.getLogger("d365_migration.pipeline")


# How often suspend may send a record back to reassign before a human must look.
MAX_REASSIGN_TRIPS = 3
# Partner Center: "After submission, an order can take up to 15 minutes to appear in the customer's order list."
ORDER_LIST_LAG = timedelta(minutes=15)


class RetryLater(Exception):
    """The step cannot finish now but will later (e.g. provisioning still pending): re-queue with a delay."""

    def __init__(self, why: str, *, delay: int | None = None) -> None:
        self.why = why
        self.delay = delay
        super().__init__(why)


@dataclass
class StepResult:
    """What a function adapter writes to its output binding (``next_messages``) after the step returned."""

    next_messages: list[StepMessage] = field(default_factory=list)
    record: MigrationRecord | None = None
    note: str = ""

    def bodies(self) -> list[str]:
        return [m.to_json() for m in self.next_messages]


@dataclass
class DetectReport:
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


def _product_key(offer_id: str) -> str:
    """New commerce: productId:skuId (the availability part may differ between catalog and subscription);
    legacy: the offer GUID."""
    parts = offer_id.strip().lower().split(":")
    return ":".join(parts[:2])


def _log(record: MigrationRecord, level: int, text: str, *args: object) -> None:
    logger.log(level, "[%s] customer=%s subscription=%s " + text, record.correlation_id, record.customer_id,
               record.subscription_id, *args)


class MigrationService:
    """The domain side of the four functions; one per process, shared by invocations."""

    def __init__(self, settings: Settings, client: PartnerCenterClient, ledger: MigrationLedger,
                 queues: QueueSender, catalog: RetiredOfferCatalog, *,
                 clock: Callable[[], datetime] = utcnow, worker_id: str | None = None) -> None:
        self.settings = settings
        self.client = client
        self.ledger = ledger
        self.queues = queues
        self.catalog = catalog
        self._clock = clock
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self._lease = timedelta(minutes=10)
        self._running: set[str] = set()  # lease owners of the invocations running in this process

    # ================================================================== 1. detect

    async def detect(self) -> DetectReport:
        """Scan every customer in this invocation (the CLI and small tenants); see :meth:`scan_page` for the
        fanned-out form the functions use."""
        report = DetectReport()
        async for scan in scan_all(self.client, self.catalog, now=self._clock(),
                                   window_days=self.settings.expiry_window_days,
                                   concurrency=self.settings.max_concurrency):
            waiting = await self._admit(scan, report)
            granted = max(0, min(len(waiting), self.settings.max_purchases_per_run - len(report.purchase_messages)))
            await self._queue_or_brake(waiting, granted, report)
        logger.info("event=detect_done customers=%d candidates=%d new=%d queued=%d dry_run=%s",
                    report.customers, len(report.candidates), report.new_records, len(report.purchase_messages),
                    self.settings.dry_run)
        return report

    def start_scan(self, run_id: str | None = None) -> ScanMessage:
        """The timer's job: start a detection run by queueing its first page."""
        run_id = run_id or self._clock().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        logger.info("event=detect_started run=%s", run_id)
        return ScanMessage(run_id=run_id, page=0, cursor=None)

    def scan_page_size(self) -> int:
        """Customers per scan invocation: about a quarter of the invocation budget at the configured rate (each
        customer costs one subscriptions call), between 20 and 500."""
        per_second = self.settings.requests_per_minute / 60.0
        return int(max(20, min(500, per_second * self.settings.invocation_budget_seconds / 4)))

    async def scan_page(self, message: ScanMessage) -> DetectReport:
        """One page of a detection run: queue the next page, record this page's candidates and return the report
        (its purchase messages go out through the function's output binding). A page already scanned in this run
        is not scanned again."""
        report = DetectReport()
        try:
            marker = await self.ledger.claim_scan_page(message.run_id, message.page, self.worker_id,
                                                       lease=self._lease)
        except ConcurrencyConflict as exc:
            logger.info("scan page %d of run %s skipped: %s", message.page, message.run_id, exc)
            return report
        if marker is not None and "done" in marker:
            logger.info("scan page %d of run %s was already scanned", message.page, message.run_id)
            return report
        cursor = (PageRequest.from_json(message.cursor) if message.cursor
                  else self.client.first_customer_page(self.scan_page_size()))
        customers, next_page = await self.client.customer_page(cursor)
        nxt = ScanMessage(message.run_id, message.page + 1, next_page.to_json()) if next_page else None
        if nxt is not None:
            # Queue the next page now, not when this one is done: another worker can fetch and scan it while this
            # one reads its customers' subscriptions. Each page's marker keeps a redelivery from scanning twice.
            await self.queues.send(SCAN_QUEUE, nxt.to_json())
        scans = await scan_customers_page(self.client, customers, self.catalog, now=self._clock(),
                                window_days=self.settings.expiry_window_days,
                                concurrency=self.settings.max_concurrency)
        waiting: list[MigrationRecord] = []
        for scan in scans:
            waiting += await self._admit(scan, report)
        granted = await self.ledger.reserve_purchases(message.run_id, len(waiting),
                                                      self.settings.max_purchases_per_run)
        await self._queue_or_brake(waiting, granted, report)
        next_json = json.dumps(next_page.to_json()) if next_page else None
        await self.ledger.complete_scan_page(message.run_id, message.page, next_cursor=next_json,
                                             customers=len(customers), candidates=len(report.candidates))
        logger.info("event=scan_page run=%s page=%d customers=%d candidates=%d queued=%d", message.run_id,
                    message.page, len(customers), len(report.candidates), len(report.purchase_messages))
        if nxt is None:
            logger.info("event=detect_done run=%s pages=%d", message.run_id, message.page + 1)
        return report

    async def _admit(self, scan: CustomerScan, report: DetectReport) -> list[MigrationRecord]:
        """Record one customer's candidates (idempotently); return the records waiting for a purchase message."""
        report.customers += 1
        if scan.error:
            report.errors.append(f"customer {scan.customer.id}: {scan.error}")
            logger.warning("event=scan_error customer=%s %s", scan.customer.id, scan.error)
        report.left_alone.extend(scan.left_alone)
        waiting: list[MigrationRecord] = []
        for candidate in scan.candidates:
            if not self.settings.customer_in_scope(candidate.customer.id):
                report.out_of_scope += 1
                report.left_alone.append(LeftAlone(candidate.customer.id, candidate.subscription.id,
                                                   candidate.subscription.offer_name,
                                                   "customer excluded by CUSTOMER_ALLOWLIST/CUSTOMER_DENYLIST"))
                continue
            report.candidates.append(candidate)
            record, created = await self.ledger.create_if_absent(self._new_record(candidate))
            report.new_records += int(created)
            if created:
                _log(record, logging.INFO, "event=detected offer=%r quantity=%d ends=%s",
                     record.offer_name, record.quantity, record.commitment_end)
            if not self.settings.dry_run and record.state == "detected":
                waiting.append(record)
        return waiting

    async def _queue_or_brake(self, waiting: list[MigrationRecord], granted: int, report: DetectReport) -> None:
        for i, record in enumerate(waiting):
            if i < granted:
                report.purchase_messages.append(self._message("purchase", record))
                continue
            report.braked += 1
            reason = (f"safety brake: this run already queued MAX_PURCHASES_PER_RUN="
                      f"{self.settings.max_purchases_per_run} purchases; review, then re-drive with "
                      "`python -m d365_migration retry` or raise the limit")
            try:
                await self._save_transition(record, "blocked", "purchase_brake", reason)
            except ConcurrencyConflict:
                logger.info("record changed while braking; leaving it as it is")

    def _new_record(self, candidate: Candidate) -> MigrationRecord:
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
            commitment_end=sub.commitment_end.isoformat() if sub.commitment_end else None,
        )

    @staticmethod
    def _message(step: str, record: MigrationRecord) -> StepMessage:
        return StepMessage(step=step, customer_id=record.customer_id,  # type: ignore[arg-type]
                           subscription_id=record.subscription_id, correlation_id=record.correlation_id)

    # ================================================================== shared step plumbing

    async def _load(self, message: StepMessage) -> MigrationRecord:
        record = await self.ledger.get(message.customer_id, message.subscription_id)
        if record is None:
            raise InvalidMessageError(
                f"no ledger record for customer {message.customer_id} subscription {message.subscription_id}")
        return record

    async def _save_transition(self, record: MigrationRecord, state: str, event: str, detail: str | None = None,
                               **changes: object) -> MigrationRecord:
        updated = await self.ledger.save(record.transition(state, event, detail, **changes))
        level = logging.WARNING if state in ("blocked", "failed") else logging.INFO
        marker = {"failed": "event=record_failed ", "blocked": "event=record_blocked "}.get(state, "")
        _log(updated, level, "%sstate=%s step_event=%s %s", marker, state, event, detail or "")
        return updated

    async def _delay(self, message: StepMessage, why: str, delay: int | None = None) -> None:
        seconds = self.settings.provisioning_poll_seconds if delay is None else delay
        await self.queues.send(message.queue, message.next_poll().to_json(), delay_seconds=seconds)
        logger.info("[%s] %s: looking again in %ss (poll %d)", message.correlation_id, why, seconds,
                    message.poll + 1)

    async def _run_step(self, message: StepMessage,
                        step: Callable[[dict[str, MigrationRecord]], Awaitable[StepResult]]) -> StepResult:
        """Load, check DRY_RUN, claim, run, release; turn RetryLater into a delayed message."""
        current_correlation_id.set(message.correlation_id)
        record = await self._load(message)
        if self.settings.dry_run:
            _log(record, logging.WARNING, "DRY_RUN is true: the %s step does nothing", message.step)
            return StepResult(record=record, note="dry run")
        if record.is_final:
            _log(record, logging.INFO, "already %s; nothing to do", record.state)
            return StepResult(record=record, note=f"already {record.state}")
        # One owner per invocation, not per process: two deliveries of the same message in one process must not
        # both hold the lease.
        owner = f"{self.worker_id}:{uuid.uuid4().hex[:8]}"
        busy_delay = max(5, self.settings.provisioning_poll_seconds // 4)
        try:
            record = await self.ledger.claim(record, owner, lease=self._lease, dead_owners=self._is_dead_owner)
        except ConcurrencyConflict as exc:
            # Another invocation has it. Look again later rather than burn this message's retries.
            await self._delay(message, f"busy: {exc}", delay=busy_delay)
            return StepResult(record=record, note="busy")
        holder: dict[str, MigrationRecord] = {"record": record}
        self._running.add(owner)
        try:
            result = await step(holder)
        except RetryLater as wait:
            await self._release(holder["record"], owner)
            await self._delay(message, wait.why, wait.delay)
            return StepResult(record=holder["record"], note=wait.why)
        except ConcurrencyConflict as exc:
            # Someone else changed the record while this step worked (a lease that ran out, a duplicate, an
            # operator). Nothing is wrong with the migration: re-read it later and carry on from what is recorded.
            await self._release(holder["record"], owner)
            await self._delay(message, f"record changed meanwhile: {exc}", delay=busy_delay)
            return StepResult(record=holder["record"], note="conflict")
        except BaseException:
            await self._release(holder["record"], owner)
            raise
        finally:
            self._running.discard(owner)
        if result.record is not None and result.record.lease_owner:
            result.record = await self.ledger.release(result.record)
        return result

    def _is_dead_owner(self, owner: str) -> bool:
        """A lease left by an invocation of this process that is no longer running (it crashed before releasing)."""
        return owner.startswith(self.worker_id + ":") and owner not in self._running

    async def _release(self, record: MigrationRecord, owner: str) -> None:
        try:
            latest = await self.ledger.get(record.customer_id, record.subscription_id)
            if latest is not None and latest.lease_owner == owner:
                await self.ledger.release(latest)
        except Exception:  # the lease expires by itself; never mask the real error
            logger.debug("could not release lease", exc_info=True)

    async def fail(self, message: StepMessage, error: str) -> None:
        """The message is going to the poison queue: record it as failed (unless already final)."""
        record = await self.ledger.get(message.customer_id, message.subscription_id)
        if record is None or record.is_final:
            return
        for _ in range(3):
            try:
                await self._save_transition(replace(record, lease_owner=None, lease_until=None), "failed",
                                            f"{message.step}_gave_up", error[:900])
                return
            except ConcurrencyConflict:
                record = await self.ledger.get(message.customer_id, message.subscription_id)
                if record is None or record.is_final:
                    return

    # ================================================================== 2. purchase

    async def purchase(self, message: StepMessage) -> StepResult:
        return await self._run_step(message, lambda h: self._purchase(h, message))

    async def _purchase(self, holder: dict[str, MigrationRecord], message: StepMessage) -> StepResult:
        record = holder["record"]
        if record.state in ("purchased", "reassigning", "reassigned"):
            nxt = "suspend" if record.state == "reassigned" else "reassign"
            return StepResult([self._message(nxt, record)], record, "already purchased")

        replacement = self.settings.replacement_offers.lookup(record.family or "", record.audience or "")
        if replacement is None:
            record = await self._save_transition(
                record, "blocked", "no_replacement",
                f"no REPLACEMENT_OFFERS entry for {record.family}.{record.audience}; add one, then "
                "`python -m d365_migration retry`")
            return StepResult([], record, "blocked")

        listed: list[Subscription] | None = None
        if record.state == "detected":
            # Right before buying: does the old subscription still qualify? A human may have renewed or
            # suspended it since detection. One listing of the customer's subscriptions answers that (it carries
            # the old one's status and auto-renew) and serves both replacement checks below.
            listed = await self.client.list_subscriptions(record.customer_id)
            old = next((s for s in listed if same_id(s.id, record.subscription_id)), None)
            if old is None:
                old = await self.client.get_subscription(record.customer_id, record.subscription_id)
            if old.status != "active" or old.auto_renew:
                why = (f"old subscription is now {old.status}" if old.status != "active"
                       else "old subscription was set to auto-renew")
                record = await self._save_transition(record, "blocked", "no_longer_qualifies",
                                                     why + " (changed since detection); nothing bought")
                return StepResult([], record, "blocked")
            untagged = None if record.buy_anyway else self._untagged_replacement(record, replacement, listed)
            if untagged is not None:
                record = await self._save_transition(
                    record, "blocked", "untagged_replacement_exists",
                    f"subscription {untagged.id} of the replacement offer appeared after detection without this "
                    f"migration's tag; nothing bought. If it IS this migration's replacement, add [{record.tag}] to "
                    "its friendly name and re-drive with `python -m d365_migration retry`; if not, re-drive with "
                    "`retry --buy-anyway`")
                return StepResult([], record, "blocked")
            record = await self._save_transition(
                record, "purchasing", "purchase_started", f"buying {replacement} x{old.quantity}",
                replacement_offer_id=replacement, quantity=old.quantity or record.quantity,
                purchase_started_at=utcnow().isoformat())
            holder["record"] = record

        record = await self._recover_order(holder)
        new_sub = await self._find_replacement(record, listed)
        if new_sub is None and not record.order_id:
            if ":" in (record.replacement_offer_id or replacement):
                record = await self._buy_through_cart(holder, record.replacement_offer_id or replacement)
            else:
                record = await self._buy_through_order(holder, record.replacement_offer_id or replacement)
            holder["record"] = record
            if record.state == "failed":
                return StepResult([], record, "failed")
            new_sub = await self._find_replacement(record)

        if new_sub is None or new_sub.status != "active":
            started = datetime.fromisoformat(record.purchase_started_at or utcnow().isoformat())
            if utcnow() - started > timedelta(minutes=self.settings.provisioning_timeout_minutes):
                record = await self._save_transition(
                    record, "failed", "provisioning_timeout",
                    f"replacement not active {self.settings.provisioning_timeout_minutes} min after purchase "
                    f"(order {record.order_id}, cart {record.cart_id}); check the order in Partner Center")
                return StepResult([], record, "failed")
            state = new_sub.status if new_sub else "not visible yet"
            raise RetryLater(f"replacement subscription {state}")

        record = await self._save_transition(record, "purchased", "replacement_active",
                                             f"new subscription {new_sub.id}", new_subscription_id=new_sub.id)
        return StepResult([self._message("reassign", record)], record, "purchased")

    async def _find_replacement(self, record: MigrationRecord,
                                listed: list[Subscription] | None = None) -> Subscription | None:
        """The replacement already bought for this record, if any: by recorded id, order id or friendly-name tag.
        ``listed`` is the customer's subscriptions if the caller has just read them."""
        if record.new_subscription_id:
            try:
                return await self.client.get_subscription(record.customer_id, record.new_subscription_id)
            except NotFoundError:
                pass
        if record.order_id:
            for sub in await self._subscriptions_of_order(record):
                return sub
        if listed is None:
            listed = await self.client.list_subscriptions(record.customer_id)
        for sub in listed:
            if not same_id(sub.id, record.subscription_id) and record.tag in (sub.friendly_name or ""):
                return sub
        return None

    def _untagged_replacement(self, record: MigrationRecord, replacement: str,
                              listed: list[Subscription]) -> Subscription | None:
        """A subscription of the replacement product created after detection without our tag: probably bought by
        hand for this very migration. Buying again would make the customer pay twice, so a human decides."""
        detected = datetime.fromisoformat(record.created_at) if record.created_at else None
        wanted = _product_key(replacement)
        for sub in listed:
            if (sub.offer_id and _product_key(sub.offer_id) == wanted and sub.status in ("active", "pending")
                    and record.tag not in (sub.friendly_name or "")
                    and (detected is None or sub.created is None or sub.created >= detected)):
                return sub
        return None

    async def _recover_order(self, holder: dict[str, MigrationRecord]) -> MigrationRecord:
        """After an answer we did not see (checkout or order), find the order by the record's tag and record it."""
        record = holder["record"]
        if record.order_id or not (record.cart_id or record.order_attempted_at):
            return record
        found = await self._find_order_by_tag(record)
        if found is not None:
            record = await self._save_transition(record, "purchasing", "order_found", f"order {found.id}",
                                                 order_id=found.id)
            holder["record"] = record
        return record

    async def _subscriptions_of_order(self, record: MigrationRecord) -> list[Subscription]:
        assert record.order_id
        try:
            order = await self.client.get_order(record.customer_id, record.order_id)
        except NotFoundError:
            order = None  # orders can take minutes to appear
        found: list[Subscription] = []
        ids = [li.subscription_id for li in order.line_items if li.subscription_id] if order else []
        for sub_id in ids:
            try:
                found.append(await self.client.get_subscription(record.customer_id, sub_id))
            except NotFoundError:
                continue
        if not found:
            found = [s for s in await self.client.list_subscriptions(record.customer_id, order_id=record.order_id)
                     if not same_id(s.id, record.subscription_id)]
        return found

    def _friendly_name(self, record: MigrationRecord) -> str:
        return f"Replacement for {(record.offer_name or 'retired offer')[:60]} [{record.tag}]"

    async def _buy_through_cart(self, holder: dict[str, MigrationRecord], catalog_item_id: str) -> MigrationRecord:
        record = holder["record"]
        if not record.cart_id:
            cart = await self.client.create_cart(
                record.customer_id, catalog_item_id, record.quantity,
                billing_cycle=self.settings.replacement_billing_cycle,
                term_duration=self.settings.replacement_term_duration,
                friendly_name=self._friendly_name(record),
                request_id=deterministic_request_id("cart", record.customer_id, record.subscription_id))
            # Recorded BEFORE checkout: a crash after this point resumes with the same cart, and checkout is
            # idempotent per cart, so the purchase happens at most once.
            record = await self._save_transition(record, "purchasing", "cart_created", f"cart {cart.id}",
                                                 cart_id=cart.id)
            holder["record"] = record
        assert record.cart_id
        try:
            result = await self.client.checkout_cart(
                record.customer_id, record.cart_id,
                request_id=deterministic_request_id("checkout", record.customer_id, record.cart_id))
        except ConflictError as exc:
            if exc.code in ("800064", "800060"):
                raise RetryLater(f"checkout in progress ({exc.code})", delay=30) from None
            raise
        except PartnerCenterApiError as exc:
            if exc.code == "800065":  # already submitted: the purchase happened; find what it created
                raise RetryLater("cart already checked out; waiting for its subscription") from None
            if exc.status in (400, 403, 404):
                return await self._save_transition(record, "failed", "checkout_rejected", str(exc))
            raise
        if result.order_errors:
            errors = "; ".join(f"{e.code}: {e.description}" for e in result.order_errors)
            return await self._save_transition(record, "failed", "checkout_order_errors", errors)
        order_id = result.orders[0].id if result.orders else None
        record = await self._save_transition(record, "purchasing", "checked_out", f"order {order_id}",
                                             order_id=order_id)
        return record

    async def _buy_through_order(self, holder: dict[str, MigrationRecord], offer_id: str) -> MigrationRecord:
        record = holder["record"]
        if record.order_id:
            return record
        request_id = deterministic_request_id("order", record.customer_id, record.subscription_id)
        if record.order_attempted_at:
            # A previous attempt may have been applied without us seeing the answer (_recover_order found no order
            # with our tag). Orders can take up to 15 minutes to show in the order list, so wait that long before
            # sending the same request (same MS-RequestId) again.
            attempted = datetime.fromisoformat(record.order_attempted_at)
            if utcnow() - attempted < ORDER_LIST_LAG:
                raise RetryLater("waiting to see whether the earlier order went through")
        else:
            record = await self._save_transition(record, "purchasing", "order_attempt", f"MS-RequestId {request_id}",
                                                 order_attempted_at=utcnow().isoformat())
            holder["record"] = record
        try:
            order = await self.client.create_order(
                record.customer_id, offer_id, record.quantity, friendly_name=self._friendly_name(record),
                billing_cycle="monthly", request_id=request_id)
        except ConflictError as exc:
            if exc.code == "800060":  # "your order is in progress": treat as possibly succeeded
                raise RetryLater("order in progress (800060)", delay=60) from None
            raise
        except PartnerCenterApiError as exc:
            if exc.status in (400, 403, 404):
                return await self._save_transition(record, "failed", "order_rejected", str(exc))
            raise
        return await self._save_transition(record, "purchasing", "ordered", f"order {order.id}", order_id=order.id)

    async def _find_order_by_tag(self, record: MigrationRecord) -> Order | None:
        for order in await self.client.list_orders(record.customer_id):
            if any(record.tag in (li.friendly_name or "") for li in order.line_items):
                return order
        return None

    # ================================================================== 3. reassign licenses

    async def reassign(self, message: StepMessage) -> StepResult:
        return await self._run_step(message, lambda h: self._reassign(h, message))

    async def _resolve_sku(self, record: MigrationRecord, subscription_id: str, *, old: bool) -> str | None:
        try:
            status = await self.client.get_provisioning_status(record.customer_id, subscription_id)
            if status.sku_id and is_guid(status.sku_id):
                return status.sku_id
        except (NotFoundError, PartnerCenterApiError) as exc:
            if isinstance(exc, PartnerCenterApiError) and exc.status >= 500:
                raise
        if old:
            offer = self.catalog.match(record.offer_id, record.offer_name)
            parts = {p.lower() for p in (offer.sku_part_numbers if offer else ())}
            if parts:
                for sku in await self.client.list_subscribed_skus(record.customer_id):
                    if (sku.product_sku.sku_part_number or "").lower() in parts:
                        return sku.product_sku.id
        return None

    async def _reassign(self, holder: dict[str, MigrationRecord], message: StepMessage) -> StepResult:
        record = holder["record"]
        if record.state == "reassigned":
            return StepResult([self._message("suspend", record)], record, "already reassigned")
        if record.state not in ("purchased", "reassigning") or not record.new_subscription_id:
            _log(record, logging.INFO, "reassign message ignored: record is %s", record.state)
            return StepResult([], record, "stale message")
        started = utcnow()
        if not (record.old_sku_id and record.new_sku_id):
            old_sku = record.old_sku_id or await self._resolve_sku(record, record.subscription_id, old=True)
            new_sku = record.new_sku_id or await self._resolve_sku(record, record.new_subscription_id, old=False)
            if not old_sku or not new_sku:
                if message.poll >= 30:
                    record = await self._save_transition(
                        record, "blocked", "sku_unknown",
                        f"cannot tell the product SKU of the {'old' if not old_sku else 'new'} subscription")
                    return StepResult([], record, "blocked")
                raise RetryLater("product SKU not resolvable yet")
            record = await self._save_transition(record, "reassigning", "skus_resolved",
                                                 f"old {old_sku} → new {new_sku}", old_sku_id=old_sku,
                                                 new_sku_id=new_sku)
            holder["record"] = record
        old_sku, new_sku = record.old_sku_id, record.new_sku_id
        assert old_sku and new_sku
        if same_id(old_sku, new_sku):
            record = await self._save_transition(record, "reassigned", "same_sku",
                                                 "old and new subscription grant the same product SKU; no user "
                                                 "needs moving")
            return StepResult([self._message("suspend", record)], record, "reassigned")

        # Page by page: find who holds the old SKU (licenses read concurrently; the client paces them), check the
        # new SKU has room, move them with one atomic assign+remove each, then checkpoint the next page's cursor in
        # the record — so a customer with thousands of users resumes where the last invocation stopped.
        budget = timedelta(seconds=self.settings.invocation_budget_seconds)
        # A new pass (after `retry`, or after suspend found the old license again) is a new logical operation and so
        # gets new MS-RequestIds; retries within a pass reuse them.
        license_pass = sum(1 for h in record.history if h.get("event") in ("old_sku_still_used", "retry"))
        page: PageRequest | None = (PageRequest.from_json(json.loads(record.users_cursor)) if record.users_cursor
                                    else self.client.first_user_page(record.customer_id))
        while page is not None:
            if utcnow() - started > budget:
                raise RetryLater("invocation budget reached; continuing from the saved users page", delay=0)
            users, next_page = await self.client.user_page(page)
            holders = await self._holders(record, users, old_sku, new_sku)
            need_units = sum(1 for _, _, has_new in holders if not has_new)
            if need_units:
                skus = {s.product_sku.id.lower(): s
                        for s in await self.client.list_subscribed_skus(record.customer_id)}
                available = skus[new_sku.lower()].available_units if new_sku.lower() in skus else 0
                if available < need_units:
                    if message.poll < 10:
                        raise RetryLater(f"{need_units} users to move but {available} units of the new SKU free yet")
                    record = await self._save_transition(
                        record, "blocked", "not_enough_licenses",
                        f"{need_units} users hold the old SKU but only {available} units of the new SKU are free; "
                        "buy more, then `python -m d365_migration retry`")
                    return StepResult([], record, "blocked")
            moved = skipped = 0
            failures: list[str] = []
            for user_id, upn, has_new in holders:
                try:
                    await self.client.update_user_licenses(
                        record.customer_id, user_id, assign=[] if has_new else [new_sku], remove=[old_sku],
                        request_id=deterministic_request_id("license", record.customer_id, record.subscription_id,
                                                            user_id, str(license_pass)))
                except PartnerCenterApiError as exc:
                    if exc.status >= 500 or exc.status == 429:
                        raise
                    failures.append(f"{upn or user_id}: {exc.description} (code {exc.code})")
                    await self.ledger.record_user(record, UserOutcome(user_id, "failed", str(exc), upn))
                    continue
                moved += not has_new
                skipped += has_new
                await self.ledger.record_user(record, UserOutcome(user_id, "skipped" if has_new else "moved", None,
                                                                  upn))
            all_failures = "; ".join(x for x in (record.user_failures, *failures) if x) or None
            record = await self.ledger.save(replace(
                record, users_moved=record.users_moved + moved, users_skipped=record.users_skipped + skipped,
                users_failed=record.users_failed + len(failures), user_failures=all_failures,
                users_cursor=json.dumps(next_page.to_json()) if next_page else None, updated_at=utcnow().isoformat()))
            holder["record"] = record
            page = next_page

        if record.users_failed:
            record = await self._save_transition(
                record, "blocked", "user_license_failed",
                f"{record.users_failed} user(s) could not be moved, so the old subscription stays active: "
                + (record.user_failures or "")[:700], users_failed=0, user_failures=None)
            return StepResult([], record, "blocked")
        record = await self._save_transition(record, "reassigned", "licenses_moved",
                                             f"{record.users_moved} moved, {record.users_skipped} already on the "
                                             "new SKU")
        return StepResult([self._message("suspend", record)], record, "reassigned")

    async def _holders(self, record: MigrationRecord, users: list[CustomerUser], old_sku: str,
                       new_sku: str) -> list[tuple[str, str | None, bool]]:
        """(user id, UPN, already has the new SKU) of the users on this page who hold the old SKU."""
        semaphore = asyncio.Semaphore(self.settings.max_concurrency)

        async def inspect(user: CustomerUser) -> tuple[str, str | None, bool] | None:
            async with semaphore:
                licenses = await self.client.get_user_licenses(record.customer_id, user.id)
            skus = {lic.product_sku.id.lower() for lic in licenses}
            if old_sku.lower() not in skus:
                return None
            return user.id, user.user_principal_name, new_sku.lower() in skus

        found = await asyncio.gather(*(inspect(u) for u in users))
        return [h for h in found if h is not None]

    # ================================================================== 4. suspend

    async def suspend(self, message: StepMessage) -> StepResult:
        return await self._run_step(message, lambda h: self._suspend(h, message))

    async def _suspend(self, holder: dict[str, MigrationRecord], message: StepMessage) -> StepResult:
        record = holder["record"]
        if record.state != "reassigned" or not record.new_subscription_id or not record.old_sku_id:
            # A stale or duplicate message (the record moved on, or went back to reassigning): nothing to do here;
            # the step that owns the record's current state has its own message.
            _log(record, logging.INFO, "suspend message ignored: record is %s", record.state)
            return StepResult([], record, "stale message")
        old_sku_id = record.old_sku_id.lower()
        # Re-verify the precondition: the replacement is active and nobody holds the old SKU any more.
        new_sub = await self.client.get_subscription(record.customer_id, record.new_subscription_id)
        if new_sub.status != "active":
            record = await self._save_transition(record, "blocked", "replacement_not_active",
                                                 f"replacement {new_sub.id} is {new_sub.status}; old kept active")
            return StepResult([], record, "blocked")
        if old_sku_id != (record.new_sku_id or "").lower():
            skus = {s.product_sku.id.lower(): s for s in await self.client.list_subscribed_skus(record.customer_id)}
            old = skus.get(old_sku_id)
            if old is not None and old.consumed_units > 0:
                trips = sum(1 for h in record.history if h.get("event") == "old_sku_still_used")
                if trips >= MAX_REASSIGN_TRIPS:
                    record = await self._save_transition(
                        record, "blocked", "old_sku_keeps_returning",
                        f"{old.consumed_units} user(s) still hold the old SKU after {trips} passes (is someone "
                        "assigning it again, or another subscription of the same product?); old kept active")
                    return StepResult([], record, "blocked")
                # Someone gave a user the old license again (or a move did not stick): move them first.
                record = await self._save_transition(record, "reassigning", "old_sku_still_used",
                                                     f"{old.consumed_units} user(s) still hold the old SKU")
                return StepResult([self._message("reassign", record)], record, "back to reassign")

        old_sub = await self.client.get_subscription(record.customer_id, record.subscription_id)
        if old_sub.status != "active":
            record = await self._save_transition(record, "completed", "already_" + old_sub.status,
                                                 f"old subscription already {old_sub.status}; no PATCH sent")
            return StepResult([], record, "completed")
        try:
            updated = await self.client.update_subscription(
                record.customer_id, old_sub, status="suspended",
                request_id=deterministic_request_id("suspend", record.customer_id, record.subscription_id,
                                                    old_sub.etag or ""))
        except PreconditionFailedError:
            raise RetryLater("old subscription changed while suspending; re-reading", delay=1) from None
        except TransportError:
            raise
        if updated.status != "suspended":
            check = await self.client.get_subscription(record.customer_id, record.subscription_id)
            if check.status != "suspended":
                raise RetryLater(f"old subscription still {check.status} after PATCH")
        record = await self._save_transition(record, "completed", "old_suspended",
                                             f"old subscription suspended; replacement {record.new_subscription_id}")
        return StepResult([], record, "completed")
