"""Queue suspend-old: re-check the precondition, then suspend the old subscription (whole-resource PATCH)."""

from typing import List

import azure.functions as func

from d365_migration import run_step


# `Out[List[str]]`, not `Out[list[str]]`: the Python worker rejects the builtin generic as a "non-type
# annotation" (Azure/azure-functions-python-worker#1176), and Azure loads this file with that worker.
async def main(msg: func.QueueMessage, reassign: func.Out[List[str]], poison: func.Out[str]) -> None:
    outputs = await run_step("suspend", msg.get_body(), msg.dequeue_count)
    if outputs.poison is not None:
        poison.set(outputs.poison)
    # A user got the old license back meanwhile: move them first, then come back here.
    if outputs.messages.get("reassign-licenses"):
        reassign.set(outputs.messages["reassign-licenses"])
