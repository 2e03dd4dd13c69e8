"""Load a v1 function folder (``function.json`` + script) and check it the way the Python worker does.

This mirrors the load-time checks of the Azure Functions Python worker for the v1 (function.json) model
(``azure_functions_worker/functions.py``, ``Registry.add_function``), using the binding converters that
``azure-functions`` registers. It is a stand-in for local use and CI, not the real worker: the real host can
still refuse things this accepts (for example extension-specific binding properties).
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import json
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azure.functions import meta

__all__ = ["Binding", "FunctionLoadError", "FunctionSpec", "check_function_folder", "load_function", "read_spec"]

#: Trigger binding types this runner can drive. Others load (if the worker would) but cannot be invoked here.
TRIGGER_TYPES = frozenset({"queueTrigger", "timerTrigger", "httpTrigger"})


class FunctionLoadError(Exception):
    """The function folder would not load in the Functions host/worker. ``str(err)`` says why."""

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


def _forget_foreign_modules(package: str, directory: Path) -> None:
    """Drop ``package`` (and submodules) from ``sys.modules`` if it was imported from another directory."""
    mod = sys.modules.get(package)
    if mod is None:
        return
    paths = [Path(p).resolve() for p in getattr(mod, "__path__", [])]
    if directory in paths:
        return
    for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
        del sys.modules[key]


def import_entry_point(spec: FunctionSpec) -> Callable[..., Any]:
    """Import the script as part of the package named after the folder, and return the entry point."""
    root = str(spec.directory.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    _forget_foreign_modules(spec.name, spec.directory)
    rel = spec.script_file.relative_to(spec.directory).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] if rel.name == "__init__" else list(rel.parts)
    modname = ".".join([spec.name, *parts])
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(modname)
    except Exception as exc:
        raise FunctionLoadError(f"importing {modname} failed: {type(exc).__name__}: {exc}", function=spec.name) from exc
    func = getattr(module, spec.entry_point, None)
    if func is None or not callable(func):
        raise FunctionLoadError(f"{modname} has no callable entry point {spec.entry_point!r}", function=spec.name)
    return typing.cast(Callable[..., Any], func)


def _is_out(anno: Any) -> bool:
    origin = typing.get_origin(anno)
    target = origin if origin is not None else anno
    return isinstance(target, type) and target.__name__ == "Out"


def _normalize(anno: Any) -> Any:
    """``list[str]`` → ``typing.List[str]`` (what the converters' typing_inspect understands)."""
    origin = typing.get_origin(anno)
    args = typing.get_args(anno)
    if origin in (list, collections.abc.Iterable, collections.abc.Sequence) and len(args) == 1:
        return typing.List[args[0]]  # type: ignore[valid-type]  # noqa: UP006
    return anno


def _generic_in(pytype: Any) -> bool:
    return isinstance(pytype, type) and issubclass(pytype, (str, bytes))


def _generic_out(pytype: Any) -> bool:
    return isinstance(pytype, type) and issubclass(pytype, (str, bytes, bytearray))


def _type_name(anno: Any) -> str:
    return getattr(anno, "__name__", None) or repr(anno)


@dataclass(frozen=True)
class Signature:
    """What the worker learns from the signature."""

    requires_context: bool
    is_async: bool
    has_return: bool
    pytypes: Mapping[str, Any]


def check_signature(spec: FunctionSpec, func: Callable[..., Any]) -> Signature:
    """Raise :class:`FunctionLoadError` where the Python worker would refuse to load the function."""
    name = spec.name

    def fail(msg: str) -> FunctionLoadError:
        return FunctionLoadError(msg, function=name)

    params = dict(inspect.signature(func).parameters)
    try:
        annotations = typing.get_type_hints(func)
    except Exception as exc:
        raise fail(f"cannot evaluate the annotations of {spec.entry_point}: {exc}") from None
    registry = meta.get_binding_registry()

    bound: dict[str, Binding] = {}
    has_return = False
    return_binding: Binding | None = None
    for b in spec.bindings:
        if b.direction == "inout":
            raise fail('"inout" bindings are not supported')
        if b.name == "$return":
            if b.direction != "out":
                raise fail('"$return" binding must have direction set to "out"')
            has_return = True
            return_binding = b
        else:
            bound[b.name] = b

    for p in params.values():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise fail(f"*args/**kwargs parameter {p.name!r} is not supported")

    requires_context = False
    if "context" in params and "context" not in bound:
        requires_context = True
        params.pop("context")
        ctx = annotations.get("context")
        if "context" in annotations and (not isinstance(ctx, type) or ctx.__name__ != "Context"):
            raise fail(f'the "context" parameter is expected to be of type azure.functions.Context, got {ctx!r}')

    extra_py = set(params) - set(bound)
    if extra_py:
        raise fail(f"the following parameters are declared in Python but not in function.json: {sorted(extra_py)!r}")
    extra_json = set(bound) - set(params)
    if extra_json:
        raise fail(f"the following parameters are declared in function.json but not in Python: {sorted(extra_json)!r}")

    pytypes: dict[str, Any] = {}
    for pname in params:
        desc = bound[pname]
        has_anno = pname in annotations
        anno = annotations.get(pname)
        is_param_out = has_anno and _is_out(anno)
        is_binding_out = desc.direction == "out"
        if is_param_out:
            args = typing.get_args(anno)
            if len(args) != 1:
                raise fail(f"binding {pname} has invalid Out annotation {anno!r}")
            pytype = _normalize(args[0])
        else:
            pytype = _normalize(anno)
        if has_anno and not isinstance(pytype, type) and typing.get_origin(pytype) is None:
            raise fail(f"binding {pname} has invalid non-type annotation {anno!r}")
        if is_binding_out and has_anno and not is_param_out:
            raise fail(
                f'binding {pname} is declared to have the "out" direction, but its annotation in Python is not '
                "a subclass of azure.functions.Out"
            )
        if not is_binding_out and is_param_out:
            raise fail(
                f'binding {pname} is declared to have the "in" direction in function.json, but its annotation is '
                "azure.functions.Out in Python"
            )
        if has_anno:
            generic = isinstance(pytype, type) and pytype in (str, bytes)
            converter = None if generic else registry.get(desc.type)
            try:
                if converter is None:
                    ok = _generic_out(pytype) if is_param_out else _generic_in(pytype)
                elif is_param_out:
                    ok = bool(converter.check_output_type_annotation(pytype))
                else:
                    ok = bool(converter.check_input_type_annotation(pytype))
            except TypeError:  # issubclass() on a non-class annotation
                ok = False
            if not ok:
                raise fail(
                    f'type of {pname} binding in function.json "{desc.type}" does not match its Python annotation '
                    f'"{_type_name(pytype)}"'
                )
        pytypes[pname] = pytype if has_anno else None

    if return_binding is not None and "return" in annotations:
        ranno = annotations["return"]
        if _is_out(ranno):
            raise fail("return annotation should not be azure.functions.Out")
        rtype = _normalize(ranno)
        if not isinstance(rtype, type) and typing.get_origin(rtype) is None:
            raise fail(f"has invalid non-type return annotation {ranno!r}")
        converter = None if rtype in (str, bytes) else registry.get(return_binding.type)
        try:
            ok = _generic_out(rtype) if converter is None else bool(converter.check_output_type_annotation(rtype))
        except TypeError:
            ok = False
        if not ok:
            raise fail(
                f'Python return annotation "{_type_name(rtype)}" does not match binding type "{return_binding.type}"'
            )

    return Signature(
        requires_context=requires_context,
        is_async=inspect.iscoroutinefunction(func),
        has_return=has_return,
        pytypes=pytypes,
    )


@dataclass(frozen=True)
class LoadedFunction:
    spec: FunctionSpec
    func: Callable[..., Any]
    signature: Signature

    @property
    def name(self) -> str:
        return self.spec.name


def load_function(path: Path) -> LoadedFunction:
    """Parse, import and check one function folder."""
    spec = read_spec(path)
    func = import_entry_point(spec)
    return LoadedFunction(spec=spec, func=func, signature=check_signature(spec, func))


def check_function_folder(path: Path | str) -> None:
    """Raise :class:`FunctionLoadError` if the Python v1 worker would refuse to load this function folder.

    Checks ``function.json`` (bindings, exactly one trigger, ``scriptFile``/``entryPoint``), imports the script
    as the package named after the folder (the folder's parent goes on ``sys.path``, as the app root is in the
    real worker), and checks the entry point's signature against the bindings: every parameter is a binding and
    vice versa (except an undeclared ``context``); ``out`` bindings are annotated ``func.Out[...]`` and ``in``
    bindings are not; annotations match the binding type (``func.QueueMessage`` for ``queueTrigger``,
    ``func.TimerRequest`` for ``timerTrigger``, ``func.HttpRequest`` for ``httpTrigger``, or ``str``/``bytes``);
    ``$return`` has direction ``out``. Sync and async entry points are both fine.
    """
    load_function(Path(path))
