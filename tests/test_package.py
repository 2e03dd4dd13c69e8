"""The package's shape: no import cycles, the shipped app never imports developer tooling or tests, every module
declares its public names in one ``__all__``, and no class grows past a readable size.

Imports are read from the source (every ``import`` statement, also those inside functions; ``if TYPE_CHECKING:``
blocks are skipped, as they never run).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import d365_migration
import d365_tooling

PACKAGE = Path(d365_migration.__file__).resolve().parent
TOOLING_PACKAGE = Path(d365_tooling.__file__).resolve().parent
ROOT = PACKAGE.parent
MAX_CLASS_LINES = 250


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """The app's and the tooling's modules (the tooling may import the app; the app never the tooling)."""
    return {module_name(p): p for root in (PACKAGE, TOOLING_PACKAGE) for p in sorted(root.rglob("*.py"))}


def is_tooling(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in ("d365_tooling", "tests"))


def shipped() -> dict[str, Path]:
    return {name: path for name, path in modules().items() if not is_tooling(name)}


def test_the_shipped_package_holds_no_tooling() -> None:
    """The deployable root is the app: sandbox, local host, demo, bench, soak and the fault harness live in
    d365_tooling, outside the package the function folders import."""
    names = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")}
    assert not names & {"sandbox", "localhost", "demo.py", "bench.py", "soak.py", "faults.py"}
    assert (TOOLING_PACKAGE / "sandbox").is_dir() and (TOOLING_PACKAGE / "localhost").is_dir()


def importable() -> list[str]:
    """The shipped modules that may be imported in a test (``__main__`` runs the CLI)."""
    return sorted(name for name in shipped() if not name.endswith("__main__"))


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(name: str, path: Path) -> set[str]:
    """Absolute names of the modules ``name`` imports (``from . import x`` counts as importing ``pkg.x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & set(modules())
            found.update(submodules)  # `from pkg import submodule` imports the submodule ...
            if len(submodules) < len(node.names):  # ... and the package only for names defined in it
                found.add(target)
    return found


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports_of(name, path) if m in known and m != name} for name, path in known.items()}


def test_the_package_has_no_import_cycles() -> None:
    graph = internal_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle() -> None:
    """The checker itself: the old cli ↔ demo cycle would have been reported."""
    graph = internal_graph()
    assert "d365_migration._ledger" in graph["d365_migration.steps._work"]
    assert "d365_migration.steps.detect" in graph["d365_migration.steps._service"]  # `from . import detect`
    assert "d365_migration.cli" not in graph["d365_tooling.demo"]


def test_the_shipped_app_imports_no_tooling_and_no_tests() -> None:
    offenders = {name: sorted(m for m in imports_of(name, path) if is_tooling(m))
                 for name, path in shipped().items()}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "d365_migration.steps.purchase" in shipped() and "d365_tooling.demo" not in shipped()


def test_the_tooling_depends_on_the_app_only_through_public_seams() -> None:
    """demo/bench/soak use the app's public functions, never the CLI's private ones."""
    for name in ("d365_tooling.demo", "d365_tooling.bench", "d365_tooling.soak"):
        tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("cli"):
                assert all(not a.name.startswith("_") for a in node.names), (name, [a.name for a in node.names])


@pytest.mark.parametrize("name", importable())
def test_every_shipped_module_declares_its_public_names_in_all(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__ list"
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ names what it does not define: {missing}"
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    public = {n for n in defined if not n.startswith("_")}
    assert public <= set(exported), f"{name} defines public names missing from __all__: {public - set(exported)}"


def test_the_package_root_re_exports_only_names_its_modules_declare() -> None:
    for name in d365_migration.__all__:
        value = getattr(d365_migration, name)
        home = importlib.import_module(getattr(value, "__module__", "") or "d365_migration")
        candidates = (home, *map(importlib.import_module, importable()))
        owner = next((m for m in candidates if name in getattr(m, "__all__", ())), None)
        assert owner is not None, f"d365_migration.{name} is in no module's __all__"


@pytest.mark.parametrize("name", sorted(shipped()))
def test_no_class_in_the_shipped_package_is_longer_than_it_can_be_read(name: str) -> None:
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
    sizes = {n.name: (n.end_lineno or n.lineno) - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    long = {cls: lines for cls, lines in sizes.items() if lines > MAX_CLASS_LINES}
    assert long == {}, f"{name}: classes longer than {MAX_CLASS_LINES} lines: {long}"
