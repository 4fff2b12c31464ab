"""The module map of DESIGN §6, checked on the source: every import (module-level or inside a function) of one
package module by another, read with `ast`, so an import hidden in a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import diffusers_dmin


PACKAGE = Path(diffusers_dmin.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported package module or third-party top-level name: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".")
                if not node.level:
                    base = node.module or ""
                # `from . import hub` imports the module `hub`; `from . import GradientIndex` imports the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target not in modules and "." in target and target.startswith("diffusers_dmin"):
                    target = target.rsplit(".", 1)[0]
                if not target.startswith("diffusers_dmin"):
                    target = target.split(".")[0]
                if target != name:
                    found.setdefault(target, node.lineno)
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles_and_no_import_of_the_package_root():
    modules = _modules()
    imports = _imports(modules)
    # `testing` (tiny offline pipelines for tests and examples) is a helper package whose modules share its __init__
    library = {m for m in modules if m != "diffusers_dmin" and not m.startswith("diffusers_dmin.testing")}
    graph = {m: {t for t in imports[m] if t in library} for m in library}
    assert _cycles(graph) == []
    assert {m: imports[m]["diffusers_dmin"] for m in library if "diffusers_dmin" in imports[m]} == {}


def test_layering_of_index_build_and_hub():
    imports = _imports(_modules())
    assert "diffusers_dmin.index" not in imports["diffusers_dmin.build"]  # build never imports the facade
    for lower in ("storage", "search", "folder", "hub", "training_data"):
        assert not {"diffusers_dmin.index", "diffusers_dmin.build"} & set(imports[f"diffusers_dmin.{lower}"]), lower
    users = sorted(m for m, found in imports.items() if "huggingface_hub" in found)
    assert users == ["diffusers_dmin.hub"]
