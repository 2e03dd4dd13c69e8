"""``python -m d365_tooling.soak``: the fault-injection matrix, outside pytest, printing one table.

Every fault kind (``d365_tooling/faults.py``: lost write responses, 429, 5xx, resets, timeouts, slow provisioning
and list lag, duplicate and redelivered queue messages, crashes after Partner Center calls, human changes, and all
of them together) × several seeds, each a whole run of the chain on the local host over a private Azurite against
the sandbox over real HTTP. Exit code 1 if any invariant was violated. Run it from the repository root (it uses the
test harness in ``tests/``); ``make soak`` runs the same matrix through pytest.

    python -m d365_tooling.soak --seeds 5 [--kinds timeout,crash_after_call] [--scope 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d365_tooling.faults import RunResult

DEFAULT_SCOPE = 2  # customers in scope per run (each has a handful of expiring qualified subscriptions)


async def run_matrix(connection_string: str, kinds: Sequence[str], seeds: Sequence[int], *,
                     scope: int | None = DEFAULT_SCOPE, progress: bool = True) -> list[RunResult]:
    """Run every kind × seed one after the other (the fault hooks patch classes, so runs cannot overlap)."""
    import dataclasses

    from d365_tooling.faults import KINDS, run_scenario

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {sorted(KINDS)}")
    results = []
    for kind in kinds:
        for seed in seeds:
            scenario = dataclasses.replace(KINDS[kind](seed), scope=scope)
            result = await run_scenario(scenario, connection_string)
            results.append(result)
            if progress:
                print(f"  {kind:<34} seed={seed:<4} {result.elapsed:5.1f}s states={result.states} "
                      f"faults={result.fault_detail} violations={len(result.violations)}",
                      file=sys.stderr, flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d365_tooling.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per fault kind (default 5)")
    parser.add_argument("--first-seed", type=int, default=101)
    parser.add_argument("--kinds", default="", help="comma-separated fault kinds (default: all)")
    parser.add_argument("--scope", type=int, default=DEFAULT_SCOPE,
                        help="customers in scope per run (0: every customer of the seeded world)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("uvicorn.error", "d365_migration", "azure"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        from d365_tooling.faults import KINDS, crash_summary, describe_violations, format_table
    except ImportError:
        print("run this from the repository root (it uses d365_tooling/faults.py)", file=sys.stderr)
        return 2
    from .localhost import AzuriteProcess

    kinds = [k for k in args.kinds.split(",") if k] or list(KINDS)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    started = time.monotonic()
    with AzuriteProcess() as azurite:
        results = asyncio.run(run_matrix(azurite.connection_string, kinds, seeds, scope=args.scope or None))
    print(format_table(results))
    print(crash_summary(results))
    print(f"{len(results)} runs in {time.monotonic() - started:.0f}s")
    if any(r.violations for r in results):
        print(describe_violations(results, limit=200))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
