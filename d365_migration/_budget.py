"""One Partner Center request budget per limit, shared by every instance and every function of the app.

Partner Center counts requests **per partner tenant**: "The Subscription resource has a rate limit of 500 requests per
minute per tenant identifier" (learn.microsoft.com/partner-center/developer/subscription-resources; the same for the
Customer and Order resources: customer-resources, order-resources). Users, licenses and subscribed SKUs are throttled
too, with numbers Microsoft does not publish (api-throttling-guidance), so they get a budget of their own. How many
instances the Functions platform runs is not something the app can know (Flex Consumption scales per function), so
the budget is not split by a guessed instance count: it lives in the storage account the app already has.

The budget is a **timeline of request slots** spaced ``60 / (limit × headroom)`` seconds apart, one Table Storage
entity per budget holding its next free slot. An instance that needs requests claims a **block** — the next few slots,
about ``block_seconds`` of the budget — with one ETag-conditional update (``If-Match``; a 412 means another instance
claimed first, so it re-reads and claims after it). It then sends one request per slot, at the slot's time. So:

* all instances together never send more than the budget, in any window, and never in a burst;
* a busy instance (many requests waiting) claims full blocks, often; one with a single request waiting claims one
  slot; an idle instance claims nothing and costs nothing;
* a slot not used by its time (the instance went idle, or crashed) is gone; a crashed instance takes at most its
  current block with it, about ``block_seconds`` of the budget, and everyone else carries on after it.

Local pacing and AIMD stay as the safety net (:class:`PacedBudget`): a 429 — for instance because another tool of
the same partner spends the same tenant budget — still pauses this instance for ``Retry-After`` and halves its pace.

If Table Storage cannot be reached, the work neither stops nor runs unbounded: the instance falls back to a
conservative local pace (``fallback_share`` of the budget), logs ``event=rate_budget_fallback`` once, tries the
table again every few seconds and logs ``event=rate_budget_restored`` when it is back.

Clocks: slot times are wall-clock (``time.time``); Azure instances are NTP-synchronised to milliseconds, which is
well inside the headroom.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._exceptions import RateBudgetUnavailable
from ._ratelimit import RateLimiter

__all__ = [
    "BUDGETS",
    "DEFAULT_HEADROOM",
    "PARTITION",
    "Block",
    "BudgetStats",
    "PacedBudget",
    "SharedBudget",
    "TableBudgetStore",
    "budget_for_path",
    "budget_store",
    "build_pacers",
    "counting_requests",
]

if TYPE_CHECKING:
    from azure.data.tables import TableClient

    from ._settings import Settings

logger = logging.getLogger("d365_migration.budget")

Budget = Literal["commerce", "license"]
BUDGETS: tuple[Budget, ...] = ("commerce", "license")
PARTITION = "partner-center-budget"
DEFAULT_HEADROOM = 0.98

#: Requests sent by the current invocation, per budget (set by the function adapters, counted by the pacer).
request_costs: ContextVar[Counter[str] | None] = ContextVar("d365_migration_request_costs", default=None)


def budget_for_path(path: str) -> Budget:
    """The one place that decides which budget a request draws from, by its path.

    ``/v1/customers/{id}/users…`` and ``/v1/customers/{id}/subscribedskus`` are the user and license APIs (their own,
    unpublished limit); everything else — customers, subscriptions (``provisioningstatus`` is part of the Subscription
    resource), orders, carts — is the documented 500-per-minute commerce budget.
    """
    segments = [s for s in path.split("?", 1)[0].lower().split("/") if s]
    if segments and segments[0] == "v1":
        segments = segments[1:]
    if len(segments) >= 3 and segments[0] == "customers" and segments[2] in ("users", "subscribedskus"):
        return "license"
    return "commerce"


@contextlib.contextmanager
def counting_requests() -> Iterator[Counter[str]]:
    """Count the Partner Center requests sent inside this block (and the tasks it starts), per budget."""
    costs: Counter[str] = Counter()
    token = request_costs.set(costs)
    try:
        yield costs
    finally:
        request_costs.reset(token)


# ---------------------------------------------------------------------------------------------------- store


@dataclass(frozen=True)
class Block:
    """``count`` consecutive slots of a budget's timeline, the first at ``start`` (epoch seconds)."""

    budget: str
    start: float
    interval: float
    count: int

    @property
    def end(self) -> float:
        return self.start + self.count * self.interval

    def slots(self) -> list[float]:
        return [self.start + i * self.interval for i in range(self.count)]


class TableBudgetStore:
    """The budgets' timelines in a Table Storage table: PartitionKey ``partner-center-budget``, RowKey the budget.

    Each entity holds ``NextSlot`` (epoch seconds of the first unclaimed slot), ``Granted`` (slots handed out, ever)
    and ``Claims``. Thread-safe; the synchronous SDK runs in a worker thread (see :class:`SharedBudget`). Any storage
    failure becomes :class:`RateBudgetUnavailable` here, the one boundary for foreign errors.
    """

    def __init__(self, table: TableClient) -> None:
        self._table = table
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, Any]] = {}
        self._table_ready = False

    # Short timeouts and no SDK retries: a claim that cannot be made at once falls back to the local pace; the next
    # attempt comes a few seconds later anyway.
    _CLIENT_OPTIONS: Mapping[str, Any] = {"retry_total": 0, "connection_timeout": 2, "read_timeout": 3}

    @classmethod
    def from_connection_string(cls, connection_string: str, table_name: str) -> TableBudgetStore:
        from azure.data.tables import TableClient

        return cls(TableClient.from_connection_string(connection_string, table_name, **cls._CLIENT_OPTIONS))

    @classmethod
    def from_endpoint(cls, table_uri: str, credential: Any, table_name: str) -> TableBudgetStore:
        from azure.data.tables import TableClient

        return cls(TableClient(endpoint=table_uri, table_name=table_name, credential=credential,
                               **cls._CLIENT_OPTIONS))

    @property
    def table_name(self) -> str:
        return str(self._table.table_name)

    def close(self) -> None:
        self._table.close()

    def claim(self, budget: str, count: int, interval: float, *, now: float) -> Block:
        """Claim the next ``count`` free slots (never earlier than ``now``) of ``budget``'s timeline.

        :raises RateBudgetUnavailable: the table could not be read or written (or stayed contended).
        """
        from azure.core.exceptions import AzureError

        if count < 1 or interval <= 0:
            raise ValueError("a claim needs count >= 1 and a positive interval")
        with self._lock:
            try:
                return self._claim(budget, count, interval, now)
            except AzureError as exc:
                self._cache.pop(budget, None)
                raise RateBudgetUnavailable(f"budget table {self.table_name}: {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None

    def _claim(self, budget: str, count: int, interval: float, now: float) -> Block:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
        from azure.data.tables import UpdateMode

        if not self._table_ready:
            with contextlib.suppress(ResourceExistsError):
                self._table.create_table()
            self._table_ready = True
        for _ in range(50):
            entity = self._cache.get(budget)
            if entity is None:
                try:
                    got = self._table.get_entity(PARTITION, budget)
                except ResourceNotFoundError:
                    entity = None
                else:
                    entity = {**got, "_etag": got.metadata["etag"]}
            if entity is None:
                start = now
                new = {"PartitionKey": PARTITION, "RowKey": budget, "NextSlot": start + count * interval,
                       "Granted": count, "Claims": 1}
                try:
                    meta = self._table.create_entity(new)
                except ResourceExistsError:
                    continue  # another instance created it first: read it and claim after it
                except ResourceNotFoundError:  # the table itself is gone (deleted by hand): make it again
                    with contextlib.suppress(ResourceExistsError):
                        self._table.create_table()
                    continue
                self._cache[budget] = {**new, "_etag": meta.get("etag")}
                return Block(budget, start, interval, count)
            start = max(float(entity["NextSlot"]), now)
            updated = {"PartitionKey": PARTITION, "RowKey": budget, "NextSlot": start + count * interval,
                       "Granted": int(entity.get("Granted", 0)) + count, "Claims": int(entity.get("Claims", 0)) + 1}
            try:
                meta = self._table.update_entity(updated, mode=UpdateMode.REPLACE, etag=entity["_etag"],
                                                 match_condition=MatchConditions.IfNotModified)
            except (ResourceModifiedError, ResourceNotFoundError):
                self._cache.pop(budget, None)  # someone claimed first (412): read theirs and claim after it
                continue
            self._cache[budget] = {**updated, "_etag": meta.get("etag")}
            return Block(budget, start, interval, count)
        raise RateBudgetUnavailable(f"budget {budget}: 50 claims in a row lost to other instances")

    def read(self, budget: str) -> dict[str, Any] | None:
        """The budget's entity (``NextSlot``, ``Granted``, ``Claims``), or None; for reports and tests."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return dict(self._table.get_entity(PARTITION, budget))
        except ResourceNotFoundError:
            return None


# ---------------------------------------------------------------------------------------------------- limiter


@dataclass
class BudgetStats:
    """What one process's share of a budget did: slots granted and used, slots that expired unused, claims made,
    requests paced locally while the table was unreachable."""

    claims: int = 0
    granted: int = 0
    used: int = 0
    expired: int = 0
    fallback_requests: int = 0
    fallback_episodes: int = 0
    blocks: list[Block] = field(default_factory=list, repr=False)  # kept only with ``keep_blocks`` (tests, bench)


class SharedBudget:
    """This process's door to one shared budget: hands out slots from claimed blocks, one per request.

    ``store=None`` means there is no shared table (a one-off CLI run without storage): the process then paces itself
    at the whole budget, which is right only when it is the only one spending it.
    """

    def __init__(
        self,
        budget: str,
        requests_per_minute: float,
        store: TableBudgetStore | None,
        *,
        headroom: float = DEFAULT_HEADROOM,
        block_seconds: float = 1.0,
        fallback_share: float = 0.1,
        retry_store_seconds: float = 5.0,
        catch_up: float = 0.25,
        keep_blocks: bool = False,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if requests_per_minute <= 0:
            raise ValueError("requests_per_minute must be positive")
        self.budget = budget
        self.requests_per_minute = requests_per_minute
        self.interval = 60.0 / (requests_per_minute * headroom)
        self.max_block = max(1, round(block_seconds / self.interval))
        self._store = store
        self._catch_up = catch_up
        self._retry_store = retry_store_seconds
        self._keep_blocks = keep_blocks
        self._clock = clock
        self._sleep = sleep
        # A slot may still be used this late (a busy event loop): each slot is used at most once, so any minute
        # still holds at most (60 + catch_up) / 60 × 98% of the budget.
        self._slots: deque[float] = deque()
        self._lock = asyncio.Lock()
        self._waiting = 0
        # Claim size: grows (doubling) while every granted slot gets used, shrinks by what expired unused, so a
        # block matches what this process can really send; many waiting requests take a full block at once.
        self._size = 1
        self._wasted_since_claim = False
        # How long a claim takes (moving average): a block starts that far ahead, so it is not already past when
        # the answer arrives.
        self._lead = 0.0
        share = 1.0 if store is None else fallback_share
        # The local pace: the whole budget without a table; the conservative share of it while the table is out.
        self._local = RateLimiter(requests_per_minute * share, safety=headroom, clock=clock, sleep=sleep)
        self.fallback_since: float | None = None
        self._retry_at = 0.0
        self.stats = BudgetStats()

    @property
    def shared(self) -> bool:
        """True while slots come from the shared table (False without one, or during an outage)."""
        return self._store is not None and self.fallback_since is None

    async def acquire(self) -> None:
        """Wait for this request's slot."""
        self._waiting += 1
        try:
            async with self._lock:
                slot = await self._take()
        finally:
            self._waiting -= 1
        if slot is None:
            self.stats.fallback_requests += self._store is not None
            await self._local.acquire()
            return
        self.stats.used += 1
        delay = slot - self._clock()
        if delay > 0:
            await self._sleep(delay)

    async def _take(self) -> float | None:
        """The next slot of this process's blocks (claiming a new block if none is left); None: pace locally."""
        if self._store is None:
            return None
        now = self._clock()
        expired = 0
        while self._slots and self._slots[0] < now - self._catch_up:
            self._slots.popleft()  # its time has passed: the slot is gone, never used late
            expired += 1
        if expired:
            self.stats.expired += expired
            self._size = max(1, self._size - expired)
            self._wasted_since_claim = True
        if self._slots:
            return self._slots.popleft()
        if self.fallback_since is not None and now < self._retry_at:
            return None
        await asyncio.sleep(0)  # let requests started in the same breath line up, so the claim sees their number
        if self.stats.claims and not self._wasted_since_claim:
            self._size = min(self.max_block, self._size * 2)
        self._wasted_since_claim = False
        count = min(self.max_block, max(self._size, self._waiting))
        started = self._clock()
        try:
            block = await asyncio.to_thread(self._store.claim, self.budget, count, self.interval,
                                            now=started + self._lead)
        except RateBudgetUnavailable as exc:
            self._enter_fallback(str(exc))
            return None
        self._lead = min(1.0, 0.7 * self._lead + 0.3 * max(0.0, self._clock() - started))
        if self.fallback_since is not None:
            logger.warning("event=rate_budget_restored budget=%s after=%.1fs: drawing from the shared budget again",
                           self.budget, self._clock() - self.fallback_since)
            self.fallback_since = None
        self.stats.claims += 1
        self.stats.granted += block.count
        if self._keep_blocks:
            self.stats.blocks.append(block)
        self._slots.extend(block.slots())
        return self._slots.popleft()

    def _enter_fallback(self, reason: str) -> None:
        now = self._clock()
        self._retry_at = now + self._retry_store
        if self.fallback_since is None:
            self.fallback_since = now
            self.stats.fallback_episodes += 1
            logger.warning(
                "event=rate_budget_fallback budget=%s local_rpm=%.0f of %.0f: the shared budget is unreachable (%s); "
                "pacing this instance conservatively and trying the table again every %.0fs", self.budget,
                self._local.ceiling * 60, self.requests_per_minute, reason, self._retry_store)


class PacedBudget:
    """What the client calls per request attempt: the shared budget, behind the local AIMD safety net.

    :meth:`acquire` first waits for the local limiter (its ceiling is the whole budget, so it only binds after a
    429 halved it or paused it for ``Retry-After``), then for a slot of the shared budget.
    """

    def __init__(self, shared: SharedBudget, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.shared = shared
        self.aimd = RateLimiter(shared.requests_per_minute, safety=1.0, clock=clock, sleep=sleep)

    @property
    def budget(self) -> str:
        return self.shared.budget

    async def acquire(self) -> None:
        costs = request_costs.get()
        if costs is not None:
            costs[self.shared.budget] += 1
        await self.aimd.acquire()
        await self.shared.acquire()

    def on_throttled(self, retry_after: float) -> None:
        self.aimd.on_throttled(retry_after)

    def on_success(self) -> None:
        self.aimd.on_success()


def budget_store(settings: Settings) -> TableBudgetStore | None:
    """The shared table from the app's storage settings, or None if none is configured."""
    if settings.storage_connection:
        return TableBudgetStore.from_connection_string(settings.storage_connection, settings.budget_table)
    if settings.storage_table_uri:
        from azure.identity import DefaultAzureCredential  # heavy; only in Azure

        credential = DefaultAzureCredential(managed_identity_client_id=settings.storage_client_id)
        return TableBudgetStore.from_endpoint(settings.storage_table_uri, credential, settings.budget_table)
    return None


def build_pacers(settings: Settings, *, store: TableBudgetStore | None = None, shared: bool = True,
                 **options: Any) -> dict[Budget, PacedBudget]:
    """One pacer per budget for a :class:`~d365_migration._client.PartnerCenterClient` (``limiters=``).

    With ``shared`` (the default) the budgets live in the app's storage account, so every instance and function
    draws from the same ones; ``shared=False`` (or no storage configured) paces this process at the whole budget.
    """
    if shared and store is None:
        store = budget_store(settings)
    if not shared:
        store = None
    limits: dict[Budget, int] = {"commerce": settings.requests_per_minute,
                                 "license": settings.license_requests_per_minute}
    return {name: PacedBudget(SharedBudget(name, rpm, store, block_seconds=settings.budget_block_seconds,
                                           fallback_share=settings.fallback_share, **options))
            for name, rpm in limits.items()}
