"""The package's layering, read from its source (every import, module-level or inside a function).

docs/architecture.md draws these rules; this test keeps them: no import circles, nothing depends on a command-line
module, the model depends on no pipeline, and the data modules stay free of JAX (grain's workers import them).
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "wings_jax")


def _modules() -> dict[str, str]:
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = "wings_jax." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """Every name ``module`` imports at run time (``if TYPE_CHECKING:`` blocks left out): package modules
    resolved to their dotted names, others as written."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    tree = ast.parse(open(path, encoding="utf-8").read())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for stmt in block.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return names


GRAPH = {m: {n for n in _imports(m) if n in MODULES and n != m} for m in MODULES}


def test_the_package_has_no_import_circles():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(GRAPH[module]):
            assert state.get(dep) != "open", " -> ".join(path[path.index(dep):] + [module, dep]) if dep in path \
                else f"{module} -> {dep} closes an import circle"
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [])


COMMAND_LINES = ("wings_jax.train", "wings_jax.generate", "wings_jax.evaluate", "wings_jax.lm_eval",
                 "wings_jax.lmms_eval", "wings_jax.convert.__main__")


def test_nothing_depends_on_a_command_line_module():
    assert {m: sorted(deps & set(COMMAND_LINES)) for m, deps in GRAPH.items() if deps & set(COMMAND_LINES)} == {}


@pytest.mark.parametrize("layer, allowed", [
    ("wings_jax.model", ("wings_jax.model", "wings_jax.sharding", "wings_jax.params")),
    ("wings_jax.data", ("wings_jax.data", "wings_jax.model.inputs")),
])
def test_a_layer_imports_only_what_it_stands_on(layer, allowed):
    stray = {m: sorted(d for d in deps if not d.startswith(allowed) and d != "wings_jax.model")
             for m, deps in GRAPH.items() if m == layer or m.startswith(layer + ".")}
    assert {m: d for m, d in stray.items() if d} == {}


def test_the_data_modules_do_not_import_jax():
    uses = {m: sorted(n for n in _imports(m) if n.split(".")[0] in ("jax", "flax", "orbax"))
            for m in MODULES if m.startswith("wings_jax.data")}
    assert {m: n for m, n in uses.items() if n} == {}
