"""Load a v1 function folder (``function.json`` + script): the host's checks here, the worker's by the worker.

Two programs check a function folder in Azure, and the local runner runs each rule where it comes from:

* **The .NET Functions host** reads ``function.json`` before any Python runs. Its rules, re-implemented here
  (:func:`read_spec`, :func:`check_host_rules`) because the host cannot be installed offline: valid JSON with a
  non-empty ``bindings`` array; each binding has ``type``, ``direction`` (in/out/inout) and a unique ``name``;
  exactly one trigger, with direction ``in``; ``scriptFile`` is a ``.py`` file inside the folder; the required
  properties of the bindings the app uses (``queueName`` on queue bindings, ``schedule`` on timers).
  ``connection`` is optional: the host then uses ``AzureWebJobsStorage``. ``%NAME%`` references are resolved from
  the app settings by :class:`~._host.LocalHost` when it opens.
* **The Python worker** (``azure-functions-runtime-v1``, pinned in ``requirements.txt``: the same library and
  version Azure runs for Python 3.13) imports the script as ``__app__.<folder>`` and validates the entry point's
  signature against the bindings (``Registry.add_function``): parameters ↔ bindings, ``func.Out[...]`` exactly on
  out bindings, annotations accepted by each binding's converter, ``$return``, ``context``. Nothing of that is
  re-implemented here: :func:`load_function` sends the worker its own ``FunctionLoadRequest``
  (:mod:`._worker`), and a refusal comes back as :class:`FunctionLoadError` with the worker's own message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._worker import WorkerLoadError, get_worker

__all__ = [
    "Binding",
    "FunctionLoadError",
    "FunctionSpec",
    "LoadedFunction",
    "check_function_folder",
    "check_host_rules",
    "load_function",
    "read_spec",
]

#: Trigger binding types this runner can drive. Others load (if the worker would) but cannot be invoked here.
TRIGGER_TYPES = frozenset({"queueTrigger", "timerTrigger", "httpTrigger"})


class FunctionLoadError(Exception):
    """The function folder would not load in the Functions host or the Python worker. ``str(err)`` says why.

    When the worker refused it, ``str(err)`` is the worker's own message (it starts "FunctionLoadError: cannot
    load the <name> function: ...").
    """

    def __init__(self, message: str, *, function: str | None = None) -> None:
        self.function = function
        self.message = message
        super().__init__(f"cannot load the {function} function: {message}" if function else message)


@dataclass(frozen=True)
class Binding:
    """One entry of ``function.json`` ``bindings`` (values as written, ``%NAME%`` not yet resolved)."""

    name: str
    type: str
    direction: str
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_trigger(self) -> bool:
        return self.type.endswith("Trigger")

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


@dataclass(frozen=True)
class FunctionSpec:
    """A parsed ``function.json``."""

    name: str
    directory: Path
    script_file: Path
    entry_point: str
    bindings: tuple[Binding, ...]
    disabled: bool = False

    @property
    def trigger(self) -> Binding:
        for binding in self.bindings:
            if binding.is_trigger:
                return binding
        raise FunctionLoadError("no trigger binding in function.json", function=self.name)

    @property
    def outputs(self) -> tuple[Binding, ...]:
        return tuple(b for b in self.bindings if b.direction == "out")


def read_spec(path: Path) -> FunctionSpec:
    """Parse ``path/function.json``; raise :class:`FunctionLoadError` if it is malformed."""
    path = Path(path).resolve()
    name = path.name
    fj = path / "function.json"
    if not fj.is_file():
        raise FunctionLoadError(f"{fj} does not exist", function=name)
    try:
        doc = json.loads(fj.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FunctionLoadError(f"function.json is not valid JSON: {exc}", function=name) from None
    if not isinstance(doc, dict):
        raise FunctionLoadError("function.json must be a JSON object", function=name)
    raw_bindings = doc.get("bindings")
    if not isinstance(raw_bindings, list) or not raw_bindings:
        raise FunctionLoadError('function.json needs a non-empty "bindings" array', function=name)
    bindings: list[Binding] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_bindings):
        if not isinstance(raw, dict):
            raise FunctionLoadError(f"bindings[{i}] is not an object", function=name)
        missing = [k for k in ("type", "direction", "name") if not isinstance(raw.get(k), str) or not raw.get(k)]
        if missing:
            raise FunctionLoadError(f"bindings[{i}] lacks {', '.join(missing)}", function=name)
        direction = raw["direction"].lower()
        if direction not in ("in", "out", "inout"):
            raise FunctionLoadError(f"bindings[{i}] has unknown direction {raw['direction']!r}", function=name)
        if raw["name"] in seen:
            raise FunctionLoadError(f"binding name {raw['name']!r} is used twice", function=name)
        seen.add(raw["name"])
        bindings.append(Binding(name=raw["name"], type=raw["type"], direction=direction, raw=dict(raw)))
    triggers = [b for b in bindings if b.is_trigger]
    if len(triggers) != 1:
        raise FunctionLoadError(
            f"a function needs exactly one trigger binding, found {len(triggers)}"
            + (f" ({', '.join(b.name for b in triggers)})" if triggers else ""),
            function=name,
        )
    if triggers[0].direction != "in":
        raise FunctionLoadError(f'trigger binding {triggers[0].name!r} must have direction "in"', function=name)
    script = doc.get("scriptFile", "__init__.py")
    entry = doc.get("entryPoint", "main")
    if not isinstance(script, str) or not isinstance(entry, str) or not entry.isidentifier():
        raise FunctionLoadError("scriptFile/entryPoint must be strings (entryPoint an identifier)", function=name)
    script_path = (path / script).resolve()
    if not script_path.is_file():
        raise FunctionLoadError(f"scriptFile {script!r} does not exist in {path}", function=name)
    if script_path.suffix != ".py" or path not in script_path.parents:
        raise FunctionLoadError(f"scriptFile {script!r} must be a .py file inside the folder", function=name)
    return FunctionSpec(
        name=name,
        directory=path,
        script_file=script_path,
        entry_point=entry,
        bindings=tuple(bindings),
        disabled=bool(doc.get("disabled", False)),
    )


#: Binding properties the .NET host requires for the binding types this app uses (host rule, not worker rule).
REQUIRED_PROPERTIES: Mapping[str, tuple[str, ...]] = {
    "queueTrigger": ("queueName",),
    "queue": ("queueName",),
    "timerTrigger": ("schedule",),
}


def check_host_rules(spec: FunctionSpec) -> None:
    """The .NET host's per-binding rules that the worker does not check (required properties).

    :raises FunctionLoadError: naming the binding and the missing property.
    """
    for binding in spec.bindings:
        for prop in REQUIRED_PROPERTIES.get(binding.type, ()):
            value = binding.get(prop)
            if not isinstance(value, str) or not value.strip():
                raise FunctionLoadError(
                    f"binding {binding.name!r} ({binding.type}) needs a {prop!r} property", function=spec.name
                )


def _run_worker_call[T](make: Coroutine[Any, Any, T]) -> T:
    """Run one of the worker's (async) handlers to completion from sync code, inside or outside an event loop.

    The handlers for init and load never wait on I/O; a private loop on a helper thread keeps this callable from
    a constructor that runs inside a test's event loop.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-load") as pool:
        return pool.submit(asyncio.run, make).result()


@dataclass(frozen=True)
class LoadedFunction:
    """A function folder the real worker accepted: its parsed spec and the worker's function id."""

    spec: FunctionSpec
    function_id: str

    @property
    def name(self) -> str:
        return self.spec.name


async def _load_in_worker(spec: FunctionSpec) -> str:
    worker = get_worker()
    await worker.init(spec.directory.parent)
    try:
        return await worker.load(
            name=spec.name,
            directory=spec.directory,
            script_file=spec.script_file,
            entry_point=spec.entry_point,
            bindings=[dict(b.raw) for b in spec.bindings],
        )
    except WorkerLoadError as exc:
        raise FunctionLoadError(str(exc), function=None) from None


def load_function(path: Path) -> LoadedFunction:
    """Parse and check ``function.json`` (host rules), then load the folder in the real worker (worker rules).

    :raises FunctionLoadError: for a broken ``function.json``, a host rule, or the worker's refusal.
    """
    spec = read_spec(path)
    check_host_rules(spec)
    return LoadedFunction(spec=spec, function_id=_run_worker_call(_load_in_worker(spec)))


def check_function_folder(path: Path | str) -> None:
    """Raise :class:`FunctionLoadError` if Azure would refuse to load this function folder.

    Runs the host's ``function.json`` rules (:func:`read_spec`, :func:`check_host_rules`), then asks the real
    Python worker to load the folder with the app root (the folder's parent) on ``sys.path``, as in Azure.
    """
    load_function(Path(path))
