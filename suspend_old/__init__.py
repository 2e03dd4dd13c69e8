"""Queue suspend-old: re-check the precondition, then suspend the old subscription (whole-resource PATCH)."""

import azure.functions as func

from d365_migration import run_step


async def main(msg: func.QueueMessage, reassign: func.Out[list[str]], poison: func.Out[str]) -> None:
    outputs = await run_step("suspend", msg.get_body(), msg.dequeue_count)
    if outputs.poison is not None:
        poison.set(outputs.poison)
    # A user got the old license back meanwhile: move them first, then come back here.
    if outputs.messages.get("reassign-licenses"):
        reassign.set(outputs.messages["reassign-licenses"])
