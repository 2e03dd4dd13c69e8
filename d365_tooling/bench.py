"""``make bench``: the scan and the whole chain at Partner Center's limit, against the sandbox, in one run.

Writes ``docs/benchmark.md`` (every table, with the command and machine) and the summary block of the README
(between the ``bench:start``/``bench:end`` markers):

* the read-only scan (``plan``) of 1,000 and 10,000 customers, paced by the shared budget (Azurite), and the same
  scan one request at a time (what a partner's PowerShell loop does) as the baseline: achieved rate as a fraction of
  the limit (server-side, first to last request), 429s, requests per customer, peak RSS of the scanning process;
* four local-host worker processes serving **all** functions at once — a detection run and ~500 migrations in
  flight — drawing from the two shared budgets; one worker is SIGKILLed mid-run. Per budget and phase: the busiest
  60-second window at the server as a fraction of the limit, 429s, and how soon after the kill the survivors use
  the whole budget again; every invocation against the invocation budget;
* requests per migration split by step, from the ``event=step_cost`` log lines, next to the minimum the documented
  API needs for the same work (see ``minimum_requests``);
* import time of each function module on Python 3.13 next to Python 3.11, and the real worker's load time.

The sandbox enforces both limits (429 + ``Retry-After`` per budget), in its own process. Figures are measurements of
this machine; no test asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def sandbox_process(customers: int, config: dict[str, Any], seed: int = 1) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(  # noqa: S603 - our own module
        [PY, "-m", "d365_migration", "sandbox", "--port", str(port), "--customers", str(customers), "--seed",
         str(seed), "--config", json.dumps(config)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/_sandbox/config", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(f"sandbox did not start: {err}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def sandbox_requests(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(url + "/_sandbox/requests", timeout=120).json()["items"])


# ---------------------------------------------------------------------------------------------------- helpers


def _best_window(times: list[float], window: float, lo: float, hi: float) -> int:
    """The most requests in any ``window`` seconds lying inside [lo, hi]."""
    inside = [t for t in times if lo <= t <= hi]
    best, j = 0, 0
    for i, t in enumerate(inside):
        while inside[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def _budget_of(entry: dict[str, Any]) -> str:
    from d365_migration._budget import budget_for_path

    return budget_for_path(str(entry.get("path", "")))


# ---------------------------------------------------------------------------------------------------- scan


async def _scan(endpoint: str, rpm: int, mode: str, connection: str, table: str) -> dict[str, Any]:
    from d365_migration._budget import PacedBudget, SharedBudget, TableBudgetStore
    from d365_migration._catalog import RetiredOfferCatalog
    from d365_migration._client import PartnerCenterClient
    from d365_migration._ledger import utcnow
    from d365_migration._scan import scan_all

    catalog = RetiredOfferCatalog.load()
    started = time.monotonic()
    customers = candidates = 0
    if mode == "paced":  # what `plan` does with a storage account configured: the shared budget
        store = TableBudgetStore.from_connection_string(connection, table)
        limiters = {name: PacedBudget(SharedBudget(name, rpm, store)) for name in ("commerce", "license")}
        async with PartnerCenterClient(endpoint, None, limiters=limiters,  # type: ignore[arg-type]
                                       max_concurrency=32) as client:
            async for scan in scan_all(client, catalog, now=utcnow(), window_days=60, concurrency=32):
                customers += 1
                candidates += len(scan.candidates)
            requests, throttled = client.stats.requests, client.stats.throttled
        store.close()
    else:  # the baseline: one request at a time, no pacing (a PowerShell-style loop)
        async with PartnerCenterClient(endpoint, None, requests_per_minute=None, license_requests_per_minute=None,
                                       max_concurrency=1) as client:
            async for customer in client.list_customers(page_size=500):
                subs = await client.list_subscriptions(customer.id)
                customers += 1
                candidates += sum(1 for s in subs if catalog.match(s.offer_id, s.offer_name))
            requests, throttled = client.stats.requests, client.stats.throttled
    wall = time.monotonic() - started
    return {"mode": mode, "customers": customers, "candidates": candidates, "requests": requests,
            "throttled": throttled, "wall": wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_scan(n: int, latency_ms: int, limit: int, mode: str, connection: str) -> dict[str, Any]:
    with sandbox_process(n, {"latency_ms": latency_ms, "requests_per_minute": limit,
                             "license_requests_per_minute": limit}) as url:
        out = subprocess.run(  # noqa: S603
            [PY, "-m", "d365_tooling.bench", "_scan", url, str(limit), mode, connection, f"benchscan{n}{mode}"],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=3600)
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        log = sandbox_requests(url)
    ok = sorted(r["time"] for r in log if r.get("status") != 429)
    result["server_429"] = sum(1 for r in log if r.get("status") == 429)
    span = ok[-1] - ok[0] if len(ok) > 1 else result["wall"]
    result["rate_fraction"] = (len(ok) - 1) / span / (limit / 60) if span else 0.0
    result["requests_per_customer"] = result["requests"] / max(1, result["customers"])
    return result


# ---------------------------------------------------------------------------------------------------- fleet


def minimum_requests(*, users: int, holders: int, cart: bool, same_sku: bool) -> dict[str, int]:
    """The fewest Partner Center calls the documented API allows for one migration, step by step.

    * purchase: one listing of the customer's subscriptions (the old one still active and not auto-renewing — the
      runbook's re-check before spending — and no replacement already there), cart + checkout (new commerce) or one
      order (legacy), and one read of the new subscription showing it active (more while provisioning is pending);
    * reassign: the product SKU of the old and of the new subscription (``provisioningstatus`` of each), the users
      (one page per 100), each user's licenses (Partner Center has no "who holds SKU X" query), the subscribed SKUs
      once (free units of the new SKU), one ``licenseupdates`` per holder (assign + remove together);
    * suspend: the runbook's re-checks — the replacement is active (GET), nobody holds the old SKU (subscribed SKUs)
      — then a fresh GET of the old subscription (its ETag and whole body: a partial PATCH resets auto-renew) and the
      PATCH.
    """
    purchase = 1 + (2 if cart else 1) + 1
    reassign = 2 if same_sku else 2 + max(1, -(-users // 100)) + users + 1 + holders
    suspend = 3 if same_sku else 4
    return {"purchase": purchase, "reassign": reassign, "suspend": suspend}


def _step_costs(log_files: list[Path]) -> tuple[dict[str, dict[str, Counter[str]]], Counter[str], int]:
    """From the workers' ``event=step_cost`` lines: per migration (correlation id) the requests of each step, per
    budget; the scan's requests per budget; and how many scan invocations there were."""
    import re

    step_re = re.compile(r"event=step_cost step=(\w+) correlation=(\S+) commerce=(\d+) license=(\d+)")
    scan_re = re.compile(r"event=step_cost step=scan run=\S+ page=\d+ commerce=(\d+) license=(\d+)")
    per: dict[str, dict[str, Counter[str]]] = {}
    scan: Counter[str] = Counter()
    pages = 0
    for path in log_files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if m := step_re.search(line):
                c = per.setdefault(m.group(2), {}).setdefault(m.group(1), Counter())
                c["commerce"] += int(m.group(3))
                c["license"] += int(m.group(4))
            elif m := scan_re.search(line):
                scan["commerce"] += int(m.group(1))
                scan["license"] += int(m.group(2))
                pages += 1
    return per, scan, pages


def _go_live_for_every_customer(connection_string: str) -> None:
    """``rollout set --live --all-customers``: DRY_RUN=false alone does not make the app spend (issue 11)."""
    from d365_migration._ledger import MigrationLedger
    from d365_migration._rollout import RolloutStore, go_live
    from d365_migration._settings import Settings

    ledger = MigrationLedger.from_connection_string(connection_string)
    try:
        asyncio.run(go_live(RolloutStore(ledger.table_client), Settings(), by="bench", all_customers=True))
    finally:
        ledger.close()


def run_fleet(customers: int, latency_ms: int, commerce_limit: int, license_limit: int, workers: int,
              seconds: float, kill_at: float, invocation_budget: int) -> dict[str, Any]:
    import signal
    import tempfile

    from d365_migration._ledger import MigrationLedger

    from .localhost import AzuriteProcess
    from .sandbox import DEMO_REPLACEMENT_OFFERS

    config = {"latency_ms": latency_ms, "requests_per_minute": commerce_limit,
              "license_requests_per_minute": license_limit, "provisioning_delay_s": 2.0}
    logs = Path(tempfile.mkdtemp(prefix="d365-bench-"))
    with AzuriteProcess() as azurite, sandbox_process(customers, config, seed=5) as url:
        env = {**os.environ, "PARTNER_CENTER_ENDPOINT": url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
               "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS), "DETECT_SCHEDULE": "0 0 6 * * *",
               "AzureWebJobsStorage": azurite.connection_string, "PROVISIONING_POLL_SECONDS": "2",
               "MAX_PURCHASES_PER_RUN": "100000", "INVOCATION_BUDGET_SECONDS": str(invocation_budget),
               "PARTNER_CENTER_REQUESTS_PER_MINUTE": str(commerce_limit),
               "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": str(license_limit)}
        _go_live_for_every_customer(azurite.connection_string)
        procs: list[subprocess.Popen[str]] = []
        log_files = []
        started = time.time()
        for i in range(workers):
            cmd = [PY, "-m", "d365_tooling.localhost", "--app-root", str(ROOT), "--timeout", str(seconds),
                   "--idle-seconds", str(seconds), "--host", "maxPollingInterval=0.5", "-v"]
            if i == 0:
                cmd += ["--timer", "detect_expiring"]
            log_files.append(logs / f"worker{i}.log")
            with log_files[-1].open("w", encoding="utf-8") as err:
                procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,  # noqa: S603
                                              stderr=err, text=True))
        time.sleep(max(0.0, started + kill_at - time.time()))
        killed_at = time.time()
        procs[-1].send_signal(signal.SIGKILL)
        reports = []
        for p in procs:
            stdout, _ = p.communicate(timeout=seconds + 600)
            try:
                reports.append(json.loads(stdout[stdout.index("{"):]))
            except ValueError:
                reports.append({})  # the killed one prints nothing
        ended = time.time()
        log = sandbox_requests(url)
        state = httpx.get(url + "/_sandbox/state", timeout=120).json()
        ledger = MigrationLedger.from_connection_string(azurite.connection_string, "migrations")
        records = asyncio.run(ledger.list_records())
        ledger.close()

    first = min((r["time"] for r in log), default=started)
    limits = {"commerce": commerce_limit, "license": license_limit}
    budgets: dict[str, Any] = {}
    for name, limit in limits.items():
        entries = [r for r in log if _budget_of(r) == name]
        ok = sorted(r["time"] for r in entries if r.get("status") != 429)
        throttled = [r["time"] for r in entries if r.get("status") == 429]
        # How soon after the kill the survivors use the whole budget again: the first 5-s window starting after the
        # kill that holds ≥ 0.9 of the budget's 5-s share.
        recovered = None
        for step in range(0, 300):
            t = killed_at + step * 0.5
            if t + 5 > ended:
                break
            if sum(1 for x in ok if t <= x < t + 5) >= 0.9 * limit / 12:
                recovered = step * 0.5
                break
        budgets[name] = {
            "limit": limit, "requests": len(ok), "429_before_kill": sum(1 for x in throttled if x < killed_at),
            "429_after_kill": sum(1 for x in throttled if x >= killed_at),
            "best_minute_before_kill": _best_window(ok, 60.0, first, killed_at) / limit,
            "best_minute_after_kill": _best_window(ok, 60.0, killed_at, ended) / limit,
            "best_minute_overall": _best_window(ok, 60.0, first, ended) / limit,
            "recovered_after_s": recovered,
        }
    # Cost per migration, step by step, for the migrations that completed (every step's invocations logged).
    per, scan, pages = _step_costs(log_files)
    users_of = {c["id"].lower(): c.get("users", []) for c in state["customers"]}
    measured: dict[str, list[int]] = {"purchase": [], "reassign": [], "suspend": []}
    minimum: dict[str, list[int]] = {"purchase": [], "reassign": [], "suspend": []}
    for r in records:
        steps = per.get(r.correlation_id)
        if r.state != "completed" or steps is None or not all(s in steps for s in measured):
            continue
        same = bool(r.old_sku_id and r.new_sku_id and r.old_sku_id.lower() == r.new_sku_id.lower())
        low = minimum_requests(users=len(users_of.get(r.customer_id.lower(), [])),
                               holders=r.users_moved + r.users_skipped,
                               cart=":" in (r.replacement_offer_id or ""), same_sku=same)
        for s in measured:
            measured[s].append(sum(steps[s].values()))
            minimum[s].append(low[s])
    scanned = len(state["customers"])
    longest: dict[str, float] = {}
    for rep in reports:
        for fn, st in rep.get("functions", {}).items():
            longest[fn] = max(longest.get(fn, 0.0), float(st.get("longest", 0.0)))
    return {
        "customers": customers, "workers": workers, "seconds": ended - started, "kill_at": killed_at - started,
        "migrations": len(records), "completed": sum(r.state == "completed" for r in records),
        "final": sum(r.is_final for r in records), "budgets": budgets,
        "cost": {s: (statistics.mean(measured[s]) if measured[s] else None,
                     statistics.mean(minimum[s]) if minimum[s] else None) for s in measured},
        "cost_sample": len(measured["purchase"]),
        "scan_per_customer": sum(scan.values()) / max(1, scanned), "scan_pages": pages,
        "scan_minimum_per_customer": 1 + max(1, pages) / max(1, scanned),
        "logged_requests": sum(sum(c.values()) for steps in per.values() for c in steps.values()) + sum(scan.values()),
        "server_requests": len(log), "longest": longest, "invocation_budget": invocation_budget,
        "logs": str(logs),
    }

# ---------------------------------------------------------------------------------------------------- imports


FUNCTION_MODULES = ["detect_expiring", "scan_customers", "purchase_new", "reassign_licenses", "suspend_old", "status"]


def _median_seconds(python: str, code: str, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        out = subprocess.run(  # noqa: S603
            [python, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        samples.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(samples)


def import_times(python: str = PY, repeat: int = 5) -> dict[str, float]:
    """Median seconds to ``import <function folder>`` in a fresh interpreter."""
    code = "import time; t = time.perf_counter(); import {m}; print(time.perf_counter() - t)"
    return {m: _median_seconds(python, code.format(m=m), repeat) for m in FUNCTION_MODULES}


def worker_load_times(repeat: int = 5) -> dict[str, float]:
    """Median seconds for the real worker (azure-functions-runtime-v1) to init and load one folder, fresh process."""
    code = ("import time; from d365_tooling.localhost import check_function_folder; t = time.perf_counter(); "
            "check_function_folder('{m}'); print(time.perf_counter() - t)")
    return {m: _median_seconds(PY, code.format(m=m), repeat) for m in FUNCTION_MODULES}


def python311() -> str | None:
    """A venv on Python 3.11 with the app's runtime requirements, made on first use.

    The app ran on 3.11 before it moved to 3.13; the bench keeps that comparison on the same machine. The 3.13-only
    pieces are swapped for what the app pinned on 3.11: no worker library (the host image carried it) and
    azure-functions 1.26.0 (2.x requires 3.13 and is content-equivalent).
    """
    venv = ROOT / ".venv-bench-py311"
    python = venv / "bin" / "python"
    if python.exists():
        return str(python)
    candidates = ["python3.11", *sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.11*/bin/python3.11"))]
    found = next((c for c in candidates if subprocess.run(  # noqa: S603
        [c, "-c", "import sys; assert sys.version_info[:2] == (3, 11)"], capture_output=True, check=False
    ).returncode == 0), None) if candidates else None
    if found is None:
        return None
    requirements = venv.parent / ".bench-py311-requirements.txt"
    pins = {"azure-functions-runtime-v1": None, "azure-functions": "azure-functions==1.26.0"}
    lines = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name = line.split("==")[0].strip()
        lines.append(pins.get(name, line))
    requirements.write_text("".join(f"{line}\n" for line in lines if line is not None))
    subprocess.run([found, "-m", "venv", str(venv)], check=True)  # noqa: S603
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)  # noqa: S603
    requirements.unlink()
    return str(python)


# ---------------------------------------------------------------------------------------------------- main


def _replace_block(text: str, block: str) -> str:
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text or end not in text:
        raise RuntimeError("README.md has no bench:start/bench:end markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_scan":
        print(json.dumps(asyncio.run(_scan(argv[1], int(argv[2]), argv[3], argv[4], argv[5]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m d365_tooling.bench")
    parser.add_argument("--latency-ms", type=int, default=60, help="sandbox latency per request")
    parser.add_argument("--limit", type=int, default=6000, help="sandbox rate limit for the scans, requests/min")
    parser.add_argument("--sizes", default="1000,10000", help="customers to scan")
    parser.add_argument("--baseline-max", type=int, default=1000,
                        help="run the one-at-a-time baseline only up to this many customers (it is slow)")
    parser.add_argument("--fleet-customers", type=int, default=840, help="≈500 migrations")
    parser.add_argument("--fleet-limit", type=int, default=500,
                        help="commerce budget of the fleet run, req/min (Partner Center's documented 500)")
    parser.add_argument("--fleet-license-limit", type=int, default=300,
                        help="user/license budget, req/min (the app's default)")
    parser.add_argument("--fleet-seconds", type=float, default=170.0)
    parser.add_argument("--kill-at", type=float, default=95.0, help="seconds into the fleet run")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--skip", default="", help="comma list of sections to skip: scan,fleet,imports")
    parser.add_argument("--no-write", action="store_true", help="print only; leave README and docs/ alone")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    command = "make bench" if not argv else "python -m d365_tooling.bench " + " ".join(argv)
    lines = [f"Measured by `{command}` on {os.cpu_count()} cores, {datetime.now().isoformat(timespec='minutes')}; "
             f"sandbox latency {args.latency_ms} ms. The client paces at 98% of each budget.", ""]
    summary: list[str] = []

    def emit(line: str = "") -> None:
        lines.append(line)
        print(line, flush=True)

    print(lines[0], flush=True)
    if "scan" not in skip:
        from .localhost import AzuriteProcess

        emit(f"**Read-only scan** (`plan`), limit {args.limit} req/min, drawing from the shared budget in Azurite; "
             "the baseline sends one request at a time:")
        emit()
        emit("| scan | customers | wall s | req/customer | achieved rate / limit | 429s | peak RSS MB | speed-up |")
        emit("|---|---:|---:|---:|---:|---:|---:|---:|")
        rss = []
        with AzuriteProcess() as azurite:
            for n in (int(x) for x in args.sizes.split(",")):
                paced = run_scan(n, args.latency_ms, args.limit, "paced", azurite.connection_string)
                base = (run_scan(n, args.latency_ms, args.limit, "sequential", azurite.connection_string)
                        if n <= args.baseline_max else None)
                rss.append((n, paced["peak_rss_mb"]))
                speed = f"{base['wall'] / paced['wall']:.1f}x" if base else "—"
                for r, label in ((paced, "paced, shared budget"), (base, "one at a time (baseline)")):
                    if r is None:
                        continue
                    emit(f"| {label} | {r['customers']} | {r['wall']:.1f} | {r['requests_per_customer']:.3f} | "
                         f"{r['rate_fraction']:.3f} | {r['server_429']} | {r['peak_rss_mb']:.0f} | "
                         f"{speed if r is paced else ''} |")
                    if r is paced:
                        summary.append(f"- scan of {n} customers: **{r['rate_fraction']:.3f} of the limit**, "
                                       f"{r['server_429']} × 429, peak RSS {r['peak_rss_mb']:.0f} MB"
                                       + (f", **{speed}** the one-at-a-time baseline" if base else ""))
        emit()
    if "fleet" not in skip:
        f = run_fleet(args.fleet_customers, args.latency_ms, args.fleet_limit, args.fleet_license_limit, args.workers,
                      args.fleet_seconds, args.kill_at, 480)
        emit(f"**{f['workers']} local-host worker processes serving all functions at once** (detection of "
             f"{f['customers']} customers and {f['migrations']} migrations in flight, {f['completed']} completed in "
             f"{f['seconds']:.0f} s); worker {f['workers']} SIGKILLed at {f['kill_at']:.0f} s. The sandbox enforces "
             "each budget (429 + Retry-After). Busiest 60-second window at the server, as a fraction of the budget:")
        emit()
        emit("| budget | limit/min | requests | busiest minute, 4 workers | 429s | busiest minute after the kill | "
             "429s | survivors at ≥ 0.9 of the budget after |")
        emit("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, b in f["budgets"].items():
            rec = f"{b['recovered_after_s']:.1f} s" if b["recovered_after_s"] is not None else "—"
            emit(f"| {name} | {b['limit']} | {b['requests']} | {b['best_minute_before_kill']:.3f} | "
                 f"{b['429_before_kill']} | {b['best_minute_after_kill']:.3f} | {b['429_after_kill']} | {rec} |")
            summary.append(f"- 4 workers, all functions, {name} budget: busiest minute "
                           f"**{b['best_minute_before_kill']:.3f}** of the limit with {b['429_before_kill']} × 429; "
                           "after one worker was killed "
                           f"{b['best_minute_after_kill']:.3f} with {b['429_after_kill']} × 429, the whole budget in "
                           f"use again {rec} after the kill")
        emit()
        emit(f"**Requests per migration, by step** ({f['cost_sample']} completed migrations; measured from the "
             "`event=step_cost` log lines, minimum as counted in `bench.minimum_requests`):")
        emit()
        emit("| step | measured | documented minimum |")
        emit("|---|---:|---:|")
        emit(f"| scan (per customer) | {f['scan_per_customer']:.3f} | {f['scan_minimum_per_customer']:.3f} |")
        total_m = total_min = 0.0
        for step, (measured, minimum) in f["cost"].items():
            if measured is None:
                continue
            total_m += measured
            total_min += minimum
            emit(f"| {step} | {measured:.2f} | {minimum:.2f} |")
        emit(f"| whole chain (purchase + reassign + suspend) | {total_m:.2f} | {total_min:.2f} |")
        emit()
        emit(f"Requests counted in the logs: {f['logged_requests']}; seen by the sandbox: {f['server_requests']} "
             "(the difference is the killed worker's last invocations, which never logged their cost).")
        emit()
        emit(f"Longest invocation per function (s; invocation budget {f['invocation_budget']} s, functionTimeout "
             "600 s): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(f["longest"].items())))
        emit()
        summary.append(f"- requests per migration: {total_m:.1f} measured vs {total_min:.1f} documented minimum "
                       f"(scan {f['scan_per_customer']:.3f} per customer)")
        summary.append(f"- longest invocation {max(f['longest'].values(), default=0.0):.1f} s "
                       f"(budget {f['invocation_budget']} s)")
    if "scan" not in skip:
        (n0, m0), (n1, m1) = rss[0], rss[-1]
        summary.append(f"- peak memory {m0:.0f} MB at {n0} customers, {m1:.0f} MB at {n1}")
    if "imports" not in skip:
        times = import_times()
        loads = worker_load_times()
        py311 = python311()
        times_311 = import_times(py311) if py311 else {}
        emit("| function module | import s, Python 3.13 | import s, Python 3.11 | init + load in the real worker s, "
             "3.13 |")
        emit("|---|---:|---:|---:|")
        for m, t in times.items():
            old = f"{times_311[m]:.3f}" if m in times_311 else "no Python 3.11 here"
            emit(f"| {m} | {t:.3f} | {old} | {loads[m]:.3f} |")
        emit("(medians of 5 fresh interpreters; the app's runtime requirements in both venvs, the worker library "
             "only on 3.13, where it exists)")
    if not args.no_write:
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "benchmark.md").write_text("# Benchmark\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
        readme = ROOT / "README.md"
        block = "\n".join([lines[0], "", *summary, "", "All tables: [docs/benchmark.md](docs/benchmark.md)."])
        readme.write_text(_replace_block(readme.read_text(encoding="utf-8"), block), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
