"""The package's layers, read from its import statements (those inside functions too): each layer imports only
the layers below it, and no module reaches itself through its imports."""

from __future__ import annotations

import ast
import os

import vlmstream

ROOT = os.path.dirname(vlmstream.__file__)

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "progress": set(),
    "io": {"errors"},
    "core": {"errors", "io"},
    "dataset": {"errors", "io", "progress"},
    "stages": {"errors", "io", "core", "dataset"},
    "presets": {"errors", "io", "core", "dataset", "stages"},
    "config": {"errors", "io", "core", "dataset", "stages", "presets", "package"},
    "cli": {"errors", "io", "core", "dataset", "stages", "progress", "config", "presets", "package"},
    "package": {"errors", "io", "core", "dataset", "stages", "config", "presets"},  # __init__: the lazy public names
    "__main__": {"cli"},
}


def modules() -> dict[str, str]:
    """Module name (vlmstream.x.y) -> file."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                name = "vlmstream" if rel == "__init__" else "vlmstream." + rel.removesuffix(".__init__")
                out[name] = os.path.join(folder, f)
    return out


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The vlmstream modules ``name`` imports (a package's submodule where one is named)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.startswith("vlmstream")}
    if name == "vlmstream":  # the lazy exports: importlib.import_module(f".{module}") of each public name
        found |= {f"vlmstream.{m}" for m in [*vlmstream._EXPORTS.values(), *vlmstream._SUBMODULES]}
    return found - {name}


def layer(name: str) -> str:
    parts = name.split(".")
    return "package" if len(parts) == 1 else parts[1]


GRAPH = None


def graph() -> dict[str, set[str]]:
    global GRAPH
    if GRAPH is None:
        mods = modules()
        GRAPH = {n: imports(n, p, set(mods)) for n, p in mods.items()}
    return GRAPH


def test_each_layer_imports_only_the_layers_below_it():
    bad = [f"{n} imports {t}" for n, ts in graph().items() for t in sorted(ts)
           if layer(t) != layer(n) and layer(t) not in ALLOWED[layer(n)]]
    assert not bad, bad


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for t in sorted(g.get(n, ())):
            if t not in g:
                continue
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[n] = 2

    for n in sorted(g):
        if n not in state and n != "vlmstream":
            visit(n, [n])
    assert not cycles, cycles
