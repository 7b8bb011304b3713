"""The level database: every prunable layer compressed once at every level, kept on disk.

Each block is walked once, and each of its layers is compressed at each level from the same statistics, so any
assignment of levels to layers can be put together without running the compressor again. The statistics come
from the *dense* model's calibration inputs (EvoPress), or, given a ``reference`` assignment, from the inputs of
the model whose earlier blocks are compressed at their reference levels: the way sequential SparseGPT/GPTQ sees
them, so the reference candidate assembled from the database *is* the sequential result and candidates near it
are close to theirs. The model is restored to dense at the end. Block ``i`` at level ``k`` goes to
``b{i:03d}-l{k:02d}.safetensors`` (read back memory-mapped): the pruned weight, or for bit widths the integer
codes, scales and zero points (the weight is their dequantization). ``database.json`` holds the levels, each
layer's size and its cost at every level (weights kept, bits stored with the grids, or for joint levels the bytes
the packed save writes). Joint levels (a size budget) also hold the output head at every level, in
``head-l{k:02d}.safetensors`` (:mod:`lmcompress.search.joint`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmcompress.algorithms.gptq import gptq_quantize
from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec, rtn_quantize
from lmcompress.calibration.engine import BlockInputs, collect_input_stats, shared_inputs, walk_blocks
from lmcompress.calibration.stats import InputStats
from lmcompress.models.families import blocks_path, find_prunable, get_blocks, set_weight_matrix, weight_matrix
from lmcompress.search.joint import HEAD_BLOCK, ByteCost
from lmcompress.transforms.prune import PruneConfig, prune_layer, prune_layers
from lmcompress.transforms.quantize import nominal_bits_per_weight

INDEX = "database.json"
# compress(weights [out, in] fp32 of layers reading one input, their stats or None, levels, layer names)
#   → result[level][layer] = (new weight, codes or None)
Compressor = Callable[
    [list[torch.Tensor], InputStats | None, list[float], list[str]],
    list[list[tuple[torch.Tensor, QuantizedTensor | None]]],
]
STACK_ELEMENTS = 1 << 25  # at most this many weights (128 MB in fp32) are solved in one stacked SparseGPT pass


def pruner(config: PruneConfig) -> tuple[Compressor, bool, bool]:
    """Levels are sparsities pruned with ``config.method``: (compressor, needs data, needs Hessian).

    SparseGPT rows are independent given the Hessian, so the layers of a group and all their levels are stacked
    row-wise and solved in as few passes as memory allows (each level keeps its own mask budget).
    """

    def compress(weights, stats, levels, names):
        per_level = max(sum(w.numel() for w in weights), 1)
        chunk = max(1, STACK_ELEMENTS // per_level) if config.method == "sparsegpt" else 1
        out = []
        for c0 in range(0, len(levels), chunk):
            part = levels[c0 : c0 + chunk]
            results = prune_layers(
                config,
                [w for _ in part for w in weights],
                stats,
                [lv for lv in part for _ in weights],
                [n for _ in part for n in names],
            )
            out += [
                [(r.weight, None) for r in results[k * len(weights) : (k + 1) * len(weights)]] for k in range(len(part))
            ]
        return out

    return compress, config.method != "magnitude", config.method == "sparsegpt"


def quantizer(method: str, group_size: int, sym: bool, percdamp: float | str = 0.01) -> tuple[Compressor, bool, bool]:
    """Levels are bit widths quantized with GPTQ (or RTN) on ``group_size`` grids."""

    def one(w, stats, level, name):
        spec = QuantSpec(int(level), group_size, sym)
        qt = (
            rtn_quantize(w, spec)
            if method == "rtn"
            else gptq_quantize(w, stats.hessian, spec, percdamp=percdamp, layer=name).quantized
        )
        return qt.dequantize(), qt

    def compress(weights, stats, levels, names):
        return [[one(w, stats, level, n) for w, n in zip(weights, names, strict=True)] for level in levels]

    return compress, method != "rtn", method != "rtn"


@dataclass
class LevelDatabase:
    """Where the compressed weights are, what the levels are, and each layer's size and cost per level."""

    folder: Path
    levels: list[float]
    layers: list[str]  # full module names, in model order
    sizes: dict[str, int]  # weights per layer
    block_of: dict[str, int]  # layer → block index
    cost: dict[str, list[float]]  # layer → cost at each level (weights kept, or bits stored)
    quantized: bool = False

    def _file(self, layer: str, level: int) -> Path:
        return self.folder / f"{_stem(self.block_of[layer])}-l{level:02d}.safetensors"

    def codes(self, layer: str, level: int) -> QuantizedTensor | None:
        """The layer's codes and grids at ``level``, or None where that level keeps floats (joint levels at 16)."""
        with safe_open(str(self._file(layer, level)), framework="pt") as f:
            meta = f.metadata() or {}
            if "bits" not in meta:
                return None
            spec = QuantSpec(int(meta["bits"]), int(meta["group_size"]), meta["sym"] == "1")
            return QuantizedTensor(
                f.get_tensor(f"{layer}.codes"), f.get_tensor(f"{layer}.scale"), f.get_tensor(f"{layer}.zero"), spec
            )

    def weight(self, layer: str, level: int) -> torch.Tensor:
        qt = self.codes(layer, level) if self.quantized else None
        if qt is not None:
            return qt.dequantize()
        with safe_open(str(self._file(layer, level)), framework="pt") as f:
            return f.get_tensor(layer)

    def apply(self, model: nn.Module, assignment: dict[str, int]) -> None:
        """Put each layer's weights at its assigned level into ``model`` (in place)."""
        modules = dict(model.named_modules())
        for layer, level in assignment.items():
            set_weight_matrix(modules[layer], self.weight(layer, level))

    @classmethod
    def open(cls, folder: str | Path) -> LevelDatabase:
        folder = Path(folder)
        meta = json.loads((folder / INDEX).read_text())
        return cls(
            folder, meta["levels"], meta["layers"], meta["sizes"], meta["block_of"], meta["cost"], meta["quantized"]
        )


def build_database(
    model: nn.Module,
    compressor: tuple[Compressor, bool, bool],
    calib: torch.Tensor | None,
    levels: list[float],
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    reference: dict[str, int] | None = None,
    progress: bool = True,
    byte_cost: ByteCost | None = None,
    head: tuple[str, list] | None = None,
) -> LevelDatabase:
    """Compress every layer of ``model`` at every level of ``levels`` into ``folder``; the model stays dense.

    ``compressor`` is what :func:`pruner` or :func:`quantizer` return. With ``reference`` (layer → level
    index), each block's statistics are taken from the outputs of the earlier blocks at their reference
    levels (sequential inputs); without it, from the dense model's. ``byte_cost`` costs each layer in the bytes
    the packed save writes (joint levels); ``head`` (its module name and its (weight, codes or None) at every
    level) adds the output head.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    builder = _Builder(compressor, list(levels), folder, blocks_path(model), reference, byte_cost)
    if not builder.needs_data:  # magnitude / RTN: no inputs, so the reference changes nothing
        for i, block in enumerate(get_blocks(model)):
            builder.visit(i, block, None)
    else:
        try:
            walk_blocks(model, calib, torch.device(device), builder.visit, desc="level database", progress=progress)
        finally:
            builder.restore()
    if head is not None:
        builder.add_head(dict(model.named_modules())[head[0]], *head)
    return builder.finish()


def _stem(block: int) -> str:
    return "head" if block == HEAD_BLOCK else f"b{block:03d}"


class _Builder:
    """The level database, one block at a time: every layer compressed at every level, one file per level."""

    def __init__(
        self, compressor, levels: list, folder: Path, prefix: str, reference: dict | None, byte_cost=None
    ) -> None:
        self.compress, self.needs_data, self.hessian = compressor
        self.levels, self.folder, self.prefix, self.reference = levels, folder, prefix, reference
        self.byte_cost = byte_cost
        self.layers: list[str] = []
        self.sizes: dict[str, int] = {}
        self.block_of: dict[str, int] = {}
        self.cost: dict[str, list[float]] = {}
        self.quantized = False
        self.originals: dict[nn.Module, torch.Tensor] = {}  # the dense weights of the block at reference levels

    def restore(self) -> None:
        for module, w in self.originals.items():
            set_weight_matrix(module, w)
        self.originals.clear()

    def visit(self, i: int, block: nn.Module, inputs: BlockInputs | None) -> None:
        self.restore()  # the previous block's outputs are computed: it goes back to dense
        modules = {f"{self.prefix}.{i}.{name}": m for name, m in find_prunable(block).items()}
        for full, module in modules.items():
            self.layers.append(full)
            self.sizes[full] = weight_matrix(module).numel()
            self.block_of[full] = i
            self.cost[full] = []
        results = self._compress(block, inputs, i)
        for k in range(len(self.levels)):
            self._write(i, k, modules, results)
        self._byte_costs(modules, results, by_level=True)
        if self.reference is not None and self.needs_data:  # the next block sees this one at its reference levels
            for full, module in modules.items():
                self.originals[module] = weight_matrix(module).detach().clone()
                set_weight_matrix(module, results[full][self.reference[full]][0])

    def _compress(self, block: nn.Module, inputs: BlockInputs | None, i: int) -> dict[str, list]:
        """Layer → (new weight, codes or None) at each level."""
        modules = find_prunable(block)
        stats = collect_input_stats(block, inputs, list(modules), self.hessian) if self.needs_data else None
        results: dict[str, list] = {}
        for group in shared_inputs(modules, stats):
            weights = [weight_matrix(modules[name]).float() for name in group]
            full = [f"{self.prefix}.{i}.{name}" for name in group]
            by_level = self.compress(weights, stats and stats[group[0]], list(self.levels), full)
            for j, f in enumerate(full):
                results[f] = [by_level[k][j] for k in range(len(self.levels))]
        return results

    def _write(self, i: int, k: int, modules: dict[str, nn.Module], results: dict[str, list]) -> None:
        """Block ``i``'s layers at level ``k``: one file, and each layer's cost at that level."""
        tensors, meta = {}, {}
        for full, module in modules.items():
            w = weight_matrix(module)
            new, qt = results[full][k]
            if qt is None:
                tensors[full] = new.to(w.dtype).contiguous().cpu()
                if self.byte_cost is None:  # nominal: equal sizes cost the same
                    self.cost[full].append(w.numel() * (1.0 - self.levels[k]))
                continue
            self.quantized = True
            for part in ("codes", "scale", "zero"):
                tensors[f"{full}.{part}"] = getattr(qt, part).cpu().contiguous()
            meta = {
                "bits": str(qt.spec.bits),
                "group_size": str(qt.spec.group_size),
                "sym": "1" if qt.spec.sym else "0",
            }
            if self.byte_cost is None:
                self.cost[full].append(nominal_bits_per_weight({full: qt}) * qt.codes.numel())
        save_file(tensors, str(self.folder / f"{_stem(i)}-l{k:02d}.safetensors"), metadata=meta or None)

    def _byte_costs(self, modules: dict[str, nn.Module], results: dict[str, list], by_level: bool = False) -> None:
        """Joint levels: each layer's cost at every level in the bytes the packed save writes (``by_level``: the
        level's label may say more, e.g. ``drop``: nothing stored)."""
        if self.byte_cost is None:
            return
        for full, module in modules.items():
            w = weight_matrix(module)
            self.cost[full] = [
                float(self.byte_cost.layer(f"{full}.weight", new.to(w.dtype), qt, self.levels[k] if by_level else None))
                for k, (new, qt) in enumerate(results[full])
            ]

    def add_head(self, module: nn.Module, name: str, per_level: list) -> None:
        """The output head at every level (joint levels): ``per_level[k]`` = (weight, codes or None)."""
        self.layers.append(name)
        self.sizes[name] = weight_matrix(module).numel()
        self.block_of[name] = HEAD_BLOCK
        self.cost[name] = []
        for k in range(len(self.levels)):
            self._write(HEAD_BLOCK, k, {name: module}, {name: per_level})
        self._byte_costs({name: module}, {name: per_level})

    def finish(self) -> LevelDatabase:
        """Write the index and open the database."""
        meta = {
            "levels": list(self.levels),
            "layers": self.layers,
            "sizes": self.sizes,
            "block_of": self.block_of,
            "cost": self.cost,
            "quantized": self.quantized,
        }
        (self.folder / INDEX).write_text(json.dumps(meta, indent=1) + "\n")
        return LevelDatabase(self.folder, *meta.values())


def prune_from_reference_inputs(
    model: nn.Module,
    config: PruneConfig,
    calib: torch.Tensor,
    assignment: dict[str, float],
    reference: dict[str, float] | None = None,
    *,
    device="cpu",
) -> None:
    """Prune each layer at its own sparsity from the statistics the database holds: the dense model's inputs,
    or those of the model pruned at the ``reference`` sparsities up to each block.

    What the database is checked against: the same statistics, each layer compressed directly.
    """
    prefix = blocks_path(model)
    new: dict[str, torch.Tensor] = {}
    originals: dict[nn.Module, torch.Tensor] = {}

    def visit(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        for module, w in originals.items():
            set_weight_matrix(module, w)
        originals.clear()
        modules = find_prunable(block)
        stats = None
        if config.method != "magnitude":
            stats = collect_input_stats(block, inputs, list(modules), config.method == "sparsegpt")
        for name, module in modules.items():
            full = f"{prefix}.{i}.{name}"
            w = weight_matrix(module)
            new[full] = prune_layer(config, w, stats and stats[name], assignment[full], full).weight.to(w.dtype)
        if reference is not None:
            for name, module in modules.items():
                full = f"{prefix}.{i}.{name}"
                originals[module] = weight_matrix(module).detach().clone()
                w = prune_layer(config, weight_matrix(module), stats and stats[name], reference[full], full).weight
                set_weight_matrix(module, w)

    walk_blocks(model, calib, torch.device(device), visit, desc="direct", progress=False)
    modules = dict(model.named_modules())
    for full, w in new.items():
        set_weight_matrix(modules[full], w)
