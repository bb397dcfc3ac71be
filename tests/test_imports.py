"""Imports run one way: the package's module graph (module-level and in-function imports) has no
cycle, and no module imports another module's private (``_name``) attribute."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from conftest import ROOT


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """``{module: modules it imports}`` inside ``package`` under ``root``, and the private names imported."""
    modules = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for mod, (path, is_pkg) in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target != package and not target.startswith(package + "."):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges[mod].add(sub if sub in modules else target)
                    if alias.name.startswith("_") and sub not in modules:
                        private.append((mod, f"{target}.{alias.name}"))
            elif isinstance(node, ast.Import):
                edges[mod].update(a.name for a in node.names if a.name in modules)
        edges[mod].discard(mod)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge's cycle found by depth-first search (empty: the graph is one-way)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_the_checker_finds_a_cycle_and_a_private_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import _hidden\n")
    edges, private = import_graph(tmp_path, "pkg")
    assert edges["pkg.a"] == {"pkg.sub.b"} and edges["pkg.sub.b"] == {"pkg.a"}
    assert cycles(edges) == [["pkg.a", "pkg.sub.b", "pkg.a"]]
    assert private == [("pkg.sub.b", "pkg.a._hidden")]


def test_vision_attn_imports_run_one_way_without_private_names():
    edges, private = import_graph(ROOT, "vision_attn")
    assert len(edges) > 40 and "vision_attn.attention.registry" in edges["vision_attn.attention.lsh"]
    assert cycles(edges) == []
    assert private == []


def test_every_package_directory_is_installed():
    """pyproject's setuptools ``packages`` lists every directory with an ``__init__.py`` (a missing one is
    left out of a wheel and of a non-editable install)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
             for top in ("vision_attn", "data") for p in (ROOT / top).rglob("__init__.py")}
    assert found == listed
