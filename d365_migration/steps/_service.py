"""``MigrationService``: the process's steps with their dependencies, as the function adapters call them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from types import MappingProxyType

from .._catalog import RetiredOfferCatalog
from .._client import PartnerCenterClient
from .._ledger import MigrationLedger, utcnow
from .._messages import ScanMessage, Step, StepMessage
from .._queues import QueueSender
from .._settings import Settings
from . import detect, purchase, reassign, suspend
from ._runner import StepFunction, StepRunner
from ._work import Deps, StepResult

__all__ = ["STEP_HANDLERS", "MigrationService"]

#: step name → the function that does it (the runner frames each one: claim, release, re-queue, fail).
STEP_HANDLERS: Mapping[Step, StepFunction] = MappingProxyType({
    "purchase": purchase.run,
    "reassign": reassign.run,
    "suspend": suspend.run,
})


class MigrationService:
    """The domain side of the functions; one per process (per event loop), shared by invocations."""

    def __init__(self, settings: Settings, client: PartnerCenterClient, ledger: MigrationLedger,
                 queues: QueueSender, catalog: RetiredOfferCatalog, *,
                 clock: Callable[[], datetime] = utcnow, worker_id: str | None = None) -> None:
        self.deps = Deps(settings=settings, client=client, ledger=ledger, queues=queues, catalog=catalog,
                         clock=clock, worker_id=worker_id or f"worker-{uuid.uuid4().hex[:8]}")
        self.runner = StepRunner(self.deps)

    @property
    def settings(self) -> Settings:
        return self.deps.settings

    @property
    def client(self) -> PartnerCenterClient:
        return self.deps.client

    @property
    def ledger(self) -> MigrationLedger:
        return self.deps.ledger

    @property
    def queues(self) -> QueueSender:
        return self.deps.queues

    async def aclose(self) -> None:
        await self.deps.client.aclose()
        self.deps.ledger.close()
        self.deps.queues.close()

    # --- detection (runbook step 1)

    def start_scan(self, run_id: str | None = None) -> ScanMessage:
        return detect.start_run(self.deps, run_id)

    async def scan_page(self, message: ScanMessage, *, last_delivery: bool = False) -> detect.DetectReport:
        """:raises ValueError: the cursor is not ours. :raises PartnerCenterError: the page could not be read."""
        return await detect.scan_page(self.deps, message, last_delivery=last_delivery)

    # --- record steps (runbook steps 2-4)

    async def run(self, message: StepMessage, *, last_delivery: bool = False) -> StepResult:
        """Run the step ``message`` names on its record.

        :raises InvalidMessageError: no ledger record for the message.
        :raises PartnerCenterError: a call failed after retries (on ``last_delivery`` the record is marked failed).
        """
        return await self.runner.run(message, STEP_HANDLERS[message.step], last_delivery=last_delivery)

    async def purchase(self, message: StepMessage) -> StepResult:
        return await self.runner.run(message, STEP_HANDLERS["purchase"])

    async def reassign(self, message: StepMessage) -> StepResult:
        return await self.runner.run(message, STEP_HANDLERS["reassign"])

    async def suspend(self, message: StepMessage) -> StepResult:
        return await self.runner.run(message, STEP_HANDLERS["suspend"])

    async def fail(self, message: StepMessage, error: str) -> None:
        await self.runner.fail(message, error)
