"""Drive the real Azure Functions Python worker (``azure-functions-runtime-v1``) in-process.

On Python 3.13+ Azure runs a v1 (function.json) app with the worker library ``azure-functions-runtime-v1``, which
the app pins in ``requirements.txt``. Azure's host talks to it over gRPC through a thin proxy that hands each
request to ``azure_functions_runtime_v1.handle_event``. This module plays that proxy's part: it builds the same
protobuf requests (``WorkerInitRequest``, ``FunctionLoadRequest``, ``InvocationRequest``) and calls the worker's
own handlers, so loading (signature validation), binding conversion (trigger → ``func.QueueMessage`` /
``func.TimerRequest`` / ``func.HttpRequest``, ``Out[...]`` / ``$return`` → typed data) and invocation run through
the very code and version that run the app in Azure. What needs the .NET host instead (turning typed data into
queue messages, visibility, poison) stays in :mod:`._host`.

The protobuf modules come from the worker wheel itself: it ships the generated ``FunctionRpc_pb2`` under its own
top-level ``tests/protos`` folder. That folder is loaded here by path under a private module name, so neither the
project's ``tests`` package nor the wheel's shadows the other.

The worker keeps its state in module globals (one worker per process, as in Azure), so one :class:`RealWorker`
is shared by every :class:`~._host.LocalHost` in a process (:func:`get_worker`).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import sys
import types
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azure_functions_runtime_v1 import handle_event, loader, start_threadpool_executor
from azure_functions_runtime_v1.version import VERSION as WORKER_VERSION

__all__ = [
    "WORKER_VERSION",
    "InvocationFailed",
    "RealWorker",
    "WorkerLoadError",
    "WorkerOutput",
    "get_worker",
    "rpc_protos",
]

_PROTOS_MODULE = "d365_tooling.localhost._rpc_protos"
_HOST_VERSION = "4.1040.0"  # the Functions host version we claim to be (only logged by the worker)


class WorkerLoadError(Exception):
    """The real worker refused to load a function; ``str(err)`` is the worker's own message."""


class InvocationFailed(Exception):
    """The function raised (or its result could not be converted); the worker's exception text is kept."""

    def __init__(self, function: str, exc_type: str, message: str, stack_trace: str) -> None:
        self.function = function
        self.exc_type = exc_type
        self.message = message
        self.stack_trace = stack_trace
        super().__init__(f"{exc_type}: {message}" if exc_type else message)


def _load_protos() -> types.ModuleType:
    """The worker wheel's generated protobuf messages, as one namespace (what Azure's proxy passes as ``protos``)."""
    if _PROTOS_MODULE in sys.modules and hasattr(sys.modules[_PROTOS_MODULE], "StreamingMessage"):
        return sys.modules[_PROTOS_MODULE]
    dist = importlib.metadata.distribution("azure-functions-runtime-v1")
    root = Path(str(dist.locate_file("tests/protos")))
    if not (root / "FunctionRpc_pb2.py").is_file():
        raise RuntimeError(f"azure-functions-runtime-v1 {WORKER_VERSION} does not ship tests/protos/FunctionRpc_pb2.py")
    spec = importlib.machinery.ModuleSpec(_PROTOS_MODULE, None, is_package=True)
    spec.submodule_search_locations = [str(root)]
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(root)]
    sys.modules[_PROTOS_MODULE] = package
    rpc = importlib.import_module(f"{_PROTOS_MODULE}.FunctionRpc_pb2")
    nullable = importlib.import_module(f"{_PROTOS_MODULE}.shared.NullableTypes_pb2")
    for module in (rpc, nullable):
        for name in dir(module):
            if not name.startswith("_"):
                setattr(package, name, getattr(module, name))
    return package


def rpc_protos() -> Any:
    """The protobuf namespace (``StreamingMessage``, ``TypedData``, ``BindingInfo``, …)."""
    return _load_protos()


@dataclass
class _WorkerRequest:
    """What Azure's proxy worker hands to ``handle_event``: the message plus request properties."""

    name: str
    request: Any
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerOutput:
    """An invocation's results as the worker converted them (typed data, as sent back to the host)."""

    output_data: dict[str, Any]  # binding name → protos.TypedData
    return_value: Any | None  # protos.TypedData or None


_DATA_TYPES = ("string", "binary", "stream")


class RealWorker:
    """The worker library, initialised once, with an app root on ``sys.path`` as the worker has in Azure."""

    def __init__(self) -> None:
        self.protos = rpc_protos()
        self._initialised = False

    async def init(self, app_root: Path) -> None:
        """``WorkerInitRequest``: the app root goes first on ``sys.path``; the worker loads its binding registry."""
        root = str(Path(app_root).resolve())
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
        # A later app root must win over an earlier one in the worker's `__app__` namespace package (tests load
        # several scratch apps in one process; in Azure there is only one).
        if root in loader._submodule_dirs:
            loader._submodule_dirs.remove(root)
        loader._submodule_dirs.insert(0, root)
        if self._initialised:
            return
        p = self.protos
        message = p.StreamingMessage(
            request_id=str(uuid.uuid4()),
            worker_init_request=p.WorkerInitRequest(
                host_version=_HOST_VERSION,
                function_app_directory=root,
                capabilities={},
            ),
        )
        response = await handle_event.worker_init_request(
            _WorkerRequest("worker_init_request", message, {"host": None, "protos": p})
        )
        if response.result.status != p.StatusResult.Success:
            raise RuntimeError(f"the worker refused to initialise: {response.result.exception.message}")
        start_threadpool_executor()
        self._initialised = True

    def _binding_info(self, raw: Mapping[str, Any]) -> Any:
        p = self.protos
        # The host sends the direction and dataType as written (validated there); `in` is a Python keyword.
        direction = p.BindingInfo.Direction.Value(str(raw.get("direction", "in")).lower())
        data_type_name = str(raw.get("dataType", "")).lower()
        data_type = p.BindingInfo.DataType.Value(data_type_name if data_type_name in _DATA_TYPES else "undefined")
        return p.BindingInfo(type=str(raw.get("type", "")), direction=direction, data_type=data_type)

    async def load(
        self, *, name: str, directory: Path, script_file: Path, entry_point: str, bindings: list[Mapping[str, Any]]
    ) -> str:
        """``FunctionLoadRequest``: import the script as ``__app__.<folder>`` and validate its signature.

        :returns: the function id to invoke it with.
        :raises WorkerLoadError: with the worker's own message when it refuses the function.
        """
        p = self.protos
        module = f"{loader._AZURE_NAMESPACE}.{Path(directory).name}"
        cached = sys.modules.get(module)
        if cached is not None and Path(getattr(cached, "__file__", "") or "").resolve() != Path(script_file).resolve():
            # Another app root's folder of the same name (tests): import this one afresh.
            for key in [k for k in sys.modules if k == module or k.startswith(module + ".")]:
                del sys.modules[key]
        importlib.invalidate_caches()
        function_id = str(uuid.uuid4())
        metadata = p.RpcFunctionMetadata(
            name=name,
            directory=str(directory),
            script_file=str(script_file),
            entry_point=entry_point,
            language="python",
            raw_bindings=[json.dumps(dict(b)) for b in bindings],
            bindings={str(b["name"]): self._binding_info(b) for b in bindings},
        )
        message = p.StreamingMessage(
            request_id=str(uuid.uuid4()),
            function_load_request=p.FunctionLoadRequest(function_id=function_id, metadata=metadata),
        )
        response = await handle_event.function_load_request(
            _WorkerRequest("function_load_request", message, {"host": None, "protos": p})
        )
        if response.result.status != p.StatusResult.Success:
            raise WorkerLoadError(response.result.exception.message)
        return function_id

    async def invoke(
        self,
        function_id: str,
        function_name: str,
        *,
        inputs: Mapping[str, Any],
        trigger_metadata: Mapping[str, Any] | None = None,
    ) -> WorkerOutput:
        """``InvocationRequest``: the worker converts the inputs, calls ``main`` and converts what it returned.

        :raises InvocationFailed: when the function raised or its outputs could not be converted.
        """
        p = self.protos
        invocation_id = str(uuid.uuid4())
        request = p.InvocationRequest(
            invocation_id=invocation_id,
            function_id=function_id,
            input_data=[p.ParameterBinding(name=k, data=v) for k, v in inputs.items()],
            trigger_metadata=dict(trigger_metadata or {}),
            trace_context=p.RpcTraceContext(trace_parent=f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"),
            retry_context=p.RetryContext(retry_count=0, max_retry_count=0),
        )
        message = p.StreamingMessage(request_id=str(uuid.uuid4()), invocation_request=request)
        response = await handle_event.invocation_request(
            _WorkerRequest("invocation_request", message, {"host": None, "protos": p})
        )
        if response.result.status != p.StatusResult.Success:
            exc = response.result.exception
            raise InvocationFailed(function_name, exc.type, exc.message, exc.stack_trace)
        return WorkerOutput(
            output_data={b.name: b.data for b in response.output_data},
            return_value=response.return_value if response.HasField("return_value") else None,
        )


_worker: RealWorker | None = None


def get_worker() -> RealWorker:
    """The process's worker (the worker library keeps global state, like the one process Azure runs)."""
    global _worker
    if _worker is None:
        _worker = RealWorker()
    return _worker
