"""A decode-time budget for the joint search: each searched layer's time per token at each level, from a table
measured once per (layer shape, level) on this machine, and the time of the rest of the model.

A table entry is the wall time of one batch-1 product (one input row, as decode runs it) of a ``[out, in]`` layer
built at that level the way ``lmcompress.load(..., kernels="auto")`` builds it: float levels as a float32
``nn.Linear`` (2:4 / 4:8 ones on the N:M sparse kernel, :mod:`lmcompress.kernels.sparse_cpu`), quantized levels
from their codes (:func:`lmcompress.kernels.linear.swap_quantized_linears`: the sparse kernel, lmcompress's packed
kernel or PyTorch's; dequantized float32 where none runs the grid). A level that no kernel runs faster costs what
its dense or quantized layer costs: where no kernel takes unstructured sparsity, ``0.5/16`` costs what ``0/16``
does and ``0.5/3`` what ``0/3`` does. Several copies of a layer are called in turn so that their weights do not
stay in the CPU's caches between calls, as in a whole model; a time is the best of a few rounds (other work on
the machine only adds time).

The rest (embedding lookup, norms, attention over the cache, and the head when it is not searched) is timed as
one decode step of the model at :data:`CONTEXT` tokens of context with every searched layer replaced by a stub
that costs nothing. A candidate's predicted time per token is that rest plus its layers' table times; the dense
time (``decode=2.5x`` means it divided by 2.5) is the rest plus every searched layer as a float32 ``nn.Linear``.
The search needs costs that do not grow with the level index, so a layer at level ``k`` is costed at the slowest
of the levels ``k, k+1, …`` (an upper bound: the prediction never falls below the table's). A dropped block's
layers cost nothing; its attention and norms stay in the rest (an upper bound too).

Times are wall-clock; ``$LMCOMPRESS_LATENCY_CLOCK=cpu`` measures this process's CPU time instead (all threads
summed), steadier where other work shares the machine. The table is a JSON file per machine (CPU name, threads,
torch version, which kernels built, the clock) under
``$LMCOMPRESS_CACHE/latency`` (default ``~/.cache/lmcompress/latency``), written through a temporary file and a
rename; the rest's time is cached there too, per model configuration.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
from lmcompress.errors import UserError
from lmcompress.models.families import prunable_layers, weight_matrix
from lmcompress.runtime import cpu_name
from lmcompress.search.joint import HEAD_BLOCK, SizeSpace, head_bits, head_of
from lmcompress.search.levels import FLOAT_BITS, JointLevel

CONTEXT = 64  # tokens of context of the decode step the rest is timed at
ROTATE_BYTES = 64 << 20  # copies of a layer called in turn: at least this many bytes of weights, beyond the caches
MAX_COPIES = 64
ROUNDS = 5  # a time is the best of this many rounds
ROUND_S = 0.02  # each round calls the layer for at least this long
DENSE = JointLevel(0.0, FLOAT_BITS)  # what the dense time counts every searched layer at
VERSION = 1  # of the table's layout and of how entries are measured

Timer = Callable[[Callable[[], object], str], float]  # (one call, its table key) → seconds per call


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_VARIABLE = "LMCOMPRESS_LATENCY_CLOCK"  # wall (default) or cpu: this process's CPU time, all threads summed


def clock_name() -> str:
    """The clock tables are measured on: ``wall``, or ``cpu`` (``$LMCOMPRESS_LATENCY_CLOCK``) on a shared machine,
    where wall times mostly measure the other work."""
    name = os.environ.get(CLOCK_VARIABLE, "wall")
    if name not in CLOCKS:
        raise UserError(f"{CLOCK_VARIABLE}={name!r}: choose wall or cpu")
    return name


def time_call(call: Callable[[], object], key: str) -> float:
    """Seconds per ``call()`` on :func:`clock_name`'s clock: best of :data:`ROUNDS` rounds of at least
    :data:`ROUND_S` each, after a warm-up."""
    clock = CLOCKS[clock_name()]
    for _ in range(3):
        call()
    n, t0 = 0, clock()
    while (elapsed := clock() - t0) < ROUND_S or n < 3:
        call()
        n += 1
    per_round = max(3, math.ceil(n * ROUND_S / max(elapsed, 1e-9)))
    best = math.inf
    for _ in range(ROUNDS):
        t0 = clock()
        for _ in range(per_round):
            call()
        best = min(best, (clock() - t0) / per_round)
    return best


# ------------------------------------------------------------------------------------------------ the budget


def parse_decode(text: str) -> tuple[float, str]:
    """``2.5x`` → (2.5, "x"): the dense float32 time per token divided by 2.5; ``40ms``, ``0.04s``, ``25tok/s``
    → (seconds per token, "s")."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(x|ms|s|us|µs|tok/s)\s*", (text or "").lower())
    if not m:
        raise UserError(
            f"decode budget {text!r} must be a speed-up over the dense float32 model (2.5x) or a time per token "
            "(40ms, 0.04s) or tokens per second (25tok/s)"
        )
    value, unit = float(m.group(1)), m.group(2)
    if not value > 0 or not math.isfinite(value):
        raise UserError(f"decode budget {text!r} must be positive")
    if unit == "x":
        if value < 1:
            raise UserError(f"decode budget {text!r}: a speed-up must be at least 1x (1x: as fast as dense float32)")
        return value, "x"
    seconds = {"ms": 1e-3, "s": 1.0, "us": 1e-6, "µs": 1e-6}.get(unit)
    return (1.0 / value if unit == "tok/s" else value * seconds), "s"


# ------------------------------------------------------------------------------------------------ the table


def machine() -> dict:
    """What a table's times depend on besides the layer: the CPU, the threads, torch, the kernels that built."""
    from lmcompress.kernels import cpu_ext
    from lmcompress.kernels.sparse_cpu import use_avx512

    cpu = cpu_name()
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "packed_kernel": cpu_ext.extension() is not None,
        "sparse_kernel": cpu_ext.sparse_extension() is not None,
        "avx512": use_avx512(),
        "clock": clock_name(),
        "version": VERSION,
    }


def table_path(cache_dir: str | Path | None = None) -> Path:
    """This machine's table file (:func:`machine` hashed) in ``cache_dir`` [``$LMCOMPRESS_CACHE/latency``]."""
    from lmcompress.checkpoint.reference import default_cache

    folder = Path(cache_dir) if cache_dir is not None else default_cache() / "latency"
    digest = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{digest}.json"


class LatencyTable:
    """Seconds per call by key, read from and merged back into one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = self._read().get("entries", {})
        self.measured: list[str] = []  # keys this process measured (not read from the file)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and data.get("machine") == machine() else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str, measure: Callable[[], tuple[float, str]]) -> float:
        """The entry ``key``, measured by ``measure()`` → (seconds, how it ran) when the table lacks it."""
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("s"), (int, float)):
            seconds, how = measure()
            entry = self.entries[key] = {"s": float(seconds), "kernel": how}
            self.measured.append(key)
        return float(entry["s"])

    def save(self) -> None:
        """Write the entries measured here, merged with what the file holds now (another process may have added
        some), through a temporary file and a rename."""
        if not self.measured:
            return
        from lmcompress.checkpoint.folder import write_file_atomic

        entries = self._read().get("entries", {}) | {k: self.entries[k] for k in self.measured}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(self.path, json.dumps({"machine": machine(), "entries": entries}, indent=1) + "\n")


def layer_key(shape: tuple[int, int], level: JointLevel, group_size: int, sym: bool) -> str:
    grid = f"/g{group_size}{'s' if sym else 'a'}" if level.quantized else ""
    return f"layer/{shape[0]}x{shape[1]}/{level.label}{grid}"


def build_layer(shape: tuple[int, int], level: JointLevel, group_size: int, sym: bool, seed: int = 0):
    """A ``[out, in]`` layer of random weights at ``level`` as ``load(kernels="auto")`` runs it, and how it runs."""
    from lmcompress.kernels.linear import kernel_report, swap_quantized_linears
    from lmcompress.kernels.sparse_cpu import swap_sparse_linears

    out, inp = shape
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.02
    w = w * _keep(w, level)
    holder = nn.Module()
    holder.layer = nn.Linear(inp, out, bias=False)
    if level.quantized:
        q = rtn_quantize(w, QuantSpec(level.bits, group_size, sym))
        report = swap_quantized_linears(holder, {"layer.weight": q}, "auto")
        if "layer" in report.swapped:
            return holder.layer, report.swapped["layer"]
        w = q.dequantize()
    holder.layer.weight.data = w.float()
    swapped = swap_sparse_linears(holder, kernel_report(holder))
    return holder.layer, swapped.get("layer", "dense float32 nn.Linear")


def _keep(w: torch.Tensor, level: JointLevel) -> torch.Tensor:
    """The mask of ``level``'s sparsity on ``w``: the largest magnitudes, per N:M group or over the whole."""
    if level.sparsity <= 0:
        return torch.ones_like(w)
    if level.pattern != "unstructured":
        n, m = (int(x) for x in level.pattern.split(":"))
        if w.shape[1] % m == 0:
            groups = w.abs().reshape(-1, m)
            keep = torch.zeros_like(groups).scatter_(1, groups.topk(n, dim=1).indices, 1.0)
            return keep.reshape(w.shape)
    k = round(level.sparsity * w.numel())
    if k <= 0:
        return torch.ones_like(w)
    threshold = w.abs().flatten().kthvalue(k).values
    return (w.abs() > threshold).to(w.dtype)


@torch.inference_mode()
def measure_layer(shape: tuple[int, int], level: JointLevel, group_size: int, sym: bool) -> tuple[float, str]:
    """Seconds per decode product of a ``shape`` layer at ``level`` (see the module docstring), and its kernel."""
    key = layer_key(shape, level, group_size, sym)
    first, how = build_layer(shape, level, group_size, sym)
    size = sum(t.numel() * t.element_size() for t in itertools.chain(first.parameters(), first.buffers()))
    count = min(MAX_COPIES, max(1, math.ceil(ROTATE_BYTES / max(size, 1))))
    copies = [first] + [_clone(first) for _ in range(count - 1)]
    x = torch.randn(1, 1, shape[1])
    turn = itertools.cycle(copies)
    return _timer()(lambda: next(turn)(x), key), how


def _clone(layer: nn.Module) -> nn.Module:
    """The same layer with its own copy of every tensor (its weights at other addresses)."""
    twin = copy.copy(layer)
    twin._parameters = {k: None if v is None else nn.Parameter(v.detach().clone(), requires_grad=False)
                        for k, v in layer._parameters.items()}  # fmt: skip
    twin._buffers = {k: None if v is None else v.clone() for k, v in layer._buffers.items()}
    return twin


def _timer() -> Timer:
    return time_call  # looked up at call time: tests replace time_call


# ------------------------------------------------------------------------------------------------ the rest


class _Free(nn.Module):
    """A searched layer while the rest is timed: zeros of the output's shape, at no cost worth counting."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def rest_key(model: nn.Module, layers: list[str]) -> str:
    config = model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else ""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    text = json.dumps({"config": config, "layers": layers, "dtype": str(dtype), "context": CONTEXT})
    return f"rest/{type(model).__name__}/{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@torch.inference_mode()
def measure_rest(model: nn.Module, layers: list[str], key: str) -> tuple[float, str]:
    """Seconds of one decode step of ``model`` at :data:`CONTEXT` tokens of context, ``layers`` costing nothing."""
    modules = dict(model.named_modules())
    saved = {name: modules[name] for name in layers}
    try:
        for name, module in saved.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _Free(weight_matrix(module).shape[0]))
        device = next(model.parameters()).device
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, CONTEXT + 1), generator=torch.Generator().manual_seed(0)).to(device)
        out = model(ids[:, :CONTEXT], use_cache=True)
        past = out.past_key_values
        if not hasattr(past, "crop"):
            raise UserError(f"a decode budget times the model's decode steps on its cache; {type(past).__name__} "
                            "cannot be cut back between steps: use a size budget")  # fmt: skip

        def step():
            model(ids[:, CONTEXT:], past_key_values=past, use_cache=True)
            past.crop(-1)  # the step's token off again (negative: tokens removed, in every version)

        seconds = _timer()(step, key)
    finally:
        for name, module in saved.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return seconds, f"decode step at {CONTEXT} tokens of context, searched layers free"


# ------------------------------------------------------------------------------------------------ the costs


@dataclass
class DecodeCosts:
    """Seconds per token: ``cost[layer][k]`` of each searched layer at level ``k`` (as measured; the search uses
    :meth:`monotone`), the ``rest``, the ``dense`` time and the ``budget``; and what building them took."""

    layers: list[str]
    labels: list[str]
    cost: dict[str, list[float]]
    rest: float
    dense: float
    budget: float
    table: str
    measured: int = 0  # table entries this call measured (0: all read from the table)
    build_s: float = 0.0  # wall seconds this call spent measuring
    kernels: dict[str, str] = field(default_factory=dict)  # table key → how the layer ran

    def monotone(self, layer: str) -> list[float]:
        """The layer's costs made non-increasing in the level: level ``k`` at the slowest of ``k, k+1, …``."""
        out, worst = [], 0.0
        for c in reversed(self.cost[layer]):
            worst = max(worst, c)
            out.append(worst)
        return out[::-1]

    def total(self, chosen: dict[str, int], *, monotone: bool = True) -> float:
        """Predicted seconds per token of an allocation (layer → level index): the rest plus its layers."""
        cost = {layer: self.monotone(layer) if monotone else self.cost[layer] for layer in chosen}
        return self.rest + sum(cost[layer][k] for layer, k in chosen.items())

    def uniform(self, k: int) -> float:
        return self.total(dict.fromkeys(self.layers, k))

    def describe(self, chosen: dict[str, int]) -> dict:
        """What ``search.json`` records of a decode budget (seconds per token, tokens per second)."""
        predicted = self.total(chosen)
        return {
            "budget_s": self.budget,
            "predicted_s": predicted,
            "predicted_table_s": self.total(chosen, monotone=False),
            "dense_s": self.dense,
            "rest_s": self.rest,
            "predicted_speedup": self.dense / predicted,
            "predicted_tokens_per_s": 1.0 / predicted,
            "uniform_s": {label: self.uniform(k) for k, label in enumerate(self.labels)},
            "table": self.table,
            "table_entries_measured": self.measured,
            "table_build_s": self.build_s,
            "threads": torch.get_num_threads(),
        }


def searched_layers(model: nn.Module) -> list[str]:
    """The layers a joint search chooses levels for: every block's linear layers, then the output head."""
    layers = list(prunable_layers(model))
    head = head_of(model)
    return layers + ([head[0]] if head is not None else [])


def decode_costs(
    model: nn.Module,
    levels: list[JointLevel],
    budget: str,
    group_size: int,
    sym: bool = True,
    *,
    layers: list[str] | None = None,
    head: str | None = None,
    cache_dir: str | Path | None = None,
) -> DecodeCosts:
    """The costs of a decode budget (``budget`` as :func:`parse_decode` reads it) over ``layers`` [the searched
    ones] at ``levels``; ``head`` (the head's name [the model's]) is costed at :func:`~lmcompress.search.joint.
    head_bits`. Entries missing from this machine's table are measured and added to it."""
    value, unit = parse_decode(budget)
    layers = layers if layers is not None else searched_layers(model)
    if head is None and head_of(model) is not None:
        head = head_of(model)[0]
    modules = dict(model.named_modules())
    table = LatencyTable(table_path(cache_dir))
    start = time.perf_counter()
    kernels: dict[str, str] = {}

    def entry(layer: str, level: JointLevel) -> float:
        if level.drop:
            return 0.0
        shape = tuple(weight_matrix(modules[layer]).shape)
        key = layer_key(shape, level, group_size, sym)
        seconds = table.get(key, lambda: measure_layer(shape, level, group_size, sym))
        kernels[key] = table.entries[key].get("kernel", "")
        return seconds

    bits = head_bits(levels)
    cost = {}
    for layer in layers:
        per_level = [JointLevel(0.0, b) for b in bits] if layer == head else levels
        cost[layer] = [entry(layer, level) for level in per_level]
    rest = table.get(rest_key(model, layers), lambda: measure_rest(model, layers, rest_key(model, layers)))
    dense = rest + sum(entry(layer, DENSE) for layer in layers)
    table.save()
    seconds = dense / value if unit == "x" else value
    return DecodeCosts(layers, [lv.label for lv in levels], cost, rest, dense, seconds, str(table.path),
                       len(table.measured), time.perf_counter() - start if table.measured else 0.0,
                       kernels)  # fmt: skip


def costs_of(model: nn.Module, config) -> DecodeCosts:
    """:func:`decode_costs` of a :class:`~lmcompress.search.config.SearchConfig` with a decode budget."""
    return decode_costs(model, config.joint_levels(), config.decode, config.group_size, config.sym)


def check_budget(costs: DecodeCosts) -> None:
    """UserError when even every layer at its fastest level exceeds the budget."""
    fastest = costs.rest + sum(min(costs.monotone(layer)) for layer in costs.layers)
    if costs.budget < fastest:
        ms = 1e3
        raise UserError(
            f"a decode budget of {costs.budget * ms:.3g} ms per token is below the fastest this model runs at these "
            f"levels ({fastest * ms:.3g} ms: every layer at {costs.labels[-1]}, the rest {costs.rest * ms:.3g} ms; "
            f"dense float32 {costs.dense * ms:.3g} ms); raise the budget or add a faster level"
        )


def uniform_level(costs: DecodeCosts) -> int:
    """The first level at which every searched layer fits the budget (the last when none does)."""
    return next((k for k in range(len(costs.labels)) if costs.uniform(k) <= costs.budget), len(costs.labels) - 1)


NS = 1e9  # the search's level space counts whole nanoseconds


def decode_space(costs: DecodeCosts, units: list[list[str]], block_of: dict[str, int]) -> SizeSpace:
    """The level space of a decode budget: ``cost[u][k]`` nanoseconds of unit ``u`` at level ``k``
    (:meth:`DecodeCosts.monotone`), the rest as ``fixed``; a candidate's total plus the rest is at most the budget
    and within the largest single level step of a unit other than the head."""
    check_budget(costs)
    mono = {layer: costs.monotone(layer) for layer in costs.layers}
    levels = len(costs.labels)
    cost = [[round(NS * sum(mono[layer][k] for layer in unit)) for k in range(levels)] for unit in units]
    fixed, budget = round(NS * costs.rest), math.floor(NS * costs.budget)
    hi = fixed + sum(c[0] for c in cost)
    heads = {u for u, unit in enumerate(units) if any(block_of.get(layer) == HEAD_BLOCK for layer in unit)}
    others = [c for u, c in enumerate(cost) if u not in heads] or cost
    step = max(abs(c[k] - c[k + 1]) for c in others for k in range(levels - 1))
    total = float(min(budget, hi) - fixed)
    return SizeSpace(tuple(tuple(c) for c in cost), total, float(min(step, total)), fixed, budget)
