"""Queue scan-customers: scan one page of customers of a detection run and queue the purchases of its expiring
qualified subscriptions (unless DRY_RUN). The next page is queued as soon as its cursor is known, so several
instances scan pages side by side."""

from typing import List

import azure.functions as func

from d365_migration import run_scan


# `Out[List[str]]`, not `Out[list[str]]`: the Python worker rejects the builtin generic as a "non-type
# annotation" (Azure/azure-functions-python-worker#1176), and Azure loads this file with that worker.
async def main(msg: func.QueueMessage, purchases: func.Out[List[str]], poison: func.Out[str]) -> None:
    outputs = await run_scan(msg.get_body(), dequeue_count=msg.dequeue_count)
    if outputs.poison is not None:
        poison.set(outputs.poison)
    if outputs.messages.get("purchase-new"):
        purchases.set(outputs.messages["purchase-new"])
