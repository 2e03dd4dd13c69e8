"""A separate OS process drawing from the shared Partner Center budget (for tests/test_budget.py).

``python -m tests._budget_worker '<json>'`` with ``mode``:

* ``requests``: send ``requests`` GETs of customers' subscriptions to ``endpoint`` through a client whose commerce
  budget is the shared one in ``table`` (starting at wall-clock ``start_at``, so several workers overlap), then print
  a JSON line with every block it was granted and what it used;
* ``claim_and_die``: let 50 requests wait for the shared budget, print the first block granted, and kill itself with
  SIGKILL (a crashed instance: no clean-up of any kind).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

from d365_migration._budget import PacedBudget, SharedBudget, TableBudgetStore
from d365_migration._client import PartnerCenterClient


def _blocks(budget: SharedBudget) -> list[list[float]]:
    return [[b.start, b.interval, b.count] for b in budget.stats.blocks]


async def _requests(args: dict[str, Any]) -> dict[str, Any]:
    store = TableBudgetStore.from_connection_string(args["connection"], args["table"])
    shared = SharedBudget("commerce", args["rpm"], store, block_seconds=args["block_seconds"], keep_blocks=True)
    customers: list[str] = args["customers"]
    delay = args["start_at"] - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    async with PartnerCenterClient(args["endpoint"], None, limiters={"commerce": PacedBudget(shared)},
                                   max_concurrency=8, max_attempts=1) as client:
        semaphore = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with semaphore:
                await client.list_subscriptions(customers[i % len(customers)])

        await asyncio.gather(*(one(i) for i in range(args["requests"])))
        sent = client.stats.requests
    store.close()
    return {"blocks": _blocks(shared), "used": shared.stats.used, "granted": shared.stats.granted,
            "expired": shared.stats.expired, "claims": shared.stats.claims, "sent": sent}


async def _claim_and_die(args: dict[str, Any]) -> None:
    store = TableBudgetStore.from_connection_string(args["connection"], args["table"])
    shared = SharedBudget("commerce", args["rpm"], store, block_seconds=args["block_seconds"], keep_blocks=True)
    waiting = [asyncio.ensure_future(shared.acquire()) for _ in range(50)]
    while not shared.stats.blocks:
        await asyncio.sleep(0.001)
    print(json.dumps({"blocks": _blocks(shared)}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.gather(*waiting)  # never reached


def main() -> int:
    args = json.loads(sys.argv[1])
    if args["mode"] == "requests":
        print(json.dumps(asyncio.run(_requests(args))), flush=True)
    else:
        asyncio.run(_claim_and_die(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
