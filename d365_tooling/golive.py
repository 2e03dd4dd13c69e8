"""Going live the way a partner does (``rollout set --live --all-customers``) for tests that run a live chain over
every seeded customer: ``DRY_RUN=false`` alone no longer makes the app spend (issue 11)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from d365_migration._ledger import MigrationLedger
from d365_migration._rollout import RolloutStore, go_live
from d365_migration._settings import Settings


def go_live_for_every_customer(storage: str, *, table: str = "migrations") -> None:
    """Store live controls for all customers in ``storage``'s ledger table (callable from sync and async tests)."""

    async def store() -> None:
        ledger = MigrationLedger.from_connection_string(storage, table)
        try:
            await go_live(RolloutStore(ledger.table_client), Settings(), by="tests", all_customers=True,
                          reason="tests run the live chain for every seeded customer")
        finally:
            ledger.close()

    with ThreadPoolExecutor(max_workers=1) as pool:  # a test's own event loop may be running
        pool.submit(asyncio.run, store()).result()
