"""Queue message schema (version 1) for the purchase → reassign → suspend chain.

A message only names the record (customer id + old subscription id); the ledger holds the state. That keeps messages
tiny, makes a duplicate delivery harmless, and means a stale message can never carry stale decisions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from ._exceptions import InvalidMessageError
from ._settings import is_guid

__all__ = [
    "MAX_MESSAGE_BYTES",
    "QUEUE_FOR_STEP",
    "RESCAN_COMMAND",
    "SCAN_QUEUE",
    "SCAN_RETRY_CHUNK",
    "SCHEMA_VERSION",
    "STEPS",
    "ScanMessage",
    "Step",
    "StepMessage",
]

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 48 * 1024  # 64 KiB after Base64
Step = Literal["purchase", "reassign", "suspend"]
STEPS: tuple[Step, ...] = ("purchase", "reassign", "suspend")
QUEUE_FOR_STEP: dict[Step, str] = {
    "purchase": "purchase-new",
    "reassign": "reassign-licenses",
    "suspend": "suspend-old",
}


@dataclass(frozen=True)
class StepMessage:
    step: Step
    customer_id: str
    subscription_id: str
    correlation_id: str
    poll: int = 0  # how many times this step has re-queued itself to wait (provisioning, resumable work)

    @property
    def queue(self) -> str:
        return QUEUE_FOR_STEP[self.step]

    def to_json(self) -> str:
        return json.dumps({
            "schemaVersion": SCHEMA_VERSION,
            "step": self.step,
            "customerId": self.customer_id,
            "subscriptionId": self.subscription_id,
            "correlationId": self.correlation_id,
            "poll": self.poll,
        }, separators=(",", ":"))

    def next_poll(self) -> StepMessage:
        return StepMessage(self.step, self.customer_id, self.subscription_id, self.correlation_id, self.poll + 1)

    @classmethod
    def parse(cls, body: bytes | str, *, expected_step: Step) -> StepMessage:
        """Validate a message; anything wrong raises :class:`InvalidMessageError` naming the problem."""
        data = _envelope(body, expected_step)
        fields: dict[str, str] = {}
        for key in ("customerId", "subscriptionId", "correlationId"):
            value = data.get(key)
            if not isinstance(value, str) or not is_guid(value):
                raise InvalidMessageError(f"{key} must be a GUID, got {_show(value)}")
            fields[key] = value  # kept as sent; compared case-insensitively
        poll = data.get("poll", 0)
        if not isinstance(poll, int) or isinstance(poll, bool) or poll < 0 or poll > 100_000:
            raise InvalidMessageError(f"poll must be a non-negative integer, got {_show(poll)}")
        return cls(step=expected_step, customer_id=fields["customerId"], subscription_id=fields["subscriptionId"],
                   correlation_id=fields["correlationId"], poll=poll)


def _envelope(body: bytes | str, expected_step: str) -> dict[str, Any]:
    """The checks every message passes first: size, JSON object, schema version, and the right queue."""
    raw = body.encode() if isinstance(body, str) else body
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidMessageError(f"message is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        data: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessageError(f"message is not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InvalidMessageError("message is not a JSON object")
    version = data.get("schemaVersion")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidMessageError(f"unknown schemaVersion {version!r}; this worker reads {SCHEMA_VERSION}")
    step = data.get("step")
    if step != expected_step:
        raise InvalidMessageError(f"message for step {step!r} arrived on the {expected_step} queue")
    return data


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


SCAN_QUEUE = "scan-customers"

#: What an operator does about customers a detection run could not scan (alerts, `run`, the status page).
RESCAN_COMMAND = ("fix the cause, then run detection again: run the detect_expiring function now (Azure portal → the "
                  "function app → detect_expiring → Test/Run) or wait for DETECT_SCHEDULE; locally "
                  "`python -m d365_migration run`")


#: Most customers one re-scan message names (each ≤ ~200 bytes: well inside MAX_MESSAGE_BYTES).
SCAN_RETRY_CHUNK = 100
_MAX_NAME_CHARS = 100
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ScanMessage:
    """One page of the customer scan of one detection run; ``cursor`` is the request for that page.

    A *re-scan* (``retry`` ≥ 1) names the customers of page ``page`` whose subscriptions could not be read the last
    time, as ``(customer id, company name)`` pairs; it reads only those (no cursor, no next page)."""

    run_id: str
    page: int
    cursor: dict[str, Any] | None  # PageRequest.to_json(); None for the first page
    retry: int = 0
    customers: tuple[tuple[str, str | None], ...] = ()
    waits: int = 0  # how often this message was put off (its page could not be read, or was busy elsewhere)

    def to_json(self) -> str:
        data: dict[str, Any] = {"schemaVersion": SCHEMA_VERSION, "step": "scan", "runId": self.run_id,
                                "page": self.page, "cursor": self.cursor}
        if self.waits:
            data["waits"] = self.waits
        if self.retry:
            data["retry"] = self.retry
            data["customers"] = [{"id": cid, "name": (name or "")[:_MAX_NAME_CHARS] or None}
                                 for cid, name in self.customers]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def parse(cls, body: bytes | str) -> ScanMessage:
        data = _envelope(body, "scan")
        run_id, page, cursor = data.get("runId"), data.get("page"), data.get("cursor")
        if not isinstance(run_id, str) or not run_id.replace("-", "").isalnum() or len(run_id) > 64:
            raise InvalidMessageError(f"runId must be a short id, got {_show(run_id)}")
        if not isinstance(page, int) or isinstance(page, bool) or not 0 <= page < 10_000_000:
            raise InvalidMessageError(f"page must be a non-negative integer, got {_show(page)}")
        if cursor is not None and not isinstance(cursor, dict):
            raise InvalidMessageError("cursor must be an object or null")
        retry = data.get("retry", 0)
        if not isinstance(retry, int) or isinstance(retry, bool) or not 0 <= retry < 1000:
            raise InvalidMessageError(f"retry must be a small non-negative integer, got {_show(retry)}")
        waits = data.get("waits", 0)
        if not isinstance(waits, int) or isinstance(waits, bool) or not 0 <= waits < 1000:
            raise InvalidMessageError(f"waits must be a small non-negative integer, got {_show(waits)}")
        customers = _scan_customers(data.get("customers")) if retry else ()
        return cls(run_id=run_id, page=page, cursor=cursor, retry=retry, customers=customers, waits=waits)


def _scan_customers(raw: Any) -> tuple[tuple[str, str | None], ...]:
    """A re-scan's customers: 1 to ``SCAN_RETRY_CHUNK`` objects ``{"id": GUID, "name": str | null}``."""
    if not isinstance(raw, list) or not 0 < len(raw) <= SCAN_RETRY_CHUNK:
        raise InvalidMessageError(f"customers must be a list of 1 to {SCAN_RETRY_CHUNK} customers")
    out: list[tuple[str, str | None]] = []
    for item in raw:
        cid = item.get("id") if isinstance(item, dict) else None
        name = item.get("name") if isinstance(item, dict) else None
        # Customer ids are GUIDs; any id Partner Center listed is accepted back (a refused re-scan would drop it).
        if not isinstance(cid, str) or not _SAFE_ID.fullmatch(cid):
            raise InvalidMessageError(f"customers[].id must be a customer id, got {_show(cid)}")
        if name is not None and not isinstance(name, str):
            raise InvalidMessageError(f"customers[].name must be a string or null, got {_show(name)}")
        out.append((cid, name[:_MAX_NAME_CHARS] if name else None))
    return tuple(out)
