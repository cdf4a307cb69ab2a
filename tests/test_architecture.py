"""The layout's rules, read from the source: which layer may import which, and no import cycle.

Layers, bottom to top (ARCHITECTURE.md): base helpers; the input side (`pipelines`) and the
network (`keras_resnet.model`), which never import each other; `keras_resnet.serving`;
`keras_resnet.training`; the commands. Imports inside functions count too.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"keras_resnet.files", "keras_resnet.constants", "keras_resnet.cli", "keras_resnet.logs",
        "pipelines.layout",
        "pipelines.formats"}
# What each group may import from the project (besides itself and BASE).
ALLOWED = {
    "base": set(),
    "pipelines": set(),
    "model": set(),
    "serving": {"model", "pipelines"},
    "training": {"model", "pipelines", "serving"},
    "package": {"model"},
    "command": {"model", "pipelines", "serving", "training"},
}


def group(module):
    if module in BASE:
        return "base"
    if module == "keras_resnet":
        return "package"
    for prefix in ("model", "serving", "training"):
        if module.startswith(f"keras_resnet.{prefix}"):
            return prefix
    if module.startswith("pipelines"):
        return "pipelines"
    return "command"  # train_main and the python -m keras_resnet.* commands


def project_modules():
    modules = {"train_main": os.path.join(REPO, "train_main.py")}
    for package in ("keras_resnet", "pipelines"):
        for directory, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    modules[module.removesuffix(".__init__")] = path
    return modules


def imports_of(path, modules):
    """Project modules imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a import b` imports module a.b if there is one, else a name of module a.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                     else node.module for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def layer_violations(graph):
    wrong = []
    for module, imported in graph.items():
        mine = group(module)
        for other in imported:
            theirs = group(other)
            if mine == "command" and theirs == "command" and other != "keras_resnet":
                wrong.append(f"{module} -> {other} (a command imports another command)")
            elif not (theirs in (mine, "base") or theirs in ALLOWED[mine]
                      or other == "keras_resnet"):  # the package's lazy public API
                wrong.append(f"{module} ({mine}) -> {other} ({theirs})")
    return sorted(wrong)


def cycles_in(graph):
    # A package's __init__ importing its own submodules is not a cycle between modules.
    edges = {m: {o for o in imported if not m.startswith(o + ".") and not o.startswith(m + ".")}
             for m, imported in graph.items()}
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for other in sorted(edges.get(module, ())):
            if state.get(other) == "open":
                cycles.append(" -> ".join(path[path.index(other):] + [other]))
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_every_import_goes_down_the_layers(graph):
    assert not layer_violations(graph), "\n".join(layer_violations(graph))


def test_no_import_cycles(graph):
    assert not cycles_in(graph), "\n".join(cycles_in(graph))


def test_the_rules_catch_wrong_imports_and_cycles(tmp_path):
    """The checks are not vacuous: a lazy import of the pipelines in the model, a command
    importing a command, and a cycle are all reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipelines import dataset\n")
    assert imports_of(str(bad), project_modules()) == {"pipelines.dataset"}
    assert layer_violations({"keras_resnet.model.resnet": {"pipelines.dataset"},
                             "keras_resnet.export": {"keras_resnet.predict"},
                             "keras_resnet.serving.export": {"keras_resnet.model.layers"}}) == [
        "keras_resnet.export -> keras_resnet.predict (a command imports another command)",
        "keras_resnet.model.resnet (model) -> pipelines.dataset (pipelines)"]
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
