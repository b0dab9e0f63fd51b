"""The package's import graph (issue 17): no module-level import cycle, and the version in a leaf module.

The graph has an edge M -> N for every import of a pib_bayes module N executed when M is imported
(module level, including ``try``/``if`` blocks; imports inside functions are deferred to the call and
``if TYPE_CHECKING:`` blocks never run, so neither counts).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pib_bayes"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _module_level(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _module_level(block)


def import_graph() -> dict[str, set[str]]:
    """Module name -> the pib_bayes modules its module-level code imports."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in _module_level(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in mods)
                continue
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target not in mods:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            edges.update(subs)
            if len(subs) < len(node.names):  # names defined in the module itself
                edges.add(target)
        edges.discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    # the would-catch twin: the edge driver -> pib_bayes (``from . import __version__``) that the
    # package facade closes (pib_bayes -> driver) is a cycle
    graph = import_graph()
    assert "pib_bayes.driver" in graph["pib_bayes"]
    graph["pib_bayes.driver"] = graph["pib_bayes.driver"] | {"pib_bayes"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "pib_bayes" in cycle


def test_version_is_a_leaf_module():
    import pib_bayes
    from pib_bayes import _version

    assert import_graph()["pib_bayes._version"] == set()
    assert pib_bayes.__version__ == _version.__version__
    toml = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{_version.__version__}"' in toml


@pytest.mark.parametrize("module", ["pib_bayes.diagnostics", "pib_bayes.posterior", "pib_bayes.driver"])
def test_each_module_imports_first_in_a_fresh_process(module):
    # a cycle that the package import order hides shows up when a submodule is imported first
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
