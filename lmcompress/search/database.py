"""The level database: every prunable layer compressed once at every level, kept on disk.

Each block is walked with the *dense* model's calibration inputs (the block's outputs are recomputed with its
dense weights before moving on), and each of its layers is pruned at each level from the same statistics, so
any assignment of levels to layers can be put together without running the compressor again. The weights of
block ``i`` at level ``k`` go to ``b{i:03d}-l{k:02d}.safetensors``, read back memory-mapped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmcompress.calibration.engine import BlockInputs, collect_input_stats, walk_blocks
from lmcompress.models.families import blocks_path, find_prunable, get_blocks, set_weight_matrix, weight_matrix
from lmcompress.transforms.prune import PruneConfig, _prune_layer

INDEX = "database.json"


@dataclass
class LevelDatabase:
    """Where the compressed weights are, what the levels are, and each layer's size (for budgets)."""

    folder: Path
    levels: list[float]
    layers: list[str]  # full module names, in model order
    sizes: dict[str, int]  # weights per layer
    block_of: dict[str, int]  # layer → block index

    def weight(self, layer: str, level: int) -> torch.Tensor:
        path = self.folder / f"b{self.block_of[layer]:03d}-l{level:02d}.safetensors"
        with safe_open(str(path), framework="pt") as f:
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
        return cls(folder, meta["levels"], meta["layers"], meta["sizes"], meta["block_of"])


def build_database(
    model: nn.Module,
    config: PruneConfig,
    calib: torch.Tensor,
    levels: list[float],
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LevelDatabase:
    """Prune every layer of ``model`` at every level of ``levels`` (``config.method``, unstructured) into ``folder``.

    The model is left dense. ``calib`` is needed for Wanda and SparseGPT (magnitude ignores it).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = blocks_path(model)
    layers: list[str] = []
    sizes: dict[str, int] = {}
    block_of: dict[str, int] = {}

    def visit(i: int, block: nn.Module, inputs: BlockInputs | None) -> None:
        modules = find_prunable(block)
        stats = None
        if config.method != "magnitude":
            stats = collect_input_stats(block, inputs, list(modules), config.method == "sparsegpt")
        for name, module in modules.items():
            full = f"{prefix}.{i}.{name}"
            layers.append(full)
            sizes[full] = weight_matrix(module).numel()
            block_of[full] = i
        for k, level in enumerate(levels):
            tensors = {}
            for name, module in modules.items():
                full = f"{prefix}.{i}.{name}"
                w = weight_matrix(module)
                res = _prune_layer(config, w, stats and stats[name], level, full)
                tensors[full] = res.weight.to(w.dtype).contiguous().cpu()
            save_file(tensors, str(folder / f"b{i:03d}-l{k:02d}.safetensors"))

    if config.method == "magnitude":
        for i, block in enumerate(get_blocks(model)):
            visit(i, block, None)
    else:  # weights are never changed in the model, so every block sees the dense model's inputs
        walk_blocks(model, calib, torch.device(device), visit, desc="level database", progress=progress)
    meta = {"levels": list(levels), "layers": layers, "sizes": sizes, "block_of": block_of, "method": config.method}
    (folder / INDEX).write_text(json.dumps(meta, indent=1) + "\n")
    return LevelDatabase(folder, list(levels), layers, sizes, block_of)


def prune_from_dense_inputs(
    model: nn.Module, config: PruneConfig, calib: torch.Tensor, assignment: dict[str, float], *, device="cpu"
) -> None:
    """Prune each layer at its own sparsity from the *dense* model's statistics (what the database holds).

    The reference the database is checked against: the same statistics, each layer compressed directly.
    """
    prefix = blocks_path(model)
    new: dict[str, torch.Tensor] = {}

    def visit(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        modules = find_prunable(block)
        stats = None
        if config.method != "magnitude":
            stats = collect_input_stats(block, inputs, list(modules), config.method == "sparsegpt")
        for name, module in modules.items():
            full = f"{prefix}.{i}.{name}"
            w = weight_matrix(module)
            new[full] = _prune_layer(config, w, stats and stats[name], assignment[full], full).weight.to(w.dtype)

    walk_blocks(model, calib, torch.device(device), visit, desc="direct", progress=False)
    modules = dict(model.named_modules())
    for full, w in new.items():
        set_weight_matrix(modules[full], w)
