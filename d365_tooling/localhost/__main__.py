"""CLI for the local runner (a stand-in for ``func start``; not the real Functions host).

Examples::

    # one worker: fire the timer once, then serve the queues until they stay empty for 2 s (max 60 s)
    AzureWebJobsStorage=... python -m d365_tooling.localhost --app-root . --timer detect_expiring --timeout 60

    # extra workers serving the same queues (for a benchmark), no timer
    AzureWebJobsStorage=... python -m d365_tooling.localhost --app-root . --timeout 60 &

    # start a private Azurite too (handy for a demo)
    python -m d365_tooling.localhost --app-root . --start-azurite --timer detect_expiring

Prints the run report as JSON on stdout. Exit code 0, or 1 if any invocation failed (with ``--strict``),
2 for usage/configuration errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._host import LocalHost, RunReport
from ._loader import FunctionLoadError
from .azurite import AzuriteError, AzuriteProcess


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _override(text: str) -> tuple[str, Any]:
    key, value = _pair(text)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m d365_tooling.localhost",
        description="Run the app's v1 functions over Storage queues locally (a stand-in for Core Tools, "
        "not the real Azure Functions host).",
    )
    p.add_argument("--app-root", type=Path, default=Path("."), help="folder with host.json and function folders")
    p.add_argument("--functions", nargs="+", metavar="NAME", help="load only these functions (default: all)")
    p.add_argument("--timer", action="append", default=[], metavar="NAME", help="fire this timer once at start")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=2.0,
        help="stop when all trigger queues stay empty this long (0 = never stop when idle)",
    )
    p.add_argument(
        "--set",
        dest="env",
        action="append",
        type=_pair,
        default=[],
        metavar="KEY=VALUE",
        help="app setting for the functions (repeatable)",
    )
    p.add_argument(
        "--host",
        dest="overrides",
        action="append",
        type=_override,
        default=[],
        metavar="KEY=VALUE",
        help="host.json queues override, e.g. --host visibilityTimeout=1 --host batchSize=16",
    )
    p.add_argument(
        "--connection-string",
        default=None,
        help="storage connection string (default: the AzureWebJobsStorage environment variable)",
    )
    p.add_argument("--start-azurite", action="store_true", help="start a private Azurite for this run")
    p.add_argument("--http-port", type=int, default=None, help="also serve HTTP functions on this port (0 = any)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any invocation failed")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: INFO logs, -vv: DEBUG")
    return p


async def _serve(args: argparse.Namespace, connection_string: str) -> RunReport:
    async with LocalHost(
        args.app_root,
        connection_string=connection_string,
        env=dict(args.env),
        host_overrides=dict(args.overrides),
        functions=args.functions,
    ) as host:
        if args.http_port is not None:
            url = host.serve_http(port=args.http_port)
            print(f"HTTP functions at {url}/api/", file=sys.stderr, flush=True)
        for name in args.timer:
            with contextlib.suppress(Exception):  # logged by the host; like the real host, keep serving
                await host.fire_timer(name)
        idle = args.idle_seconds if args.idle_seconds and args.idle_seconds > 0 else None
        return await host.run(timeout=args.timeout, idle_seconds=idle)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        logging.getLogger("azure").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        conn = args.connection_string or os.environ.get("AzureWebJobsStorage")
        if args.start_azurite:
            try:
                conn = stack.enter_context(AzuriteProcess()).connection_string
            except AzuriteError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        if not conn:
            print("error: set AzureWebJobsStorage (or pass --connection-string / --start-azurite)", file=sys.stderr)
            return 2
        try:
            report = asyncio.run(_serve(args, conn))
        except (FunctionLoadError, ValueError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # e.g. storage unreachable
            if args.verbose >= 2:
                traceback.print_exc()
            print(f"error: {type(exc).__name__}: {str(exc)[:500]} (-vv for the traceback)", file=sys.stderr)
            return 2
    print(json.dumps(report.to_dict(), indent=2))
    return 1 if args.strict and report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
