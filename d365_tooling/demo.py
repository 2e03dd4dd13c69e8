"""``make demo``: Azurite + the Partner Center sandbox + the four functions on the local host, then a report.

Developer tooling, not part of the deployed app: the CLI's ``run``, ``sandbox`` and ``demo`` commands load this
module by name (``cli.TOOLING_MODULE``). It uses only the app's public seams (``_app.read_records``,
``steps.redrive``), never the CLI's internals.

The report has one row per migration (customer, old offer, replacement, quantity, users moved, state), then what was
left untouched and why, then an independent check of the sandbox's final state: every expected migration bought
once with the right offer and quantity, every user on the new SKU, the old subscription suspended last, and
nothing else touched. The seeded world includes a user with no usage location, so one customer's migrations block
on the first pass exactly as they would in production; the demo then fixes that user (as a partner would) and
re-drives the records with ``retry``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from d365_migration._app import open_storage, read_records
from d365_migration._exceptions import ConfigurationError
from d365_migration._ledger import MigrationRecord
from d365_migration._rollout import RolloutControls, RolloutStore, go_live, load_effective_controls
from d365_migration._settings import Settings
from d365_migration.steps import redrive
from d365_migration.steps._quantity import POLICY_TEXT

APP_ROOT = Path(__file__).resolve().parent.parent


async def run_pipeline(settings: Settings, env: dict[str, str], *, timeout: float,
                       host_overrides: dict[str, Any] | None = None,
                       progress: Callable[[dict[str, int]], None] | None = None) -> dict[str, Any]:
    """Fire the timer once, then serve the queues on the local host until no message is left on any of them (the
    run's own scan included, in a dry run too), or the timeout. ``progress`` gets the records per state whenever
    they change (read every couple of seconds)."""
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
        last: dict[str, Any] = {"at": 0.0, "counts": None}

        async def report_progress() -> bool:
            # Never stops the run: it ends when every queue is empty (the scan's pages, then every record's steps).
            if progress is not None and time.monotonic() - last["at"] >= 2.0:
                last["at"] = time.monotonic()
                counts = dict(sorted(Counter(r.state for r in await read_records(settings)).items()))
                if counts != last["counts"]:
                    last["counts"] = counts
                    progress(counts)
            return False

        report = await host.run(until=report_progress, timeout=timeout, idle_seconds=3.0)
    return {"host": report}


def serve_sandbox(port: int, customers: int, seed: int, out: TextIO, config: str | None = None) -> int:
    """``python -m d365_migration sandbox``: serve a seeded Partner Center sandbox until Ctrl-C."""
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


async def _redrive(settings: Settings, target: str, out: TextIO) -> None:
    async with open_storage(settings) as (ledger, queues):
        result = await redrive.run(ledger, queues, target)
    out.write(result.describe() + "\n")


def verify_world(state: Any, manifest: Any, records: Sequence[MigrationRecord],
                 initial_status: dict[str, str], replacement_offers: dict[str, dict[str, str]] | None = None
                 ) -> list[str]:
    """Everything that is wrong with the sandbox's final state; an empty list means the run was exactly right.
    ``replacement_offers`` is the REPLACEMENT_OFFERS mapping used (default: the sandbox's new-commerce ids)."""
    from .sandbox import DEMO_REPLACEMENT_OFFERS, sku_for_offer
    from .sandbox._transitions import native_operations

    offers = replacement_offers or DEMO_REPLACEMENT_OFFERS

    problems: list[str] = []
    by_key = {r.key: r for r in records}
    purchases = state.purchases()
    patches = state.patches()
    updates = state.license_updates()
    native_ops = native_operations(state)
    expected_subs = {em.subscription_id.lower() for em in manifest.expected}
    expected_customers = {em.customer_id.lower() for em in manifest.expected}
    for em in manifest.expected:
        cid, sid = em.customer_id.lower(), em.subscription_id.lower()
        where = f"{cid}/{sid} ({em.offer_name_as_listed})"
        record = by_key.get((cid, sid))
        if record is None:
            problems.append(f"{where}: no ledger record")
            continue
        if record.state != "completed":
            problems.append(f"{where}: record is {record.state} ({record.reason})")
        replacement = offers[em.family][em.audience]
        mine = [p for p in purchases if p["customer_id"].lower() == cid and record.tag in (p["friendly_name"] or "")]
        moves = [op for op in native_ops if op["from_subscription_id"].lower() == sid]
        native = record.migration_path in ("native_transition", "native_upgrade")
        if native and (len(moves) != 1 or mine):
            problems.append(f"{where}: native path took {len(moves)} moves and {len(mine)} purchases "
                            "(expected exactly 1 move, no purchase)")
        if not native and (len(mine) != 1 or moves):
            problems.append(f"{where}: {len(mine)} purchases and {len(moves)} native moves for this record "
                            "(expected exactly 1 purchase)")
        for p in mine:
            # the availability part of a catalog item id rotates; the product SKU (or legacy offer) must match
            if str(p["offer_id"]).lower().split(":")[:2] != replacement.lower().split(":")[:2]:
                problems.append(f"{where}: bought {p['offer_id']}, expected {replacement}")
            if int(p["quantity"]) != em.quantity:
                problems.append(f"{where}: bought quantity {p['quantity']}, expected {em.quantity}")
        granted = sku_for_offer(replacement)
        if granted is None:
            problems.append(f"{where}: the sandbox does not know replacement {replacement}")
            continue
        new_sku = granted.id.lower()
        old_sku = em.old_sku_id.lower()
        for user in state.users(cid):
            skus = set(state.user_licenses(cid, user["id"]))
            if old_sku in skus:
                problems.append(f"{where}: user {user['userPrincipalName']} still holds the old SKU")
            if user["id"] in em.user_ids and new_sku not in skus:
                problems.append(f"{where}: user {user['userPrincipalName']} lost the product (no new SKU)")
        old = state.subscription(cid, sid)
        if old["status"] != "suspended":
            problems.append(f"{where}: old subscription is {old['status']}, expected suspended")
        suspends = [p for p in patches if p["subscription_id"].lower() == sid and p["after_status"] == "suspended"
                    and p["before_status"] != "suspended"]
        if len(suspends) > 1:
            problems.append(f"{where}: suspended {len(suspends)} times")
        if suspends:
            t = suspends[0]["time"]
            provisioned = [p["provisioned_at"] for p in mine if p.get("provisioned_at")] + [
                op["complete_at"] for op in moves if op["completed"]]
            if not provisioned or min(provisioned) > t:
                problems.append(f"{where}: old subscription suspended before the replacement was active")
            late = [u for u in updates if u["customer_id"].lower() == cid and old_sku in u["removed"]
                    and u["time"] > t]
            if late:
                problems.append(f"{where}: {len(late)} license move(s) happened after the suspension")
    for p in patches:
        if p["subscription_id"].lower() not in expected_subs:
            problems.append(f"subscription {p['subscription_id']} was changed but is not a migration")
    tags = {r.tag for r in records}
    for p in purchases:
        if p.get("via") != "by_hand" and not any(tag in (p["friendly_name"] or "") for tag in tags):
            problems.append(f"purchase {p['order_id']} for customer {p['customer_id']} belongs to no migration")
    for u in updates:
        if u["customer_id"].lower() not in expected_customers:
            problems.append(f"licenses of a user of customer {u['customer_id']} were changed; it has no migration")
    for d in manifest.distractors:
        now = state.subscription(d.customer_id, d.subscription_id)["status"]
        if now != initial_status.get(d.subscription_id.lower(), now):
            problems.append(f"left-alone subscription {d.subscription_id} ({d.reason}) changed to {now}")
    return problems


async def _go_live(settings: Settings) -> RolloutControls:
    async with open_storage(settings) as (ledger, _queues):
        return await go_live(RolloutStore(ledger.table_client), settings, by="demo", all_customers=True,
                             reason="make demo: every seeded customer")


async def _controls(settings: Settings) -> RolloutControls:
    async with open_storage(settings) as (ledger, _queues):
        return await load_effective_controls(RolloutStore(ledger.table_client), settings, seed=False)


def demo_native_paths(manifest: Any) -> dict[str, str]:
    """Which seeded customers Partner Center offers a native path (sandbox ``native_paths``): every third customer
    with a migration gets a transition with license transfer, the next one a transition without it; customers with a
    pooled SKU or a user the demo fixes by hand keep the runbook (those are the runbook's stories)."""
    keep = ({p.customer_id.lower() for p in manifest.pooled}
            | {cid.lower() for cid, _ in manifest.users_without_usage_location})
    with_work = sorted({em.customer_id.lower() for em in manifest.expected} - keep)
    paths = {cid: "transition_with_license_transfer" for cid in with_work[::3]}
    paths.update({cid: "transition_only" for cid in with_work[1::6]})
    return paths


def path_of(record: MigrationRecord) -> tuple[str, str]:
    """The path a record took and why, as its history recorded the choice."""
    label = {"native_transition": "native transition", "native_upgrade": "native upgrade",
             "runbook": "three-step runbook"}.get(record.migration_path or "", "three-step runbook")
    why = next((str(h.get("detail") or "") for h in reversed(record.history)
                if h.get("event") in ("path_native", "path_runbook", "native_rejected_fallback")),
               "MIGRATION_PATH_POLICY=runbook_only" if record.migration_path is None else "")
    return label, why.removeprefix(f"{label}: ")


def _print_report(out: TextIO, records: Sequence[MigrationRecord], left_alone: list[tuple[str, str, str]],
                  problems: list[str], elapsed: float, *, controls: RolloutControls | None = None,
                  policy: str | None = None, path_policy: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=170)
    if controls is not None:
        console.print(f"Rollout controls (`python -m d365_migration rollout show`): {controls.summary()}; "
                      f"last changed by {controls.changed_by} at {controls.changed_at}", markup=False, soft_wrap=True)
    if policy is not None:
        console.print(f"Quantity policy: REPLACEMENT_QUANTITY_POLICY={policy}: {POLICY_TEXT[policy]}", markup=False,
                      soft_wrap=True)
    if path_policy is not None:
        console.print(f"Migration path: MIGRATION_PATH_POLICY={path_policy}: Partner Center's transition or upgrade "
                      "with license transfer where it offers one, else the three-step runbook", markup=False,
                      soft_wrap=True)
    table = Table(title=f"Migrations ({len(records)})")
    for col in ("customer", "old offer", "replacement", "qty", "users moved", "path", "why this path", "state"):
        table.add_column(col, overflow="fold")
    for r in records:
        label, why = path_of(r)
        table.add_row(r.customer_name or r.customer_id, r.offer_name or "", r.replacement_offer_id or "—",
                      str(r.quantity), str(r.users_moved), label, why[:90], r.state)
    console.print(table)
    lt = Table(title=f"Left untouched ({len(left_alone)})")
    for col in ("customer", "offer", "why"):
        lt.add_column(col, overflow="fold")
    for row in left_alone:
        lt.add_row(*row)
    console.print(lt)
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r.state] += 1
    paths = Counter(path_of(r)[0] for r in records)
    console.print(f"states: {dict(counts)}; paths: {dict(sorted(paths.items()))}; wall time {elapsed:.1f}s")
    if problems:
        console.print(f"[bold red]verification FAILED ({len(problems)} problems)[/bold red]")
        for p in problems:
            console.print(f"  - {p}")
    else:
        console.print("[bold green]verification passed[/bold green]: every expiring qualified subscription has "
                      "its replacement (bought once with the right offer and quantity, or moved once by Partner "
                      "Center's transition), every user is on the new SKU, the old subscription was suspended last, "
                      "and nothing else was touched.")


def run_demo(*, customers: int = 24, seed: int = 7, timeout: float = 300.0, out: TextIO | None = None) -> int:
    from .localhost import AzuriteProcess
    from .sandbox import DEMO_REPLACEMENT_OFFERS, SandboxConfig, SandboxServer, SandboxState, seed_world

    out = out or sys.stdout
    state = SandboxState()
    manifest = seed_world(state, customers=customers, seed=seed, today=datetime.now(UTC).date())
    initial = {s["id"].lower(): s["status"] for cid in manifest.customers for s in state.subscriptions(cid)}
    started = time.monotonic()
    out.write(f"Seeded {customers} customers: {len(manifest.expected)} expiring qualified subscriptions, "
              f"{len(manifest.distractors)} that must be left alone.\n")
    # The documented behaviours the steps already handle (sandbox DEMO_BEHAVIOURS) are on. Partner Center offers a
    # transition with license transfer to some customers, a transition without it (licenses would not move) to one,
    # and nothing to the rest: under MIGRATION_PATH_POLICY=prefer_native each migration takes the path it has.
    native = demo_native_paths(manifest)
    config = SandboxConfig.realistic(provisioning_delay_s=2.0, native_paths=native, native_completion_s=1.0)
    with AzuriteProcess() as azurite, SandboxServer(state, config) as sandbox:
        env = {
            "PARTNER_CENTER_ENDPOINT": sandbox.url, "PARTNER_CENTER_AUTH": "none", "DRY_RUN": "false",
            "REPLACEMENT_OFFERS": json.dumps(DEMO_REPLACEMENT_OFFERS), "AzureWebJobsStorage": azurite.connection_string,
            "PROVISIONING_POLL_SECONDS": "2", "DETECT_SCHEDULE": "0 0 6 * * *", "EXPIRY_WINDOW_DAYS": "60",
            "MAX_PURCHASES_PER_RUN": "1000", "MIGRATION_PATH_POLICY": "prefer_native",
            # the sandbox has no rate limit unless told; pace at a generous local budget
            "PARTNER_CENTER_REQUESTS_PER_MINUTE": "6000", "PARTNER_CENTER_LICENSE_REQUESTS_PER_MINUTE": "6000",
        }
        previous = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            settings = Settings.from_env()
            # Going live the documented way: DRY_RUN=false alone never makes the app spend for every customer.
            controls = asyncio.run(_go_live(settings))
            out.write("Went live the way a partner does: `python -m d365_migration rollout set --live "
                      f"--all-customers` → {controls.summary()}\n")
            out.write(f"Sandbox at {sandbox.url}; Azurite on 127.0.0.1. Running detect → purchase → reassign → "
                      "suspend through the local host…\n")
            asyncio.run(run_pipeline(settings, env, timeout=timeout))
            records = asyncio.run(read_records(settings))
            blocked = [r for r in records if r.state == "blocked" and "usage location" in (r.reason or "")]
            if blocked:
                out.write(f"\n{len(blocked)} migration(s) blocked: a user has no usage location, so their license "
                          "could not be moved and the old subscription was kept active. Fixing the user (as the "
                          "partner would) and re-driving with `python -m d365_migration retry`…\n")
                for cid, uid in manifest.users_without_usage_location:
                    state.set_usage_location(cid, uid, "US")
                for r in blocked:
                    asyncio.run(_redrive(settings, f"{r.customer_id}/{r.subscription_id}", out))
                asyncio.run(run_pipeline(settings, env, timeout=timeout))
                records = asyncio.run(read_records(settings))
            problems = verify_world(state, manifest, records, initial)
            left = [(d.customer_id, d.offer_name, d.reason) for d in manifest.distractors]
            out.write("\n")
            _print_report(out, records, left, problems, time.monotonic() - started,
                          controls=asyncio.run(_controls(settings)), policy=settings.replacement_quantity_policy,
                          path_policy=settings.migration_path_policy)
        finally:
            for k, v in previous.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return 1 if problems else 0
