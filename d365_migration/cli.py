"""Command line: plan and offers (read-only), run, status, retry, rollout, cancel, sandbox, demo, consent.

``run`` and ``demo`` serve the function folders through the project's local host (which stands in for Azure Functions
Core Tools locally; it is not the real host) over Azurite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from ._exceptions import AuthenticationError, ConfigurationError, MigrationError, PartnerCenterError
from ._ledger import MigrationRecord
from ._settings import Settings

__all__ = ["APP_ROOT", "TOOLING_MODULE", "build_parser", "load_local_settings", "main", "print_records", "reason_code",
           "retry", "retry_many"]

APP_ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("d365_migration.cli")
#: Where the developer tooling's commands live (see :func:`_tooling`).
TOOLING_MODULE = "d365_tooling.demo"


def _console(file: TextIO | None = None) -> Any:
    from rich.console import Console

    return Console(file=file or sys.stdout, width=160 if not sys.stdout.isatty() else None)


# ---------------------------------------------------------------------------------------------------- plan


async def _scope_for_plan(settings: Settings) -> Callable[[str], bool]:
    """Who is in the rollout's scope, as the purchase step will decide it: the *stored* rollout controls when a
    ledger is configured (read only, nothing is seeded), else the app settings (no storage: a plan from a laptop)."""
    from ._app import storage_clients
    from ._exceptions import LedgerError
    from ._rollout import RolloutStore, load_effective_controls

    if not (settings.storage_connection or (settings.storage_queue_uri and settings.storage_table_uri)):
        return settings.customer_in_scope
    ledger, queues = storage_clients(settings)
    try:
        controls = await load_effective_controls(RolloutStore(ledger.table_client), settings, seed=False)
    except LedgerError as exc:
        print(f"warning: rollout controls not readable ({exc}); scope from the app settings", file=sys.stderr)
        return settings.customer_in_scope
    finally:
        ledger.close()
        queues.close()
    return controls.customer_in_scope


def _cost_estimator(settings: Settings, *, prices: bool, currency: str | None) -> tuple[Any, Any]:
    """``plan``'s cost estimator and the price sheet client it uses (``None`` when prices are off).

    The price sheet lives on the Partner API (``https://api.partner.microsoft.com``), App+User only, for its own
    audience; a loopback Partner Center (the sandbox) is asked for it at its own address."""
    from ._pricing import PRICING_ENDPOINT, PRICING_SCOPE, CostEstimator, PriceSheetClient
    from ._settings import is_loopback_url

    def estimator(client: Any, unavailable: str = "") -> Any:
        return CostEstimator(client, term_duration=settings.replacement_term_duration,
                             billing_cycle=settings.replacement_billing_cycle, currency=currency,
                             unavailable=unavailable)

    if not prices:
        return estimator(None, "prices not requested (--no-prices)"), None
    endpoint = settings.endpoint if is_loopback_url(settings.endpoint) else PRICING_ENDPOINT
    credential = None
    if settings.auth != "none":
        from ._auth import build_credential

        credential = build_credential(settings, scopes=(PRICING_SCOPE,))
    client = PriceSheetClient(endpoint, credential)
    return estimator(client), client


async def _plan(settings: Settings, fmt: str, show_all: bool, out: TextIO, *, prices: bool = True,
                currency: str | None = None) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from ._app import build_credential
    from ._budget import build_pacers
    from ._catalog import RetiredOfferCatalog
    from ._client import PartnerCenterClient
    from ._ledger import utcnow
    from ._scan import scan_all
    from .steps._quantity import POLICY_TEXT, count_holders

    catalog = RetiredOfferCatalog.load(settings.retired_offers_extra)
    in_rollout_scope = await _scope_for_plan(settings)
    policy = settings.replacement_quantity_policy
    rows: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    customers = 0
    errors: list[str] = []
    costs, price_client = _cost_estimator(settings, prices=prices, currency=currency)
    markets: dict[str, str | None] = {}

    async def market_of(customer_id: str) -> str | None:
        # A customer whose profile cannot be read gets no price (the row says its country is unknown); the plan
        # itself goes on — prices inform it, they never stop it.
        if customer_id not in markets:
            try:
                markets[customer_id] = (await client.get_customer(customer_id)).country
            except (PartnerCenterError, AuthenticationError) as exc:
                logger.warning("event=price_market_unreadable customer=%s error=%s", customer_id,
                               type(exc).__name__)
                markets[customer_id] = None
        return markets[customer_id]

    # With a storage account configured, the plan draws from the budget the deployed app shares (same tenant).
    pc_client = PartnerCenterClient(settings.endpoint, build_credential(settings),
                                    requests_per_minute=settings.requests_per_minute,
                                    license_requests_per_minute=settings.license_requests_per_minute,
                                    limiters=build_pacers(settings), max_concurrency=settings.max_concurrency)
    async with contextlib.AsyncExitStack() as stack, pc_client as client:
        if price_client is not None:
            await stack.enter_async_context(price_client)  # closed with the Partner Center client
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=_console(sys.stderr),
                      transient=True, disable=fmt != "table" or not sys.stderr.isatty()) as progress:
            task = progress.add_task("scanning customers…", total=None)
            async for scan in scan_all(client, catalog, now=utcnow(), window_days=settings.expiry_window_days,
                                       concurrency=settings.max_concurrency):
                customers += 1
                progress.update(task, description=f"scanned {customers} customers, {len(rows)} to migrate")
                if scan.error:
                    errors.append(f"{scan.customer.id}: {scan.error}")
                skus = (await client.list_subscribed_skus(scan.customer.id)
                        if scan.candidates and policy == "license_holders" else [])
                for c in scan.candidates:
                    in_scope = in_rollout_scope(c.customer.id)
                    replacement = settings.replacement_offers.lookup(c.offer.family, c.offer.audience)
                    row = {
                        "customerId": c.customer.id.lower(), "customerName": c.customer.company_name,
                        "subscriptionId": c.subscription.id.lower(), "offerName": c.subscription.offer_name,
                        "family": c.offer.family, "audience": c.offer.audience, "channel": c.offer.channel,
                        "quantity": c.subscription.quantity,
                        "commitmentEndDate": c.ends.date().isoformat() if c.ends else None,
                        "replacement": replacement,
                        "action": ("skip: customer not in scope" if not in_scope else
                                   "block: no REPLACEMENT_OFFERS entry" if replacement is None else "migrate"),
                        "quantityToBuy": _quantity_to_buy(policy, c.subscription.quantity, await count_holders(
                            client, c.customer.id, c.subscription.id, part_numbers=c.offer.sku_part_numbers,
                            skus=skus) if policy == "license_holders" else None),
                    }
                    rows.append(row)
                    if row["action"] == "migrate":
                        await _add_path(client, settings, c, row)
                    if replacement is not None:
                        # A native move keeps the old quantity; the runbook buys what the quantity policy says.
                        quantity = (row["quantity"] if str(row.get("path", "")).startswith("native")
                                    else row["quantityToBuy"])
                        estimate = await costs.estimate(
                            await market_of(c.customer.id) if price_client is not None else None,
                            settings.replacement_offers.target(c.offer.family, c.offer.audience), quantity,
                            in_scope=row["action"] == "migrate")
                        row["cost"], row["costLabel"] = estimate.to_json(), estimate.label()
                if show_all:
                    left.extend({"customerId": x.customer_id.lower(), "subscriptionId": x.subscription_id.lower(),
                                 "offerName": x.offer_name, "reason": x.reason} for x in scan.left_alone)
        requests = client.stats.requests
    rows.sort(key=lambda r: (r["customerId"], r["subscriptionId"]))
    if fmt == "json":
        json.dump({"customers": customers, "quantityPolicy": policy, "quantityPolicyText": POLICY_TEXT[policy],
                   "migrations": [{k: v for k, v in r.items() if k != "costLabel"} for r in rows],
                   "cost": {"totals": {c: str(a) for c, a in sorted(costs.totals.items())},
                            "outOfScopeTotals": {c: str(a) for c, a in sorted(costs.out_of_scope.items())},
                            "priced": costs.priced, "unpriced": costs.unpriced, "summary": costs.summary()},
                   "leftAlone": left, "errors": errors, "requests": requests}, out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        fields = ["customerId", "customerName", "subscriptionId", "offerName", "family", "audience", "channel",
                  "quantity", "commitmentEndDate", "replacement", "action", "quantityToBuy", "path", "pathReason",
                  "cost", "currency", "costPerBill", "costNote"]
        writer = csv.DictWriter(out, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "cost": r.get("cost", {}).get("amount", ""),
                          "currency": r.get("cost", {}).get("currency", ""),
                          "costPerBill": r.get("cost", {}).get("perBill") or "",
                          "costNote": r.get("cost", {}).get("note") or r.get("cost", {}).get("unavailable", "")}
                         for r in rows)
        # --all: what was left alone (unrecognised offers included, with their names), one row each, and why.
        writer.writerows({"customerId": x["customerId"], "subscriptionId": x["subscriptionId"],
                          "offerName": x["offerName"], "action": f"leave alone: {x['reason']}",
                          "pathReason": x["reason"]} for x in left)
    else:
        from rich.table import Table

        table = Table(title=f"Migrations planned ({len(rows)} of {customers} customers scanned)")
        for col in ("customer", "old offer", "audience", "qty", "to buy", "ends", "replacement", "action", "path",
                    "why", "cost (one term)"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r["customerName"] or r["customerId"], r["offerName"], r["audience"], str(r["quantity"]),
                          str(r["quantityToBuy"]), r["commitmentEndDate"] or "", r["replacement"] or "—", r["action"],
                          r.get("path", ""), r.get("pathReason", ""), r.get("costLabel", ""))
        console = _console(out)
        console.print(table)
        console.print(f"Quantity policy: REPLACEMENT_QUANTITY_POLICY={policy}: {POLICY_TEXT[policy]}; "
                      f"{sum(r['quantityToBuy'] for r in rows if r['action'] == 'migrate')} seat(s) to buy in total.",
                      soft_wrap=True, markup=False)
        console.print(f"Cost: {costs.summary()}.", soft_wrap=True, markup=False)
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


async def _add_path(client: Any, settings: Settings, candidate: Any, row: dict[str, Any]) -> None:
    """The path this migration takes under MIGRATION_PATH_POLICY and why (eligibility errors verbatim)."""
    from ._native_path import choose_path, parse_path_policy

    target = settings.replacement_offers.target(candidate.offer.family, candidate.offer.audience)
    if target is None:
        return
    choice = await choose_path(client, candidate.customer.id, candidate.subscription, target,
                               policy=parse_path_policy(settings.migration_path_policy))
    row["path"], row["pathReason"] = choice.label, choice.reason
    if choice.kind == "blocked":
        row["action"] = "block: no native path (MIGRATION_PATH_POLICY=native_only)"


def _quantity_to_buy(policy: str, old_quantity: int, holders: int | None) -> int:
    """What the purchase step would buy now (steps/_quantity.py): holders unknown → the old quantity."""
    if policy == "license_holders" and holders is not None:
        return max(1, holders)
    return old_quantity


# ---------------------------------------------------------------------------------------------------- ledger


def print_records(records: Sequence[MigrationRecord], out: TextIO, title: str = "Migrations", *,
                  would_do: Callable[[MigrationRecord], str] | None = None, extra_column: str = "would do") -> None:
    """The records as a table, with the ``<customer>/<subscription>`` id that ``retry`` and ``cancel`` take.
    ``would_do``: a dry run's column saying what going live would do with each record."""
    from rich.table import Table

    table = Table(title=title)
    columns = ["record (customer/subscription)", "customer", "old offer", "replacement", "qty", "users moved",
               "state", "reason"]
    if would_do is not None:
        columns.insert(3, extra_column)
    for col in columns:
        # the id column never wraps: it is copied into `retry` / `cancel`
        table.add_column(col, overflow="fold", no_wrap=col.startswith("record"), min_width=73 if col.startswith(
            "record") else None)
    for r in records:
        row = [f"{r.customer_id}/{r.subscription_id}", r.customer_name or "", r.offer_name or "",
               r.replacement_offer_id or "—", str(r.quantity), str(r.users_moved), r.state, r.reason or ""]
        if would_do is not None:
            row.insert(3, would_do(r))
        table.add_row(*row)
    _console(out).print(table)


_RECORD_CSV_FIELDS = ("record", "customerId", "subscriptionId", "customerName", "offerName", "family", "audience",
                      "quantity", "replacementOfferId", "newSubscriptionId", "usersMoved", "state", "reasonCode",
                      "reason", "updatedAt", "retry")


def _write_records_csv(records: Sequence[MigrationRecord], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=_RECORD_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        stopped = r.state in ("blocked", "failed")
        writer.writerow({
            "record": f"{r.customer_id}/{r.subscription_id}", "customerId": r.customer_id,
            "subscriptionId": r.subscription_id, "customerName": r.customer_name or "", "offerName": r.offer_name or "",
            "family": r.family or "", "audience": r.audience or "", "quantity": r.quantity,
            "replacementOfferId": r.replacement_offer_id or "", "newSubscriptionId": r.new_subscription_id or "",
            "usersMoved": r.users_moved, "state": r.state, "reasonCode": reason_code(r) if stopped else "",
            "reason": r.reason or "", "updatedAt": r.updated_at or "",
            "retry": f"python -m d365_migration retry {r.customer_id}/{r.subscription_id}" if stopped else ""})


def _print_by_customer(records: Sequence[MigrationRecord], out: TextIO, *, csv_format: bool, json_format: bool
                       ) -> None:
    """One row per customer: how many of its records are in each state (and the filter that re-drives them)."""
    from ._ledger import STATES

    rows: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda x: x.customer_id.lower()):
        row = rows.setdefault(r.customer_id.lower(), {"customerId": r.customer_id.lower(),
                                                     "customerName": r.customer_name or "",
                                                     **{s: 0 for s in STATES}})
        row[r.state] += 1
    for row in rows.values():
        row["retry"] = (f"python -m d365_migration retry --customer {row['customerId']}"
                        if row["blocked"] or row["failed"] else "")
    if json_format:
        json.dump(list(rows.values()), out, indent=2)
        out.write("\n")
        return
    fields = ["customerId", "customerName", *STATES, "retry"]
    if csv_format:
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows.values())
        return
    from rich.table import Table

    table = Table(title=f"Migrations per customer ({len(rows)})")
    for col in fields:
        table.add_column(col, overflow="fold", no_wrap=col == "customerId")
    for row in rows.values():
        table.add_row(*(str(row[f]) for f in fields))
    _console(out).print(table)


def _would_do(settings: Settings) -> Callable[[MigrationRecord], str]:
    """What going live would do with a record that a dry run left ``detected`` (nothing is called)."""
    def describe(r: MigrationRecord) -> str:
        if r.state != "detected":
            return "—"
        replacement = settings.replacement_offers.lookup(r.family or "", r.audience or "")
        if replacement is None:
            return f"block: no REPLACEMENT_OFFERS entry for {r.family}.{r.audience}"
        seats = (f"{r.quantity}" if settings.replacement_quantity_policy == "old_quantity"
                 else f"one per license holder (at most {r.quantity})")
        return f"buy {replacement} x {seats}, move the users, suspend the old subscription"
    return describe


async def _run(settings: Settings, timeout: float, out: TextIO) -> int:
    """``run``: detect once and serve the queues until none holds a message; say what happened and what needs a
    human. Exit 0 only when detection and every record went through (or, in a dry run, were recorded)."""
    from ._app import read_records
    from ._ledger import utcnow
    from ._preflight import check_partner_center, check_storage

    await check_storage(settings)
    await check_partner_center(settings)
    started = utcnow()

    def progress(counts: dict[str, int]) -> None:
        print("progress: " + (", ".join(f"{state}={n}" for state, n in counts.items()) or "no records yet"),
              file=sys.stderr, flush=True)

    print(f"run: scanning customers at {settings.endpoint}, then serving the queues (Ctrl-C stops)…",
          file=sys.stderr, flush=True)
    result = await _tooling().run_pipeline(settings, dict(os.environ), timeout=timeout, progress=progress)
    host = result["host"]
    records = await read_records(settings)
    controls = await _controls(settings)
    problems: list[str] = []
    scan = host.functions.get("scan_customers")
    if scan is not None and scan.poisoned:
        problems.append(f"detection failed: {scan.poisoned} customer page(s) could not be scanned (see the log "
                        "and the scan-customers-poison queue); fix the cause and run again")
    problems += await _not_scanned(settings, since=started)
    others = host.poisoned - (scan.poisoned if scan is not None else 0)
    if others:
        problems.append(f"{others} step message(s) were poisoned (their records are marked failed)")
    if host.stopped_because == "timeout":
        problems.append(f"stopped after --timeout {timeout:g}s with messages still queued; run again to continue")
    if controls.dry_run:
        print_records(records, out, "Dry run: recorded, nothing bought, moved or suspended",
                      would_do=_would_do(settings))
        out.write(f"DRY RUN ({controls.summary()}): {sum(r.state == 'detected' for r in records)} migration(s) "
                  "recorded. To go live: python -m d365_migration rollout set --live --allow <customer-id> "
                  "(or --all-customers)\n")
    else:
        print_records(records, out)
        if controls.paused:
            problems.append(f"the rollout is paused ({controls.pause_reason}): records wait as detected; "
                            "python -m d365_migration rollout resume")
    for r in records:
        if r.state in ("failed", "blocked"):
            problems.append(f"{r.state}: {r.customer_id}/{r.subscription_id}: {r.reason or ''} — re-drive with "
                            f"python -m d365_migration retry {r.customer_id}/{r.subscription_id}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


async def _not_scanned(settings: Settings, *, since: Any) -> list[str]:
    """One line per customer (or unreadable page) this run's detection could not scan: their subscriptions were
    not checked, so an expiring one would not be migrated (the ledger's scan markers, ``scan_failures``)."""
    from ._app import open_storage

    async with open_storage(settings) as (ledger, _queues):
        failures = await ledger.scan_failures(since=since)
    lines: list[str] = []
    for f in failures:
        for customer_id, reason in f.customers:
            lines.append(f"not scanned: customer {customer_id}: {reason} — its subscriptions were not checked; fix "
                         "the cause and run again")
        if f.unlisted:
            what = f"{f.unlisted} more customer(s)" if f.customers else "its customers"
            lines.append(f"not scanned: page {f.page} of detection run {f.run_id}: {f.reason or 'see the log'} "
                         f"({what} not checked); fix the cause and run again")
    return lines


async def _controls(settings: Settings) -> Any:
    from ._app import open_storage
    from ._rollout import RolloutStore, load_effective_controls

    async with open_storage(settings) as (ledger, _queues):
        return await load_effective_controls(RolloutStore(ledger.table_client), settings, seed=False)


def reason_code(record: MigrationRecord) -> str:
    """The code of why a record stopped: its last history event (``purchase_brake``, ``no_replacement``…)."""
    return str(record.history[-1].get("event", "")) if record.history else ""


def _matches(record: MigrationRecord, states: Sequence[str], codes: Sequence[str], customers: Sequence[str]) -> bool:
    return (record.state in states and (not codes or reason_code(record) in codes)
            and (not customers or record.customer_id.lower() in customers))


async def retry_many(settings: Settings, out: TextIO, *, states: Sequence[str], codes: Sequence[str],
                     customers: Sequence[str], yes: bool, buy_anyway: bool = False,
                     confirm: Callable[[str], str] = input) -> int:
    """Re-drive every stopped record the filters select: show them, ask (unless ``yes``), then re-drive each."""
    from ._app import open_storage
    from .steps import redrive

    customers = [c.strip().lower() for c in customers]
    async with open_storage(settings) as (ledger, queues):
        selected = [r for r in await ledger.list_records() if _matches(r, states, codes, customers)]
        if not selected:
            out.write("no blocked or failed record matches the filters\n")
            return 0
        print_records(selected, out, f"To re-drive ({len(selected)})", would_do=reason_code, extra_column="reason code")
        if not yes:
            if not sys.stdin.isatty() and confirm is input:
                print("refused: not a terminal; add --yes to re-drive these records", file=sys.stderr)
                return 2
            if confirm(f"Re-drive {len(selected)} record(s)? [y/N] ").strip().lower() not in ("y", "yes"):
                out.write("nothing re-driven\n")
                return 1
        for r in selected:
            result = await redrive.run(ledger, queues, f"{r.customer_id}/{r.subscription_id}", buy_anyway=buy_anyway)
            out.write(result.describe() + "\n")
    return 0


async def retry(settings: Settings, target: str, out: TextIO, *, buy_anyway: bool = False,
                users_file: str | None = None) -> int:
    """Re-drive a failed or blocked record from the step it stopped at (``steps/redrive.py``). Safe to run twice.
    ``users_file``: the user principal names (one a line, ``#`` comments) that move off a pooled product SKU."""
    from ._app import open_storage
    from .steps import redrive

    moving_users = None
    if users_file is not None:
        try:
            lines = Path(users_file).read_text(encoding="utf-8-sig").splitlines()
        except OSError as exc:
            print(f"error: cannot read the users file {users_file}: {exc.strerror}", file=sys.stderr)
            return 2
        moving_users = [line.split("#", 1)[0].strip() for line in lines]
    async with open_storage(settings) as (ledger, queues):
        result = await redrive.run(ledger, queues, target, buy_anyway=buy_anyway, moving_users=moving_users)
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


# ---------------------------------------------------------------------------------------------------- rollout


def _print_controls(controls: Any, out: TextIO) -> None:
    doc = controls.to_json()
    if controls.source == "stored":
        origin = f"stored; last changed by {controls.changed_by} at {controls.changed_at} (version {controls.version})"
    else:
        origin = "not stored yet: first-deploy defaults from the app settings (stored on first use)"
    customers = ("ALL customers (chosen explicitly)" if controls.all_customers else
                 ", ".join(doc["allowlist"]) if doc["allowlist"] else "none (allow-list empty)")
    paused = f"yes: {controls.pause_reason or 'no reason given'}" if controls.paused else "no"
    out.write(f"mode:                 {'LIVE' if controls.live else 'dry run'}\n"
              f"paused:               {paused}\n"
              f"customers:            {customers}\n"
              f"denied (app setting): {', '.join(doc['denylist']) or 'none'}\n"
              f"purchase brake:       at most {controls.max_purchases_per_run} purchase(s) per detection run\n"
              f"may buy now:          {'yes' if controls.may_purchase else 'no'}\n"
              f"source:               {origin}\n")
    if controls.note:
        out.write(f"note:                 {controls.note}\n")


def _print_audit(entries: Sequence[Any], out: TextIO) -> None:
    if not entries:
        out.write("no changes recorded yet\n")
        return
    for entry in entries:
        changed = "; ".join(f"{k}: {before!r} -> {after!r}" for k, (before, after) in entry.changes().items())
        out.write(f"{entry.at}  {entry.by}  {entry.action}: {changed or 'no change'}"
                  f"{'  (' + entry.reason + ')' if entry.reason else ''}\n")


async def _rollout(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    """``rollout show|audit|set|pause|resume``: the controls that decide what the app may spend (see _rollout)."""
    from ._app import storage_clients
    from ._exceptions import RolloutRefused
    from ._rollout import (
        RolloutControls,
        RolloutStore,
        controls_from_settings,
        default_actor,
        load_effective_controls,
        parse_customer_ids,
    )

    ledger, queues = storage_clients(settings)
    try:
        store = RolloutStore(ledger.table_client)
        action = args.rollout_action
        if action in ("show", "audit"):
            controls = await load_effective_controls(store, settings, seed=False)
            entries = await store.audit(limit=args.limit)
            if args.json:
                doc = {"controls": controls.to_json(), "audit": [e.to_json() for e in entries]}
                json.dump(doc if action == "show" else doc["audit"], out, indent=2)
                out.write("\n")
            elif action == "show":
                _print_controls(controls, out)
                out.write("\nrecent changes:\n")
                _print_audit(entries[:5], out)
            else:
                _print_audit(entries, out)
            return 0
        by = args.by or default_actor()
        reason = args.reason
        update: Any
        if action == "pause":
            def update(c: RolloutControls) -> RolloutControls:
                return replace(c, paused=True, pause_reason=reason or "paused by an operator")
        elif action == "resume":
            def update(c: RolloutControls) -> RolloutControls:
                return replace(c, paused=False, pause_reason=None)
        else:  # set
            allow = parse_customer_ids(args.allow or [])
            disallow = parse_customer_ids(args.disallow or [])
            if not (args.mode or allow or disallow or args.clear_allowlist or args.all_customers
                    or args.max_purchases is not None):
                raise RolloutRefused("nothing to change: give --live/--dry-run, --allow, --disallow, "
                                     "--clear-allowlist, --all-customers or --max-purchases")

            def update(c: RolloutControls) -> RolloutControls:
                allowlist = frozenset() if args.clear_allowlist else c.allowlist
                allowlist = (allowlist | allow) - disallow
                all_customers = c.all_customers
                if allow or args.clear_allowlist:
                    all_customers = False  # naming customers (or starting over) ends "all customers"
                if args.all_customers:
                    all_customers = True
                live = c.live if args.mode is None else args.mode == "live"
                brake = c.max_purchases_per_run if args.max_purchases is None else args.max_purchases
                return replace(c, live=live, allowlist=allowlist, all_customers=all_customers,
                               max_purchases_per_run=brake)
        try:
            controls = await store.change(update, by=by, action=action, reason=reason,
                                          defaults=controls_from_settings(settings))
        except RolloutRefused as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 2
        out.write(f"rollout {action} by {by}: {controls.summary()}\n")
        if action == "resume" and controls.may_purchase:
            requeued = await _requeue_waiting(ledger, queues)
            out.write(f"re-queued {requeued} record(s) waiting to be bought\n")
        return 0
    except RolloutRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    finally:
        ledger.close()
        queues.close()


async def _requeue_waiting(ledger: Any, queues: Any) -> int:
    """After a pause, the records that were never bought (``detected``) are sent to the purchase step again. The
    step checks the ledger and Partner Center before it buys, so a record queued twice is bought once."""
    from ._messages import StepMessage
    from .steps._gate import purchase_under_way

    # detected, or purchasing with nothing bought yet (the purchase gate stopped it before a cart or order)
    waiting = [r for r in await ledger.list_records(states=("detected", "purchasing"))
               if r.state == "detected" or not purchase_under_way(r)]
    for record in waiting:
        message = StepMessage(step="purchase", customer_id=record.customer_id,
                              subscription_id=record.subscription_id, correlation_id=record.correlation_id)
        await queues.send(message.queue, message.to_json())
    return len(waiting)


# ---------------------------------------------------------------------------------------------------- offers


async def _offers(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    """Read-only: the new-commerce products and SKUs that can replace each retired family and audience in a country,
    and the REPLACEMENT_OFFERS JSON for azd (see _offers)."""
    from ._app import build_credential
    from ._catalog import RetiredOfferCatalog
    from ._offers import PRICES_NOT_AVAILABLE, find_replacements, replacement_offers_json

    country = args.country.strip().upper()
    if len(country) != 2 or not country.isalpha():
        raise ConfigurationError("--country", f"{args.country!r} is not a two-letter country code", "e.g. --country US")
    from ._client import PartnerCenterClient

    catalog = RetiredOfferCatalog.load(settings.retired_offers_extra)
    async with PartnerCenterClient(settings.endpoint, build_credential(settings),
                                   requests_per_minute=settings.requests_per_minute,
                                   license_requests_per_minute=settings.license_requests_per_minute,
                                   max_concurrency=settings.max_concurrency) as client:
        found = await find_replacements(client, catalog, country)
    mapping = replacement_offers_json(found, id_format=args.id_format)
    compact = json.dumps(mapping, separators=(",", ":"))
    missing = [f"{f}.{a}" for (f, a), c in sorted(found.items()) if not c]
    if args.json_for_azd:
        out.write(compact + "\n")
        for name in missing:
            print(f"warning: no replacement found in {country} for {name}", file=sys.stderr)
        return 0
    term, cycle = settings.replacement_term_duration, settings.replacement_billing_cycle
    if args.json:
        doc = {"country": country, "prices": PRICES_NOT_AVAILABLE, "configuredTerm": {"duration": term,
                                                                                       "billingCycle": cycle},
               "replacements": [{"family": f, "audience": a,
                                 "retiredOffers": sorted(o.name for o in catalog if (o.family, o.audience) == (f, a)),
                                 "candidates": [{**c.to_json(), "offersConfiguredTerm": c.offers_term(term, cycle)}
                                                for c in cands]}
                                for (f, a), cands in sorted(found.items())],
               "replacementOffers": mapping, "missing": missing,
               "azd": f"azd env set REPLACEMENT_OFFERS '{compact}'"}
        json.dump(doc, out, indent=2)
        out.write("\n")
        return 0
    from rich.table import Table

    table = Table(title=f"New-commerce replacements in {country} (first row of each group is suggested)")
    for col in ("family", "audience", "product", "SKU", "REPLACEMENT_OFFERS id", "catalog item id", "terms"):
        table.add_column(col, overflow="fold")
    for (family, audience), cands in sorted(found.items()):
        if not cands:
            table.add_row(family, audience, "[red]none found[/red]", "", "", "", "")
        for i, c in enumerate(cands):
            terms = ", ".join(f"{t.duration}/{t.billing_cycle}" for t in c.terms)
            mark = "" if c.offers_term(term, cycle) else f" (no {term}/{cycle})"
            table.add_row(family if i == 0 else "", audience if i == 0 else "", c.product_title, c.sku_title,
                          c.replacement_id, c.catalog_item_id, terms + mark)
    console = _console(out)
    console.print(table)
    console.print(f"Prices: {PRICES_NOT_AVAILABLE}.", soft_wrap=True)
    console.print("Set the suggested ids (check each against the customer's needs first):", soft_wrap=True)
    console.print(f"  azd env set REPLACEMENT_OFFERS '{compact}'", soft_wrap=True, markup=False)
    return 0


# ---------------------------------------------------------------------------------------------------- cancel


async def _cancel(settings: Settings, target: str, out: TextIO, *, by: str | None) -> int:
    """Cancel a replacement this tool bought, inside Partner Center's cancellation window (see _cancel)."""
    from ._app import build_credential, storage_clients
    from ._cancel import cancel_replacement
    from ._client import PartnerCenterClient
    from ._exceptions import CancelRefused
    from ._rollout import default_actor

    ledger, queues = storage_clients(settings)
    try:
        async with PartnerCenterClient(settings.endpoint, build_credential(settings),
                                       requests_per_minute=settings.requests_per_minute,
                                       license_requests_per_minute=settings.license_requests_per_minute,
                                       max_concurrency=settings.max_concurrency) as client:
            try:
                outcome = await cancel_replacement(ledger, client, target, by=by or default_actor())
            except CancelRefused as exc:
                print(f"refused: {exc}", file=sys.stderr)
                return 2
        r = outcome.record
        if outcome.already:
            out.write(f"already cancelled: replacement {outcome.cancelled_subscription_id} of "
                      f"{r.customer_id}/{r.subscription_id} (record {r.state})\n")
        else:
            window = (f" (window open until {outcome.window_ends.isoformat(timespec='minutes')})"
                      if outcome.window_ends else "")
            out.write(f"cancelled replacement {outcome.cancelled_subscription_id} of {r.customer_id}/"
                      f"{r.subscription_id}{window}; the old subscription stays active; record is {r.state}\n")
        return 0
    finally:
        ledger.close()
        queues.close()




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
    p.add_argument("--no-prices", dest="prices", action="store_false",
                   help="do not read the partner price sheet (no cost per migration)")
    p.add_argument("--currency", metavar="CODE",
                   help="price in this currency where a market's price sheet has several (European markets)")
    p = sub.add_parser("run", help="detect once, then serve the queues until none holds a message; exit 1 if "
                                  "detection failed or a record failed or is blocked")
    p.add_argument("--timeout", type=float, default=600.0)
    p = sub.add_parser("status", help="the ledger: every record (with the ids retry takes), or per customer")
    status_fmt = p.add_mutually_exclusive_group()
    status_fmt.add_argument("--json", action="store_true")
    status_fmt.add_argument("--csv", action="store_true", help="one row per record (or per customer)")
    p.add_argument("--by-customer", action="store_true", help="one row per customer: records per state")
    p.add_argument("--customer", action="append", metavar="CUSTOMER_ID", help="only this customer's records")
    p = sub.add_parser("retry", help="re-drive failed or blocked records: one (<subscription> or "
                                     "<customer>/<subscription>) or every one the filters select")
    p.add_argument("record", nargs="?", help="one record; omit it to use the filters")
    p.add_argument("--state", action="append", choices=("blocked", "failed"),
                   help="only records in this state (repeatable; default both)")
    p.add_argument("--reason-code", action="append", metavar="CODE",
                   help="only records that stopped with this code, e.g. purchase_brake (see `status`)")
    p.add_argument("--customer", action="append", metavar="CUSTOMER_ID", help="only this customer's records")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--buy-anyway", action="store_true",
                   help="an untagged subscription of the replacement offer is NOT this migration's: buy anyway")
    p.add_argument("--users-file", metavar="PATH",
                   help="pooled SKU: the user principal names (one a line) of the retiring subscription's users; "
                        "only they move")
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
    _add_rollout_parser(sub)
    p = sub.add_parser("offers", help="read-only: new-commerce products/SKUs that can replace each retired offer in a "
                                      "country, and the REPLACEMENT_OFFERS JSON")
    p.add_argument("--country", required=True, help="two-letter country code of the customers, e.g. US")
    out_fmt = p.add_mutually_exclusive_group()
    out_fmt.add_argument("--json", action="store_true", help="every candidate, as JSON")
    out_fmt.add_argument("--json-for-azd", action="store_true",
                         help="only the REPLACEMENT_OFFERS value: azd env set REPLACEMENT_OFFERS \"$(... )\"")
    p.add_argument("--id-format", choices=("product-sku", "catalog-item"), default="product-sku",
                   help="productId:skuId (stable; default) or the full catalog item id productId:skuId:availabilityId")
    p = sub.add_parser("cancel", help="cancel a replacement this tool bought, inside Partner Center's 7-day "
                                      "cancellation window: <subscription> or <customer>/<subscription>")
    p.add_argument("record", help="the old subscription id (or the replacement's), optionally <customer>/...")
    p.add_argument("--by", help="who is cancelling (default: user@host); kept in the record's history")
    return parser


def _add_rollout_parser(sub: Any) -> None:
    p = sub.add_parser("rollout", help="show or change what the app may spend (kept in storage; a re-deploy does "
                                       "not change it)")
    actions = p.add_subparsers(dest="rollout_action", required=True)
    for name, text in (("show", "the controls in force and the latest changes"),
                       ("audit", "who changed the controls, what and when")):
        a = actions.add_parser(name, help=text)
        a.add_argument("--json", action="store_true")
        a.add_argument("--limit", type=int, default=50)
    s = actions.add_parser("set", help="change the controls (every change is recorded with who and when)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--live", dest="mode", action="store_const", const="live", help="buy, move and suspend")
    mode.add_argument("--dry-run", dest="mode", action="store_const", const="dry-run", help="change nothing")
    s.add_argument("--allow", action="extend", nargs="+", metavar="CUSTOMER_ID", help="add to the allow-list")
    s.add_argument("--disallow", action="extend", nargs="+", metavar="CUSTOMER_ID",
                   help="remove from the allow-list")
    s.add_argument("--clear-allowlist", action="store_true", help="empty the allow-list first")
    s.add_argument("--all-customers", action="store_true",
                   help="every customer (required to go live without an allow-list)")
    s.add_argument("--max-purchases", type=int, metavar="N", help="purchase brake: at most N purchases per run")
    pause = actions.add_parser("pause", help="stop new purchases now (in-flight records finish their step)")
    resume = actions.add_parser("resume", help="allow purchases again and re-queue the records that waited")
    for a in (s, pause, resume):
        a.add_argument("--by", help="who is making the change (default: user@host)")
        a.add_argument("--reason", help="why (kept in the audit trail)")


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
            return asyncio.run(_plan(settings, args.fmt or "table", args.all, out, prices=args.prices,
                                     currency=args.currency))
        if args.command == "run":
            return asyncio.run(_run(settings, args.timeout, out))
        if args.command == "status":
            from ._preflight import check_storage

            asyncio.run(check_storage(settings))
            records = asyncio.run(read_records(settings))
            if args.customer:
                wanted = {c.strip().lower() for c in args.customer}
                records = [r for r in records if r.customer_id.lower() in wanted]
            if args.by_customer:
                _print_by_customer(records, out, csv_format=args.csv, json_format=args.json)
            elif args.json:
                json.dump([{**r.to_entity(), "History": r.history} for r in records], out, indent=2, default=str)
                out.write("\n")
            elif args.csv:
                _write_records_csv(records, out)
            else:
                print_records(records, out, "Ledger")
            return 0
        if args.command == "offers":
            return asyncio.run(_offers(settings, args, out))
        if args.command == "cancel":
            return asyncio.run(_cancel(settings, args.record, out, by=args.by))
        if args.command == "rollout":
            return asyncio.run(_rollout(settings, args, out))
        if args.command == "retry":
            from ._preflight import check_storage

            asyncio.run(check_storage(settings))
            if args.record and not (args.state or args.reason_code or args.customer):
                return asyncio.run(retry(settings, args.record, out, buy_anyway=args.buy_anyway,
                                         users_file=args.users_file))
            if args.record:
                raise ConfigurationError("retry", "give one record or filters, not both",
                                         "e.g. retry --state blocked --reason-code purchase_brake")
            if not (args.state or args.reason_code or args.customer):
                raise ConfigurationError("retry", "which records?",
                                         "give one record, or filters (--state, --reason-code, --customer)")
            return asyncio.run(retry_many(settings, out, states=args.state or ("blocked", "failed"),
                                          codes=args.reason_code or (), customers=args.customer or (),
                                          yes=args.yes, buy_anyway=args.buy_anyway))
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2
