"""Exceptions raised by d365_migration.

The hierarchy::

    MigrationError                      base of everything this package raises on purpose
    ├── ConfigurationError              a bad app setting; names the setting and the fix (start-up stops)
    ├── InvalidMessageError             a queue message that can never be processed (goes to poison, no retries)
    ├── LedgerError                     the ledger could not be read or written
    │   └── ConcurrencyConflict         another worker changed the record first (ETag mismatch)
    ├── AuthenticationError             no access token could be had; says exactly what to run to fix it
    ├── RequestIdReusedError            a caller sent an MS-RequestId that already got an answer (a bug; strict mode)
    ├── RolloutRefused                  a rollout-controls change that is not allowed (says why and what to do)
    ├── CancelRefused                   ``cancel`` will not cancel this subscription (not ours, window closed, …)
    └── PartnerCenterError              a Partner Center call failed
        ├── TransportError              no usable answer (after retries), named by the phase it failed in:
        │   ├── RequestNotSentError     never reached Partner Center (connect failed): nothing was applied
        │   └── ResponseLostError       sent, but no answer came back (reset, timeout): it MAY have been applied
        ├── MalformedResponseError      an answer that is not the documented shape (HTML page, truncated JSON…)
        ├── AccessDeniedError           401/403: the token or the GDAP roles are wrong — one stop for the whole step,
        │                               never a per-user failure; ``fix`` names what to do (roles by name)
        ├── LookAgainLater              not a failure: the same check/call will work later (``retry_after``)
        └── PartnerCenterApiError       a documented error answer: carries status, code, description
            ├── ServerError             5xx after retries
            │   └── UncertainWriteError 5xx to a write that is not safe to repeat: it MAY have been applied
            ├── ThrottledError          429 after the retry budget; carries retry_after
            │   └── RetryAfterTooLongError   Retry-After above what the client will sleep (also LookAgainLater)
            └── ClientError             4xx
                ├── NotFoundError
                │   └── ProvisioningNotReadyError   404 800007 on provisioning status (also LookAgainLater)
                ├── ConflictError
                │   └── UpdatePendingError          409 800082 / 900278, or a 202 not yet visible (LookAgainLater)
                ├── PreconditionFailedError
                ├── SubscriptionSuspendedError      400 800091: re-read; complete if it is already suspended
                └── PurchaseRejectedError           cart / line-item / checkout / order business failure
                    └── NoAvailabilityError         no purchasable availability for the term and billing cycle

``error.maybe_applied`` is true exactly for the errors after which the write may have happened (ResponseLostError,
UncertainWriteError): the caller looks at Partner Center's state before sending it again.

Messages never contain tokens, secrets or Authorization headers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccessDeniedError",
    "AuthenticationError",
    "CancelRefused",
    "ClientError",
    "ConcurrencyConflict",
    "ConfigurationError",
    "ConflictError",
    "InvalidMessageError",
    "LedgerError",
    "LookAgainLater",
    "MalformedResponseError",
    "MigrationError",
    "NoAvailabilityError",
    "NotFoundError",
    "PartnerCenterApiError",
    "PartnerCenterError",
    "PreconditionFailedError",
    "ProvisioningNotReadyError",
    "PurchaseRejectedError",
    "RateBudgetUnavailable",
    "RequestIdReusedError",
    "RequestNotSentError",
    "ResponseLostError",
    "RetryAfterTooLongError",
    "RolloutRefused",
    "ServerError",
    "SubscriptionSuspendedError",
    "ThrottledError",
    "TransportError",
    "UncertainWriteError",
    "UpdatePendingError",
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


class RateBudgetUnavailable(MigrationError):
    """The shared Partner Center request budget (Table Storage) could not be read or claimed from. The limiter
    catches it and paces conservatively on its own; it never reaches a step."""


class AuthenticationError(MigrationError):
    """No Partner Center access token could be obtained. The message says what to run."""


class RequestIdReusedError(MigrationError):
    """A write was about to reuse an ``MS-RequestId`` that already got an answer (success or business failure).

    Partner Center's headers page: reuse the id only to retry the same call after a timeout; after any response the
    next call needs a new id. This is a programming error in the caller, raised before anything is sent."""
class RolloutRefused(MigrationError):
    """A change of the rollout controls that is not allowed, e.g. going live with an empty allow-list without
    choosing all customers."""


class CancelRefused(MigrationError):
    """``cancel`` refuses: the subscription was not bought by this tool, the cancellation window is closed, users
    already hold its licenses, or the old subscription is no longer active."""


class PartnerCenterError(MigrationError):
    """A Partner Center call failed."""

    #: True when the request may have been applied although no success answer arrived (see the module docstring).
    maybe_applied: bool = False

    def __init__(self, message: str, *, method: str = "", path: str = "") -> None:
        self.method = method
        self.path = path
        where = f"{method} {path}: " if method or path else ""
        super().__init__(f"{where}{message}")


class LookAgainLater(PartnerCenterError):
    """Not a failure: the resource is not ready or the service asked us to wait; look again after ``retry_after``
    seconds (None: the caller's own poll interval). Mixed into the concrete errors below."""

    retry_after: float | None = None


class AccessDeniedError(PartnerCenterError):
    """401/403 meaning the token or the partner's roles in the customer tenant are wrong, not the request.

    ``reason`` is one of ``mfa_required``, ``conditional_access``, ``app_only_token``, ``insufficient_privileges``
    (GDAP), ``unauthorized``; ``fix`` says what to do, naming the GDAP roles (``roles``) the operation needs. Every
    other call of the same kind will fail the same way, so a step stops once instead of failing per user."""

    def __init__(self, status: int, code: str | None, description: str, *, reason: str, fix: str,
                 roles: tuple[str, ...] = (), method: str = "", path: str = "") -> None:
        self.status = status
        self.code = code
        self.description = description
        self.reason = reason
        self.fix = fix
        self.roles = roles
        code_text = f" code {code}" if code is not None else ""
        super().__init__(f"HTTP {status}{code_text} ({reason}): {description} — {fix}", method=method, path=path)


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

    def __init__(self, retry_after: float, *, method: str = "", path: str = "", status: int = 429) -> None:
        self.retry_after = retry_after
        super().__init__(status, None, f"rate limit exceeded; retry after {retry_after:g}s", method=method,
                         path=path)


class RetryAfterTooLongError(ThrottledError, LookAgainLater):
    """The service asked for a longer wait (``Retry-After``) than the client will sleep in one call: not a failure —
    the caller re-queues the work for ``retry_after`` seconds."""

    retry_after: float  # always set


class ProvisioningNotReadyError(NotFoundError, LookAgainLater):
    """404 code 800007 on a subscription's provisioning status: "unable to retrieve provisioning information" yet.
    The status is refreshed about every 15 minutes (get-subscription-provisioning-status)."""


class UpdatePendingError(ConflictError, LookAgainLater):
    """An update of the subscription is still being applied: ``409`` code ``800082`` ("not ready to be updated") or
    ``900278`` ("pending operation"), or a ``202 Accepted`` update whose new state was not visible within the
    client's confirmation window (``status`` 202, ``location`` set). Look again later; do not send another update."""

    location: str | None = None


class SubscriptionSuspendedError(ClientError):
    """400 code 800091 "can't update a subscription with suspended status": after a lost answer to a suspend, the
    first one was applied. Re-read the subscription and complete if it is suspended."""


class PurchaseRejectedError(ClientError):
    """A purchase that Partner Center refused as a business failure, with its code and text: a cart-creation error
    (e.g. ``400 800009``), a cart line item's ``error``, a checkout ``orderErrors`` entry, ``404 400019`` availability
    not found at checkout, or a rejected legacy order. ``stage`` is ``cart``, ``cart_line_item``, ``checkout``,
    ``order_errors``, ``order`` or ``availability``. Record it on the first delivery; do not retry blindly."""

    def __init__(self, status: int, code: str | None, description: str, *, stage: str, method: str = "",
                 path: str = "", data: Any = None, error_name: str | None = None) -> None:
        self.stage = stage
        super().__init__(status, code, description, method=method, path=path, data=data, error_name=error_name)


class NoAvailabilityError(PurchaseRejectedError):
    """No purchasable availability of the product SKU matches the customer's country, term and billing cycle."""


class ServerError(PartnerCenterApiError):
    """5xx that outlasted the retry budget."""


class UncertainWriteError(ServerError):
    """A 5xx answer to a write that is not safe to repeat blindly (a legacy order): it may have been applied."""

    maybe_applied = True
