"""Fault-injection harness: the whole chain (LocalHost over Azurite, sandbox over real HTTP) under one fault kind.

``run_scenario(kind, seed, connection_string)`` seeds a small sandbox world, injects the faults of ``kind``, fires
``detect_expiring`` and serves the queues until they are drained, then checks invariants against the sandbox's own
logs (purchases, license updates, subscription patches, the event log) and the ledger. ``KINDS`` lists every fault
kind; ``format_table`` prints the soak table. Used by ``tests/test_faults.py`` and ``python -m d365_tooling.soak``.

Fault kinds:

* sandbox faults, by configuration: lost write responses (``lose_first_write_response``, ``lose_response_rate``),
  429 with Retry-After (a short throttling window so Retry-After stays small), 5xx, connection resets, timeouts
  (``timeout_rate`` with the client's timeout below ``timeout_s``; the client timeout is set by wrapping
  ``_app.build_service``, as there is no setting for it), slow provisioning and list lag;
* queue faults: a duplicate of every step message enqueued next to the real one, and messages redelivered while
  their first worker still runs (``messageLease`` below one second: the runner receives with a zero visibility
  timeout until the first renewal);
* crashes: a ``SimulatedCrash`` raised right AFTER a Partner Center write returned (cart, checkout, order, license
  update, PATCH) or right after a ledger save, before the next step's message is written. The step's lease is released
  as usual (standing for a lease that has expired by the time the message is redelivered);
* human changes mid-flight: the old subscription suspended / set to auto-renew by hand before purchase, the
  replacement bought by hand (tagged or not), a user's old license removed by hand before reassign, and a moved user
  given the old license again before suspend;
* the native path (``Scenario.native``: Partner Center offers a transition or upgrade with license transfer to half
  the customers in scope, ``MIGRATION_PATH_POLICY=prefer_native``, the others take the runbook) under lost answers,
  crashes after the transition/upgrade POST and after each native ledger event, duplicate messages, slow completion
  with the old subscription left active, 5xx and timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueClient, TextBase64EncodePolicy

import d365_migration
from d365_migration import _app
from d365_migration._client import PartnerCenterClient
from d365_migration._ledger import FINAL_STATES, MigrationLedger, MigrationRecord
from d365_migration._messages import StepMessage
from d365_migration.steps import Work, observe_steps
from d365_tooling.demo import verify_world
from d365_tooling.golive import go_live_for_every_customer
from d365_tooling.localhost import LocalHost
from d365_tooling.localhost.azurite import wipe_account
from d365_tooling.sandbox import (
    DEMO_BEHAVIOURS,
    DEMO_REPLACEMENT_OFFERS,
    LEGACY_REPLACEMENT_OFFERS,
    Distractor,
    SandboxConfig,
    SandboxServer,
    SandboxState,
    SeedManifest,
    seed_world,
    sku_for_offer,
)
from d365_tooling.sandbox._faults import SlidingWindow
from d365_tooling.sandbox._transitions import native_operations

APP_ROOT = Path(d365_migration.__file__).resolve().parent.parent
LEDGER_TABLE = "migrations"
WRITE_METHODS = ("create_cart", "checkout_cart", "create_order", "update_user_licenses", "update_subscription",
                 "create_transition", "create_upgrade")
# Ledger events after which a simulated crash may strike (the next step's message is then never written).
CRASH_AFTER_EVENTS = ("cart_created", "checkout_sent", "checked_out", "order_attempt", "ordered", "order_found",
                      "replacement_active", "skus_resolved", "licenses_moved", "path_native", "native_attempt",
                      "native_started", "native_verified", "suspension_not_visible")


_CURRENT_MESSAGE: contextvars.ContextVar[StepMessage | None] = contextvars.ContextVar("current_message",
                                                                                     default=None)


class SimulatedCrash(Exception):
    """The worker 'dies' here: the invocation fails and nothing after this point runs."""


# ----------------------------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """What one run injects. ``expect_success``: every expected migration must complete and verify_world be clean."""

    kind: str
    seed: int
    customers: int = 5
    sandbox: dict[str, Any] = field(default_factory=dict)  # SandboxConfig fields; "faults": FaultConfig fields
    throttle_window_s: float | None = None  # replaces the sandbox's 60 s throttling window
    client_timeout_s: float | None = None
    crash_rate: float = 0.0
    duplicates: bool = False
    redeliver: bool = False  # after a Partner Center write, the running message shows up again; the worker stalls
    human: str | None = None
    host_overrides: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    expect_success: bool = True
    timeout_s: float = 90.0
    legacy_orders: bool = False  # buy through legacy orders (POST /orders, not idempotent) instead of NCE carts
    scope: int | None = None  # only this many customers in CUSTOMER_ALLOWLIST (a smaller run); None: all
    # Partner Center's native path (a sandbox NATIVE_MODES value) for every other customer with a migration, with
    # MIGRATION_PATH_POLICY=prefer_native; the rest take the runbook. None: the runbook only.
    native: str | None = None


FAST_HOST: dict[str, Any] = {"maxPollingInterval": 0.2, "visibilityTimeout": 0.5, "maxDequeueCount": 5}


def _lost_first(seed: int) -> Scenario:
    return Scenario("lost_first_write", seed, sandbox={"faults": {"lose_first_write_response": True}})


def _lost_rate(seed: int) -> Scenario:
    return Scenario("lost_responses", seed, sandbox={"faults": {"lose_response_rate": 0.3}})


def _throttle(seed: int) -> Scenario:
    return Scenario("throttle_429", seed, sandbox={"requests_per_minute": 30, "license_requests_per_minute": 30},
                    throttle_window_s=1.5)


def _errors(seed: int) -> Scenario:
    return Scenario("server_5xx", seed, sandbox={"faults": {"error_rate": 0.15}})


def _resets(seed: int) -> Scenario:
    return Scenario("conn_reset", seed, sandbox={"faults": {"reset_rate": 0.15}})


def _timeouts(seed: int) -> Scenario:
    return Scenario("timeout", seed, sandbox={"faults": {"timeout_rate": 0.08, "timeout_s": 1.0}},
                    client_timeout_s=0.5)


def _slow(seed: int) -> Scenario:
    return Scenario("slow_provisioning_lag", seed, sandbox={"provisioning_delay_s": 2.5, "list_lag_s": 2.0})


def _duplicates(seed: int) -> Scenario:
    return Scenario("duplicate_messages", seed, duplicates=True)


def _redelivery(seed: int) -> Scenario:
    return Scenario("redelivery_while_running", seed, sandbox={"latency_ms": 20}, redeliver=True)


def _crashes(seed: int) -> Scenario:
    return Scenario("crash_after_call", seed, crash_rate=0.5)


def _all_together(seed: int) -> Scenario:
    return Scenario(
        "all_together", seed,
        sandbox={"latency_ms": 10, "requests_per_minute": 100, "license_requests_per_minute": 100,
                 "provisioning_delay_s": 1.5, "list_lag_s": 1.0,
                 "faults": {"lose_first_write_response": True, "lose_response_rate": 0.1, "error_rate": 0.05,
                            "reset_rate": 0.05, "timeout_rate": 0.03, "timeout_s": 1.0}},
        throttle_window_s=1.5, client_timeout_s=0.5, crash_rate=0.3, duplicates=True, redeliver=True,
        host_overrides={"maxDequeueCount": 10}, timeout_s=150)


def _human(name: str) -> Callable[[int], Scenario]:
    def make(seed: int) -> Scenario:
        return Scenario(f"human_{name}", seed, human=name, expect_success=False)

    return make


def _legacy(seed: int) -> Scenario:
    # The legacy purchase path (one POST /orders, not retried blindly) under lost responses and timeouts whose
    # write is applied AFTER the client gave up (the sandbox sleeps, then acts).
    return Scenario("legacy_orders_lost_and_late", seed, legacy_orders=True,
                    sandbox={"faults": {"lose_first_write_response": True, "timeout_rate": 0.1, "timeout_s": 2.5}},
                    client_timeout_s=0.5)


def _documented(name: str, **sandbox: Any) -> Callable[[int], Scenario]:
    """A documented Partner Center behaviour (issue 10) switched on in the sandbox, on top of lost first answers where
    the behaviour is about finding what a write did."""
    def make(seed: int) -> Scenario:
        return Scenario(name, seed, sandbox=dict(sandbox))

    return make


def _baseline(seed: int) -> Scenario:
    return Scenario("no_faults", seed)


def _every_documented_behaviour(seed: int) -> Scenario:
    # Every documented behaviour the steps handle (the demo's), at once, with the first answer of every write lost
    # and the native path beside the runbook: what an independent Partner Center written from Learn may show.
    return Scenario("every_documented_behaviour_lost_first_write", seed, native="transition_with_license_transfer",
                    sandbox={**DEMO_BEHAVIOURS, "faults": {"lose_first_write_response": True}}, timeout_s=150)


_TRANSFER = "transition_with_license_transfer"


def _native_lost(seed: int) -> Scenario:
    # Transitions whose answers are lost after Partner Center applied them (first and a share of the rest).
    return Scenario("native_lost_answers", seed, native=_TRANSFER,
                    sandbox={"faults": {"lose_first_write_response": True, "lose_response_rate": 0.2}})


def _native_crash(seed: int) -> Scenario:
    # The worker dies right after the transition POST returned or after a native ledger event; every step message
    # also arrives twice.
    return Scenario("native_crash_and_duplicates", seed, native=_TRANSFER, crash_rate=0.5, duplicates=True)


def _native_upgrade(seed: int) -> Scenario:
    # Legacy → legacy upgrades with license transfer (REPLACEMENT_OFFERS names the legacy offers); lost answers and
    # timeouts applied after the client gave up. Upgrades leave no history: recovery reads the subscriptions.
    return Scenario("native_upgrade_lost_and_late", seed, native="upgrade_with_license_transfer", legacy_orders=True,
                    sandbox={"faults": {"lose_first_write_response": True, "timeout_rate": 0.1, "timeout_s": 2.5}},
                    client_timeout_s=0.5)


def _native_slow(seed: int) -> Scenario:
    # The move completes seconds later and Partner Center leaves the old subscription active (the tool suspends it
    # after verification); 5xx on the way.
    return Scenario("native_slow_left_active_5xx", seed, native=_TRANSFER,
                    sandbox={"native_completion_s": 2.0, "native_source_left_active": True,
                             "faults": {"error_rate": 0.1}})


KINDS: dict[str, Callable[[int], Scenario]] = {
    "no_faults": _baseline,
    "lost_first_write": _lost_first,
    "lost_responses": _lost_rate,
    "throttle_429": _throttle,
    "server_5xx": _errors,
    "conn_reset": _resets,
    "timeout": _timeouts,
    "slow_provisioning_lag": _slow,
    "duplicate_messages": _duplicates,
    "redelivery_while_running": _redelivery,
    "crash_after_call": _crashes,
    "all_together": _all_together,
    "legacy_orders_lost_and_late": _legacy,
    # issue 10: documented behaviours the sandbox can switch on
    "nce_product_names_lost_first_write": _documented(
        "nce_product_names_lost_first_write", nce_product_friendly_names=True,
        faults={"lose_first_write_response": True}),
    "availabilities_rotated": _documented("availabilities_rotated", availabilities_rotated=True),
    "patch_accepted_202": _documented("patch_accepted_202", patch_accepted=True, patch_apply_delay_s=0.5),
    "provisioning_and_sku_lag": _documented("provisioning_and_sku_lag", provisioning_status_lag_s=2.0,
                                            subscribed_skus_lag_s=1.0),
    "paging_2000_and_license_warnings": _documented(
        "paging_2000_and_license_warnings", customer_paging_ends_in_2000=True, users_paging_ends_in_2000=True,
        license_warnings=True),
    "every_documented_behaviour_lost_first_write": _every_documented_behaviour,
    # issue 13: the native path (transitions / upgrades with license transfer) beside the runbook
    "native_lost_answers": _native_lost,
    "native_crash_and_duplicates": _native_crash,
    "native_upgrade_lost_and_late": _native_upgrade,
    "native_slow_left_active_5xx": _native_slow,
    "human_suspended_before_purchase": _human("suspended_before_purchase"),
    "human_autorenew_before_purchase": _human("autorenew_before_purchase"),
    "human_bought_replacement_tagged": _human("bought_replacement_tagged"),
    "human_removed_license": _human("removed_license"),
    "human_regranted_old_license": _human("regranted_old_license"),
}


# Not in the matrix: kinds whose right outcome is a product decision still to be made (see tests/test_faults.py).
EXTRA_KINDS: dict[str, Callable[[int], Scenario]] = {
    "human_bought_replacement_untagged": _human("bought_replacement_untagged"),
    # Partner Center deduplicating MS-RequestIds (undocumented; the sandbox's dedupe_request_ids) + a user given the
    # old license again: the second move of that user reuses the first move's request id.
    "human_regranted_old_license_dedupe": lambda seed: dataclasses.replace(
        _human("regranted_old_license")(seed), kind="human_regranted_old_license_dedupe",
        sandbox={"dedupe_request_ids": True}, timeout_s=10),
}


# ----------------------------------------------------------------------------------------------- results


@dataclass
class RunResult:
    kind: str
    seed: int
    migrations: int = 0
    completed: int = 0
    faults_injected: int = 0
    fault_detail: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    stopped_because: str = ""
    crash_points: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- storage


def _send(connection_string: str, queue: str, body: str) -> None:
    client = QueueClient.from_connection_string(connection_string, queue,
                                                message_encode_policy=TextBase64EncodePolicy())
    with client:
        with contextlib.suppress(ResourceExistsError):
            client.create_queue()
        client.send_message(body)


async def _records(connection_string: str) -> list[MigrationRecord]:
    ledger = MigrationLedger.from_connection_string(connection_string, LEDGER_TABLE)
    try:
        return await ledger.list_records()
    finally:
        ledger.close()


# ----------------------------------------------------------------------------------------------- hooks


@dataclass
class _Hooks:
    """Patches active for one run: crashes after Partner Center writes / ledger saves, human changes per step."""

    scenario: Scenario
    state: SandboxState
    manifest: SeedManifest
    rng: random.Random
    crashes: int = 0
    crash_points: dict[str, int] = field(default_factory=dict)  # after which call / ledger event, how often
    human_changes: int = 0
    crashed: set[tuple[str, ...]] = field(default_factory=set)
    crashes_per_record: dict[str, int] = field(default_factory=dict)
    connection_string: str = ""
    redeliveries: int = 0
    redelivered: set[tuple[str, ...]] = field(default_factory=set)
    target: Any = None  # the ExpectedMigration a human changes
    done: set[str] = field(default_factory=set)
    notes: dict[str, Any] = field(default_factory=dict)

    def _maybe_crash(self, point: tuple[str, ...], record_key: tuple[str, str]) -> None:
        if self.scenario.crash_rate <= 0 or point in self.crashed:
            return
        message = _CURRENT_MESSAGE.get()
        per = "/".join(record_key) + "/" + (message.step if message else "?")
        if self.crashes_per_record.get(per, 0) >= 2:  # per step message: stay well inside maxDequeueCount
            return
        if self.rng.random() >= self.scenario.crash_rate:
            return
        self.crashed.add(point)
        self.crashes_per_record[per] = self.crashes_per_record.get(per, 0) + 1
        self.crashes += 1
        where = point[1] if point[0] == "save" else point[0]
        self.crash_points[where] = self.crash_points.get(where, 0) + 1
        raise SimulatedCrash(f"worker killed after {'/'.join(point)}")

    async def _maybe_redeliver(self, point: tuple[str, ...]) -> None:
        """The message being worked on becomes visible again (its lease ran out) while this worker is stalled right
        after a Partner Center write: another delivery of the same body runs concurrently, then this one resumes."""
        message = _CURRENT_MESSAGE.get()
        if not self.scenario.redeliver or message is None or point in self.redelivered:
            return
        if self.rng.random() >= 0.7:
            return
        self.redelivered.add(point)
        self.redeliveries += 1
        await asyncio.to_thread(_send, self.connection_string, message.queue, message.to_json())
        await asyncio.sleep(1.5)

    # --- Partner Center writes: crash AFTER the call returned (the write is applied; the ledger never hears of it)
    def wrap_client(self, name: str, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        hooks = self

        @functools.wraps(original)
        async def wrapper(self: PartnerCenterClient, customer_id: str, *args: Any, **kwargs: Any) -> Any:
            result = await original(self, customer_id, *args, **kwargs)
            record_key = hooks._record_key_for(name, customer_id, args, kwargs)
            if record_key is not None:
                await hooks._maybe_redeliver((name, *record_key))
                hooks._maybe_crash((name, *record_key), record_key)
            return result

        return wrapper

    @staticmethod
    def _record_key_for(name: str, customer_id: str, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> tuple[str, str] | None:
        """The record whose step made this call: the step message being handled (set by ``around_step``)."""
        message = _CURRENT_MESSAGE.get()
        if message is None or message.customer_id.lower() != customer_id.lower():
            return None
        return message.customer_id.lower(), message.subscription_id.lower()

    # --- ledger saves: crash right AFTER a save (the next step's message is never written)
    def wrap_save(self, original: Callable[..., Awaitable[MigrationRecord]]) -> Callable[..., Awaitable[Any]]:
        hooks = self

        @functools.wraps(original)
        async def wrapper(self: MigrationLedger, record: MigrationRecord) -> MigrationRecord:
            saved = await original(self, record)
            event = record.history[-1]["event"] if record.history else ""
            if event in CRASH_AFTER_EVENTS:
                hooks._maybe_crash(("save", event, *record.key), record.key)
            return saved

        return wrapper

    # --- human changes, made right before a step runs for the target record (the steps' public observer seam)
    @contextlib.asynccontextmanager
    async def around_step(self, work: Work) -> AsyncIterator[None]:
        self.before_step(work.message.step, work.record)
        token = _CURRENT_MESSAGE.set(work.message)
        try:
            yield
        finally:
            _CURRENT_MESSAGE.reset(token)

    def before_step(self, step: str, record: MigrationRecord) -> None:
        em = self.target
        human = self.scenario.human
        if em is None or human is None or human in self.done:
            return
        if record.key != (em.customer_id.lower(), em.subscription_id.lower()):
            return
        state = self.state
        if step == "purchase" and human == "suspended_before_purchase":
            state.set_subscription_status(em.customer_id, em.subscription_id, "suspended")
        elif step == "purchase" and human == "autorenew_before_purchase":
            with state.lock:  # no by-hand helper for auto-renew: flip it as the portal would (new ETag)
                sub = state._customers[em.customer_id.lower()].subscriptions[em.subscription_id.lower()]
                sub.auto_renew = True
                sub.etag_version += 1
                state._event("by_hand_auto_renew", customer_id=em.customer_id, subscription_id=sub.id)
        elif step == "purchase" and human in ("bought_replacement_tagged", "bought_replacement_untagged"):
            name = "Bought in the portal" + (f" [{record.tag}]" if human.endswith("_tagged") else "")
            bought = state.purchase_by_hand(em.customer_id, em.replacement_catalog_item_id, em.quantity, name)
            self.notes["by_hand_subscription"] = str(bought["id"]).lower()
        elif step == "reassign" and human == "removed_license":
            if record.state not in ("purchased", "reassigning"):
                return
            holders = [u for u in em.user_ids if em.old_sku_id.lower() in state.user_licenses(em.customer_id, u)]
            if not holders:
                return
            user = self.rng.choice(holders)
            state.remove_user_license(em.customer_id, user, em.old_sku_id)
            self.notes["removed_from"] = user.lower()
        elif step == "suspend" and human == "regranted_old_license":
            if record.state != "reassigned":
                return
            new_sku = _new_sku(em)
            moved = [u for u in em.user_ids if new_sku in state.user_licenses(em.customer_id, u)]
            if not moved:
                return
            user = self.rng.choice(moved)
            state.assign_user_license(em.customer_id, user, em.old_sku_id)
            self.notes["regranted_to"] = user.lower()
        else:
            return
        self.done.add(human)
        self.human_changes += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for name in WRITE_METHODS:
                original = getattr(PartnerCenterClient, name)
                stack.enter_context(mock.patch.object(PartnerCenterClient, name, self.wrap_client(name, original)))
            stack.enter_context(mock.patch.object(MigrationLedger, "save", self.wrap_save(MigrationLedger.save)))
            stack.enter_context(observe_steps(self))
            if self.scenario.client_timeout_s is not None:
                timeout = httpx.Timeout(self.scenario.client_timeout_s)
                stack.enter_context(mock.patch.object(
                    _app, "build_service", functools.partial(_app.build_service, timeout=timeout)))
            yield


def _new_sku(em: Any) -> str:
    granted = sku_for_offer(em.replacement_catalog_item_id)
    assert granted is not None
    return granted.id.lower()


# ----------------------------------------------------------------------------------------------- duplicates


class _Duplicator:
    """Enqueues a second copy of every step message (directly, Base64 as the trigger expects), next to the real one."""

    def __init__(self, connection_string: str) -> None:
        self.connection_string = connection_string
        self.sent: set[tuple[str, str, str]] = set()
        self.count = 0

    async def duplicate(self, records: list[MigrationRecord]) -> None:
        for r in records:
            wanted: list[str] = []
            if r.state == "detected":
                wanted = ["purchase", "reassign", "suspend"]  # the stale ones must be ignored
            elif r.state in ("native_pending", "native_moving"):
                wanted = ["purchase", "suspend"]
            elif r.state in ("purchased", "reassigning"):
                wanted = ["reassign"]
            elif r.state == "reassigned":
                wanted = ["suspend", "purchase"]
            for step in wanted:
                key = (r.customer_id, r.subscription_id, step)
                if key in self.sent:
                    continue
                self.sent.add(key)
                msg = StepMessage(step, r.customer_id, r.subscription_id, r.correlation_id)  # type: ignore[arg-type]
                await asyncio.to_thread(_send, self.connection_string, msg.queue, msg.to_json())
                self.count += 1

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.duplicate(await _records(self.connection_string))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.3)


# ----------------------------------------------------------------------------------------------- the run


def base_env(sandbox_url: str, scenario: Scenario) -> dict[str, str]:
    dequeue = (FAST_HOST | scenario.host_overrides)["maxDequeueCount"]
    return {
        "PARTNER_CENTER_ENDPOINT": sandbox_url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
        "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS), "PROVISIONING_POLL_SECONDS": "1",
        "PARTNER_CENTER_REQUESTS_PER_MINUTE": "6000", "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "6000",
        "DETECT_SCHEDULE": "0 0 6 * * *", "EXPIRY_WINDOW_DAYS": "60", "MAX_PURCHASES_PER_RUN": "1000",
        "LEDGER_TABLE": LEDGER_TABLE, "AzureFunctionsJobHost__extensions__queues__maxDequeueCount": str(dequeue),
        # Production waits the documented 15-minute order-list lag before re-sending a lost write; the sandbox's list
        # lag here is at most a few seconds, and the wait stays longer than it, as it does in production.
        "LOST_WRITE_RESEND_WAIT_SECONDS": "5",
        **scenario.env,
    }


def _sandbox_config(scenario: Scenario, native_customers: list[str]) -> SandboxConfig:
    config = SandboxConfig()
    patch = dict(scenario.sandbox)
    faults = dict(patch.pop("faults", {}))
    faults["seed"] = scenario.seed
    if scenario.native is not None:
        patch["native_paths"] = {c: scenario.native for c in native_customers}
    config.apply_patch({**patch, "faults": faults})
    return config


def native_customers_of(scenario: Scenario, manifest: SeedManifest) -> list[str]:
    """Every other customer with a migration (sorted ids; at least one): those Partner Center offers the native path."""
    if scenario.native is None:
        return []
    pooled = {p.customer_id.lower() for p in manifest.pooled}
    with_work = sorted({em.customer_id.lower() for em in manifest.expected} - pooled)
    return with_work[::2]


async def run_scenario(scenario: Scenario, connection_string: str) -> RunResult:
    """Run the whole chain once under ``scenario`` and return the counts and every invariant violation."""
    started = time.monotonic()
    await asyncio.to_thread(wipe_account, connection_string)
    _app._services.clear()
    _app._host_json_max_dequeue_count.cache_clear()
    state = SandboxState()
    manifest = seed_world(state, customers=scenario.customers, seed=scenario.seed)
    rng = random.Random(f"{scenario.kind}/{scenario.seed}")
    allow: list[str] = []
    if scenario.scope is not None:
        # A smaller run: the allowlist keeps the other customers' expiring subscriptions out of scope, so they
        # must be left untouched (they stay in the distractor checks through the full manifest's statuses).
        with_work = sorted({em.customer_id.lower() for em in manifest.expected})
        allow = sorted(rng.sample(with_work, min(scenario.scope, len(with_work))))
        full = manifest
        manifest = dataclasses.replace(
            manifest, expected=[em for em in full.expected if em.customer_id.lower() in allow],
            distractors=[*full.distractors, *(Distractor(em.customer_id, em.subscription_id, "out of scope",
                                                         em.offer_name)
                                              for em in full.expected if em.customer_id.lower() not in allow)])
    for cid, uid in manifest.users_without_usage_location:  # a known blocker unrelated to faults: fix it up front
        state.set_usage_location(cid, uid, "US")
    if scenario.legacy_orders:
        manifest = dataclasses.replace(manifest, expected=[
            dataclasses.replace(em, replacement_catalog_item_id=LEGACY_REPLACEMENT_OFFERS[em.family][em.audience])
            for em in manifest.expected])
    initial_status = {s["id"].lower(): s["status"] for cid in manifest.customers for s in state.subscriptions(cid)}
    initial_licenses = {(cid.lower(), u["id"].lower()): set(state.user_licenses(cid, u["id"]))
                        for cid in manifest.customers for u in state.users(cid)}
    hooks = _Hooks(scenario, state, manifest, rng, connection_string=connection_string)
    if scenario.human and manifest.expected:
        hooks.target = rng.choice(manifest.expected)
    duplicator = _Duplicator(connection_string) if scenario.duplicates else None
    result = RunResult(scenario.kind, scenario.seed)
    native_customers = native_customers_of(scenario, manifest)
    server = SandboxServer(state, _sandbox_config(scenario, native_customers))
    if scenario.throttle_window_s is not None:
        server.app.general = SlidingWindow(scenario.throttle_window_s)
        server.app.license = SlidingWindow(scenario.throttle_window_s)
    async with server:
        env = base_env(server.url, scenario)
        if allow:
            env["CUSTOMER_ALLOWLIST"] = ",".join(allow)
        else:
            await asyncio.to_thread(go_live_for_every_customer, connection_string, table=LEDGER_TABLE)
        if scenario.legacy_orders:
            env["REPLACEMENT_OFFERS"] = json.dumps(LEGACY_REPLACEMENT_OFFERS)
        if scenario.native is not None:
            env["MIGRATION_PATH_POLICY"] = "prefer_native"
        overrides = FAST_HOST | scenario.host_overrides
        try:
            with hooks.installed():
                async with LocalHost(APP_ROOT, connection_string=connection_string, env=env,
                                     host_overrides=overrides) as host:
                    await host.fire_timer("detect_expiring")
                    stop = asyncio.Event()
                    watcher = asyncio.create_task(duplicator.watch(stop)) if duplicator else None
                    try:
                        report = await host.run(timeout=scenario.timeout_s, idle_seconds=0.6)
                    finally:
                        stop.set()
                        if watcher is not None:
                            await watcher
                    result.stopped_because = report.stopped_because
        finally:
            _app._services.clear()
            _app._host_json_max_dequeue_count.cache_clear()
        records = await _records(connection_string)
        requests = state.requests()
    faults: dict[str, int] = {}
    for entry in requests:
        name = entry.get("fault")
        if name:
            name = str(name).split(":")[0]
            faults[name] = faults.get(name, 0) + 1
        if entry.get("status") == 429:
            faults["429"] = faults.get("429", 0) + 1
    made = [p for p in state.purchases() if p.get("via") != "by_hand"]
    if scenario.sandbox.get("provisioning_delay_s"):
        faults["slow-provisioning"] = len(made)
    if scenario.sandbox.get("list_lag_s"):
        faults["list-lag"] = len(made)
    if hooks.crashes:
        faults["crash"] = hooks.crashes
    result.crash_points = dict(hooks.crash_points)
    if hooks.redeliveries:
        faults["redelivery"] = hooks.redeliveries
    if duplicator is not None and duplicator.count:
        faults["duplicate"] = duplicator.count
    if hooks.human_changes:
        faults["human"] = hooks.human_changes
    native_moves = native_operations(state)
    if native_moves:
        faults["native-move"] = len(native_moves)
    result.fault_detail = faults
    result.faults_injected = sum(v for k, v in faults.items() if k not in ("dedupe-replay", "native-move"))
    result.migrations = len(manifest.expected)
    result.completed = sum(1 for r in records if r.state == "completed")
    for r in records:
        result.states[r.state] = result.states.get(r.state, 0) + 1
    result.violations = check_invariants(scenario, state, manifest, records, initial_status, initial_licenses, hooks)
    if result.stopped_because == "timeout":
        result.violations.append(f"the queues were not drained within {scenario.timeout_s}s")
    result.elapsed = time.monotonic() - started
    return result


# ----------------------------------------------------------------------------------------------- invariants


def check_invariants(scenario: Scenario, state: SandboxState, manifest: SeedManifest,
                     records: list[MigrationRecord], initial_status: dict[str, str],
                     initial_licenses: dict[tuple[str, str], set[str]], hooks: _Hooks) -> list[str]:
    v: list[str] = []
    by_key = {r.key: r for r in records}
    expected = {(em.customer_id.lower(), em.subscription_id.lower()): em for em in manifest.expected}
    purchases = state.purchases()
    events = state.events()
    # 1. none lost, none stuck, none extra; blocked/failed say why
    for key, em in expected.items():
        if key not in by_key:
            v.append(f"{'/'.join(key)} ({em.offer_name}): no ledger record (migration lost)")
    for r in records:
        if r.key not in expected:
            v.append(f"{r.customer_id}/{r.subscription_id}: a record for a subscription that is not a migration")
        if r.state not in FINAL_STATES:
            v.append(f"{r.customer_id}/{r.subscription_id}: stuck in {r.state}")
        elif r.state in ("blocked", "failed") and not (r.reason or "").strip():
            v.append(f"{r.customer_id}/{r.subscription_id}: {r.state} without a reason")
    # 2. at most one purchase or native move per record (by the pipeline), never both; none that belongs to no record
    tags = {r.tag: r for r in records}
    moves = native_operations(state)
    for r in records:
        mine = [p for p in purchases if p["customer_id"].lower() == r.key[0] and p.get("via") != "by_hand"
                and r.tag in (p["friendly_name"] or "")]
        moved = [op for op in moves if op["from_subscription_id"].lower() == r.key[1]]
        if len(mine) > 1:
            v.append(f"{r.customer_id}/{r.subscription_id}: bought {len(mine)} times")
        if len(moved) > 1:
            v.append(f"{r.customer_id}/{r.subscription_id}: {len(moved)} native moves")
        if mine and moved:
            v.append(f"{r.customer_id}/{r.subscription_id}: bought a replacement AND moved natively")
    for op in moves:
        if (op["customer_id"].lower(), op["from_subscription_id"].lower()) not in expected:
            v.append(f"native move of {op['from_subscription_id']} ({op['customer_id']}) belongs to no migration")
    for p in purchases:
        if p.get("via") != "by_hand" and not any(t in (p["friendly_name"] or "") for t in tags):
            v.append(f"purchase {p['order_id']} ({p['friendly_name']!r}) belongs to no record")
    # 3./4. replay the event log: suspension only after the replacement is active and nobody holds the old SKU;
    #       a user who held the old SKU keeps old or new through every pipeline license update
    skus = {k: set(s) for k, s in initial_licenses.items()}
    provisioned: set[str] = set()
    old_to_new = {em.old_sku_id.lower(): _new_sku(em) for em in manifest.expected}
    records_by_sub = {r.key[1]: r for r in records}
    for ev in events:
        kind = ev["type"]
        cid = str(ev.get("customer_id", "")).lower()
        if kind == "subscription_provisioned" or kind == "by_hand_purchase":
            provisioned.add(str(ev["subscription_id"]).lower())
        elif kind in ("native_transition_completed", "native_upgrade_completed"):
            # Partner Center's move: the new subscription is active and the moved users' licenses swapped at once
            provisioned.add(str(ev["to_subscription_id"]).lower())
            moved_from = expected.get((cid, str(ev["from_subscription_id"]).lower()))
            for user in ev["moved_users"] if moved_from is not None else []:
                key = (cid, str(user).lower())
                assert moved_from is not None
                skus[key] = (skus.get(key, set()) - {moved_from.old_sku_id.lower()}) | {_new_sku(moved_from)}
        elif kind == "license_update":
            key = (cid, str(ev["user_id"]).lower())
            before = set(skus.get(key, set()))
            after = (before - set(ev["removed"])) | set(ev["assigned"])
            skus[key] = after
            for old, new in old_to_new.items():
                if old in before and old not in after and new not in after:
                    v.append(f"user {key[1]} of {cid} lost the product: update removed {old} without {new}")
            if cid not in {k[0] for k in expected}:
                v.append(f"licenses of user {key[1]} of {cid} changed; the customer has no migration")
        elif kind == "by_hand_remove_license":
            skus.setdefault((cid, str(ev["user_id"]).lower()), set()).discard(str(ev["sku_id"]).lower())
        elif kind == "by_hand_assign_license":
            skus.setdefault((cid, str(ev["user_id"]).lower()), set()).add(str(ev["sku_id"]).lower())
        elif kind == "subscription_patched":
            sid = str(ev["subscription_id"]).lower()
            if (cid, sid) not in expected:
                v.append(f"subscription {sid} of {cid} was changed but is not a migration")
                continue
            if ev["after_status"] != "suspended" or ev["before_status"] == "suspended":
                continue
            em = expected[(cid, sid)]
            rec = records_by_sub.get(sid)
            new_sub = (rec.new_subscription_id or "").lower() if rec else ""
            if not new_sub or new_sub not in provisioned:
                v.append(f"{cid}/{sid}: suspended before its replacement {new_sub or '?'} was active")
            old = em.old_sku_id.lower()
            still = [u for (c, u), s in skus.items() if c == cid and old in s]
            if still:
                v.append(f"{cid}/{sid}: suspended while {len(still)} user(s) still held the old SKU")
    # 5. nothing outside the records touched
    for d in manifest.distractors:
        now = state.subscription(d.customer_id, d.subscription_id)["status"]
        if now != initial_status.get(d.subscription_id.lower(), now):
            v.append(f"left-alone subscription {d.subscription_id} ({d.reason}) changed to {now}")
    # 6. the expected outcome
    if scenario.expect_success:
        for r in records:
            if r.state != "completed":
                v.append(f"{r.customer_id}/{r.subscription_id}: ended {r.state} ({r.reason}); history: "
                         + " > ".join(str(h.get("event")) for h in r.history))
        v.extend(f"verify_world: {p}" for p in _verify(scenario, state, manifest, records, initial_status))
    else:
        v.extend(_check_human(scenario, state, manifest, records, initial_status, hooks))
    return v


def _verify(scenario: Scenario, state: SandboxState, manifest: SeedManifest, records: list[MigrationRecord],
            initial_status: dict[str, str]) -> list[str]:
    """demo.verify_world, told which REPLACEMENT_OFFERS the run used."""
    offers = LEGACY_REPLACEMENT_OFFERS if scenario.legacy_orders else DEMO_REPLACEMENT_OFFERS
    return verify_world(state, manifest, records, initial_status, replacement_offers=offers)


def _check_human(scenario: Scenario, state: SandboxState, manifest: SeedManifest, records: list[MigrationRecord],
                 initial_status: dict[str, str], hooks: _Hooks) -> list[str]:
    v: list[str] = []
    em = hooks.target
    if em is None:
        return ["no target migration for the human change"]
    human = scenario.human
    if human not in hooks.done:
        v.append(f"the human change {human!r} never happened (harness timing)")
    cid, sid = em.customer_id.lower(), em.subscription_id.lower()
    where = f"{cid}/{sid}"
    record = next((r for r in records if r.key == (cid, sid)), None)
    others = [r for r in records if r.key != (cid, sid)]
    for r in others:
        if r.state != "completed":
            v.append(f"{r.customer_id}/{r.subscription_id} (not changed by hand): ended {r.state} ({r.reason})")
    for p in _verify(scenario, state, manifest, records, initial_status):
        if sid not in p.lower():
            v.append(f"verify_world: {p}")
    if record is None:
        return [*v, f"{where}: no record"]
    pipeline_buys = [p for p in state.purchases() if p["customer_id"].lower() == cid and p.get("via") != "by_hand"
                     and record.tag in (p["friendly_name"] or "")]
    old_status = state.subscription(cid, sid)["status"]
    if human in ("suspended_before_purchase", "autorenew_before_purchase"):
        if record.state != "blocked" or "nothing bought" not in (record.reason or ""):
            v.append(f"{where}: expected blocked (no longer qualifies), got {record.state} ({record.reason})")
        if pipeline_buys:
            v.append(f"{where}: bought {len(pipeline_buys)} replacement(s) for a subscription that no longer qualifies")
        want = "suspended" if human == "suspended_before_purchase" else "active"
        if old_status != want:
            v.append(f"{where}: old subscription is {old_status}, the human left it {want}")
    elif human == "bought_replacement_tagged":
        if record.state != "completed":
            v.append(f"{where}: expected completed on the replacement bought by hand, got {record.state}")
        if pipeline_buys:
            v.append(f"{where}: bought again although a tagged replacement existed ({len(pipeline_buys)} purchases)")
        if (record.new_subscription_id or "").lower() != hooks.notes.get("by_hand_subscription"):
            v.append(f"{where}: did not adopt the replacement bought by hand")
        v.extend(f"verify_world: {p}" for p in _verify(scenario, state, manifest, [record], initial_status)
                 if sid in p.lower())
    elif human == "bought_replacement_untagged":
        if pipeline_buys:
            v.append(f"{where}: bought a replacement although the same product was bought by hand for this customer "
                     f"after detection (untagged, {hooks.notes.get('by_hand_subscription')}); the customer now pays "
                     "twice")
    elif human == "removed_license":
        if record.state != "completed":
            v.append(f"{where}: expected completed, got {record.state} ({record.reason})")
        removed = hooks.notes.get("removed_from")
        for p in _verify(scenario, state, manifest, [record], initial_status):
            if sid in p.lower() and not ("lost the product" in p and removed is not None):
                v.append(f"verify_world: {p}")
        if removed is not None:
            held = set(state.user_licenses(cid, removed))
            if em.old_sku_id.lower() in held:
                v.append(f"{where}: the pipeline gave user {removed} the old SKU back")
    elif human == "regranted_old_license":
        if record.state != "completed":
            v.append(f"{where}: expected completed after going back to reassign, got {record.state} ({record.reason})")
        events = [h.get("event") for h in record.history]
        if hooks.notes.get("regranted_to") and "old_sku_still_used" not in events:
            v.append(f"{where}: suspend did not go back to reassign after the old license was given again")
        v.extend(f"verify_world: {p}" for p in _verify(scenario, state, manifest, [record], initial_status)
                 if sid in p.lower())
    return v


# ----------------------------------------------------------------------------------------------- the table


@dataclass
class Row:
    kind: str
    runs: int = 0
    faults: int = 0
    migrations: int = 0
    completed: int = 0
    violations: int = 0
    seconds: float = 0.0
    detail: dict[str, int] = field(default_factory=dict)


def summarize(results: list[RunResult]) -> list[Row]:
    rows: dict[str, Row] = {}
    for res in results:
        row = rows.setdefault(res.kind, Row(res.kind))
        row.runs += 1
        row.faults += res.faults_injected
        row.migrations += res.migrations
        row.completed += res.completed
        row.violations += len(res.violations)
        row.seconds += res.elapsed
        for k, n in res.fault_detail.items():
            row.detail[k] = row.detail.get(k, 0) + n
    return list(rows.values())


def format_table(results: list[RunResult]) -> str:
    rows = summarize(results)
    head = ("fault kind", "runs", "faults injected", "migrations", "completed", "invariant violations", "seconds",
            "faults by type")
    lines = [[r.kind, str(r.runs), str(r.faults), str(r.migrations), str(r.completed), str(r.violations),
              f"{r.seconds:.0f}", ", ".join(f"{k}={n}" for k, n in sorted(r.detail.items()))] for r in rows]
    total = Row("TOTAL", sum(r.runs for r in rows), sum(r.faults for r in rows), sum(r.migrations for r in rows),
                sum(r.completed for r in rows), sum(r.violations for r in rows), sum(r.seconds for r in rows))
    lines.append([total.kind, str(total.runs), str(total.faults), str(total.migrations), str(total.completed),
                  str(total.violations), f"{total.seconds:.0f}", ""])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def fmt(cells: tuple[str, ...] | list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(fmt(line) for line in lines)
    return "\n".join(out)


def crash_summary(results: list[RunResult]) -> str:
    """After which Partner Center call / ledger event the simulated crashes happened (all runs together)."""
    total: dict[str, int] = {}
    for res in results:
        for where, n in res.crash_points.items():
            total[where] = total.get(where, 0) + n
    if not total:
        return ""
    return "crashes after: " + ", ".join(f"{k}={n}" for k, n in sorted(total.items()))


def describe_violations(results: list[RunResult], limit: int = 40) -> str:
    lines = []
    for res in results:
        for text in res.violations:
            lines.append(f"[{res.kind} seed={res.seed}] {text}")
    more = len(lines) - limit
    return "\n".join(lines[:limit] + ([f"... and {more} more"] if more > 0 else []))
