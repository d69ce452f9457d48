"""The shape of the house: the core imports without Ray or DeepSpeed, and no package has an
import cycle.

The first test imports every module of `spvit`, `search_spaces` and `nas` in a fresh
interpreter whose import system refuses `ray` and `deepspeed` (a meta-path finder that raises),
so a core module that imports them, at any depth and in any form (`import ray`,
`from ray.tune import ...`, through a third module), fails here; `launch.searcher`, which
defers Ray to the first use of its Tune classes, is checked on its own (no `ray` in
`sys.modules` after importing it). Another
test reads every module's imports with `ast` (module level and inside functions: a deferred
import is still a dependency) and fails on any cycle among the modules of the four packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("spvit", "search_spaces", "nas")
PACKAGES = CORE + ("launch",)


def _modules(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_every_core_module_imports_without_ray_or_deepspeed():
    modules = [m for p in CORE for m in _modules(p)]
    assert len(modules) > 20  # the discovery found the packages
    code = textwrap.dedent(f"""
        import importlib, sys

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray", "deepspeed"):
                    raise ImportError(f"the core must not import {{name}}")
                return None

        sys.meta_path.insert(0, Refuse())
        for name in {modules!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed"))
        assert not loaded, loaded
        print("imported", len({modules!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"imported {len(modules)}" in proc.stdout


def test_launch_searcher_imports_without_ray():
    """`launch.searcher` puts Ray Tune's base classes under its searcher only when
    `StudySearcher` / `TrialErrors` is first looked up; the lookup does import Ray."""
    code = textwrap.dedent("""
        import sys
        import launch.searcher
        assert "ray" not in sys.modules, sorted(m for m in sys.modules if m.startswith("ray"))
        launch.searcher.StudySearcher
        assert "ray" in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_refusing_finder_does_refuse():
    """The check above can fail: the same finder stops a module that imports Ray."""
    code = textwrap.dedent("""
        import sys

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray", "deepspeed"):
                    raise ImportError(name)
                return None

        sys.meta_path.insert(0, Refuse())
        try:
            from ray.tune import Tuner  # noqa: F401
        except ImportError:
            sys.exit(0)
        sys.exit(1)
    """)
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def _imports(module: str, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports (anywhere in its file)."""
    package_path = ROOT.joinpath(*module.split("."))
    is_package = (package_path / "__init__.py").is_file()
    path = package_path / "__init__.py" if is_package else package_path.with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` depends on the deepest known
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_among_the_packages_modules():
    known = {m for p in PACKAGES for m in _modules(p)}
    graph = {m: _imports(m, known) for m in known}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_detection_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    """launch -> nas -> search_spaces -> spvit: no module imports a package above its own."""
    order = {"spvit": 0, "search_spaces": 1, "nas": 2, "launch": 3}
    known = {m for p in PACKAGES for m in _modules(p)}
    for module in _modules(package):
        upward = sorted(m for m in _imports(module, known)
                        if order[m.split(".")[0]] > order[package])
        assert not upward, f"{module} imports {upward}"
