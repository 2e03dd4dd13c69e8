"""``make bench``: scan and migration throughput against the sandbox, at a configured latency and rate limit.

Prints one table (and writes it as Markdown to ``bench-results.md``):

* the read-only scan (``plan``) of N customers, paced by the client's limiter, and the same scan one request at a
  time (what a partner's PowerShell loop does) as the baseline: wall time, achieved rate as a fraction of the limit,
  429s, requests per customer, peak RSS of the scanning process;
* the whole chain for ~500 migrations through the local host: migrations per minute and where time goes;
* the fanned-out scan with 4 local-host worker processes sharing one tenant budget (split by
  ``PARTNER_CENTER_INSTANCES``), and the same without the split (every worker believes it owns the whole budget,
  so only the 429 back-off holds them in);
* import time of each function module.

The sandbox runs in its own process, so its work does not share the scanner's interpreter or its memory figure.
Figures are measurements of this machine; nothing here is asserted by tests.
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


# ---------------------------------------------------------------------------------------------------- scan


async def _scan(endpoint: str, rpm: int, mode: str) -> dict[str, Any]:
    from ._catalog import RetiredOfferCatalog
    from ._client import PartnerCenterClient
    from ._ledger import utcnow
    from ._scan import scan_all

    catalog = RetiredOfferCatalog.load()
    started = time.monotonic()
    customers = candidates = 0
    if mode == "paced":
        async with PartnerCenterClient(endpoint, None, requests_per_minute=rpm, license_requests_per_minute=rpm,
                                       max_concurrency=32) as client:
            async for scan in scan_all(client, catalog, now=utcnow(), window_days=60, concurrency=32):
                customers += 1
                candidates += len(scan.candidates)
            requests, throttled = client.stats.requests, client.stats.throttled
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


def run_scan(n: int, latency_ms: int, limit: int, mode: str) -> dict[str, Any]:
    with sandbox_process(n, {"latency_ms": latency_ms, "requests_per_minute": limit}) as url:
        out = subprocess.run(  # noqa: S603
            [PY, "-m", "d365_migration.bench", "_scan", url, str(limit), mode], cwd=ROOT, capture_output=True,
            text=True, check=True, timeout=3600)
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        log = sandbox_requests(url)
    result["server_429"] = sum(1 for r in log if r.get("status") == 429)
    result["rate_fraction"] = result["requests"] / result["wall"] / (limit / 60)
    result["requests_per_customer"] = result["requests"] / max(1, result["customers"])
    return result


# ---------------------------------------------------------------------------------------------------- chain


def run_chain(customers: int, latency_ms: int, limit: int) -> dict[str, Any]:
    from ._ledger import MigrationLedger
    from ._settings import Settings
    from .demo import run_pipeline
    from .localhost import AzuriteProcess
    from .sandbox import DEMO_REPLACEMENT_OFFERS

    config = {"latency_ms": latency_ms, "requests_per_minute": limit, "license_requests_per_minute": limit,
              "provisioning_delay_s": 2.0}
    with AzuriteProcess() as azurite, sandbox_process(customers, config, seed=5) as url:
        env = {"PARTNER_CENTER_ENDPOINT": url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
               "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS),
               "AzureWebJobsStorage": azurite.connection_string,
               "PROVISIONING_POLL_SECONDS": "2", "MAX_PURCHASES_PER_RUN": "100000",
               "PARTNER_CENTER_REQUESTS_PER_MINUTE": str(limit),
               "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": str(limit)}
        os.environ.update(env)
        settings = Settings.from_env()
        started = time.monotonic()
        report = asyncio.run(run_pipeline(settings, env, timeout=1800,
                                          host_overrides={"batchSize": 32, "maxPollingInterval": 0.5}))["host"]
        wall = time.monotonic() - started
        ledger = MigrationLedger.from_connection_string(azurite.connection_string, settings.ledger_table)
        records = asyncio.run(ledger.list_records())
        log = sandbox_requests(url)
    final = [r for r in records if r.is_final]
    stages: dict[str, list[float]] = {"queued → purchase started": [], "purchase + provisioning": [],
                                      "license moves": [], "suspension": []}
    for r in records:
        at = {h.get("event"): datetime.fromisoformat(h["at"]) for h in r.history if "at" in h}
        created = datetime.fromisoformat(r.created_at)
        pairs = [("queued → purchase started", created, at.get("purchase_started")),
                 ("purchase + provisioning", at.get("purchase_started"), at.get("replacement_active")),
                 ("license moves", at.get("replacement_active"), at.get("licenses_moved") or at.get("same_sku")),
                 ("suspension", at.get("licenses_moved") or at.get("same_sku"), at.get("old_suspended"))]
        for name, a, b in pairs:
            if a and b:
                stages[name].append((b - a).total_seconds())
    return {
        "migrations": len(records), "completed": sum(r.state == "completed" for r in records),
        "blocked": sum(r.state == "blocked" for r in records), "final": len(final), "wall": wall,
        "per_minute": len(final) / wall * 60, "requests": len(log),
        "server_429": sum(1 for x in log if x.get("status") == 429),
        "stages": {k: statistics.median(v) if v else None for k, v in stages.items()},
        "busy_seconds": {name: round(s.seconds, 1) for name, s in report.functions.items()} if report else {},
        "longest_invocation": max((s.longest for s in report.functions.values()), default=0.0) if report else 0.0,
    }


# ---------------------------------------------------------------------------------------------------- workers


def run_workers(customers: int, latency_ms: int, limit: int, workers: int, split: bool) -> dict[str, Any]:
    from .localhost import AzuriteProcess

    with AzuriteProcess() as azurite, sandbox_process(customers, {"latency_ms": latency_ms,
                                                                   "requests_per_minute": limit}) as url:
        env = {**os.environ, "PARTNER_CENTER_ENDPOINT": url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "true",
               "AzureWebJobsStorage": azurite.connection_string, "DETECT_SCHEDULE": "0 0 6 * * *",
               "PARTNER_CENTER_REQUESTS_PER_MINUTE": str(limit),
               "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": str(limit),
               "PARTNER_CENTER_INSTANCES": str(workers if split else 1), "REPLACEMENT_OFFERS": "{}",
               # smaller pages (≈ 50 s of work each at a quarter of the budget), so four workers share the scan
               "INVOCATION_BUDGET_SECONDS": "200"}
        procs = []
        started = time.monotonic()
        for i in range(workers):
            cmd = [PY, "-m", "d365_migration.localhost", "--app-root", str(ROOT), "--functions", "detect_expiring",
                   "scan_customers", "--timeout", "900", "--idle-seconds", "4",
                   "--host", "maxPollingInterval=0.5", "--host", "batchSize=1"]
            if i == 0:
                cmd += ["--timer", "detect_expiring"]
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,  # noqa: S603
                                          stderr=subprocess.DEVNULL, text=True))
        reports = []
        for p in procs:
            stdout, _ = p.communicate(timeout=1000)
            try:
                reports.append(json.loads(stdout[stdout.index("{"):]))
            except ValueError:
                reports.append({})
        wall = time.monotonic() - started
        log = sandbox_requests(url)
    times = sorted(r["time"] for r in log if r.get("time"))
    span = (times[-1] - times[0]) if len(times) > 1 else wall
    ok = [r for r in log if r.get("status") != 429]
    invocations = [r.get("functions", {}).get("scan_customers", {}).get("invocations", 0) for r in reports]
    return {"workers": workers, "split": split, "requests": len(log), "server_429": len(log) - len(ok),
            "wall": wall, "span": span, "rate_fraction": len(ok) / span / (limit / 60) if span else 0.0,
            "pages_per_worker": invocations}


# ---------------------------------------------------------------------------------------------------- imports


def import_times(repeat: int = 5) -> dict[str, float]:
    modules = ["detect_expiring", "scan_customers", "purchase_new", "reassign_licenses", "suspend_old", "status"]
    result = {}
    for m in modules:
        samples = []
        for _ in range(repeat):
            out = subprocess.run(  # noqa: S603
                [PY, "-c", f"import time; t = time.perf_counter(); import {m}; print(time.perf_counter() - t)"],
                cwd=ROOT, capture_output=True, text=True, check=True)
            samples.append(float(out.stdout.strip()))
        result[m] = statistics.median(samples)
    return result


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_scan":
        print(json.dumps(asyncio.run(_scan(argv[1], int(argv[2]), argv[3]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m d365_migration.bench")
    parser.add_argument("--latency-ms", type=int, default=40)
    parser.add_argument("--limit", type=int, default=6000, help="sandbox rate limit, requests per minute")
    parser.add_argument("--sizes", default="1000,10000", help="customers to scan")
    parser.add_argument("--baseline-max", type=int, default=1000,
                        help="run the one-at-a-time baseline only up to this many customers (it is slow)")
    parser.add_argument("--chain-customers", type=int, default=840, help="≈500 migrations")
    parser.add_argument("--worker-customers", type=int, default=6000)
    parser.add_argument("--worker-limit", type=int, default=3000,
                        help="rate limit for the 4-worker runs: low enough that they outlast a 60 s window")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: scan,chain,workers,imports")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    lines = [f"Benchmark on {os.cpu_count()} cores, {datetime.now().isoformat(timespec='minutes')}; sandbox latency "
             f"{args.latency_ms} ms, rate limit {args.limit} req/min (client pacing at 95% of it).", ""]

    def emit(line: str = "") -> None:
        lines.append(line)
        print(line, flush=True)

    print(lines[0], flush=True)
    if "scan" not in skip:
        emit("| scan | customers | wall s | req/customer | achieved rate / limit | 429s | peak RSS MB | speed-up |")
        emit("|---|---:|---:|---:|---:|---:|---:|---:|")
        for n in (int(x) for x in args.sizes.split(",")):
            paced = run_scan(n, args.latency_ms, args.limit, "paced")
            base = run_scan(n, args.latency_ms, args.limit, "sequential") if n <= args.baseline_max else None
            speed = f"{base['wall'] / paced['wall']:.1f}x" if base else "—"
            for r, label in ((paced, "paced, concurrent"), (base, "one at a time (baseline)")):
                if r is None:
                    continue
                emit(f"| {label} | {r['customers']} | {r['wall']:.1f} | {r['requests_per_customer']:.3f} | "
                     f"{r['rate_fraction']:.3f} | {r['server_429']} | {r['peak_rss_mb']:.0f} | "
                     f"{speed if r is paced else ''} |")
        emit()
    if "chain" not in skip:
        c = run_chain(args.chain_customers, args.latency_ms, args.limit)
        emit("| whole chain | migrations | final | completed | blocked | wall s | migrations/min | requests | 429s | "
             "longest invocation s |")
        emit("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        emit(f"| local host, 1 process | {c['migrations']} | {c['final']} | {c['completed']} | {c['blocked']} | "
             f"{c['wall']:.1f} | {c['per_minute']:.0f} | {c['requests']} | {c['server_429']} | "
             f"{c['longest_invocation']:.1f} |")
        emit()
        emit("| where a migration's time goes (median s) | " + " | ".join(c["stages"]) + " |")
        emit("|---|" + "---:|" * len(c["stages"]))
        emit("| | " + " | ".join(f"{v:.1f}" if v is not None else "—" for v in c["stages"].values()) + " |")
        emit("| function busy time (s, all invocations) | " + ", ".join(f"{k} {v}" for k, v in
                                                                         c["busy_seconds"].items()) + " |")
        emit()
    if "workers" not in skip:
        emit(f"| 4 local-host workers, one scan, limit {args.worker_limit}/min | customers | requests | wall s | "
             "combined rate / limit | 429s | pages per worker |")
        emit("|---|---:|---:|---:|---:|---:|---|")
        for split in (True, False):
            w = run_workers(args.worker_customers, args.latency_ms, args.worker_limit, 4, split)
            label = "budget split (PARTNER_CENTER_INSTANCES=4)" if split else "no split (AIMD back-off only)"
            emit(f"| {label} | {args.worker_customers} | {w['requests']} | {w['wall']:.1f} | "
                 f"{w['rate_fraction']:.3f} | {w['server_429']} | {w['pages_per_worker']} |")
        emit()
    if "imports" not in skip:
        times = import_times()
        emit("| function module | import s (median of 5, fresh interpreter) |")
        emit("|---|---:|")
        for m, t in times.items():
            emit(f"| {m} | {t:.3f} |")
    (ROOT / "bench-results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
