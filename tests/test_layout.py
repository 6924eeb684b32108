"""The layout's promises, read from the source with `ast` (nothing is imported, so a lazy
import inside a function counts as much as one at the top of a file):

- `training` imports nothing from `service`: the model library knows nothing of HTTP;
- each room of `training` imports only the rooms below it (ROOMS): `analysis` is used by
  the command line, never by the library;
- the server (service/ outside service/clients/, service/benchmarks/ and the command line)
  imports nothing from the programs that talk to it from outside or measure it;
- of the server, only service.engine imports `training`: the one door into the model;
- no two modules import each other, directly or through others.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "service")
COMMAND_LINE = "service.cli"  # the `worldplan` command, over server, clients and training
DOOR = "service.engine"  # the server's one module that imports training
# The rooms of `training` and the rooms each may import (training.config and
# training.errors: any of them).
ROOMS = {
    "data": set(),
    "models": set(),
    "learning": {"data", "models"},
    "planning": {"models"},
    "analysis": {"data", "models", "learning", "planning"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that the file at `path` (module `name`) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, `level - 1` up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from a import b` imports the module a.b when there is one, else a name of a
            found.update(
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            )
    return {m for m in found if m in known and m != name}


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, name, known) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_the_project_and_its_lazy_imports():
    graph = import_graph(ROOT)
    assert {"service.app", "service.clients.client", "training.planning.planners"} <= set(graph)
    assert "service.openapi" in graph["service.app"]
    assert "service.app" in graph["service.clients.local"]  # imported inside a function


def test_training_imports_nothing_from_service():
    graph = import_graph(ROOT)
    offending = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("training")
        for target in targets
        if target.startswith("service")
    }
    assert not offending, sorted(offending)


def room(module: str) -> str | None:
    """The room of a training module (training.planning.planners -> planning), else None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "training" and len(parts) > 1 and parts[1] in ROOMS else None


def room_violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(module, import) pairs where a room imports a room it may not; the modules at the
    top of `training` (config, cli, errors) are outside every room."""
    return {
        (m, t)
        for m, targets in graph.items()
        if room(m) in ROOMS
        for t in targets
        if room(t) not in (None, room(m)) and room(t) not in ROOMS[room(m)]
    }


def test_every_training_module_lives_in_a_room():
    graph = import_graph(ROOT)
    loose = {m for m in graph if m.startswith("training.") and room(m) is None}
    assert loose <= {"training.config", "training.cli", "training.errors"}, sorted(loose)
    assert {room(m) for m in graph if room(m)} == set(ROOMS)


def test_each_room_imports_only_the_rooms_below_it():
    assert room_violations(import_graph(ROOT)) == set()


def test_the_room_rule_catches_the_library_importing_analysis():
    graph = {"training.learning.loop": {"training.analysis.plots", "training.models.vae"}}
    assert room_violations(graph) == {("training.learning.loop", "training.analysis.plots")}


def test_the_server_imports_nothing_from_its_clients_or_benchmarks():
    graph = import_graph(ROOT)
    server = server_modules(graph)
    assert {"service.app", "service.routes", "service.openapi"} <= set(server)
    outside = ("service.clients", "service.benchmarks")
    offending = {(m, t) for m in server for t in graph[m] if t.startswith(outside)}
    assert not offending, sorted(offending)


def server_modules(graph: dict[str, set[str]]) -> list[str]:
    return [
        m
        for m in graph
        if m.startswith("service")
        and not m.startswith(("service.clients", "service.benchmarks"))
        and m != COMMAND_LINE
    ]


def test_only_the_engine_imports_training():
    graph = import_graph(ROOT)
    server = server_modules(graph)
    assert {DOOR, "service.routes", "service.app", "service.batcher"} <= set(server)
    assert any(t.startswith("training") for t in graph[DOOR])
    offending = {(m, t) for m in server if m != DOOR for t in graph[m] if t.startswith("training")}
    assert not offending, sorted(offending)


def test_no_import_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_a_cycle_through_a_lazy_relative_import_is_found(tmp_path):
    """The checker itself: the circle app.py <-> openapi.py once had, on a package of three."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "app.py").write_text("from pkg.openapi import build\n")
    (pkg / "openapi.py").write_text("def document():\n    from .app import create\n")
    (pkg / "routes.py").write_text("from pkg import app\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.routes"] == {"pkg.app"}
    assert cycles(graph) == [["pkg.app", "pkg.openapi"]]
