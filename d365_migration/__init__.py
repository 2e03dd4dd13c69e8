"""d365_migration: move CSP customers off retired Dynamics 365 Qualified Offers, unattended and safely.

The public names are re-exported here from small private modules. Function folders import only
``run_detect`` / ``run_step``; the rest is for the CLI, tests and partners who script against the package.
"""

from ._app import StepOutputs, build_service, get_service, run_detect, run_scan, run_step
from ._catalog import RetiredOffer, RetiredOfferCatalog, normalize_offer_name
from ._client import PartnerCenterClient, deterministic_request_id
from ._exceptions import (
    AuthenticationError,
    ClientError,
    ConcurrencyConflict,
    ConfigurationError,
    ConflictError,
    InvalidMessageError,
    LedgerError,
    MalformedResponseError,
    MigrationError,
    NotFoundError,
    PartnerCenterApiError,
    PartnerCenterError,
    PreconditionFailedError,
    ServerError,
    ThrottledError,
    TransportError,
)
from ._ledger import FINAL_STATES, STATES, MigrationLedger, MigrationRecord, UserOutcome
from ._messages import QUEUE_FOR_STEP, StepMessage
from ._pipeline import DetectReport, MigrationService, StepResult
from ._queues import QueueSender
from ._settings import APP_SETTINGS, ReplacementOffers, Settings, load_settings

__all__ = [
    "APP_SETTINGS",
    "FINAL_STATES",
    "QUEUE_FOR_STEP",
    "STATES",
    "AuthenticationError",
    "ClientError",
    "ConcurrencyConflict",
    "ConfigurationError",
    "ConflictError",
    "DetectReport",
    "InvalidMessageError",
    "LedgerError",
    "MalformedResponseError",
    "MigrationError",
    "MigrationLedger",
    "MigrationRecord",
    "MigrationService",
    "NotFoundError",
    "PartnerCenterApiError",
    "PartnerCenterClient",
    "PartnerCenterError",
    "PreconditionFailedError",
    "QueueSender",
    "ReplacementOffers",
    "RetiredOffer",
    "RetiredOfferCatalog",
    "ServerError",
    "Settings",
    "StepMessage",
    "StepOutputs",
    "StepResult",
    "ThrottledError",
    "TransportError",
    "UserOutcome",
    "build_service",
    "deterministic_request_id",
    "get_service",
    "load_settings",
    "normalize_offer_name",
    "run_detect",
    "run_scan",
    "run_step",
]
