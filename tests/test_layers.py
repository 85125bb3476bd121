"""The house's layering, checked from the source: every import of the project's own modules (top-level and inside
functions alike), parsed with `ast`, goes down the layer order below or stays inside its own package, and the
module graph has no cycle. The order is written once, here; docs/architecture.md draws the same picture."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom first. Packages on one line are siblings: neither may import the other.
LAYERS = [
    ("amp_kernels",),
    ("amp.common",),
    ("amp.arch",),
    ("amp.runtime",),
    ("amp.io",),
    ("amp.prune",),
    ("amp.quality", "amp.recover", "amp.export"),
    ("amp.api",),
    ("amp.cli", "amp"),
]
RANK = {package: rank for rank, line in enumerate(LAYERS) for package in line}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*(ROOT / "amp").rglob("*.py"), *(ROOT / "amp_kernels").rglob("*.py")]
    # amp/resources holds data the engine writes out (configuration_decilm.py goes beside DeciLM exports), not code;
    # amp/export/vllm_plugin is a package of its own, installed into vLLM's environment (it imports vLLM only)
    return {_module_name(p): p for p in files if "__pycache__" not in p.parts and "resources" not in p.parts
            and "vllm_plugin" not in p.parts}


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The project modules an ImportFrom names (a `from pkg import mod` names the submodule when there is one)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [f"{target}.{alias.name}" for alias in node.names]
    return [n if n in MODULES else target for n in names]


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, path.name == "__init__.py", node))
    return {_owner_module(name) for name in found if _owner_module(name)} - {module}


def _owner_module(name: str) -> str | None:
    """The longest project module that `name` is or lies inside (None for outside packages)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def package_of(module: str) -> str:
    """The layer package a module belongs to: its longest prefix named in LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no layer of LAYERS: add its package to the order")


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        package_of(module)


def test_no_import_goes_up_or_sideways():
    wrong = []
    for module, targets in GRAPH.items():
        mine = package_of(module)
        for target in targets:
            theirs = package_of(target)
            if theirs == mine:
                continue
            if RANK[theirs] >= RANK[mine]:
                wrong.append(f"{module} imports {target} ({theirs} is not below {mine})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str):
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation(tmp_path):
    """The parser resolves relative imports and imports inside functions (what the checks above rely on)."""
    source = "from ..io import models\n\ndef f():\n    from ..api import prune_\n"
    node_list = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert _resolve("amp.prune.passes", False, node_list[0]) == ["amp.io.models"]
    assert _owner_module(_resolve("amp.prune.passes", False, node_list[1])[0]) == "amp.api"
    assert RANK[package_of("amp.api")] > RANK[package_of("amp.prune.passes")]
