"""The correlation id of the migration being worked on, for log lines written deep in the client."""

from __future__ import annotations

from contextvars import ContextVar

__all__ = [
    "current_correlation_id",
    "log_prefix",
]

current_correlation_id: ContextVar[str | None] = ContextVar("d365_migration_correlation_id", default=None)


def log_prefix() -> str:
    cid = current_correlation_id.get()
    return f"[{cid}] " if cid else ""
