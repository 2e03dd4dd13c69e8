"""Timer: start a detection run. Its customer pages are scanned one per invocation by scan_customers, so no
invocation scans everything, however many customers the partner has."""

import azure.functions as func

from d365_migration import run_detect


async def main(timer: func.TimerRequest, scan: func.Out[str]) -> None:
    scan.set(await run_detect())
