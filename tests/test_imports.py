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


# ------------------------------------------------------------------ tests/ mirrors the package (issue 17)
#: Subpackages whose modules are the internal layout of one public function: their tests are the
#: package's (``pib_bayes.driver`` is ``sample``; see its docstring), not one file per module.
LAYOUT_PACKAGES = {"driver"}


def public_modules(root: Path = PKG) -> list[str]:
    """Dotted names below pib_bayes of the public modules and subpackages: no part starts with ``_``
    (``__init__`` stands for its package), ``__main__`` is not a module to test."""
    out = []
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p.startswith("_") for p in parts):
            continue
        if parts[0] in LAYOUT_PACKAGES and len(parts) > 1:
            continue
        out.append(".".join(parts))
    return out


def missing_test_files(modules: list[str], tests: set[str]) -> list[str]:
    """Each public module ``a.b`` needs tests/test_a_b.py; a subpackage ``a`` needs tests/test_a.py or
    at least one tests/test_a_*.py."""
    missing = []
    for m in modules:
        stem = "test_" + m.replace(".", "_")
        if f"{stem}.py" in tests:
            continue
        is_package = (PKG / m.replace(".", "/") / "__init__.py").is_file()
        if is_package and any(t.startswith(stem + "_") for t in tests):
            continue
        missing.append(f"pib_bayes.{m} -> tests/{stem}.py")
    return missing


def test_every_public_module_has_its_test_file():
    tests = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    modules = public_modules()
    expected = {"energy", "posterior", "config", "samplers", "samplers.kernels", "iiw.fisher", "driver"}
    assert expected <= set(modules) and not any(m.startswith("driver.") for m in modules)
    assert missing_test_files(modules, tests) == []


def test_the_mirror_check_finds_a_module_without_tests():
    # the would-catch twin: a new module (or a removed test file) is reported
    tests = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    found = missing_test_files([*public_modules(), "newthing"], tests)
    assert found == ["pib_bayes.newthing -> tests/test_newthing.py"]
    assert missing_test_files(["iiw.result"], tests - {"test_iiw_result.py"}) == [
        "pib_bayes.iiw.result -> tests/test_iiw_result.py"]
