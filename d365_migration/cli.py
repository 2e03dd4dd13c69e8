"""Command line: plan (read-only), run, status, retry, sandbox, demo, consent.

``run`` and ``demo`` serve the function folders through the project's local host (which stands in for Azure Functions
Core Tools locally; it is not the real host) over Azurite.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from ._exceptions import ConfigurationError, MigrationError
from ._ledger import MigrationRecord
from ._settings import Settings

__all__ = ["APP_ROOT", "TOOLING_MODULE", "build_parser", "load_local_settings", "main", "print_records", "retry"]

APP_ROOT = Path(__file__).resolve().parent.parent
#: Where the developer tooling's commands live (see :func:`_tooling`).
TOOLING_MODULE = "d365_migration.demo"


def _console(file: TextIO | None = None) -> Any:
    from rich.console import Console

    return Console(file=file or sys.stdout, width=160 if not sys.stdout.isatty() else None)


# ---------------------------------------------------------------------------------------------------- plan


async def _plan(settings: Settings, fmt: str, show_all: bool, out: TextIO) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from ._app import build_credential
    from ._catalog import RetiredOfferCatalog
    from ._client import PartnerCenterClient
    from ._ledger import utcnow
    from ._scan import scan_all

    catalog = RetiredOfferCatalog.load(settings.retired_offers_extra)
    rows: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    customers = 0
    errors: list[str] = []
    async with PartnerCenterClient(settings.endpoint, build_credential(settings),
                                   requests_per_minute=settings.requests_per_minute,
                                   license_requests_per_minute=settings.license_requests_per_minute,
                                   max_concurrency=settings.max_concurrency) as client:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=_console(sys.stderr),
                      transient=True, disable=fmt != "table" or not sys.stderr.isatty()) as progress:
            task = progress.add_task("scanning customers…", total=None)
            async for scan in scan_all(client, catalog, now=utcnow(), window_days=settings.expiry_window_days,
                                       concurrency=settings.max_concurrency):
                customers += 1
                progress.update(task, description=f"scanned {customers} customers, {len(rows)} to migrate")
                if scan.error:
                    errors.append(f"{scan.customer.id}: {scan.error}")
                for c in scan.candidates:
                    in_scope = settings.customer_in_scope(c.customer.id)
                    replacement = settings.replacement_offers.lookup(c.offer.family, c.offer.audience)
                    row = {
                        "customerId": c.customer.id.lower(), "customerName": c.customer.company_name,
                        "subscriptionId": c.subscription.id.lower(), "offerName": c.subscription.offer_name,
                        "family": c.offer.family, "audience": c.offer.audience, "channel": c.offer.channel,
                        "quantity": c.subscription.quantity,
                        "commitmentEndDate": c.subscription.commitment_end.date().isoformat()
                        if c.subscription.commitment_end else None,
                        "replacement": replacement,
                        "action": ("skip: customer not in scope" if not in_scope else
                                   "block: no REPLACEMENT_OFFERS entry" if replacement is None else "migrate"),
                    }
                    rows.append(row)
                if show_all:
                    left.extend({"customerId": x.customer_id.lower(), "subscriptionId": x.subscription_id.lower(),
                                 "offerName": x.offer_name, "reason": x.reason} for x in scan.left_alone)
        requests = client.stats.requests
    rows.sort(key=lambda r: (r["customerId"], r["subscriptionId"]))
    if fmt == "json":
        json.dump({"customers": customers, "migrations": rows, "leftAlone": left, "errors": errors,
                   "requests": requests}, out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        fields = ["customerId", "customerName", "subscriptionId", "offerName", "family", "audience", "channel",
                  "quantity", "commitmentEndDate", "replacement", "action"]
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.table import Table

        table = Table(title=f"Migrations planned ({len(rows)} of {customers} customers scanned)")
        for col in ("customer", "old offer", "audience", "qty", "ends", "replacement", "action"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["customerName"] or r["customerId"], r["offerName"], r["audience"], str(r["quantity"]),
                          r["commitmentEndDate"] or "", r["replacement"] or "—", r["action"])
        console = _console(out)
        console.print(table)
        if left:
            lt = Table(title="Retired offers left alone")
            for col in ("customer", "subscription", "offer", "why"):
                lt.add_column(col)
            for x in left:
                lt.add_row(x["customerId"], x["subscriptionId"], x["offerName"] or "", x["reason"])
            console.print(lt)
        for e in errors:
            console.print(f"[red]error[/red] {e}")
    return 1 if errors else 0


# ---------------------------------------------------------------------------------------------------- ledger


def print_records(records: Sequence[MigrationRecord], out: TextIO, title: str = "Migrations") -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("customer", "old offer", "replacement", "qty", "users moved", "state", "reason"):
        table.add_column(col, overflow="fold")
    for r in records:
        table.add_row(r.customer_name or r.customer_id, r.offer_name or "", r.replacement_offer_id or "—",
                      str(r.quantity), str(r.users_moved), r.state, r.reason or "")
    _console(out).print(table)


async def retry(settings: Settings, target: str, out: TextIO, *, buy_anyway: bool = False) -> int:
    """Re-drive a failed or blocked record from the step it stopped at (``steps/redrive.py``). Safe to run twice."""
    from ._app import open_storage
    from .steps import redrive

    async with open_storage(settings) as (ledger, queues):
        result = await redrive.run(ledger, queues, target, buy_anyway=buy_anyway)
    out.write(result.describe() + "\n")
    return result.exit_code


# ---------------------------------------------------------------------------------------------------- tooling


def _tooling() -> ModuleType:
    """The developer tooling (Partner Center sandbox, local host, demo). It is not part of the deployed app, so the
    commands that need it (run, sandbox, demo) load it by name; they work from a clone of the repository."""
    try:
        return importlib.import_module(TOOLING_MODULE)
    except ModuleNotFoundError as exc:
        if not exc.name or not TOOLING_MODULE.startswith(exc.name):
            raise
        raise MigrationError(f"this command needs the developer tooling ({TOOLING_MODULE}), which is not part of "
                             f"the deployed app: run it from a clone of the repository ({exc})") from None


# ---------------------------------------------------------------------------------------------------- main


def load_local_settings(path: Path) -> list[str]:
    """Core Tools reads ``local.settings.json`` into the environment; the CLI does the same locally. Values already
    in the environment win. Returns the names it set."""
    if not path.is_file():
        return []
    try:
        values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigurationError(str(path), f"is not valid JSON ({exc})",
                                 "fix it or start from local.settings.example.json") from None
    if not isinstance(values, dict):
        raise ConfigurationError(str(path), "'Values' must be an object", "see local.settings.example.json")
    set_names = []
    for name, value in values.items():
        if isinstance(name, str) and isinstance(value, str) and name not in os.environ:
            os.environ[name] = value
            set_names.append(name)
    return set_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m d365_migration", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="read-only: what would be migrated")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json")
    fmt.add_argument("--csv", dest="fmt", action="store_const", const="csv")
    p.add_argument("--all", action="store_true", help="also list retired offers left alone, and why")
    p = sub.add_parser("run", help="detect once, then serve the queues until every record is final")
    p.add_argument("--timeout", type=float, default=600.0)
    sub.add_parser("status", help="the ledger").add_argument("--json", action="store_true")
    p = sub.add_parser("retry", help="re-drive a failed or blocked record: <subscription> or <customer>/<subscription>")
    p.add_argument("record")
    p.add_argument("--buy-anyway", action="store_true",
                   help="an untagged subscription of the replacement offer is NOT this migration's: buy anyway")
    p = sub.add_parser("sandbox", help="serve the Partner Center sandbox")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--customers", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--config", help='JSON, e.g. {"latency_ms": 40, "requests_per_minute": 6000}')
    p = sub.add_parser("demo", help="sandbox + Azurite + run + report")
    p.add_argument("--customers", type=int, default=24)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=300.0)
    sub.add_parser("consent", help="one-time sign-in of the partner service account (stores the refresh token)")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    from ._app import read_records

    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            return int(_tooling().run_demo(customers=args.customers, seed=args.seed, timeout=args.timeout, out=out))
        if args.command == "sandbox":
            return int(_tooling().serve_sandbox(args.port, args.customers, args.seed, out, args.config))
        load_local_settings(Path.cwd() / "local.settings.json")
        settings = Settings.from_env()
        if args.command == "consent":
            from ._consent import run_consent

            return run_consent(settings, out=out)
        if args.command == "plan":
            return asyncio.run(_plan(settings, args.fmt or "table", args.all, out))
        if args.command == "run":
            asyncio.run(_tooling().run_pipeline(settings, dict(os.environ), timeout=args.timeout))
            records = asyncio.run(read_records(settings))
            print_records(records, out)
            return 1 if any(r.state == "failed" for r in records) else 0
        if args.command == "status":
            records = asyncio.run(read_records(settings))
            if args.json:
                json.dump([{**r.to_entity(), "History": r.history} for r in records], out, indent=2, default=str)
                out.write("\n")
            else:
                print_records(records, out, "Ledger")
            return 0
        if args.command == "retry":
            return asyncio.run(retry(settings, args.record, out, buy_anyway=args.buy_anyway))
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2
