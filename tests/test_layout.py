"""The package layout reads as the architecture: imports point one way, no circles, no Prefect in
comat_core, every module importable alone.

Layers, from the bottom up (``LAYERS``); a module imports modules of its own layer and of the layers
below it, never above:

    comat_core (the package itself: its version), comat_core.errors
    < comat_core.store
    < comat_core.config, comat_core.runtime, comat_core.progress   (config refuses credentials in storage
                                                                    options with store.credentials; models
                                                                    and the method read the config)
    < comat_core.models < comat_core.text < comat_core.method       (text: the prompt library the method's
                                                                    token alignment and the stages use)
    < comat_core.worlds                                             (built from models and the method's losses)
    < comat_core.stages
    < comat_core.preflight, comat_core.export                       (checks and exports over the stages)
    < tasks < flows                                                 (flows.cli, the comat command, on top)

Every import counts: at module level, inside functions, and under ``if TYPE_CHECKING:`` (an
annotation-only import still ties two modules together). Circles are checked between modules of
comat_core, tasks and flows; a package's ``__init__`` is not an edge of its own for its submodules.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "comat_core"
PROJECT = ("comat_core", "tasks", "flows")
OPTIONAL = {"comat_core.stages.masks.gsam"}  # needs the gsam extra (segment_anything)

LAYERS = [
    ("comat_core", "comat_core.errors"),
    ("comat_core.store",),
    ("comat_core.config", "comat_core.runtime", "comat_core.progress"),
    ("comat_core.models",),
    ("comat_core.text",),  # the text library (lexicons, parsers, token alignment), arriving from another branch
    ("comat_core.method",),
    ("comat_core.worlds",),
    ("comat_core.stages",),
    ("comat_core.preflight", "comat_core.export"),
    ("tasks",),
    ("flows",),
]

# Upward edges being removed on another branch; delete each entry when its edge is gone (the test says when).
KNOWN_PENDING: set[tuple[str, str]] = set()  # an upward edge allowed by name while it is being removed


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
ALL_MODULES = {module_name(p): p for top in PROJECT for p in sorted((ROOT / top).rglob("*.py"))}


def imports_of(module: str, path: Path) -> set[str]:
    """Project modules this module imports: every ``import`` and ``from … import`` anywhere in the file
    (module level, functions, ``TYPE_CHECKING`` blocks); a name that is no module counts as its package."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = module.split(".")[: len(module.split(".")) - (path.name != "__init__.py") - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in ALL_MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports; a package's ``__init__`` runs before any of its
    submodules, so importing it from inside is not an edge of its own."""
    return {m: {i for i in imports_of(m, p) if not m.startswith(i + ".")} for m, p in ALL_MODULES.items()}


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of the entry naming the module or its package (``comat_core`` names only the package itself)."""
    for index, entries in enumerate(LAYERS):
        if any(module == e or (module.startswith(e + ".") and e != "comat_core") for e in entries):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py's LAYERS: place it there")


def upward_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, i) for m, imported in graph.items() for i in imported if layer_of(i) > layer_of(m)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_has_a_layer():
    for module in ALL_MODULES:
        layer_of(module)


def test_imports_point_down_the_layers():
    upward = upward_edges(import_graph())
    assert sorted(upward - KNOWN_PENDING) == []
    assert sorted(KNOWN_PENDING - upward) == [], "these edges are gone: delete them from KNOWN_PENDING"


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_type_checking_and_function_imports_count(tmp_path):
    """The scan sees an annotation-only import and one inside a function, and flags an upward one."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from comat_core.stages.registry import StageResult\n"
                      "def f():\n    from flows import cli\n")
    assert imports_of("comat_core.store.probe", source) == {"comat_core.stages.registry", "flows.cli"}
    assert upward_edges({"comat_core.store.probe": {"comat_core.stages.registry", "comat_core.errors"}}) == {
        ("comat_core.store.probe", "comat_core.stages.registry")}


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_prefect_inside_comat_core():
    offenders = [m for m, p in MODULES.items() if "prefect" in {n.split(".")[0] for n in _all_imports(p)}]
    assert offenders == []


def _all_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_the_cached_path_imports_no_prefect():
    """What a fully cached ``comat run`` imports (the CLI, its logging, the cache check, the closing rows)
    leaves Prefect unimported, so a run with nothing to compute starts no Prefect server."""
    code = ("import sys, flows.cli, flows.cached, tasks.logs, tasks.rows, tasks.summary; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_every_module_imports_alone():
    """Each module in a fresh interpreter: an import that only works after another module was imported fails here."""
    names = [m for m in MODULES if m not in OPTIONAL]
    script = ("import importlib, subprocess, sys\n"
              "bad = []\n"
              "for m in sys.argv[1:]:\n"
              "    r = subprocess.run([sys.executable, '-c', f'import {m}'], capture_output=True, text=True)\n"
              "    if r.returncode: bad.append(m + ': ' + (r.stderr.strip().splitlines() or ['?'])[-1])\n"
              "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("folder", ["store", "models", "method", "stages", "worlds"])
def test_each_folder_says_what_it_is_for(folder):
    doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text(encoding="utf-8")))
    assert doc and len(doc.splitlines()[0]) > 20
