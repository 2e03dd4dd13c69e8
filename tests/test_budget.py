"""The shared Partner Center budget over real Azurite: which budget a path draws from, block claims, expiry, crashed
instances, two OS processes sharing one budget, and a Table Storage outage (conservative local pace, no work lost
or repeated). Counts grants and requests; no assertion is about elapsed time."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from d365_migration._budget import (
    PacedBudget,
    SharedBudget,
    TableBudgetStore,
    budget_for_path,
    build_pacers,
    counting_requests,
)
from d365_migration._client import PageRequest, PartnerCenterClient
from d365_migration._exceptions import ConfigurationError, RateBudgetUnavailable
from d365_migration._settings import Settings
from d365_tooling.localhost.azurite import free_port
from d365_tooling.sandbox import SandboxServer

ROOT = Path(__file__).resolve().parent.parent
TABLE = "partnercenterbudget"


def _store(connection: str) -> TableBudgetStore:
    return TableBudgetStore.from_connection_string(connection, TABLE)


def _slots(blocks: list[list[float]]) -> list[float]:
    return sorted(start + i * interval for start, interval, count in blocks for i in range(int(count)))


def _max_in_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window + 1e-9:
            j += 1
        best = max(best, i - j + 1)
    return best


# ---------------------------------------------------------------------------------------------------- which budget


@pytest.mark.parametrize(("path", "budget"), [
    ("/v1/customers", "commerce"),
    ("/v1/customers/c1", "commerce"),
    ("/v1/customers/c1/subscriptions", "commerce"),
    ("/v1/customers/c1/subscriptions/s1/provisioningstatus", "commerce"),  # part of the Subscription resource
    ("/v1/customers/c1/orders", "commerce"),
    ("/v1/customers/c1/carts/k1/checkout", "commerce"),
    ("/v1/customers/c1/users", "license"),
    ("/v1/customers/c1/users?size=100", "license"),
    ("/v1/customers/c1/users/u1/licenses", "license"),
    ("/v1/customers/c1/users/u1/licenseupdates", "license"),
    ("/v1/Customers/C1/SubscribedSkus", "license"),
    ("customers/c1/users", "license"),  # a links.next uri without the /v1 prefix
])
def test_the_request_path_alone_decides_the_budget(path: str, budget: str) -> None:
    assert budget_for_path(path) == budget


async def test_the_client_draws_each_call_from_the_budget_of_its_path(sandbox: SandboxServer) -> None:
    customer = sandbox.state.customer_ids()[0]
    pacers = build_pacers(Settings(), shared=False)
    async with PartnerCenterClient(sandbox.url, None, limiters=pacers) as client:
        with counting_requests() as costs:
            await client.list_subscriptions(customer)
            await client.list_subscribed_skus(customer)
            page: PageRequest | None = client.first_user_page(customer, page_size=1)
            users_pages = 0
            while page is not None:
                _, page = await client.user_page(page)
                users_pages += 1
    assert users_pages >= 2
    assert costs == Counter({"commerce": 1, "license": 1 + users_pages})


# ---------------------------------------------------------------------------------------------------- store


def test_claims_are_contiguous_never_overlap_and_a_gap_is_not_saved_up(storage: str) -> None:
    a, b = _store(storage), _store(storage)  # two instances, each with its own table client and ETag cache
    try:
        first = a.claim("commerce", 5, 0.1, now=1000.0)
        second = b.claim("commerce", 3, 0.1, now=1000.0)  # b's view was stale: its write must not win blindly
        third = a.claim("commerce", 2, 0.1, now=1000.0)  # a's cached ETag is stale now: re-read, claim after b
        assert (first.start, first.count) == (1000.0, 5)
        assert second.start == pytest.approx(first.end)
        assert third.start == pytest.approx(second.end)
        # Nobody claimed for a while: the next block starts now; the unused past is gone, not a burst to spend.
        later = b.claim("commerce", 4, 0.1, now=2000.0)
        assert later.start == 2000.0
        entity = a.read("commerce")
        assert entity is not None and entity["Granted"] == 5 + 3 + 2 + 4 and entity["Claims"] == 4
        assert entity["NextSlot"] == pytest.approx(later.end)
        # The other budget is a timeline of its own.
        assert a.claim("license", 1, 0.5, now=1000.0).start == 1000.0
    finally:
        a.close()
        b.close()


async def test_a_busy_instance_claims_full_blocks_a_single_request_one_slot_an_idle_one_nothing(
        storage: str) -> None:
    store = _store(storage)
    try:
        busy = SharedBudget("commerce", 60_000, store, block_seconds=0.05, keep_blocks=True)
        await asyncio.gather(*(busy.acquire() for _ in range(200)))
        assert busy.max_block > 1
        assert [b.count for b in busy.stats.blocks[:3]] == [busy.max_block] * 3
        assert busy.stats.used == 200 and busy.stats.granted >= 200

        single = SharedBudget("license", 60_000, store, block_seconds=0.05, keep_blocks=True)
        await single.acquire()
        assert [b.count for b in single.stats.blocks] == [1]

        SharedBudget("commerce", 60_000, store)  # idle: never asks for anything
        entity = store.read("commerce")
        assert entity is not None and entity["Granted"] == busy.stats.granted
    finally:
        store.close()


async def test_slots_whose_time_passed_are_dropped_not_spent_in_a_burst(storage: str) -> None:
    store = _store(storage)
    now = [5000.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    try:
        budget = SharedBudget("commerce", 600, store, block_seconds=1.0, catch_up=0.04, keep_blocks=True,
                              clock=lambda: now[0], sleep=sleep)
        await asyncio.gather(*(budget.acquire() for _ in range(3)))  # claims a block of 3 slots (0.1 s apart)
        assert budget.stats.blocks[0].count == 3
        await budget.acquire()  # a 4th: the block is used up, a new claim
        assert budget.stats.claims == 2
        remaining = budget.stats.granted - budget.stats.used
        now[0] += 60  # the instance was idle for a minute
        await budget.acquire()
        assert budget.stats.expired == remaining  # the old slots were dropped...
        assert budget.stats.blocks[-1].start == now[0]  # ...and the new one starts now
    finally:
        store.close()


def test_a_crashed_instance_loses_at_most_its_one_block(storage: str) -> None:
    args = {"mode": "claim_and_die", "connection": storage, "table": TABLE, "rpm": 600, "block_seconds": 2.0}
    proc = subprocess.run([sys.executable, "-m", "tests._budget_worker", json.dumps(args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -9, proc.stderr  # SIGKILL: no clean-up ran
    [[start, interval, count]] = json.loads(proc.stdout.strip().splitlines()[-1])["blocks"]
    assert count == round(2.0 / interval)  # 50 requests were waiting: a full block, no more
    store = _store(storage)
    try:
        # The survivor claims right behind the dead instance's block: all it took with it is that one block.
        survivor = store.claim("commerce", 1, interval, now=start)
        assert survivor.start == pytest.approx(start + count * interval)
        entity = store.read("commerce")
        assert entity is not None and entity["Granted"] == count + 1
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------- two processes


def test_two_processes_sharing_one_budget_never_exceed_it_together(storage: str,
                                                                   sandbox: SandboxServer) -> None:
    rpm, per_process = 12_000, 200
    args = {"mode": "requests", "connection": storage, "table": TABLE, "rpm": rpm, "block_seconds": 0.1,
            "endpoint": sandbox.url, "customers": sandbox.state.customer_ids(), "requests": per_process,
            "start_at": time.time() + 3.0}
    procs = [subprocess.Popen([sys.executable, "-m", "tests._budget_worker", json.dumps(args)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    # Every request sent drew one slot of the shared budget, and the server saw each of them once.
    assert [r["used"] for r in results] == [per_process, per_process]
    assert [r["sent"] for r in results] == [per_process, per_process]
    assert len(sandbox.state.requests()) == 2 * per_process
    # Both processes really competed for the same timeline.
    assert all(r["claims"] >= 2 for r in results)
    # No slot was handed out twice, and the table's count is the sum of what the two were granted.
    slots = _slots([b for r in results for b in r["blocks"]])
    interval = results[0]["blocks"][0][1]
    assert all(later - earlier >= interval - 1e-6 for earlier, later in itertools.pairwise(slots))
    store = _store(storage)
    try:
        entity = store.read("commerce")
    finally:
        store.close()
    assert entity is not None and entity["Granted"] == sum(r["granted"] for r in results) == len(slots)
    # So together they were granted at most the budget in any minute, and at most its 60th in any second.
    assert _max_in_window(slots, 60.0) <= rpm
    assert _max_in_window(slots, 1.0) <= rpm // 60


# ---------------------------------------------------------------------------------------------------- outage


class StorageSwitch:
    """A real TCP relay in front of Azurite's table endpoint that can be switched off (connections refused, open
    ones cut) and on again: a storage outage without touching the client under test."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.on()

    def on(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def off(self) -> None:
        with self._lock:
            if self._listener is not None:
                # shutdown wakes the accepting thread (close alone would leave it accepting on Linux)
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


def _through(connection: str, port: int) -> str:
    return re.sub(r"(TableEndpoint=http://127\.0\.0\.1:)\d+", rf"\g<1>{port}", connection)


async def test_a_storage_outage_falls_back_to_a_conservative_pace_and_loses_or_repeats_no_work(
        storage: str, sandbox: SandboxServer, caplog: pytest.LogCaptureFixture) -> None:
    table_port = int(re.search(r"TableEndpoint=http://127\.0\.0\.1:(\d+)", storage).group(1))  # type: ignore[union-attr]
    switch = StorageSwitch(table_port)
    store = _store(_through(storage, switch.port))
    customers = sandbox.state.customer_ids()
    rpm, share = 60_000, 0.05
    shared = SharedBudget("commerce", rpm, store, block_seconds=0.05, fallback_share=share,
                          retry_store_seconds=0.3)
    caplog.set_level(logging.INFO, logger="d365_migration.budget")
    results: dict[int, int] = {}
    async with PartnerCenterClient(sandbox.url, None, limiters={"commerce": PacedBudget(shared)},
                                   max_concurrency=8, max_attempts=1) as client:
        async def work(i: int) -> None:
            subs = await client.list_subscriptions(customers[i % len(customers)])
            results[i] = len(subs)

        await asyncio.gather(*(work(i) for i in range(0, 100)))
        claims_before = shared.stats.claims
        assert claims_before >= 1 and shared.shared

        switch.off()
        await asyncio.gather(*(work(i) for i in range(100, 160)))
        assert not shared.shared  # drawing from the conservative local pace now
        assert shared.stats.fallback_episodes == 1
        assert shared.stats.fallback_requests >= 1
        # The conservative pace is the configured share of the budget (a rate, not a measured time).
        assert shared._local.ceiling * 60 == pytest.approx(rpm * share * 0.98)

        switch.on()
        while shared.fallback_since is not None:  # the next claim after the retry interval finds the table again
            await work(len(results))
        await asyncio.gather(*(work(len(results) + i) for i in range(40)))
        assert shared.shared and shared.stats.claims > claims_before
    switch.off()
    store.close()

    # No work lost and none repeated: every logical request got its answer, and the server saw each exactly once.
    assert sorted(results) == list(range(len(results)))
    sent = [r for r in sandbox.state.requests() if r["path"].endswith("/subscriptions")]
    assert len(sent) == len(results) and all(r["status"] == 200 for r in sent)
    events = [r.getMessage() for r in caplog.records]
    assert sum("event=rate_budget_fallback budget=commerce" in e for e in events) == 1
    assert sum("event=rate_budget_restored budget=commerce" in e for e in events) == 1


def test_an_unreachable_table_is_reported_as_budget_unavailable(storage: str) -> None:
    store = _store(_through(storage, free_port()))  # nothing listens there
    try:
        with pytest.raises(RateBudgetUnavailable, match="partnercenterbudget"):
            store.claim("commerce", 1, 0.1, now=1.0)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("env", "setting"), [
    ({"PARTNER_CENTER_FALLBACK_SHARE": "lots"}, "PARTNER_CENTER_FALLBACK_SHARE"),
    ({"PARTNER_CENTER_FALLBACK_SHARE": "0"}, "PARTNER_CENTER_FALLBACK_SHARE"),
    ({"PARTNER_CENTER_FALLBACK_SHARE": "1.5"}, "PARTNER_CENTER_FALLBACK_SHARE"),
    ({"PARTNER_CENTER_FALLBACK_SHARE": "nan"}, "PARTNER_CENTER_FALLBACK_SHARE"),
    ({"PARTNER_CENTER_BUDGET_BLOCK_SECONDS": "0"}, "PARTNER_CENTER_BUDGET_BLOCK_SECONDS"),
    ({"PARTNER_CENTER_BUDGET_BLOCK_SECONDS": "90"}, "PARTNER_CENTER_BUDGET_BLOCK_SECONDS"),
    ({"PARTNER_CENTER_BUDGET_TABLE": "no-dashes"}, "PARTNER_CENTER_BUDGET_TABLE"),
    ({"PARTNER_CENTER_BUDGET_TABLE": "Migrations"}, "PARTNER_CENTER_BUDGET_TABLE"),  # the ledger's table
])
def test_bad_budget_settings_name_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    assert info.value.setting == setting


def test_budget_settings_are_read() -> None:
    s = Settings.from_env({"PARTNER_CENTER_FALLBACK_SHARE": "0.25", "PARTNER_CENTER_BUDGET_BLOCK_SECONDS": "2.5",
                           "PARTNER_CENTER_BUDGET_TABLE": "pcbudget"})
    assert (s.fallback_share, s.budget_block_seconds, s.budget_table) == (0.25, 2.5, "pcbudget")
    pacers = build_pacers(s, shared=False)
    assert pacers["commerce"].shared.max_block == round(2.5 / (60 / (500 * 0.98)))
