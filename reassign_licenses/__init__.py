"""Queue reassign-licenses: move every user from the old product SKU to the new one, then queue the suspension."""

from typing import List

import azure.functions as func

from d365_migration import run_step


# `Out[List[str]]`, not `Out[list[str]]`: the Python worker rejects the builtin generic as a "non-type
# annotation" (Azure/azure-functions-python-worker#1176), and Azure loads this file with that worker.
async def main(msg: func.QueueMessage, suspend: func.Out[List[str]], poison: func.Out[str]) -> None:
    outputs = await run_step("reassign", msg.get_body(), msg.dequeue_count)
    if outputs.poison is not None:
        poison.set(outputs.poison)
    if outputs.messages.get("suspend-old"):
        suspend.set(outputs.messages["suspend-old"])
