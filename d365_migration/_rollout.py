"""Rollout controls: what the app may spend, stored next to the ledger so that a re-deploy cannot widen it.

Four controls decide whether and for whom the app buys replacements:

* **live** (or dry run): only a live app buys, moves licenses and suspends;
* **customers**: an allow-list of customer tenant ids, or the explicit choice *all customers*. Going live with an
  empty allow-list is refused unless *all customers* was chosen on purpose;
* **purchase brake**: at most this many purchases are queued per detection run;
* **pause**: stops new purchases at once (records already past the order finish their step; the rest wait).

They live in the ledger's table (partition ``rollout``: one ``controls`` row and append-only ``audit-…`` rows) and
change only through ``python -m d365_migration rollout …``, which writes the new controls and an audit entry (who,
what, when, why) in one transaction. App settings (``DRY_RUN``, ``CUSTOMER_ALLOWLIST``, ``MAX_PURCHASES_PER_RUN``)
are read only while nothing is stored yet: the first read stores them (first-deploy defaults) and from then on they
are ignored, so an ``azd up`` that rewrites the app settings changes nothing. ``CUSTOMER_DENYLIST`` stays an app
setting: it can only narrow what the controls allow.

The steps call :func:`load_effective_controls` before they spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, TableTransactionError, UpdateMode

from ._exceptions import ConcurrencyConflict, LedgerError, RolloutRefused
from ._ledger import utcnow
from ._settings import Settings, is_guid

__all__ = [
    "AUDIT_PREFIX",
    "CONTROLS_ROW",
    "PARTITION",
    "AuditEntry",
    "RolloutControls",
    "RolloutStore",
    "controls_from_settings",
    "default_actor",
    "go_live",
    "load_effective_controls",
    "parse_customer_ids",
]

logger = logging.getLogger("d365_migration.rollout")

PARTITION = "rollout"
CONTROLS_ROW = "controls"
AUDIT_PREFIX = "audit-"
_MAX_TS = 10**13  # milliseconds; inverted so the newest audit entry sorts first


@dataclass(frozen=True)
class RolloutControls:
    """The effective rollout controls. ``source`` says where they came from: ``stored`` (changed with the CLI, or
    stored from the app settings on first use) or ``app-settings`` (nothing stored yet; shown, not yet kept)."""

    live: bool = False
    all_customers: bool = False
    allowlist: frozenset[str] = frozenset()
    max_purchases_per_run: int = 50
    paused: bool = False
    pause_reason: str | None = None
    source: Literal["stored", "app-settings"] = "app-settings"
    changed_by: str | None = None
    changed_at: str | None = None
    version: int = 0
    note: str | None = None  # e.g. why an app-settings default was not taken as it was
    denylist: frozenset[str] = field(default=frozenset(), compare=False)  # CUSTOMER_DENYLIST (app setting, narrows)
    etag: str | None = field(default=None, compare=False, repr=False)

    @property
    def dry_run(self) -> bool:
        return not self.live

    @property
    def may_purchase(self) -> bool:
        """Whether a new purchase may start now: live and not paused."""
        return self.live and not self.paused

    def customer_in_scope(self, customer_id: str) -> bool:
        cid = customer_id.strip().lower()
        if cid in self.denylist:
            return False
        return self.all_customers or cid in self.allowlist

    def validate(self) -> None:
        """:raises RolloutRefused: the combination is not allowed (live for nobody-chosen, or contradictory)."""
        if self.all_customers and self.allowlist:
            raise RolloutRefused("choose either an allow-list or all customers, not both "
                                 "(--all-customers clears nothing by itself: use --clear-allowlist first)")
        if self.live and not self.all_customers and not self.allowlist:
            raise RolloutRefused("going live with an empty allow-list would buy for every customer: add customers "
                                 "with --allow <customer-id>, or choose every customer explicitly with "
                                 "--all-customers")
        if self.max_purchases_per_run < 0:
            raise RolloutRefused("the purchase brake must be 0 or more")

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "live" if self.live else "dry-run",
            "live": self.live,
            "paused": self.paused,
            "pauseReason": self.pause_reason,
            "customers": "all" if self.all_customers else "allow-list",
            "allowlist": sorted(self.allowlist),
            "denylist": sorted(self.denylist),
            "maxPurchasesPerRun": self.max_purchases_per_run,
            "mayPurchase": self.may_purchase,
            "source": self.source,
            "changedBy": self.changed_by,
            "changedAt": self.changed_at,
            "version": self.version,
            "note": self.note,
        }

    def summary(self) -> str:
        customers = ("all customers" if self.all_customers else
                     f"{len(self.allowlist)} allow-listed customer(s)" if self.allowlist else "no customers")
        state = "PAUSED" if self.paused else "live" if self.live else "dry run"
        return f"{state}; {customers}; at most {self.max_purchases_per_run} purchase(s) per run"

    # ------------------------------------------------------------------ entity mapping

    def _entity(self) -> dict[str, Any]:
        return {
            "PartitionKey": PARTITION, "RowKey": CONTROLS_ROW, "Kind": "rollout",
            "Live": self.live, "AllCustomers": self.all_customers,
            "Allowlist": ",".join(sorted(self.allowlist)), "MaxPurchasesPerRun": self.max_purchases_per_run,
            "Paused": self.paused, "PauseReason": self.pause_reason or "",
            "ChangedBy": self.changed_by or "", "ChangedAt": self.changed_at or "", "Version": self.version,
            "Note": self.note or "",
        }

    @classmethod
    def _from_entity(cls, entity: Any, denylist: frozenset[str]) -> RolloutControls:
        allow = frozenset(p for p in str(entity.get("Allowlist") or "").lower().split(",") if p)
        metadata = getattr(entity, "metadata", None) or {}
        return cls(
            live=bool(entity.get("Live")), all_customers=bool(entity.get("AllCustomers")), allowlist=allow,
            max_purchases_per_run=int(entity.get("MaxPurchasesPerRun") or 0), paused=bool(entity.get("Paused")),
            pause_reason=entity.get("PauseReason") or None, source="stored",
            changed_by=entity.get("ChangedBy") or None, changed_at=entity.get("ChangedAt") or None,
            version=int(entity.get("Version") or 0), note=entity.get("Note") or None, denylist=denylist,
            etag=metadata.get("etag"))


@dataclass(frozen=True)
class AuditEntry:
    at: str
    by: str
    action: str
    reason: str | None
    before: dict[str, Any] | None
    after: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "by": self.by, "action": self.action, "reason": self.reason, "before": self.before,
                "after": self.after}

    def changes(self) -> dict[str, tuple[Any, Any]]:
        """``{field: (before, after)}`` for the fields this entry changed."""
        before = self.before or {}
        keys = ("mode", "paused", "pauseReason", "customers", "allowlist", "maxPurchasesPerRun")
        return {k: (before.get(k), self.after.get(k)) for k in keys if before.get(k) != self.after.get(k)}


def controls_from_settings(settings: Settings) -> RolloutControls:
    """First-deploy defaults from the app settings. ``DRY_RUN=false`` with an empty ``CUSTOMER_ALLOWLIST`` is taken
    as a dry run: an empty allow-list never means *all customers* unless chosen with ``rollout set
    --all-customers``."""
    live = not settings.dry_run
    note = None
    if live and not settings.customer_allowlist:
        live = False
        note = ("DRY_RUN=false was not taken: CUSTOMER_ALLOWLIST is empty. Choose customers with "
                "`rollout set --live --allow <id>` or every customer with `rollout set --live --all-customers`")
    return RolloutControls(live=live, allowlist=settings.customer_allowlist,
                           max_purchases_per_run=settings.max_purchases_per_run, source="app-settings", note=note,
                           denylist=settings.customer_denylist)


def default_actor() -> str:
    """Who is changing the controls, when ``--by`` is not given: the OS user at this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class RolloutStore:
    """The controls and their audit trail in the ledger's table (an async facade over a ``TableClient``)."""

    def __init__(self, table: TableClient) -> None:
        self._table = table

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (ResourceModifiedError, ResourceExistsError, ResourceNotFoundError, TableTransactionError):
            raise
        except HttpResponseError as exc:
            if exc.status_code == 412:
                raise ResourceModifiedError(message=str(exc)) from exc
            raise LedgerError(f"rollout controls call failed: HTTP {exc.status_code} {exc.reason}") from None
        except AzureError as exc:
            raise LedgerError(f"rollout controls unreachable: {type(exc).__name__}") from None

    async def _ensure_table(self) -> None:
        with contextlib.suppress(ResourceExistsError):
            await self._run(self._table.create_table)

    async def get(self, *, denylist: frozenset[str] = frozenset()) -> RolloutControls | None:
        """The stored controls, or ``None`` when nothing is stored yet.

        :raises LedgerError: storage could not be read.
        """
        try:
            entity = await self._run(self._table.get_entity, PARTITION, CONTROLS_ROW)
        except ResourceNotFoundError:
            return None
        return RolloutControls._from_entity(entity, denylist)

    async def audit(self, *, limit: int = 50) -> list[AuditEntry]:
        """The newest ``limit`` audit entries, newest first."""
        query = f"PartitionKey eq '{PARTITION}' and RowKey ge '{AUDIT_PREFIX}' and RowKey lt '{AUDIT_PREFIX}~'"

        def read() -> list[Any]:
            out = []
            for entity in self._table.query_entities(query):
                out.append(entity)
                if len(out) >= limit:
                    break
            return out

        try:
            entities = await self._run(read)
        except ResourceNotFoundError:
            return []
        entries = []
        for e in entities:
            before = json.loads(e["Before"]) if e.get("Before") else None
            entries.append(AuditEntry(at=e.get("At", ""), by=e.get("By", ""), action=e.get("Action", ""),
                                      reason=e.get("Reason") or None, before=before,
                                      after=json.loads(e.get("After") or "{}")))
        return entries

    async def change(self, update: Callable[[RolloutControls], RolloutControls], *, by: str, action: str,
                     reason: str | None, defaults: RolloutControls) -> RolloutControls:
        """Apply ``update`` to the stored controls (``defaults`` when nothing is stored yet) and append an audit
        entry, in one transaction; retried when another writer got there first.

        :raises RolloutRefused: the result is not allowed (see :meth:`RolloutControls.validate`).
        :raises LedgerError: storage could not be written.
        """
        await self._ensure_table()
        for _ in range(10):
            current = await self.get(denylist=defaults.denylist)
            base = current or replace(defaults, version=0)
            now = utcnow().isoformat()
            after = replace(update(base), source="stored", changed_by=by, changed_at=now, version=base.version + 1)
            after.validate()
            audit = self._audit_entity(now, by, action, reason, current.to_json() if current else None, after)
            if current is None:
                operations: list[Any] = [("create", after._entity()), ("create", audit)]
            else:
                operations = [("update", after._entity(), {"mode": UpdateMode.REPLACE, "etag": current.etag,
                                                            "match_condition": MatchConditions.IfNotModified}),
                              ("create", audit)]
            try:
                await self._run(self._table.submit_transaction, operations)
            except (TableTransactionError, ResourceModifiedError, ResourceExistsError) as exc:
                if _is_conflict(exc):
                    continue
                raise LedgerError(f"rollout controls could not be saved: {exc}") from None
            stored = await self.get(denylist=defaults.denylist)
            assert stored is not None
            logger.warning("event=rollout_changed by=%s action=%s now=%s reason=%s", by, action, stored.summary(),
                           reason or "")
            return stored
        raise ConcurrencyConflict("the rollout controls kept changing underneath; try again")

    async def seed(self, defaults: RolloutControls, *, by: str) -> RolloutControls:
        """Store ``defaults`` if nothing is stored yet (the first-deploy defaults); returns what is stored."""
        existing = await self.get(denylist=defaults.denylist)
        if existing is not None:
            return existing
        try:
            return await self.change(lambda c: c, by=by, action="seeded from app settings",
                                     reason=defaults.note, defaults=defaults)
        except RolloutRefused:  # cannot happen for controls_from_settings(); stay safe: store a dry run
            return await self.change(lambda c: replace(c, live=False), by=by, action="seeded from app settings",
                                     reason="app settings were not a valid rollout; stored as dry run",
                                     defaults=defaults)

    @staticmethod
    def _audit_entity(now: str, by: str, action: str, reason: str | None, before: dict[str, Any] | None,
                      after: RolloutControls) -> dict[str, Any]:
        millis = int(utcnow().timestamp() * 1000)
        return {
            "PartitionKey": PARTITION, "RowKey": f"{AUDIT_PREFIX}{_MAX_TS - millis:013d}-{uuid.uuid4().hex[:8]}",
            "Kind": "rollout-audit", "At": now, "By": by[:200], "Action": action[:200], "Reason": (reason or "")[:1000],
            "Before": json.dumps(before) if before is not None else "", "After": json.dumps(after.to_json()),
        }


def _is_conflict(exc: Exception) -> bool:
    if isinstance(exc, (ResourceModifiedError, ResourceExistsError)):
        return True
    status = getattr(exc, "status_code", None)
    code = str(getattr(exc, "error_code", "") or "")
    return status in (409, 412) or code in ("EntityAlreadyExists", "UpdateConditionNotSatisfied")


async def load_effective_controls(store: RolloutStore, settings: Settings, *, seed: bool = True,
                                  actor: str | None = None) -> RolloutControls:
    """The rollout controls in force now. The purchase step calls this before it spends.

    Stored controls win over the app settings. When nothing is stored yet, the app settings are the first-deploy
    defaults: with ``seed`` (the default) they are stored at once (with an audit entry), so a later change of the
    app settings (for example by a re-deploy) has no effect; without ``seed`` (the status page, ``rollout show``)
    they are returned as ``source="app-settings"`` and nothing is written. ``CUSTOMER_DENYLIST`` always applies.

    :raises LedgerError: storage could not be read or written. Callers must not spend when this is raised.
    """
    defaults = controls_from_settings(settings)
    stored = await store.get(denylist=defaults.denylist)
    if stored is not None:
        return stored
    if not seed:
        return defaults
    return await store.seed(defaults, by=actor or f"app:{socket.gethostname()}")


def parse_customer_ids(values: Iterable[str]) -> frozenset[str]:
    """Customer tenant ids from the command line (commas or spaces allowed).

    :raises RolloutRefused: one is not a GUID.
    """
    ids: set[str] = set()
    for value in values:
        for part in value.replace(";", ",").replace(" ", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if not is_guid(part):
                raise RolloutRefused(f"{part!r} is not a customer tenant id (GUID)")
            ids.add(part.lower())
    return frozenset(ids)


async def go_live(store: RolloutStore, settings: Settings, *, by: str, reason: str | None = None,
                  allow: Iterable[str] = (), all_customers: bool = False) -> RolloutControls:
    """``rollout set --live`` for the customers in ``allow`` or, with ``all_customers``, for every customer: the
    go-live step the demo, the benchmark and the tests take the way a partner does (audited like any change).

    :raises RolloutRefused: neither customers nor ``all_customers`` were given.
    :raises LedgerError: storage could not be written.
    """
    allowlist = parse_customer_ids(allow)

    def update(c: RolloutControls) -> RolloutControls:
        if all_customers:
            return replace(c, live=True, all_customers=True, allowlist=frozenset())
        return replace(c, live=True, all_customers=False, allowlist=c.allowlist | allowlist)

    return await store.change(update, by=by, action="set", reason=reason, defaults=controls_from_settings(settings))
