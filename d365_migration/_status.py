"""The ledger as JSON and as a small HTML page: counts per state, and every record that needs a human."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from ._ledger import STATES, MigrationLedger, MigrationRecord, ScanFailure
from ._messages import RESCAN_COMMAND

if TYPE_CHECKING:
    from ._settings import Settings
__all__ = [
    "load_status",
    "not_scanned_rows",
    "render_html",
    "retry_command",
    "status_document",
]


def retry_command(record: MigrationRecord) -> str:
    return f"python -m d365_migration retry {record.customer_id}/{record.subscription_id}"


def not_scanned_rows(failures: Sequence[ScanFailure]) -> list[dict[str, Any]]:
    """One row per customer a detection run could not scan (``customerId`` None for a page whose customers are not
    all known; ``count`` says how many of them)."""
    rows: list[dict[str, Any]] = []
    for f in failures:
        rows += [{"runId": f.run_id, "page": f.page, "customerId": customer_id, "count": 1, "reason": reason}
                 for customer_id, reason in f.customers]
        if f.unlisted:
            rows.append({"runId": f.run_id, "page": f.page, "customerId": None, "count": f.unlisted,
                         "reason": f.reason or "see the log (event=needs_attention)"})
    return rows


def status_document(records: Sequence[MigrationRecord], *, dry_run: bool,
                    rollout: dict[str, Any] | None = None, latest_run: str | None = None,
                    not_scanned: Sequence[ScanFailure] = ()) -> dict[str, Any]:
    """``rollout`` is :meth:`RolloutControls.to_json` of the controls in force; when given, its mode is the page's
    dry-run flag (the stored controls, not the app setting, decide whether the app spends). ``not_scanned``: what
    the latest detection run (``latest_run``) could not scan — customers whose subscriptions nobody checked."""
    counts = Counter(r.state for r in records)
    if rollout is not None:
        dry_run = not rollout["live"]
    return {
        "dryRun": dry_run,
        "rollout": rollout,
        "detection": {"latestRunId": latest_run, "notScanned": not_scanned_rows(not_scanned),
                      "redrive": RESCAN_COMMAND},
        "total": len(records),
        "counts": {state: counts.get(state, 0) for state in STATES},
        "attention": [
            {"customerId": r.customer_id, "customerName": r.customer_name, "subscriptionId": r.subscription_id,
             "offerName": r.offer_name, "state": r.state, "reason": r.reason, "updatedAt": r.updated_at,
             "correlationId": r.correlation_id, "retry": retry_command(r)}
            for r in records if r.state in ("blocked", "failed")
        ],
        "records": [
            {"customerId": r.customer_id, "customerName": r.customer_name, "subscriptionId": r.subscription_id,
             "offerName": r.offer_name, "family": r.family, "audience": r.audience, "quantity": r.quantity,
             "replacementOfferId": r.replacement_offer_id, "newSubscriptionId": r.new_subscription_id,
             "usersMoved": r.users_moved, "state": r.state, "reason": r.reason, "updatedAt": r.updated_at,
             "correlationId": r.correlation_id}
            for r in records
        ],
    }


async def load_status(ledger: MigrationLedger, *, dry_run: bool, settings: Settings | None = None) -> dict[str, Any]:
    """The status document; with ``settings``, it includes the rollout controls in force (read-only: nothing is
    stored from the status page)."""
    rollout = None
    if settings is not None:
        from ._rollout import RolloutStore, load_effective_controls

        controls = await load_effective_controls(RolloutStore(ledger.table_client), settings, seed=False)
        rollout = controls.to_json()
    latest_run, not_scanned = await ledger.latest_scan_failures()
    return status_document(await ledger.list_records(), dry_run=dry_run, rollout=rollout, latest_run=latest_run,
                           not_scanned=not_scanned)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1b1b1b;background:#fafafa}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin-top:2rem}
.banner{padding:.5rem .8rem;border-radius:6px;display:inline-block;margin:.5rem 0}
.dry{background:#fff4ce;border:1px solid #e0c060}.live{background:#dff6dd;border:1px solid #7fba7a}
.counts{display:flex;gap:.6rem;flex-wrap:wrap;margin:1rem 0}
.count{background:#fff;border:1px solid #ddd;border-radius:8px;padding:.6rem .9rem;min-width:6.5rem}
.count b{display:block;font-size:1.5rem}.count.bad b{color:#b3261e}.count.ok b{color:#107c10}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9rem}
th,td{border:1px solid #e1e1e1;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f0f0} code{background:#f3f3f3;padding:.1rem .3rem;border-radius:4px;font-size:.85rem}
.state-failed,.state-blocked{color:#b3261e;font-weight:600}.state-completed{color:#107c10;font-weight:600}
.paused{background:#fde7e9;border:1px solid #d13438}.rollout td:first-child{width:12rem;font-weight:600}
"""


def _rollout_html(rollout: dict[str, Any] | None) -> str:
    if rollout is None:
        return ""
    e = escape
    customers = ("all customers (chosen explicitly)" if rollout["customers"] == "all" else
                 ", ".join(f"<code>{e(c)}</code>" for c in rollout["allowlist"]) or "none (allow-list empty)")
    origin = (f"stored; changed by {e(rollout['changedBy'] or '')} at {e((rollout['changedAt'] or '')[:19])} UTC"
              if rollout["source"] == "stored" else "app settings (first-deploy defaults, not stored yet)")
    paused = (f'<div class="banner paused">Paused: {e(rollout["pauseReason"] or "")}. No new purchases; resume '
              "with <code>python -m d365_migration rollout resume</code>.</div>" if rollout["paused"] else "")
    rows = [("mode", "live" if rollout["live"] else "dry run"), ("paused", "yes" if rollout["paused"] else "no"),
            ("customers", customers),
            ("denied (CUSTOMER_DENYLIST)", ", ".join(f"<code>{e(c)}</code>" for c in rollout["denylist"]) or "none"),
            ("purchase brake", f"at most {int(rollout['maxPurchasesPerRun'])} purchase(s) per detection run"),
            ("source", origin)]
    if rollout.get("note"):
        rows.append(("note", e(rollout["note"])))
    body = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return (f"{paused}<h2>Rollout controls</h2><table class='rollout'>{body}</table>"
            "<p>Change them with <code>python -m d365_migration rollout set|pause|resume</code> "
            "(every change is audited: <code>rollout audit</code>).</p>")


def _who(row: dict[str, Any]) -> str:
    if row["customerId"]:
        return f"<code>{escape(str(row['customerId']))}</code>"
    return f"{int(row['count'])} customer(s) of page {int(row['page'])}"


def render_html(doc: dict[str, Any]) -> str:
    """A readable page; every value is HTML-escaped (offer and customer names come from Partner Center)."""
    e = escape
    banner = ('<div class="banner dry">DRY_RUN is on: nothing is bought or changed.</div>' if doc["dryRun"]
              else '<div class="banner live">Live: purchases, license moves and suspensions are enabled.</div>')
    cards = []
    for state, n in doc["counts"].items():
        cls = "bad" if state in ("failed", "blocked") and n else "ok" if state == "completed" and n else ""
        cards.append(f'<div class="count {cls}"><b>{n}</b>{e(state)}</div>')
    attention_rows = "".join(
        f"<tr><td>{e(a['customerName'] or a['customerId'])}<br><code>{e(a['customerId'])}</code></td>"
        f"<td>{e(a['offerName'] or '')}<br><code>{e(a['subscriptionId'])}</code></td>"
        f"<td class='state-{e(a['state'])}'>{e(a['state'])}</td><td>{e(a['reason'] or '')}</td>"
        f"<td><code>{e(a['retry'])}</code></td></tr>"
        for a in doc["attention"])
    attention = (f"<table><tr><th>customer</th><th>old subscription</th><th>state</th><th>reason</th>"
                 f"<th>after fixing the cause, re-drive with</th></tr>{attention_rows}</table>"
                 if doc["attention"] else "<p>Nothing needs attention.</p>")
    detection = doc["detection"]
    missed = detection["notScanned"]
    missed_rows = "".join(f"<tr><td>{_who(m)}</td><td>{e(m['reason'] or '')}</td></tr>" for m in missed)
    not_scanned = (
        f"<h2>Not scanned by the latest detection run ({sum(m['count'] for m in missed)})</h2>"
        "<p>Their subscriptions were not checked, so an expiring one would not be migrated: "
        f"{e(detection['redrive'])}.</p><table><tr><th>customer</th><th>reason</th></tr>{missed_rows}</table>"
        if missed else "")
    record_rows = "".join(
        f"<tr><td>{e(r['customerName'] or r['customerId'])}</td><td>{e(r['offerName'] or '')}</td>"
        f"<td>{e(r['audience'] or '')}</td><td>{r['quantity']}</td><td>{e(r['replacementOfferId'] or '—')}</td>"
        f"<td>{r['usersMoved']}</td><td class='state-{e(r['state'])}'>{e(r['state'])}</td>"
        f"<td>{e((r['updatedAt'] or '')[:19])}</td></tr>"
        for r in doc["records"])
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>d365-migration status</title>"
        f"<style>{_CSS}</style></head><body><h1>d365-migration: Qualified Offer migrations</h1>{banner}"
        f"{_rollout_html(doc.get('rollout'))}<div class='counts'>{''.join(cards)}</div>"
        f"<h2>Needs attention ({len(doc['attention'])})</h2>{attention}{not_scanned}"
        f"<h2>All migrations ({doc['total']})</h2><table><tr><th>customer</th><th>old offer</th><th>audience</th>"
        f"<th>qty</th><th>replacement</th><th>users moved</th><th>state</th><th>updated (UTC)</th></tr>"
        f"{record_rows}</table></body></html>")
