"""The structure of the package: floors that import only downwards, no private names across modules,
short functions. Read from the source with ``ast``, function-level imports included."""
from __future__ import annotations

import ast
import pathlib

import pytest

import gpunn

PACKAGE = pathlib.Path(gpunn.__file__).parent

#: Bottom to top. A module may import modules of lower floors only (never its own floor, never higher).
FLOORS: list[set[str]] = [
    {"errors", "types", "version"},
    {"backend", "threads"},
    {"activations", "init", "io", "schedules", "callbacks", "distributed"},
    {"losses"},
    {"validation", "kernels", "cpukernels"},
    {"ops"},
    {"layers"},
    {"optim"},
    {"checkpoint"},
    {"training"},
    {"network"},
    {"datasets", "check", "bench", "plots"},
    {"recipes", "sklearn"},
    {"cli"},
    {"__init__"},
]
FLOOR = {name: k for k, names in enumerate(FLOORS) for name in names}


def gpunn_imports(tree: ast.Module, module: str) -> list[tuple[str, list[str], int]]:
    """(imported gpunn module, names taken from it, line) for every import in ``tree``, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1 and node.module is None:    # from . import a, b: modules, or names of __init__
                found += [(n if n in FLOOR else "__init__", [], node.lineno) for n in names]
            elif node.level == 1 or (node.level == 0 and (node.module or "").startswith("gpunn.")):
                target = node.module.removeprefix("gpunn.") if node.level == 0 else node.module
                found.append((target.split(".")[0], names, node.lineno))
            elif node.level == 0 and node.module == "gpunn":
                found += [(n, [], node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], [], node.lineno) for a in node.names
                      if a.name.startswith("gpunn.")]
    return found


def private_uses(tree: ast.Module) -> list[str]:
    """Private names of other gpunn modules used in ``tree``: ``from .m import _x`` or ``m._x``."""
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.level == 1 and node.module is None for alias in node.names}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("gpunn")):
            bad += [f"from {node.module} import {a.name}" for a in node.names if _private(a.name)]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in modules and _private(node.attr)):
            bad.append(f"{node.value.id}.{node.attr}")
    return bad


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(sources: dict[str, str]) -> list[str]:
    """Every import that goes up or sideways, and every private name taken from another module."""
    out = []
    for module, text in sources.items():
        if module not in FLOOR:
            out.append(f"{module}.py has no floor in FLOORS: place it")
            continue
        tree = ast.parse(text)
        for target, _, line in gpunn_imports(tree, module):
            if target not in FLOOR:
                out.append(f"{module}.py:{line} imports unknown module {target}")
            elif FLOOR[target] >= FLOOR[module]:
                out.append(f"{module}.py:{line} imports {target} (floor {FLOOR[target]} >= {FLOOR[module]})")
        out += [f"{module}.py uses {use}" for use in private_uses(tree)]
    return out


def package_sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(PACKAGE.glob("*.py"))}


def test_every_import_goes_down_and_no_private_name_crosses_a_module():
    assert violations(package_sources()) == []


@pytest.mark.parametrize("module,text,expected", [
    ("backend", "def f():\n    from .network import Sequential\n", "imports network"),   # upwards, in a function
    ("losses", "from . import activations, losses\n", "imports losses"),                  # itself
    ("layers", "from .activations import _private_helper\n", "uses from activations import _private_helper"),
    ("layers", "from . import activations\nx = activations._cap\n", "uses activations._cap"),
    ("newmodule", "", "has no floor"),
    ("ops", "import gpunn.optim\n", "imports optim"),
    ("cli", "from . import Sequential\n", "imports __init__"),      # a name of the package itself
])
def test_the_checker_catches_what_it_should(module, text, expected):
    found = violations({module: text})
    assert any(expected in v for v in found), found


MAX_LINES = 60


def test_no_function_is_longer_than_60_lines():
    long = []
    for module, text in package_sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{module}.py:{node.lineno} {node.name} has {n} lines")
    assert long == []
