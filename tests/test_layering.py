"""The package's imports go downward only: no cycles, and no import from a lower layer to a higher one.

Every ``import`` of the package is read from the source (module level and inside functions alike) and checked
against :data:`LAYERS`, the one declaration of the layer order. A module may import its own layer and the layers
below it; inside a layer the modules may not import one another in a circle. The few imports that break the rule
today are listed, each with why, in :data:`EXCEPTIONS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lmcompress

PACKAGE = Path(lmcompress.__file__).parent

# Low → high. A layer is a subpackage or a top-level module of lmcompress (by the first name after "lmcompress.").
LAYERS: list[tuple[str, ...]] = [
    ("errors",),  # UserError: everything may raise it
    ("job_options",),  # the options of a whole job (the CLI reads them before torch is loaded)
    ("algorithms",),  # tensor math on one layer: masks, OBS solves, quantization grids
    ("kernels",),  # CPU kernels for packed / quantized layers
    ("models",),  # families, layouts, surgery, tiny test models
    ("checkpoint",),  # reading, writing, packing and streaming weights
    ("runtime", "kv_cache"),  # device, window length, versions; the compressed KV cache models run with
    ("calibration",),  # windows, the block walker, statistics, distributed sharing
    ("transforms",),  # prune, quantize, shrink, drop experts, factorize a model in memory
    ("measure",),  # perplexity, tasks, sweeps, reports
    ("search",),  # per-layer level search (uses measure.perplexity for --max-loss)
    ("streaming",),  # jobs whose weights stream from disk
    ("jobs",),  # whole jobs: source → transform → saved folder with its recipe
    ("demo",),
    ("cli", "__main__"),
    ("",),  # lmcompress/__init__.py: the public facade, imported lazily (PEP 562)
]

# (importing module, imported module): imports that break the order today, each with the reason and the fix.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = ["lmcompress", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[tuple[str, int, str]]:
    """``(imported module, line, imported name)`` for every import of the package in module ``name``, at any
    depth; ``from pkg import sub`` counts as importing the module ``pkg.sub`` where that is a module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {(a.name, node.lineno, "") for a in node.names if a.name.split(".")[0] == "lmcompress"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "lmcompress":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add((sub if sub in MODULES else base, node.lineno, a.name))
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> int:
    first = name.split(".")[1] if "." in name else ""
    for rank, layer in enumerate(LAYERS):
        if first in layer:
            return rank
    raise AssertionError(f"{name} is in no layer: add {first!r} to LAYERS in tests/test_layering.py")


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def goes_up(name: str, target: str, what: str = "") -> bool:
    """Whether module ``name`` importing ``what`` from ``target`` breaks the order (listed exceptions aside)."""
    if target == "lmcompress" and what == "__version__":
        return False  # the version string, set before the facade imports anything
    return layer_of(target) > layer_of(name) and (name, target) not in EXCEPTIONS


def test_no_import_goes_up_a_layer():
    wrong = [
        f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {target}"
        for name, found in GRAPH.items()
        for target, line, what in found
        if goes_up(name, target, what)
    ]
    assert not wrong, "imports from a lower layer up to a higher one (see LAYERS):\n" + "\n".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = {
        name: {t for t, _line, _what in found if t in MODULES and t != name and (name, t) not in EXCEPTIONS}
        for name, found in GRAPH.items()
    }
    assert _cycles(graph) == []


def test_the_check_sees_imports_inside_functions_and_finds_circles():
    """The reader finds function-level imports (most of the old circles hid there) and the cycle search works."""
    assert any(line > 1 and t == "lmcompress.transforms.prune" for t, line, _w in GRAPH["lmcompress"])
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert goes_up("lmcompress.models.families", "lmcompress.jobs") and goes_up("lmcompress.calibration.engine", "")
    assert not goes_up("lmcompress.jobs", "lmcompress.models.families") and not goes_up(
        "lmcompress.jobs", "lmcompress.jobs"
    )


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer != ("",)])
def test_layers_exist(layer):
    """Every declared layer names a real subpackage or module, so the order stays a description of the code."""
    assert any((PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").is_file() for n in layer), layer
