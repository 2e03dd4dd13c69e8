"""Timer: find expiring retired-offer subscriptions, record them, queue their purchases (unless DRY_RUN)."""

import azure.functions as func

from d365_migration import run_detect


async def main(timer: func.TimerRequest, purchases: func.Out[list[str]]) -> None:
    messages = await run_detect()
    if messages:
        purchases.set(messages)
