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
    {"errors", "types", "version", "numbacache"},
    {"backend", "scalars", "registry", "admission", "threads", "cpuexp"},
    {"activations", "init", "io", "schedules", "callbacks", "distributed"},
    {"losses", "exports"},
    {"validation", "kernels", "cpukernels"},
    {"ops"},
    {"layers"},
    {"params"},
    {"optim"},
    {"checkpoint", "data", "history", "backprop"},
    {"strategy"},
    {"trainer"},
    {"inference", "modelfile"},
    {"network"},
    {"datasets", "check", "bench", "plots"},
    {"userdata"},
    {"recipes", "sklearn", "options"},
    {"cli"},
    {"__main__"},
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


MAX_CLASS_LINES = 250


def test_no_class_is_longer_than_250_lines():
    long = [f"{module}.py:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
            for module, text in package_sources().items() for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]
    assert long == []


#: Names and annotations by which code holds a model that another unit handed it.
MODEL_NAMES = {"net", "model", "network"}
MODEL_TYPES = ("Sequential", "Trainable", "Steppable", "InferenceModel")


def _model_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    return {a.arg for a in args if a.arg in MODEL_NAMES
            or (a.annotation is not None and any(t in ast.unparse(a.annotation) for t in MODEL_TYPES))}


def _holds_model(node: ast.expr, params: set[str]) -> bool:
    """``node`` is a model handed in: a model parameter, or ``<anything>.model`` / ``.net`` / ``.network``."""
    if isinstance(node, ast.Name):
        return node.id in params
    return isinstance(node, ast.Attribute) and node.attr in MODEL_NAMES


def model_attribute_writes(sources: dict[str, str]) -> list[str]:
    """Every assignment to an attribute of a model that a function outside ``network.py`` was handed."""
    out = []
    for module, text in sources.items():
        if module == "network":
            continue
        for fn in ast.walk(ast.parse(text)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            params = _model_params(fn)
            for node in ast.walk(fn):
                targets = (node.targets if isinstance(node, ast.Assign) else
                           [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                        and node.args):
                    targets = [ast.Attribute(value=node.args[0], attr="?")]
                for t in targets:
                    for leaf in (t.elts if isinstance(t, ast.Tuple) else [t]):
                        if isinstance(leaf, ast.Attribute) and _holds_model(leaf.value, params):
                            out.append(f"{module}.py:{node.lineno} {fn.name} assigns {ast.unparse(leaf)}")
    return out


def test_only_the_model_assigns_a_models_attributes():
    assert model_attribute_writes(package_sources()) == []


@pytest.mark.parametrize("text", [
    "def fit(net, h):\n    net.history = h\n",
    "def f(m: 'Sequential'):\n    m.loss, x = 1, 2\n",
    "class R:\n    def g(self):\n        self.model.optimizer = None\n",
    "def f(model):\n    setattr(model, 'history', None)\n",
    "def f(net):\n    net.epochs += 1\n",
])
def test_the_model_attribute_checker_catches_what_it_should(text):
    assert model_attribute_writes({"trainer": text}) != []


def test_the_model_attribute_checker_allows_what_it_should():
    ok = ("def f(net, h):\n    net.flat_parameters()[...] = h\n    h.x = 1\n"
          "class R:\n    def g(self):\n        self.history = 1\n")
    assert model_attribute_writes({"trainer": ok, "network": "def f(net):\n    net.loss = 1\n"}) == []
