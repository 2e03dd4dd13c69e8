"""d365_migration: move CSP customers off retired Dynamics 365 Qualified Offers, unattended and safely.

The public names are re-exported here from small private modules, lazily: a function folder that imports
``run_step`` does not pay for the Storage and HTTP SDKs until its first invocation (cold start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "StepOutputs": "_app",
    "build_service": "_app",
    "get_service": "_app",
    "run_detect": "_app",
    "run_scan": "_app",
    "run_status": "_app",
    "run_step": "_app",
    "RetiredOffer": "_catalog",
    "RetiredOfferCatalog": "_catalog",
    "normalize_offer_name": "_catalog",
    "PartnerCenterClient": "_client",
    "deterministic_request_id": "_client",
    "RequestAttempt": "_client",
    "gdap_roles_for": "_client",
    "AuthenticationError": "_exceptions",
    "AccessDeniedError": "_exceptions",
    "LookAgainLater": "_exceptions",
    "NoAvailabilityError": "_exceptions",
    "ProvisioningNotReadyError": "_exceptions",
    "PurchaseRejectedError": "_exceptions",
    "RequestIdReusedError": "_exceptions",
    "RetryAfterTooLongError": "_exceptions",
    "SubscriptionSuspendedError": "_exceptions",
    "UpdatePendingError": "_exceptions",
    "CancelRefused": "_exceptions",
    "RolloutRefused": "_exceptions",
    "ClientError": "_exceptions",
    "ConcurrencyConflict": "_exceptions",
    "ConfigurationError": "_exceptions",
    "ConflictError": "_exceptions",
    "InvalidMessageError": "_exceptions",
    "LedgerError": "_exceptions",
    "MalformedResponseError": "_exceptions",
    "MigrationError": "_exceptions",
    "NotFoundError": "_exceptions",
    "PartnerCenterApiError": "_exceptions",
    "PartnerCenterError": "_exceptions",
    "PreconditionFailedError": "_exceptions",
    "RequestNotSentError": "_exceptions",
    "ResponseLostError": "_exceptions",
    "ServerError": "_exceptions",
    "ThrottledError": "_exceptions",
    "TransportError": "_exceptions",
    "UncertainWriteError": "_exceptions",
    "FINAL_STATES": "_ledger",
    "STATES": "_ledger",
    "MigrationLedger": "_ledger",
    "MigrationRecord": "_ledger",
    "UserOutcome": "_ledger",
    "QUEUE_FOR_STEP": "_messages",
    "StepMessage": "_messages",
    "DetectReport": "steps",
    "MigrationService": "steps",
    "RetryLater": "steps",
    "STEP_FOR_STATE": "steps",
    "StepResult": "steps",
    "Work": "steps",
    "observe_steps": "steps",
    "QueueSender": "_queues",
    "Availability": "_models",
    "LicenseUpdateResult": "_models",
    "LicenseWarning": "_models",
    "UpdateAccepted": "_models",
    "RolloutControls": "_rollout",
    "RolloutStore": "_rollout",
    "load_effective_controls": "_rollout",
    "APP_SETTINGS": "_settings",
    "ReplacementOffers": "_settings",
    "ReplacementTarget": "_settings",
    "Settings": "_settings",
    "load_settings": "_settings",
}

__all__ = sorted(_EXPORTS)



def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'd365_migration' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._app import (
        StepOutputs as StepOutputs,
    )
    from ._app import (
        build_service as build_service,
    )
    from ._app import (
        get_service as get_service,
    )
    from ._app import (
        run_detect as run_detect,
    )
    from ._app import (
        run_scan as run_scan,
    )
    from ._app import (
        run_status as run_status,
    )
    from ._app import (
        run_step as run_step,
    )
    from ._catalog import (
        RetiredOffer as RetiredOffer,
    )
    from ._catalog import (
        RetiredOfferCatalog as RetiredOfferCatalog,
    )
    from ._catalog import (
        normalize_offer_name as normalize_offer_name,
    )
    from ._client import (
        PartnerCenterClient as PartnerCenterClient,
    )
    from ._client import RequestAttempt as RequestAttempt
    from ._client import (
        deterministic_request_id as deterministic_request_id,
    )
    from ._client import gdap_roles_for as gdap_roles_for
    from ._exceptions import AccessDeniedError as AccessDeniedError
    from ._exceptions import (
        AuthenticationError as AuthenticationError,
    )
    from ._exceptions import (
        CancelRefused as CancelRefused,
    )
    from ._exceptions import (
        ClientError as ClientError,
    )
    from ._exceptions import (
        ConcurrencyConflict as ConcurrencyConflict,
    )
    from ._exceptions import (
        ConfigurationError as ConfigurationError,
    )
    from ._exceptions import (
        ConflictError as ConflictError,
    )
    from ._exceptions import (
        InvalidMessageError as InvalidMessageError,
    )
    from ._exceptions import (
        LedgerError as LedgerError,
    )
    from ._exceptions import LookAgainLater as LookAgainLater
    from ._exceptions import (
        MalformedResponseError as MalformedResponseError,
    )
    from ._exceptions import (
        MigrationError as MigrationError,
    )
    from ._exceptions import NoAvailabilityError as NoAvailabilityError
    from ._exceptions import (
        NotFoundError as NotFoundError,
    )
    from ._exceptions import (
        PartnerCenterApiError as PartnerCenterApiError,
    )
    from ._exceptions import (
        PartnerCenterError as PartnerCenterError,
    )
    from ._exceptions import (
        PreconditionFailedError as PreconditionFailedError,
    )
    from ._exceptions import ProvisioningNotReadyError as ProvisioningNotReadyError
    from ._exceptions import PurchaseRejectedError as PurchaseRejectedError
    from ._exceptions import RequestIdReusedError as RequestIdReusedError
    from ._exceptions import (
        RequestNotSentError as RequestNotSentError,
    )
    from ._exceptions import (
        ResponseLostError as ResponseLostError,
    )
    from ._exceptions import RetryAfterTooLongError as RetryAfterTooLongError
    from ._exceptions import (
        RolloutRefused as RolloutRefused,
    )
    from ._exceptions import (
        ServerError as ServerError,
    )
    from ._exceptions import SubscriptionSuspendedError as SubscriptionSuspendedError
    from ._exceptions import (
        ThrottledError as ThrottledError,
    )
    from ._exceptions import (
        TransportError as TransportError,
    )
    from ._exceptions import (
        UncertainWriteError as UncertainWriteError,
    )
    from ._exceptions import UpdatePendingError as UpdatePendingError
    from ._ledger import (
        FINAL_STATES as FINAL_STATES,
    )
    from ._ledger import (
        STATES as STATES,
    )
    from ._ledger import (
        MigrationLedger as MigrationLedger,
    )
    from ._ledger import (
        MigrationRecord as MigrationRecord,
    )
    from ._ledger import (
        UserOutcome as UserOutcome,
    )
    from ._messages import (
        QUEUE_FOR_STEP as QUEUE_FOR_STEP,
    )
    from ._messages import (
        StepMessage as StepMessage,
    )
    from ._models import Availability as Availability
    from ._models import LicenseUpdateResult as LicenseUpdateResult
    from ._models import LicenseWarning as LicenseWarning
    from ._models import UpdateAccepted as UpdateAccepted
    from ._queues import (
        QueueSender as QueueSender,
    )
    from ._rollout import (
        RolloutControls as RolloutControls,
    )
    from ._rollout import (
        RolloutStore as RolloutStore,
    )
    from ._rollout import (
        load_effective_controls as load_effective_controls,
    )
    from ._settings import (
        APP_SETTINGS as APP_SETTINGS,
    )
    from ._settings import (
        ReplacementOffers as ReplacementOffers,
    )
    from ._settings import ReplacementTarget as ReplacementTarget
    from ._settings import (
        Settings as Settings,
    )
    from ._settings import (
        load_settings as load_settings,
    )
    from .steps import (
        STEP_FOR_STATE as STEP_FOR_STATE,
    )
    from .steps import (
        DetectReport as DetectReport,
    )
    from .steps import (
        MigrationService as MigrationService,
    )
    from .steps import (
        RetryLater as RetryLater,
    )
    from .steps import (
        StepResult as StepResult,
    )
    from .steps import (
        Work as Work,
    )
    from .steps import (
        observe_steps as observe_steps,
    )
