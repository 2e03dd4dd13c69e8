"""The migration ledger: one row per migration in Azure Table Storage (Azurite locally).

PartitionKey is the customer id and RowKey the old subscription id (both lower-case), so one customer's records live
together. Per-user outcomes of the license step are rows in the same partition (RowKey ``<sub>|user|<user>``).

Every change is an optimistic-concurrency update (``If-Match`` with the entity's ETag): two workers holding the same
record cannot both win, and a step *claims* a record (a short lease written the same way) before it acts. The ledger
is what makes retries safe: a step always reads it first and does only what is still missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, TableServiceClient, UpdateMode

from ._exceptions import ConcurrencyConflict, LedgerError

__all__ = [
    "FINAL_STATES",
    "STATES",
    "MigrationLedger",
    "MigrationRecord",
    "ScanFailure",
    "UserOutcome",
    "correlation_id_for",
    "record_key",
    "utcnow",
]

logger = logging.getLogger("d365_migration.ledger")

STATES = ("detected", "purchasing", "purchased", "reassigning", "reassigned", "completed", "blocked", "failed",
          "cancelled", "native_pending", "native_moving")
# native_pending / native_moving: Partner Center's own transition or upgrade with license transfer replaces buy +
# move (steps/native.py); once verified the record rejoins the runbook at ``purchased`` (the license step finds
# nobody left to move and hands over to the suspension).
# cancelled: an operator cancelled the replacement this tool bought, inside Partner Center's cancellation window
# (`python -m d365_migration cancel`); the old subscription was left active.
FINAL_STATES = frozenset({"completed", "blocked", "failed", "cancelled"})
_MAX_HISTORY_CHARS = 30_000  # a Table property holds 64 KiB (32 K UTF-16 characters)


def utcnow() -> datetime:
    return datetime.now(UTC)


def record_key(customer_id: str, subscription_id: str) -> tuple[str, str]:
    return customer_id.strip().lower(), subscription_id.strip().lower()


def correlation_id_for(customer_id: str, subscription_id: str) -> str:
    """Stable per migration: every log line and Partner Center call of one record can be joined on it."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "d365-migration:record:" + "/".join(record_key(customer_id,
                                                                                             subscription_id))))


@dataclass
class MigrationRecord:
    customer_id: str
    subscription_id: str
    state: str = "detected"
    customer_name: str | None = None
    offer_id: str | None = None
    offer_name: str | None = None
    family: str | None = None
    audience: str | None = None
    channel: str | None = None
    quantity: int = 0
    commitment_end: str | None = None
    replacement_offer_id: str | None = None
    cart_id: str | None = None
    order_id: str | None = None
    order_attempted_at: str | None = None
    purchase_started_at: str | None = None
    new_subscription_id: str | None = None
    old_sku_id: str | None = None
    new_sku_id: str | None = None
    users_moved: int = 0
    users_skipped: int = 0
    users_failed: int = 0
    users_cursor: str | None = None  # JSON PageRequest of the next users page to work on (resumable moves)
    user_failures: str | None = None  # "upn: reason; …" of users that could not be moved so far
    buy_anyway: bool = False  # an operator confirmed an untagged subscription of the replacement is not ours
    reseller_partner_id: str | None = None  # the old subscription's indirect reseller (carried to the purchase)
    wait_kind: str | None = None  # what the license step is waiting for (provisioning_status, subscribed_sku, …)
    wait_started_at: str | None = None  # since when (the injected clock): waits are measured in time, not polls
    # JSON {wait kind: since when} of every wait since the step last made progress: a kind seen again keeps its first
    # start, so answers that flap between two waits cannot restart them for ever (steps/_waits.py).
    wait_starts: str | None = None
    purchase_attempt: int = 0  # RequestAttempt.attempt of the next cart/checkout/order write (bumped per answer)
    migration_path: str | None = None  # native_transition | native_upgrade | runbook (steps/native.py)
    native_target: str | None = None  # catalog item id (transition) or legacy offer id (upgrade)
    native_attempt: int = 0  # RequestAttempt number of the native write (bumped after every answer seen)
    native_attempted_at: str | None = None  # recorded BEFORE the native write is sent
    native_request_id: str | None = None
    native_operation_id: str | None = None  # the transition's id as Partner Center reported it
    suspend_attempt: int = 0  # RequestAttempt.attempt of the next suspension PATCH (bumped per answer)
    # Pooled SKU: the user principal names (JSON list, lower-case) an operator named as the retiring subscription's
    # users (`retry … --users-file`); the license step moves exactly those.
    moving_users: str | None = None
    reason: str | None = None
    polls: int = 0
    lease_owner: str | None = None
    lease_until: str | None = None
    created_at: str = ""
    updated_at: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    etag: str | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return record_key(self.customer_id, self.subscription_id)

    @property
    def correlation_id(self) -> str:
        return correlation_id_for(self.customer_id, self.subscription_id)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def named_users(self) -> frozenset[str] | None:
        """The operator's list of who moves (lower-case UPNs), or ``None`` when every holder moves."""
        if not self.moving_users:
            return None
        return frozenset(str(u).lower() for u in json.loads(self.moving_users))

    @property
    def tag(self) -> str:
        """A short marker put in the replacement's friendly name, so a purchase can be recognised later."""
        return "d365mig-" + self.correlation_id.replace("-", "")[:12]

    def transition(self, state: str, event: str, detail: str | None = None, *, at: datetime | None = None,
                   **changes: Any) -> MigrationRecord:
        """A copy in ``state`` with ``changes`` applied and one history entry appended, dated ``at`` (default:
        now)."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        now = (at or utcnow()).isoformat()
        entry: dict[str, Any] = {"at": now, "state": state, "event": event}
        if detail:
            entry["detail"] = detail[:500]
        history = [*self.history, entry]
        if state in ("blocked", "failed"):
            changes.setdefault("reason", detail or event)
        elif "reason" not in changes and state != self.state:
            changes["reason"] = None
        return replace(self, state=state, history=history, updated_at=now, **changes)

    # ------------------------------------------------------------------ table entity mapping

    def to_entity(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("etag")
        history = json.dumps(data.pop("history"), separators=(",", ":"))
        if len(history) > _MAX_HISTORY_CHARS:
            # Keep the first entries (how it started) and the latest, and say that some were folded.
            kept = [*self.history[:5], {"event": "history_truncated"}, *self.history[-50:]]
            history = json.dumps(kept, separators=(",", ":"))
        pk, rk = self.key
        entity: dict[str, Any] = {"PartitionKey": pk, "RowKey": rk, "Kind": "migration", "History": history}
        for name, value in data.items():
            if value is not None:
                entity[_camel(name)] = value
        return entity

    @classmethod
    def from_entity(cls, entity: Mapping[str, Any]) -> MigrationRecord:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("history", "etag"):
                continue
            value = entity.get(_camel(f.name))
            if value is not None:
                kwargs[f.name] = value
        try:
            history = json.loads(entity.get("History") or "[]")
        except json.JSONDecodeError:
            history = [{"event": "history_unreadable"}]
        metadata = getattr(entity, "metadata", None) or {}
        return cls(history=history if isinstance(history, list) else [], etag=metadata.get("etag"), **kwargs)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head[:1].upper() + head[1:] + "".join(p.title() for p in rest)


@dataclass(frozen=True)
class UserOutcome:
    user_id: str
    outcome: str  # moved | skipped | failed
    detail: str | None = None
    user_principal_name: str | None = None
    # Answers seen to this user's license updates: the RequestAttempt.attempt of the next one (documented rule: a
    # new MS-RequestId after any answer, the same one only after a lost answer).
    answers: int = 0


def _user_outcome(entity: Mapping[str, Any]) -> UserOutcome:
    # A row written before answers were counted still stands for one answer seen (rows follow answers).
    answers = entity.get("Answers")
    return UserOutcome(user_id=entity["UserId"], outcome=entity["Outcome"], detail=entity.get("Detail") or None,
                       user_principal_name=entity.get("UserPrincipalName") or None,
                       answers=int(answers) if answers is not None else 1)


@dataclass(frozen=True)
class ScanFailure:
    """A page of a detection run (``part``: a re-scan of some of its customers) whose customers were not all scanned:
    ``customers`` are (customer id, reason); ``reason`` is set when the whole page failed (its customers may then be
    unknown); ``failed`` counts them (more than listed when the list was too long to keep)."""

    run_id: str
    page: int
    part: str
    customers: tuple[tuple[str, str], ...]
    reason: str | None
    failed: int
    at: str

    @property
    def unlisted(self) -> int:
        """How many of the failed customers are counted but not listed (unknown, or too many to keep)."""
        return max(0, self.failed - len(self.customers))

    @classmethod
    def from_entity(cls, entity: Mapping[str, Any]) -> ScanFailure:
        row = str(entity["RowKey"])
        page, _, part = row.partition(".")
        try:
            listed = json.loads(entity.get("FailedCustomers") or "[]")
        except json.JSONDecodeError:
            listed = []
        customers = tuple((str(x.get("customerId")), str(x.get("reason") or "")) for x in listed
                          if isinstance(x, dict))
        return cls(run_id=str(entity["PartitionKey"]).removeprefix("scan-"), page=int(page) if page.isdigit() else 0,
                   part=part, customers=customers, reason=entity.get("Reason") or None,
                   failed=int(entity.get("Failed") or 0), at=str(entity.get("At") or ""))


def _scan_row(page: int, part: str) -> str:
    return f"{page:07d}" + (f".{part}" if part else "")


def _failed_customers(failed: Sequence[tuple[str, str]]) -> str:
    """(customer id, reason) as JSON within what a Table property holds (the rest are counted, not listed)."""
    kept: list[dict[str, str]] = []
    size = 2
    for customer_id, reason in failed:
        item = {"customerId": customer_id, "reason": reason[:300]}
        size += len(json.dumps(item)) + 1
        if size > _MAX_HISTORY_CHARS:
            break
        kept.append(item)
    return json.dumps(kept, separators=(",", ":"))


class _ScanMarkers:
    """The ledger's detection bookkeeping (one partition per detection run): which pages and re-scans are being or
    were scanned, the customers that could not be, and the run's purchase budget. A part of :class:`MigrationLedger`.
    """

    if TYPE_CHECKING:
        _table: TableClient

        async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any: ...

        async def ensure_table(self) -> None: ...

    async def claim_scan_page(self, run_id: str, page: int, owner: str, *, lease: timedelta, part: str = ""
                              ) -> dict[str, Any] | None:
        """Mark a page of a detection run (``part``: one re-scan of some of its customers) as being scanned. Returns
        the marker if this worker may scan it; a page already scanned returns ``{"done": marker}`` (a page
        recorded *failed* may be scanned again: its message was re-driven).

        :raises ConcurrencyConflict: another worker is scanning it (its lease has not expired).
        """
        await self.ensure_table()
        pk, rk = f"scan-{run_id}", _scan_row(page, part)
        now = utcnow()
        entity = {"PartitionKey": pk, "RowKey": rk, "Kind": "scanpage", "Status": "scanning", "Owner": owner,
                  "LeaseUntil": (now + lease).isoformat()}
        try:
            await self._run(self._table.create_entity, entity)
            return entity
        except ResourceExistsError:
            pass
        existing = await self._run(self._table.get_entity, pk, rk)
        if existing.get("Status") == "done":
            return {"done": dict(existing)}
        lease_until = existing.get("LeaseUntil")  # none on a page recorded failed: free to take
        if lease_until and datetime.fromisoformat(lease_until) > now and existing.get("Owner") != owner:
            raise ConcurrencyConflict(f"scan page {page} of run {run_id} is being scanned by another worker")
        try:
            await self._run(self._table.update_entity, entity, mode=UpdateMode.REPLACE,
                            etag=existing.metadata["etag"], match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError:
            raise ConcurrencyConflict(f"scan page {page} of run {run_id} was taken by another worker") from None
        return entity

    async def release_scan_page(self, run_id: str, page: int, owner: str, *, part: str = "") -> None:
        """Give up ``owner``'s claim on a page it could not finish (nothing happens if someone else holds it now), so
        the message's next delivery — on any instance — scans it instead of finding it "being scanned"."""
        await self.ensure_table()
        pk, rk = f"scan-{run_id}", _scan_row(page, part)
        try:
            existing = await self._run(self._table.get_entity, pk, rk)
        except ResourceNotFoundError:
            return
        if existing.get("Status") != "scanning" or existing.get("Owner") != owner:
            return
        entity = {"PartitionKey": pk, "RowKey": rk, "Kind": "scanpage", "Status": "released",
                  "At": utcnow().isoformat()}
        with contextlib.suppress(ResourceModifiedError):  # taken over meanwhile: theirs now
            await self._run(self._table.update_entity, entity, mode=UpdateMode.REPLACE,
                            etag=existing.metadata["etag"], match_condition=MatchConditions.IfNotModified)

    async def complete_scan_page(self, run_id: str, page: int, *, next_cursor: str | None, customers: int,
                                 candidates: int, part: str = "", retrying: int = 0,
                                 failed: Sequence[tuple[str, str]] = ()) -> None:
        """Mark a page (or re-scan ``part``) scanned: it is not scanned again. ``retrying``: customers handed to a
        re-scan; ``failed``: (customer id, reason) of the customers that could not be scanned and will not be read
        again in this run (:meth:`scan_failures` lists them)."""
        entity = {"PartitionKey": f"scan-{run_id}", "RowKey": _scan_row(page, part), "Kind": "scanpage",
                  "Status": "done", "NextCursor": next_cursor or "", "Customers": customers, "Candidates": candidates,
                  "Retrying": retrying, "Failed": len(failed), "FailedCustomers": _failed_customers(failed),
                  "At": utcnow().isoformat()}
        await self._run(self._table.upsert_entity, entity, mode=UpdateMode.REPLACE)

    async def fail_scan_page(self, run_id: str, page: int, *, reason: str, part: str = "",
                             customers: Sequence[str] = ()) -> None:
        """Record that a page (or re-scan ``part``) could not be scanned at all — its message's last delivery failed
        — with the reason and the customers it was to scan when they are known."""
        entity = {"PartitionKey": f"scan-{run_id}", "RowKey": _scan_row(page, part), "Kind": "scanpage",
                  "Status": "failed", "Reason": reason[:1000], "Failed": max(1, len(customers)),
                  "FailedCustomers": _failed_customers([(c, reason[:200]) for c in customers]),
                  "At": utcnow().isoformat()}
        await self._run(self._table.upsert_entity, entity, mode=UpdateMode.REPLACE)

    async def _scan_page_entities(self) -> list[Any]:
        await self.ensure_table()
        return await self._run(lambda: list(self._table.query_entities("Kind eq 'scanpage'")))

    async def scan_failures(self, *, since: datetime | None = None) -> list[ScanFailure]:
        """The pages and customers detection could not scan (recorded at or after ``since``), oldest first."""
        entities = await self._scan_page_entities()
        failures = [ScanFailure.from_entity(e) for e in entities if int(e.get("Failed") or 0) > 0]
        if since is not None:
            failures = [f for f in failures if f.at >= since.isoformat()]
        return sorted(failures, key=lambda f: (f.at, f.run_id, f.page, f.part))

    async def latest_scan_failures(self) -> tuple[str | None, list[ScanFailure]]:
        """The latest detection run (the one whose page was recorded last) and what it could not scan, for the status
        page: older runs' failures were either scanned by a later run or are reported again by it."""
        entities = await self._scan_page_entities()
        if not entities:
            return None, []
        latest = max(entities, key=lambda e: (str(e.get("At") or ""), str(e["PartitionKey"])))
        run_key = str(latest["PartitionKey"])
        failures = [ScanFailure.from_entity(e) for e in entities
                    if str(e["PartitionKey"]) == run_key and int(e.get("Failed") or 0) > 0]
        return run_key.removeprefix("scan-"), sorted(failures, key=lambda f: (f.page, f.part))

    async def reserve_purchases(self, run_id: str, wanted: int, limit: int) -> int:
        """How many of ``wanted`` purchases this page may still queue under the run's ``MAX_PURCHASES_PER_RUN``
        (an ETag-guarded counter shared by every page of the run)."""
        if wanted <= 0:
            return 0
        await self.ensure_table()
        pk, rk = f"scan-{run_id}", "run"
        for _ in range(20):
            try:
                existing = await self._run(self._table.get_entity, pk, rk)
            except ResourceNotFoundError:
                granted = min(wanted, limit)
                try:
                    await self._run(self._table.create_entity, {"PartitionKey": pk, "RowKey": rk, "Kind": "scanrun",
                                                                "Queued": granted})
                    return granted
                except ResourceExistsError:
                    continue
            queued = int(existing.get("Queued", 0))
            granted = max(0, min(wanted, limit - queued))
            try:
                await self._run(self._table.update_entity, {**existing, "Queued": queued + granted},
                                mode=UpdateMode.REPLACE, etag=existing.metadata["etag"],
                                match_condition=MatchConditions.IfNotModified)
                return granted
            except ResourceModifiedError:
                continue
        raise ConcurrencyConflict(f"could not update the purchase budget of run {run_id}")


class MigrationLedger(_ScanMarkers):
    """Async facade over a synchronous ``TableClient`` (each call runs in a worker thread)."""

    def __init__(self, table: TableClient) -> None:
        self._table = table
        self._ready = False

    @classmethod
    def from_connection_string(cls, connection_string: str, table_name: str = "migrations") -> MigrationLedger:
        service = TableServiceClient.from_connection_string(connection_string)
        return cls(service.get_table_client(table_name))

    @classmethod
    def from_endpoint(cls, table_uri: str, credential: Any, table_name: str = "migrations") -> MigrationLedger:
        return cls(TableClient(endpoint=table_uri, table_name=table_name, credential=credential))

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (ResourceModifiedError, ResourceExistsError, ResourceNotFoundError):
            raise
        except HttpResponseError as exc:
            if exc.status_code == 412:
                raise ResourceModifiedError(message=str(exc)) from exc
            raise LedgerError(f"ledger call failed: HTTP {exc.status_code} {exc.reason}") from None
        except AzureError as exc:
            raise LedgerError(f"ledger unreachable: {type(exc).__name__}") from None

    async def ensure_table(self) -> None:
        if self._ready:
            return
        with contextlib.suppress(ResourceExistsError):
            await self._run(self._table.create_table)
        self._ready = True

    async def get(self, customer_id: str, subscription_id: str) -> MigrationRecord | None:
        await self.ensure_table()
        pk, rk = record_key(customer_id, subscription_id)
        try:
            entity = await self._run(self._table.get_entity, pk, rk)
        except ResourceNotFoundError:
            return None
        return MigrationRecord.from_entity(entity)

    async def create_if_absent(self, record: MigrationRecord) -> tuple[MigrationRecord, bool]:
        """Insert the record unless one exists for the same key; returns (the stored record, created?)."""
        await self.ensure_table()
        now = utcnow().isoformat()
        if not record.created_at:
            record = replace(record, created_at=now, updated_at=now,
                             history=record.history or [{"at": now, "state": record.state, "event": "detected"}])
        try:
            metadata = await self._run(self._table.create_entity, record.to_entity())
        except ResourceExistsError:
            existing = await self.get(record.customer_id, record.subscription_id)
            if existing is None:  # deleted in between; extremely unlikely — try once more
                raise ConcurrencyConflict("record vanished while being created") from None
            return existing, False
        return replace(record, etag=metadata.get("etag")), True

    async def save(self, record: MigrationRecord) -> MigrationRecord:
        """Replace the record if nobody changed it since it was read (ETag); else :class:`ConcurrencyConflict`."""
        if record.etag is None:
            raise LedgerError("save() needs a record read from the ledger (it has no ETag)")
        try:
            metadata = await self._run(self._table.update_entity, record.to_entity(), mode=UpdateMode.REPLACE,
                                       etag=record.etag, match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError:
            raise ConcurrencyConflict(
                f"record {record.customer_id}/{record.subscription_id} was changed by another worker") from None
        except ResourceNotFoundError:
            raise LedgerError(f"record {record.customer_id}/{record.subscription_id} no longer exists") from None
        return replace(record, etag=metadata.get("etag"))

    async def claim(self, record: MigrationRecord, owner: str, *, lease: timedelta,
                    dead_owners: Callable[[str], bool] | None = None, now: datetime | None = None
                    ) -> MigrationRecord:
        """Take a short lease on the record before acting. Raises :class:`ConcurrencyConflict` if another worker
        holds an unexpired lease, or wins the race to write it. ``dead_owners(owner)`` says whether a lease holder
        is known to be gone (an invocation of this process that crashed), whose lease may be taken at once.

        :raises ConcurrencyConflict: another worker holds the lease or changed the record first.
        """
        now = now or utcnow()
        holder = record.lease_owner
        if holder and holder != owner and record.lease_until and not (dead_owners and dead_owners(holder)):
            until = datetime.fromisoformat(record.lease_until)
            if until > now:
                raise ConcurrencyConflict(
                    f"record {record.customer_id}/{record.subscription_id} is being worked on by another worker "
                    f"until {until.isoformat()}")
        return await self.save(replace(record, lease_owner=owner, lease_until=(now + lease).isoformat()))

    async def release(self, record: MigrationRecord) -> MigrationRecord:
        if record.lease_owner is None:
            return record
        return await self.save(replace(record, lease_owner=None, lease_until=None))

    def _iter_records(self, query: str | None) -> Iterator[MigrationRecord]:
        entities = self._table.query_entities(query) if query else self._table.list_entities()
        for entity in entities:
            if entity.get("Kind") == "migration":
                yield MigrationRecord.from_entity(entity)

    async def list_records(self, *, states: Sequence[str] | None = None) -> list[MigrationRecord]:
        await self.ensure_table()
        query = "Kind eq 'migration'"
        records: list[MigrationRecord] = await self._run(lambda: list(self._iter_records(query)))
        if states is not None:
            records = [r for r in records if r.state in states]
        return sorted(records, key=lambda r: (r.customer_id, r.subscription_id))

    async def customer_records(self, customer_id: str) -> list[MigrationRecord]:
        """Every migration record of one customer (one partition): what the customer's other migrations have
        already claimed (orders, subscriptions) when a step looks for what an earlier attempt of its own did."""
        await self.ensure_table()
        pk = customer_id.strip().lower().replace("'", "''")
        query = f"PartitionKey eq '{pk}' and Kind eq 'migration'"
        return await self._run(lambda: list(self._iter_records(query)))

    async def record_user(self, record: MigrationRecord, outcome: UserOutcome) -> None:
        await self.ensure_table()
        pk, rk = record.key
        entity = {
            "PartitionKey": pk,
            "RowKey": f"{rk}|user|{outcome.user_id.lower()}",
            "Kind": "user",
            "UserId": outcome.user_id,
            "Outcome": outcome.outcome,
            "Detail": (outcome.detail or "")[:1000],
            "UserPrincipalName": outcome.user_principal_name or "",
            "Answers": outcome.answers,
            "At": utcnow().isoformat(),
        }
        await self._run(self._table.upsert_entity, entity, mode=UpdateMode.REPLACE)

    async def user_outcomes(self, record: MigrationRecord) -> list[UserOutcome]:
        await self.ensure_table()
        pk, rk = record.key
        query = f"PartitionKey eq '{pk}' and RowKey ge '{rk}|user|' and RowKey lt '{rk}|user|~'"
        entities = await self._run(lambda: list(self._table.query_entities(query)))
        return [_user_outcome(e) for e in entities]

    async def user_answers(self, record: MigrationRecord, user_ids: Sequence[str]) -> dict[str, int]:
        """How many license-update answers each of ``user_ids`` has had for this record (0 when none was recorded),
        keyed by the lower-case user id: the attempt number of the next update's request id."""
        await self.ensure_table()
        pk, rk = record.key

        def read(user_id: str) -> int:
            try:
                entity = self._table.get_entity(pk, f"{rk}|user|{user_id.lower()}")
            except ResourceNotFoundError:
                return 0
            return _user_outcome(entity).answers

        counts = await asyncio.gather(*(self._run(read, u) for u in user_ids))
        return {u.lower(): n for u, n in zip(user_ids, counts, strict=True)}

    @property
    def table_client(self) -> TableClient:
        """The underlying table: the rollout controls (``_rollout``) live in it too, under their own partition."""
        return self._table

    def close(self) -> None:
        self._table.close()
