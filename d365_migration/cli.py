"""Command line: plan (read-only), run, status, retry, sandbox, demo, consent.

``run`` and ``demo`` serve the function folders through the project's local host (which stands in for Azure Functions
Core Tools locally; it is not the real host) over Azurite.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from ._exceptions import ConfigurationError, MigrationError
from ._ledger import FINAL_STATES, MigrationRecord
from ._settings import Settings

APP_ROOT = Path(__file__).resolve().parent.parent


def _console(file: TextIO | None = None) -> Any:
    from rich.console import Console

    return Console(file=file or sys.stdout, width=160 if not sys.stdout.isatty() else None)


# ---------------------------------------------------------------------------------------------------- plan


async def _plan(settings: Settings, fmt: str, show_all: bool, out: TextIO) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from ._app import build_credential
    from ._budget import build_pacers
    from ._catalog import RetiredOfferCatalog
    from ._client import PartnerCenterClient
    from ._ledger import utcnow
    from ._scan import scan_all

    catalog = RetiredOfferCatalog.load(settings.retired_offers_extra)
    rows: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    customers = 0
    errors: list[str] = []
    # With a storage account configured, the plan draws from the budget the deployed app shares (same tenant).
    async with PartnerCenterClient(settings.endpoint, build_credential(settings),
                                   requests_per_minute=settings.requests_per_minute,
                                   license_requests_per_minute=settings.license_requests_per_minute,
                                   limiters=build_pacers(settings),
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


# ---------------------------------------------------------------------------------------------------- run


async def _all_final(settings: Settings) -> bool:
    records = await _records(settings)
    return bool(records) and all(r.state in FINAL_STATES for r in records)


async def run_pipeline(settings: Settings, env: dict[str, str], *, timeout: float,
                       host_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fire the timer once, then serve the queues until every record is final (or the timeout)."""
    from .localhost import LocalHost

    if not settings.storage_connection:
        raise ConfigurationError("AzureWebJobsStorage", "run needs a storage connection string",
                                 "set AzureWebJobsStorage (e.g. Azurite's connection string)")
    # function.json reads the schedule as %DETECT_SCHEDULE%; the local host must be able to resolve it
    env = {"DETECT_SCHEDULE": settings.detect_schedule, **env}
    overrides = {"maxPollingInterval": 0.5, "visibilityTimeout": 2.0, **(host_overrides or {})}
    async with LocalHost(APP_ROOT, connection_string=settings.storage_connection, env=env,
                         host_overrides=overrides) as host:
        await host.fire_timer("detect_expiring")
        if settings.dry_run:
            report = None
        else:
            async def done() -> bool:
                return await _all_final(settings)

            report = await host.run(until=done, timeout=timeout, idle_seconds=3.0)
    return {"host": report}


async def _records(settings: Settings) -> list[MigrationRecord]:
    from ._app import storage_clients

    ledger, queues = storage_clients(settings)
    try:
        return await ledger.list_records()
    finally:
        ledger.close()
        queues.close()


def print_records(records: Sequence[MigrationRecord], out: TextIO, title: str = "Migrations") -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("customer", "old offer", "replacement", "qty", "users moved", "state", "reason"):
        table.add_column(col, overflow="fold")
    for r in records:
        table.add_row(r.customer_name or r.customer_id, r.offer_name or "", r.replacement_offer_id or "—",
                      str(r.quantity), str(r.users_moved), r.state, r.reason or "")
    _console(out).print(table)


# ---------------------------------------------------------------------------------------------------- retry


async def _retry(settings: Settings, target: str, out: TextIO, *, buy_anyway: bool = False) -> int:
    """Re-drive a failed or blocked record from the step it stopped at. Safe to run twice."""
    from ._app import storage_clients
    from ._ledger import utcnow
    from ._messages import StepMessage

    ledger, queues = storage_clients(settings)
    try:
        wanted = target.lower().split("/")
        matches = [r for r in await ledger.list_records()
                   if r.key[1] == wanted[-1] and (len(wanted) == 1 or r.key[0] == wanted[0])]
        if not matches:
            out.write(f"no record for {target}\n")
            return 2
        record = matches[0]
        if record.state not in ("failed", "blocked"):
            out.write(f"record {record.customer_id}/{record.subscription_id} is {record.state}; nothing to re-drive\n")
            return 0
        refused = record.state == "failed" and bool(record.history) and record.history[-1].get("event") in (
            "order_rejected", "checkout_rejected", "checkout_order_errors")
        if refused:
            # Partner Center refused the purchase, so nothing was bought: start over with the current mapping (the
            # purchase step re-checks the old subscription; the tag search still prevents a second purchase).
            record = replace(record, replacement_offer_id=None, cart_id=None, order_id=None,
                             order_attempted_at=None, purchase_started_at=None)
        if not record.new_subscription_id:
            state, step = ("purchasing" if (record.cart_id or record.order_id or record.order_attempted_at)
                           else "detected"), "purchase"
        else:
            state, step = "reassigning" if record.old_sku_id else "purchased", "reassign"
        # A re-driven purchase gets a fresh provisioning clock; the recorded cart/order ids stay, so nothing is
        # bought twice.
        restarted = utcnow().isoformat() if step == "purchase" and record.purchase_started_at else None
        updated = await ledger.save(replace(record, lease_owner=None, lease_until=None,
                                            buy_anyway=record.buy_anyway or buy_anyway,
                                            purchase_started_at=restarted or record.purchase_started_at).transition(
            state, "retry", f"re-driven by an operator from {record.state}"))
        message = StepMessage(step=step, customer_id=updated.customer_id,  # type: ignore[arg-type]
                              subscription_id=updated.subscription_id, correlation_id=updated.correlation_id)
        await queues.send(message.queue, message.to_json())
        out.write(f"re-driven {updated.customer_id}/{updated.subscription_id}: {record.state} → {state}; "
                  f"queued {message.queue}\n")
        return 0
    finally:
        ledger.close()
        queues.close()


# ---------------------------------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    from .demo import run_demo

    return run_demo(customers=args.customers, seed=args.seed, timeout=args.timeout, out=out)


# ---------------------------------------------------------------------------------------------------- sandbox


def _serve_sandbox(port: int, customers: int, seed: int, out: TextIO, config: str | None = None) -> int:
    import time

    from .sandbox import DEMO_REPLACEMENT_OFFERS, SandboxConfig, SandboxServer, SandboxState, seed_world

    state = SandboxState()
    manifest = seed_world(state, customers=customers, seed=seed)
    sandbox_config = SandboxConfig()
    if config:
        sandbox_config.apply_patch(json.loads(config))
    with SandboxServer(state, sandbox_config, port=port) as server:
        out.write(f"Partner Center sandbox on {server.url} ({customers} customers, "
                  f"{len(manifest.expected)} expiring qualified subscriptions). State: {server.url}/_sandbox/state\n"
                  f"Try:\n  export PARTNER_CENTER_ENDPOINT={server.url} PARTNER_CENTER_AUTH=none\n"
                  f"  export REPLACEMENT_OFFERS='{json.dumps(DEMO_REPLACEMENT_OFFERS)}'\n"
                  "  python -m d365_migration plan\nCtrl-C stops it.\n")
        out.flush()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


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
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            return _demo(args, out)
        if args.command == "sandbox":
            return _serve_sandbox(args.port, args.customers, args.seed, out, args.config)
        load_local_settings(Path.cwd() / "local.settings.json")
        settings = Settings.from_env()
        if args.command == "consent":
            from ._consent import run_consent

            return run_consent(settings, out=out)
        if args.command == "plan":
            return asyncio.run(_plan(settings, args.fmt or "table", args.all, out))
        if args.command == "run":
            asyncio.run(run_pipeline(settings, dict(os.environ), timeout=args.timeout))
            records = asyncio.run(_records(settings))
            print_records(records, out)
            return 1 if any(r.state == "failed" for r in records) else 0
        if args.command == "status":
            records = asyncio.run(_records(settings))
            if args.json:
                json.dump([{**r.to_entity(), "History": r.history} for r in records], out, indent=2, default=str)
                out.write("\n")
            else:
                print_records(records, out, "Ledger")
            return 0
        if args.command == "retry":
            return asyncio.run(_retry(settings, args.record, out, buy_anyway=args.buy_anyway))
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2
