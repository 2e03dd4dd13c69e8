"""Queue purchase-new: buy the replacement (once), wait for it to be active, then queue the license move."""

from typing import List

import azure.functions as func

from d365_migration import run_step


# `Out[List[str]]`, not `Out[list[str]]`: the Python worker rejects the builtin generic as a "non-type
# annotation" (Azure/azure-functions-python-worker#1176), and Azure loads this file with that worker.
async def main(msg: func.QueueMessage, reassign: func.Out[List[str]], poison: func.Out[str]) -> None:
    outputs = await run_step("purchase", msg.get_body(), msg.dequeue_count)
    if outputs.poison is not None:
        poison.set(outputs.poison)
    if outputs.messages.get("reassign-licenses"):
        reassign.set(outputs.messages["reassign-licenses"])
