"""Exceptions raised by d365_migration.

The hierarchy::

    MigrationError                      base of everything this package raises on purpose
    ├── ConfigurationError              a bad app setting; names the setting and the fix (start-up stops)
    ├── InvalidMessageError             a queue message that can never be processed (goes to poison, no retries)
    ├── LedgerError                     the ledger could not be read or written
    │   └── ConcurrencyConflict         another worker changed the record first (ETag mismatch)
    ├── AuthenticationError             no access token could be had; says exactly what to run to fix it
    └── PartnerCenterError              a Partner Center call failed
        ├── TransportError              no usable answer (after retries), named by the phase it failed in:
        │   ├── RequestNotSentError     never reached Partner Center (connect failed): nothing was applied
        │   └── ResponseLostError       sent, but no answer came back (reset, timeout): it MAY have been applied
        ├── MalformedResponseError      an answer that is not the documented shape (HTML page, truncated JSON…)
        └── PartnerCenterApiError       a documented error answer: carries status, code, description
            ├── ThrottledError          429 after the retry budget; carries retry_after
            ├── ServerError             5xx after retries
            │   └── UncertainWriteError 5xx to a write that is not safe to repeat: it MAY have been applied
            └── (4xx)                   ClientError, NotFoundError, ConflictError, PreconditionFailedError

``error.maybe_applied`` is true exactly for the errors after which the write may have happened (ResponseLostError,
UncertainWriteError): the caller looks at Partner Center's state before sending it again.

Messages never contain tokens, secrets or Authorization headers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "ClientError",
    "ConcurrencyConflict",
    "ConfigurationError",
    "ConflictError",
    "InvalidMessageError",
    "LedgerError",
    "MalformedResponseError",
    "MigrationError",
    "NotFoundError",
    "PartnerCenterApiError",
    "PartnerCenterError",
    "PreconditionFailedError",
    "RequestNotSentError",
    "ResponseLostError",
    "ServerError",
    "ThrottledError",
    "TransportError",
    "UncertainWriteError",
]


class MigrationError(Exception):
    """Base class of the errors this package raises."""


class ConfigurationError(MigrationError):
    """A setting is missing or malformed. ``setting`` names it."""

    def __init__(self, setting: str, problem: str, fix: str = "") -> None:
        self.setting = setting
        self.problem = problem
        self.fix = fix
        text = f"setting {setting}: {problem}"
        if fix:
            text += f" — {fix}"
        super().__init__(text)


class InvalidMessageError(MigrationError):
    """A queue message that no retry can fix (not JSON, wrong schema, bad ids, oversize)."""


class LedgerError(MigrationError):
    """The ledger (Azure Table Storage) could not be read or written."""


class ConcurrencyConflict(LedgerError):
    """The record changed since it was read (its ETag no longer matches)."""


class AuthenticationError(MigrationError):
    """No Partner Center access token could be obtained. The message says what to run."""


class PartnerCenterError(MigrationError):
    """A Partner Center call failed."""

    #: True when the request may have been applied although no success answer arrived (see the module docstring).
    maybe_applied: bool = False

    def __init__(self, message: str, *, method: str = "", path: str = "") -> None:
        self.method = method
        self.path = path
        where = f"{method} {path}: " if method or path else ""
        super().__init__(f"{where}{message}")


class TransportError(PartnerCenterError):
    """The request got no usable answer (connection error, timeout) after retries."""


class RequestNotSentError(TransportError):
    """The request never reached Partner Center (connection refused, connect timeout): nothing was applied."""


class ResponseLostError(TransportError):
    """The request was sent but no answer came back (connection reset, read timeout): it may have been applied."""

    maybe_applied = True


class MalformedResponseError(PartnerCenterError):
    """Partner Center answered with something that is not the documented JSON shape."""


class PartnerCenterApiError(PartnerCenterError):
    """Partner Center answered with an error status and (usually) an error body."""

    def __init__(
        self,
        status: int,
        code: str | None,
        description: str,
        *,
        method: str = "",
        path: str = "",
        data: Any = None,
        error_name: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.description = description
        self.data = data
        self.error_name = error_name
        code_text = f" code {code}" if code is not None else ""
        super().__init__(f"HTTP {status}{code_text}: {description}", method=method, path=path)


class ClientError(PartnerCenterApiError):
    """A 4xx answer other than the specialised ones below."""


class NotFoundError(ClientError):
    """404."""


class ConflictError(ClientError):
    """409 (e.g. 800060 order in progress, 800064 cart being processed)."""


class PreconditionFailedError(ClientError):
    """412, or 400 with code 2055: the ETag is no longer valid."""


class ThrottledError(PartnerCenterApiError):
    """429 that outlasted the retry budget."""

    def __init__(self, retry_after: float, *, method: str = "", path: str = "") -> None:
        self.retry_after = retry_after
        super().__init__(429, None, f"rate limit exceeded; retry after {retry_after:g}s", method=method, path=path)


class ServerError(PartnerCenterApiError):
    """5xx that outlasted the retry budget."""


class UncertainWriteError(ServerError):
    """A 5xx answer to a write that is not safe to repeat blindly (a legacy order): it may have been applied."""

    maybe_applied = True
