"""Queue scan-customers: scan one page of customers of a detection run, record the expiring qualified
subscriptions, queue their purchases (unless DRY_RUN), and queue the next page."""

import azure.functions as func

from d365_migration import run_scan


async def main(msg: func.QueueMessage, purchases: func.Out[list[str]], next_page: func.Out[list[str]],
               poison: func.Out[str]) -> None:
    outputs = await run_scan(msg.get_body())
    if outputs.poison is not None:
        poison.set(outputs.poison)
    if outputs.messages.get("purchase-new"):
        purchases.set(outputs.messages["purchase-new"])
    if outputs.messages.get("scan-customers"):
        next_page.set(outputs.messages["scan-customers"])
