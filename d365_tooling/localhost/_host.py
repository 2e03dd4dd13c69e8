"""LocalHost: runs the app's v1 functions over real Storage queues (Azurite), standing in for Core Tools.

**This is not the Azure Functions host.** Core Tools (``func start``) cannot be installed here, so this module
approximates the parts of the host this app relies on, over real queues:

* loading: the .NET host's ``function.json`` rules here, the signature checks by the **real Python worker**
  (``azure-functions-runtime-v1``, the library Azure runs for Python 3.13), see :mod:`._loader`;
* invoking: every invocation is an ``InvocationRequest`` handled by the real worker (:mod:`._worker`), which
  builds the ``func.QueueMessage`` / ``func.TimerRequest`` / ``func.HttpRequest`` from typed data and trigger
  metadata as the host sends them, calls ``main`` and converts ``Out[...]`` / ``$return`` values to typed data;
  a value the real worker cannot convert fails the invocation here too. What the .NET host does with the typed
  data (a JSON array on a queue output becomes one message per element; an ``http`` result becomes the
  response) is done here;
* app settings as environment variables, ``%NAME%`` in binding values, ``connection`` names;
* queue triggers: peek-lock receive, Base64 decoding (``messageEncoding``), ``func.QueueMessage`` with
  ``dequeue_count`` and the timestamps, output bindings written only when ``main`` returns, the message
  deleted on success, made visible again after ``visibilityTimeout`` on failure, and moved to
  ``<queue>-poison`` once ``dequeue_count`` reaches ``maxDequeueCount``; ``batchSize`` invocations at once;
  polling that backs off to ``maxPollingInterval``;
* timers fired on demand (:meth:`LocalHost.fire_timer`), not on their schedule;
* HTTP triggers called directly (:meth:`LocalHost.call_http`) or through a small loopback server.

It does not implement: schedules/``runOnStartup``/timer singletons, ``functionTimeout`` enforcement, retry
policies, input bindings other than the trigger, output bindings other than ``queue`` and ``http``,
``newBatchThreshold``, dynamic concurrency, identity-based connections, HTTP auth levels.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
import requests
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.queue import QueueClient, QueueServiceClient

from ._loader import FunctionLoadError, LoadedFunction, load_function
from ._settings import HostSettings, resolve_setting_refs
from ._worker import WorkerOutput, get_worker

__all__ = ["FunctionStats", "LocalHost", "RunReport"]

log = logging.getLogger("d365_tooling.localhost")

T = TypeVar("T")

_SUPPORTED_OUT = frozenset({"queue", "http"})


# --------------------------------------------------------------------------------------------------- reports


@dataclass
class FunctionStats:
    """Counts for one function. ``poisoned`` counts messages moved to ``<queue>-poison``."""

    invocations: int = 0
    successes: int = 0
    failures: int = 0
    poisoned: int = 0
    seconds: float = 0.0  # total time spent in invocations
    longest: float = 0.0  # the longest single invocation, in seconds

    def timed(self, started: float) -> None:
        took = time.monotonic() - started
        self.seconds += took
        self.longest = max(self.longest, took)

    def minus(self, other: FunctionStats) -> FunctionStats:
        return FunctionStats(
            self.invocations - other.invocations,
            self.successes - other.successes,
            self.failures - other.failures,
            self.poisoned - other.poisoned,
            self.seconds - other.seconds,
            self.longest,
        )


@dataclass
class RunReport:
    """What one :meth:`LocalHost.run` did. ``stopped_because`` is ``"until"``, ``"idle"`` or ``"timeout"``."""

    functions: dict[str, FunctionStats]
    stopped_because: str
    elapsed: float

    @property
    def invocations(self) -> int:
        return sum(s.invocations for s in self.functions.values())

    @property
    def successes(self) -> int:
        return sum(s.successes for s in self.functions.values())

    @property
    def failures(self) -> int:
        return sum(s.failures for s in self.functions.values())

    @property
    def poisoned(self) -> int:
        return sum(s.poisoned for s in self.functions.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "stopped_because": self.stopped_because,
            "elapsed": round(self.elapsed, 3),
            "functions": {k: dataclasses.asdict(v) for k, v in self.functions.items()},
        }


@dataclass
class _Result:
    """What an invocation produced, collected only after ``main`` returned."""

    queue_messages: list[tuple[str, str, str]] = field(default_factory=list)  # (connection, queue, encoded)
    http_response: func.HttpResponse | None = None


class _OutputError(Exception):
    """Typed data that the host cannot turn into the output (the invocation fails, nothing is written)."""


# ------------------------------------------------------------------------------------------------- routing


def _route_regex(template: str) -> re.Pattern[str]:
    """``status/{id?}``, ``items/{id:int}`` → regex with named groups (constraints are not checked)."""
    out = ""
    pos = 0
    for m in re.finditer(r"/?\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]*)?(\?)?\}", template):
        out += re.escape(template[pos : m.start()])
        catch_all, name, optional = m.group(1), m.group(2), m.group(3)
        slash = "/" if m.group(0).startswith("/") else ""
        body = f"(?P<{name}>.+)" if catch_all else f"(?P<{name}>[^/]+)"
        out += f"(?:{re.escape(slash)}{body})?" if optional else re.escape(slash) + body
        pos = m.end()
    out += re.escape(template[pos:])
    return re.compile(f"^{out}/?$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- the host


class LocalHost:
    """Stands in for the Azure Functions host (Core Tools) locally; it is **not** the real host.

    Loads every function folder under ``app_root`` (a folder with ``function.json``), or only those named in
    ``functions``, checking each like the Python v1 worker (:class:`FunctionLoadError` otherwise).

    ``connection_string`` is the host storage (``AzureWebJobsStorage``) unless ``env`` sets that explicitly; a
    binding's ``connection`` names another app setting (``X`` or ``AzureWebJobsX``) looked up in ``env`` then
    ``os.environ``, falling back to ``connection_string``. App settings (``env``, plus ``AzureWebJobsStorage``)
    are exported to ``os.environ`` while the host is open, as the real host exposes app settings to the worker,
    and the previous values are restored by :meth:`aclose`. ``host_overrides`` override host.json
    ``extensions.queues`` values (seconds as floats), e.g. ``{"visibilityTimeout": 0.2, "maxDequeueCount": 3}``.

    Use as ``async with LocalHost(...) as host:``.
    """

    def __init__(
        self,
        app_root: Path | str,
        *,
        connection_string: str,
        env: Mapping[str, str] | None = None,
        host_overrides: Mapping[str, Any] | None = None,
        functions: Sequence[str] | None = None,
        export_env: bool = True,
    ) -> None:
        self.app_root = Path(app_root).resolve()
        self.connection_string = connection_string
        self._env_overrides: dict[str, str] = dict(env or {})
        self._exported: dict[str, str | None] = {}
        if export_env:
            self._export_env({"AzureWebJobsStorage": connection_string, **self._env_overrides})
        try:
            self.settings = HostSettings.load(self.app_root, host_overrides, self.env)
            self.functions: dict[str, LoadedFunction] = self._load(functions)
            self._trigger_queue: dict[str, tuple[str, str]] = {}  # function → (connection string, queue name)
            self._out_targets: dict[tuple[str, str], tuple[str, str]] = {}  # (function, binding) → (conn, queue)
            for fn in self.functions.values():
                self._resolve_bindings(fn)
        except BaseException:
            self._restore_env()
            raise
        self.stats: dict[str, FunctionStats] = {name: FunctionStats() for name in self.functions}
        self._services: dict[str, QueueServiceClient] = {}
        self._created: set[tuple[str, str]] = set()
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=128)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        n_queue = max(1, len(self._trigger_queue))
        self._io_pool = ThreadPoolExecutor(
            max_workers=min(128, 8 + 2 * n_queue * self.settings.batch_size), thread_name_prefix="localhost-io"
        )
        self._in_flight = 0
        self._http_server: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------ settings

    @property
    def env(self) -> dict[str, str]:
        """The app settings as functions see them: ``os.environ`` overlaid with ``env``."""
        merged = dict(os.environ)
        merged.update(self._env_overrides)
        merged.setdefault("AzureWebJobsStorage", self.connection_string)
        return merged

    def _export_env(self, values: Mapping[str, str]) -> None:
        for key, value in values.items():
            if key not in self._exported:
                self._exported[key] = os.environ.get(key)
            os.environ[key] = value

    def _restore_env(self) -> None:
        for key, old in self._exported.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        self._exported.clear()

    def _connection(self, fn: LoadedFunction, name: str | None) -> str:
        env = self.env
        if not name or name == "AzureWebJobsStorage":
            return self._env_overrides.get("AzureWebJobsStorage", self.connection_string)
        for key in (name, f"AzureWebJobs{name}"):
            if env.get(key):
                return env[key]
        log.debug("%s: connection %r not set; using the host storage", fn.name, name)
        return self.connection_string

    def _resolve(self, fn: LoadedFunction, value: Any, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise FunctionLoadError(f"{what} is missing", function=fn.name)
        try:
            return resolve_setting_refs(value, self.env)
        except KeyError as exc:
            raise FunctionLoadError(f"{what}: {exc.args[0]}", function=fn.name) from None

    def _load(self, names: Sequence[str] | None) -> dict[str, LoadedFunction]:
        folders = sorted(p for p in self.app_root.iterdir() if (p / "function.json").is_file())
        by_name = {p.name: p for p in folders}
        if names is not None:
            missing = [n for n in names if n not in by_name]
            if missing:
                raise FunctionLoadError(f"no function folder(s) {missing} under {self.app_root}")
            folders = [by_name[n] for n in names]
        loaded = {}
        for folder in folders:
            fn = load_function(folder)
            if fn.spec.disabled and names is None:
                log.info("function %s is disabled; not loaded", fn.name)
                continue
            loaded[fn.name] = fn
        return loaded

    def _resolve_bindings(self, fn: LoadedFunction) -> None:
        trigger = fn.spec.trigger
        if trigger.type not in ("queueTrigger", "timerTrigger", "httpTrigger"):
            raise FunctionLoadError(
                f"trigger type {trigger.type!r} is not supported by the local runner", function=fn.name
            )
        for b in fn.spec.bindings:
            if b is trigger:
                continue
            if b.direction != "out" or b.type not in _SUPPORTED_OUT:
                raise FunctionLoadError(
                    f"binding {b.name!r} ({b.direction} {b.type}) is not supported by the local runner "
                    "(pass functions=[...] / --functions to leave this function out)",
                    function=fn.name,
                )
            if b.type == "queue":
                queue = self._resolve(fn, b.get("queueName"), f"binding {b.name!r} queueName")
                self._out_targets[(fn.name, b.name)] = (self._connection(fn, b.get("connection")), queue)
        if trigger.type == "queueTrigger":
            queue = self._resolve(fn, trigger.get("queueName"), f"binding {trigger.name!r} queueName")
            self._trigger_queue[fn.name] = (self._connection(fn, trigger.get("connection")), queue)
        elif trigger.type == "timerTrigger":
            self._resolve(fn, trigger.get("schedule"), f"binding {trigger.name!r} schedule")

    def trigger_queue(self, name: str) -> str:
        """The (resolved) queue a queue-triggered function listens on."""
        return self._trigger_queue[name][1]

    def output_queue(self, name: str, binding: str) -> str:
        """The (resolved) queue an output binding writes to."""
        return self._out_targets[(name, binding)][1]

    # --------------------------------------------------------------------------------------------- storage

    def _service(self, conn: str) -> QueueServiceClient:
        svc = self._services.get(conn)
        if svc is None:
            transport = RequestsTransport(session=self._session, session_owner=False)
            svc = QueueServiceClient.from_connection_string(conn, transport=transport)
            self._services[conn] = svc
        return svc

    def _queue(self, conn: str, name: str) -> QueueClient:
        return self._service(conn).get_queue_client(name)

    def _ensure_queue(self, conn: str, name: str) -> None:
        if (conn, name) in self._created:
            return
        with contextlib.suppress(ResourceExistsError):
            self._queue(conn, name).create_queue()
        self._created.add((conn, name))

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io_pool, functools.partial(fn, *args, **kwargs))

    def _encode(self, data: bytes) -> str:
        if self.settings.message_encoding == "base64":
            return base64.b64encode(data).decode("ascii")
        return data.decode("utf-8")

    def _decode(self, text: str) -> bytes:
        if self.settings.message_encoding == "base64":
            return base64.b64decode(text.encode("ascii"), validate=True)
        return text.encode("utf-8")

    # ---------------------------------------------------------------------------------------- invocation

    def _collect(self, fn: LoadedFunction, output: WorkerOutput) -> _Result:
        """Turn the worker's typed outputs into messages/response, as the host does (nothing is written yet)."""
        res = _Result()
        for b in fn.spec.outputs:
            data = output.return_value if b.name == "$return" else output.output_data.get(b.name)
            if data is None or data.WhichOneof("data") is None:
                continue
            if b.type == "http":
                res.http_response = self._http_response(b.name, data)
            elif b.type == "queue":
                conn, queue = self._out_targets[(fn.name, b.name)]
                for payload in self._queue_payloads(b.name, data):
                    res.queue_messages.append((conn, queue, self._encode(payload)))
        return res

    @staticmethod
    def _queue_payloads(name: str, data: Any) -> list[bytes]:
        """Typed data → queue message bodies: a JSON array is one message per element (the host's rule)."""
        kind = data.WhichOneof("data")
        if kind == "string":
            return [data.string.encode("utf-8")]
        if kind == "bytes":
            return [bytes(data.bytes)]
        if kind in ("int", "double"):
            return [str(getattr(data, kind)).encode("utf-8")]
        if kind == "json":
            value = json.loads(data.json)
            items = value if isinstance(value, list) else [value]
            return [(item if isinstance(item, str) else json.dumps(item)).encode("utf-8") for item in items]
        raise _OutputError(f"queue output {name!r}: the host cannot write typed data of kind {kind!r}")

    @staticmethod
    def _http_response(name: str, data: Any) -> func.HttpResponse:
        kind = data.WhichOneof("data")
        if kind == "string":
            return func.HttpResponse(data.string)
        if kind != "http":
            raise _OutputError(f"http output {name!r}: expected an http response, got typed data {kind!r}")
        http = data.http
        body_kind = http.body.WhichOneof("data")
        body: bytes = b""
        if body_kind == "bytes":
            body = bytes(http.body.bytes)
        elif body_kind in ("string", "json"):
            body = getattr(http.body, body_kind).encode("utf-8")
        headers = dict(http.headers)
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        mimetype, _, params = content_type.partition(";")
        charset = next((v.strip() for k, _, v in (p.partition("=") for p in params.split(";"))
                        if k.strip().lower() == "charset"), None)
        return func.HttpResponse(
            body,
            status_code=int(http.status_code or 200),
            headers=headers,
            mimetype=mimetype.strip() or None,
            charset=charset,
        )

    async def _call(self, fn: LoadedFunction, trigger: Any, metadata: Mapping[str, Any] | None = None) -> _Result:
        """One ``InvocationRequest`` to the real worker; raise :class:`~._worker.InvocationFailed` if it failed."""
        output = await get_worker().invoke(
            fn.function_id, fn.name, inputs={fn.spec.trigger.name: trigger}, trigger_metadata=metadata
        )
        return self._collect(fn, output)

    async def _write_outputs(self, res: _Result) -> None:
        for conn, queue, encoded in res.queue_messages:
            await self._io(self._ensure_queue, conn, queue)
            await self._io(self._queue(conn, queue).send_message, encoded)

    def _get(self, name: str, kind: str) -> LoadedFunction:
        fn = self.functions.get(name)
        if fn is None:
            raise KeyError(f"no function {name!r} loaded (have {sorted(self.functions)})")
        if fn.spec.trigger.type != kind:
            raise ValueError(f"function {name!r} is a {fn.spec.trigger.type}, not a {kind}")
        return fn

    # -------------------------------------------------------------------------------------------- timers

    async def fire_timer(self, name: str, *, past_due: bool = False) -> None:
        """Call a timer-triggered function once now (the schedule is not evaluated).

        Output bindings are written if it returns. If it raises, nothing is written and the exception is
        logged and re-raised (the real host logs it and waits for the next occurrence).
        """
        fn = self._get(name, "timerTrigger")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        schedule = {"AdjustForDST": True}
        status = {"Last": now, "Next": now, "LastUpdated": now}
        # The host sends the timer's TimerInfo as JSON typed data.
        payload = json.dumps({"Schedule": schedule, "ScheduleStatus": status, "IsPastDue": past_due})
        await self._invoke_simple(fn, get_worker().protos.TypedData(json=payload), "timer")

    async def _invoke_simple(self, fn: LoadedFunction, trigger: Any, what: str) -> _Result:
        stats = self.stats[fn.name]
        stats.invocations += 1
        started = time.monotonic()
        log.info("Executing %s (%s)", fn.name, what)
        try:
            res = await self._call(fn, trigger)
            await self._write_outputs(res)
        except Exception:
            stats.failures += 1
            stats.timed(started)
            log.exception("Executed %s (%s): failed after %.0f ms", fn.name, what, 1000 * (time.monotonic() - started))
            raise
        stats.successes += 1
        stats.timed(started)
        log.info("Executed %s (%s): succeeded in %.0f ms", fn.name, what, 1000 * (time.monotonic() - started))
        return res

    # ---------------------------------------------------------------------------------------------- http

    def _match_http(self, path: str) -> tuple[LoadedFunction, dict[str, str]] | None:
        path = path.split("?", 1)[0]
        if not path.startswith("/api/"):
            return None
        rest = path[len("/api/") :]
        for fn in self.functions.values():
            trigger = fn.spec.trigger
            if trigger.type != "httpTrigger":
                continue
            route = trigger.get("route") or fn.name
            m = _route_regex(route.strip("/")).match(rest.strip("/"))
            if m:
                return fn, {k: v for k, v in m.groupdict().items() if v is not None}
        return None

    async def call_http(
        self,
        name: str,
        method: str = "GET",
        url: str = "/api/status",
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        route_params: Mapping[str, str] | None = None,
    ) -> func.HttpResponse:
        """Call an HTTP-triggered function with a ``func.HttpRequest``; return its ``func.HttpResponse``.

        Query parameters in ``url`` are merged with ``params``. An exception in the function gives a 500
        response (as the host does); a function that sets no response gives 204.
        """
        fn = self._get(name, "httpTrigger")
        allowed = [m.upper() for m in (fn.spec.trigger.get("methods") or [])]
        if allowed and method.upper() not in allowed:
            return func.HttpResponse(status_code=405)
        split = urlsplit(url)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        query.update(params or {})
        full_url = url if split.scheme else f"http://localhost{url if url.startswith('/') else '/' + url}"
        if route_params is None:
            matched = self._match_http(split.path)
            route_params = matched[1] if matched and matched[0] is fn else {}
        protos = get_worker().protos
        # The host sends the request as RpcHttp typed data; with the worker's RawHttpBodyBytes capability the body
        # is bytes. `params` are the route parameters, `query` the query string.
        request = protos.TypedData(
            http=protos.RpcHttp(
                method=method.upper(),
                url=full_url,
                headers={k.lower(): v for k, v in (headers or {}).items()},
                query=query,
                params=dict(route_params),
                body=protos.TypedData(bytes=body),
            )
        )
        try:
            res = await self._invoke_simple(fn, request, f"{method.upper()} {split.path}")
        except Exception:
            return func.HttpResponse(status_code=500)
        return res.http_response or func.HttpResponse(status_code=204)

    def serve_http(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve ``/api/<route or function name>`` for the HTTP functions on a loopback port; return its URL.

        Call it from inside the event loop that owns this host (requests run on that loop); the server
        stops in :meth:`aclose`.
        """
        if self._http_server is not None:
            addr = self._http_server.server_address
            return f"http://{addr[0]!s}:{addr[1]}"
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        localhost = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                matched = localhost._match_http(self.path)
                if matched is None:
                    self.send_error(404, "no function for this path")
                    return
                fn, route = matched
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                coro = localhost.call_http(
                    fn.name,
                    self.command,
                    self.path,
                    headers=dict(self.headers.items()),
                    body=body,
                    route_params=route,
                )
                resp = asyncio.run_coroutine_threadsafe(coro, loop).result() if loop is not None else asyncio.run(coro)
                payload = resp.get_body() or b""
                self.send_response(resp.status_code)
                for key, value in resp.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding"):
                        self.send_header(key, value)
                if "content-type" not in {k.lower() for k, _ in resp.headers.items()}:
                    self.send_header("Content-Type", resp.mimetype or "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        self._http_server = ThreadingHTTPServer((host, port), Handler)
        self._http_server.daemon_threads = True
        self._http_thread = threading.Thread(target=self._http_server.serve_forever, name="localhost-http", daemon=True)
        self._http_thread.start()
        addr = self._http_server.server_address
        return f"http://{addr[0]!s}:{addr[1]}"

    # -------------------------------------------------------------------------------------------- queues

    async def _handle_message(self, fn: LoadedFunction, conn: str, queue: str, msg: Any) -> None:
        """One delivery: invoke, then delete / release / poison. Never raises (except cancellation)."""
        stats = self.stats[fn.name]
        qc = self._queue(conn, queue)
        s = self.settings
        receipt = {"pop": msg.pop_receipt}
        lock = asyncio.Lock()
        dequeue_count = int(msg.dequeue_count or 0)

        async def poison(reason: str) -> None:
            poison_queue = f"{queue}-poison"
            await self._io(self._ensure_queue, conn, poison_queue)
            await self._io(self._queue(conn, poison_queue).send_message, msg.content)
            async with lock:
                await self._io(qc.delete_message, msg.id, receipt["pop"])
            stats.poisoned += 1
            log.warning(
                "%s: message %s moved to %s (%s, dequeue_count=%d)",
                fn.name,
                msg.id,
                poison_queue,
                reason,
                dequeue_count,
            )

        finished = asyncio.Event()

        async def renew() -> None:
            """Keep the message hidden while main runs (the host renews its lease the same way)."""
            while True:
                try:
                    await asyncio.wait_for(finished.wait(), timeout=s.message_lease / 2)
                    return
                except TimeoutError:
                    pass
                async with lock:
                    try:
                        updated = await self._io(
                            qc.update_message, msg.id, receipt["pop"], visibility_timeout=max(1, int(s.message_lease))
                        )
                    except Exception as exc:
                        log.warning("%s: renewing the lease of message %s failed: %s", fn.name, msg.id, exc)
                        return
                    receipt["pop"] = updated.pop_receipt

        async def stop_renewing() -> None:
            finished.set()
            await asyncio.gather(renewer, return_exceptions=True)

        if dequeue_count > s.max_dequeue_count:  # e.g. a worker died mid-invocation on the last attempt
            await self._guard(fn, msg, poison("dequeue count already above maxDequeueCount"))
            return

        stats.invocations += 1
        started = time.monotonic()
        log.info("Executing %s (message %s, dequeue_count=%d)", fn.name, msg.id, dequeue_count)
        renewer = asyncio.create_task(renew())
        try:
            try:
                body = self._decode(msg.content or "")
            except ValueError as exc:  # binascii.Error, UnicodeDecodeError
                raise ValueError(f"message is not valid for messageEncoding={s.message_encoding}: {exc}") from exc
            trigger, metadata = self._queue_trigger_data(msg, body, dequeue_count)
            res = await self._call(fn, trigger, metadata)
            await self._write_outputs(res)
        except Exception as exc:
            await stop_renewing()
            stats.failures += 1
            stats.timed(started)
            elapsed = 1000 * (time.monotonic() - started)
            log.warning(
                "Executed %s (message %s, dequeue_count=%d): failed after %.0f ms: %s: %s",
                fn.name,
                msg.id,
                dequeue_count,
                elapsed,
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            if dequeue_count >= s.max_dequeue_count:
                await self._guard(fn, msg, poison(f"failed {dequeue_count} times"))
            else:
                await self._guard(fn, msg, self._release(qc, msg, receipt, lock))
            return
        finally:
            if not finished.is_set():
                await stop_renewing()
        stats.successes += 1
        stats.timed(started)
        log.info(
            "Executed %s (message %s, dequeue_count=%d): succeeded in %.0f ms",
            fn.name,
            msg.id,
            dequeue_count,
            1000 * (time.monotonic() - started),
        )

        async def delete() -> None:
            async with lock:
                await self._io(qc.delete_message, msg.id, receipt["pop"])

        await self._guard(fn, msg, delete())

    @staticmethod
    def _queue_trigger_data(msg: Any, body: bytes, dequeue_count: int) -> tuple[Any, dict[str, Any]]:
        """The queue message as the host sends it: the body as typed data, plus the trigger metadata."""
        p = get_worker().protos
        try:
            trigger = p.TypedData(string=body.decode("utf-8"))
        except UnicodeDecodeError:
            trigger = p.TypedData(bytes=body)

        def when(value: Any) -> Any:
            return p.TypedData(json=json.dumps(value.isoformat() if value is not None else None))

        metadata = {
            "Id": p.TypedData(string=str(msg.id)),
            "DequeueCount": p.TypedData(json=json.dumps(dequeue_count)),
            "InsertionTime": when(msg.inserted_on),
            "ExpirationTime": when(msg.expires_on),
            "NextVisibleTime": when(msg.next_visible_on),
            "PopReceipt": p.TypedData(string=str(msg.pop_receipt or "")),
            "QueueTrigger": trigger,
        }
        return trigger, metadata

    async def _release(self, qc: QueueClient, msg: Any, receipt: dict[str, str], lock: asyncio.Lock) -> None:
        """Make a failed message visible again after ``visibilityTimeout``.

        The Storage API takes whole seconds; for a fractional timeout (tests use 0.2 s) the runner keeps the
        message hidden for that long itself and then makes it visible at once.
        """
        vt = self.settings.visibility_timeout
        if vt != int(vt):
            await asyncio.sleep(vt)
            vt = 0
        async with lock:
            await self._io(qc.update_message, msg.id, receipt["pop"], visibility_timeout=int(vt))

    async def _guard(self, fn: LoadedFunction, msg: Any, op: Awaitable[None]) -> None:
        try:
            await op
        except ResourceNotFoundError:
            log.warning("%s: message %s was gone or its lease was lost (another worker may have it)", fn.name, msg.id)
        except Exception:
            log.exception("%s: storage operation on message %s failed", fn.name, msg.id)

    def _receive(self, conn: str, queue: str, count: int) -> list[Any]:
        qc = self._queue(conn, queue)
        pages = qc.receive_messages(
            messages_per_page=count, max_messages=count, visibility_timeout=int(self.settings.message_lease)
        )
        return list(pages)

    async def _listen(self, fn: LoadedFunction, stop: asyncio.Event) -> None:
        """Poll one function's queue until ``stop`` is set; then wait for its in-flight invocations."""
        conn, queue = self._trigger_queue[fn.name]
        s = self.settings
        await self._io(self._ensure_queue, conn, queue)
        in_flight: set[asyncio.Task[None]] = set()
        delay = s.min_polling_interval
        try:
            while not stop.is_set():
                free = min(32, s.batch_size - len(in_flight))
                if free <= 0:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await self._io(self._receive, conn, queue, free)
                except Exception as exc:
                    log.warning("%s: polling %s failed: %s", fn.name, queue, exc)
                    msgs = []
                for msg in msgs:
                    task = asyncio.create_task(self._tracked(self._handle_message(fn, conn, queue, msg)))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                if msgs:
                    delay = s.min_polling_interval
                    if len(in_flight) >= s.batch_size:
                        continue
                    wait = 0.0
                else:
                    wait = delay * random.uniform(0.8, 1.2)
                    delay = min(delay * 2, max(s.max_polling_interval, s.min_polling_interval))
                if wait > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=wait)
        finally:
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _tracked(self, coro: Awaitable[None]) -> None:
        self._in_flight += 1
        try:
            await coro
        finally:
            self._in_flight -= 1

    def _approximate_count(self, conn: str, queue: str) -> int:
        try:
            props = self._queue(conn, queue).get_queue_properties()
        except ResourceNotFoundError:
            return 0
        return int(props.approximate_message_count or 0)

    async def pending_messages(self) -> int:
        """Messages in all trigger queues, visible or not (Storage's approximate count)."""
        targets = sorted(set(self._trigger_queue.values()))
        counts = await asyncio.gather(*(self._io(self._approximate_count, c, q) for c, q in targets))
        return sum(counts)

    async def run(
        self,
        *,
        until: Callable[[], Awaitable[bool]] | None = None,
        timeout: float | None = None,
        idle_seconds: float | None = 1.0,
    ) -> RunReport:
        """Serve every queue-triggered function concurrently, then stop and return what happened.

        Stops when ``until()`` returns True, when every trigger queue has held no message (visible or
        invisible) and nothing ran here for ``idle_seconds`` (``None`` disables this), or after ``timeout``
        seconds. In-flight invocations finish before it returns.
        """
        before = {k: dataclasses.replace(v) for k, v in self.stats.items()}
        started = time.monotonic()
        stop = asyncio.Event()
        listeners = [
            asyncio.create_task(self._listen(fn, stop), name=f"listen-{fn.name}")
            for fn in self.functions.values()
            if fn.name in self._trigger_queue
        ]
        reason = "timeout"
        idle_since: float | None = None
        check_every = 0.1 if idle_seconds is None else max(0.02, min(0.25, idle_seconds / 4))
        try:
            while True:
                now = time.monotonic()
                if timeout is not None and now - started >= timeout:
                    reason = "timeout"
                    break
                if until is not None and await until():
                    reason = "until"
                    break
                if idle_seconds is not None and self._trigger_queue:
                    busy = self._in_flight > 0 or await self.pending_messages() > 0
                    if busy:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= idle_seconds:
                        reason = "idle"
                        break
                elif idle_seconds is not None and not self._trigger_queue and until is None:
                    reason = "idle"
                    break
                failed = [t for t in listeners if t.done() and t.exception() is not None]
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
                await asyncio.sleep(check_every)
        finally:
            stop.set()
            await asyncio.gather(*listeners, return_exceptions=True)
        report = RunReport(
            functions={k: v.minus(before.get(k, FunctionStats())) for k, v in self.stats.items()},
            stopped_because=reason,
            elapsed=time.monotonic() - started,
        )
        log.info(
            "run stopped (%s) after %.1fs: %d invocations, %d failed, %d poisoned",
            reason,
            report.elapsed,
            report.invocations,
            report.failures,
            report.poisoned,
        )
        return report

    # --------------------------------------------------------------------------------------------- close

    async def aclose(self) -> None:
        """Stop the HTTP server, release threads and clients, restore ``os.environ``."""
        if self._closed:
            return
        self._closed = True
        if self._http_server is not None:
            server = self._http_server
            await asyncio.get_running_loop().run_in_executor(None, server.shutdown)
            server.server_close()
            self._http_server = None
        self._io_pool.shutdown(wait=False, cancel_futures=True)
        for svc in self._services.values():
            svc.close()
        self._session.close()
        self._restore_env()

    async def __aenter__(self) -> LocalHost:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
