"""Structured pruning of whole FFN channels and attention heads: the model really gets smaller and faster.

Blocks are pruned in order (``engine.walk_blocks``): for each block the inputs of the layer that reads the
units (``down_proj`` / ``o_proj`` and their per-family equivalents) are measured on the calibration windows,
the least important units are chosen (``lmcompress.algorithms.units``), their rows and columns are
physically removed (new, smaller ``nn.Linear`` / ``Conv1D`` modules), the reading layer is optionally
corrected, and the pruned block's outputs feed the next block.

With one ratio for every block the config is updated (``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``; ``head_dim`` kept explicitly) so that plain ``from_pretrained`` loads the result.
With per-block ratios (``allocation="owl"``) the config keeps the dense shapes and every resized layer is
written as a surgery record (``lmcompress.models.surgery``); such folders load with ``lmcompress.load``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from lmcompress.algorithms.units import (
    CORRECTIONS,
    CRITERIA,
    UnitStats,
    correct,
    unit_columns,
    unit_scores,
    units_to_keep,
)
from lmcompress.calibration.engine import BlockInputs, collect, walk_blocks
from lmcompress.errors import UserError
from lmcompress.models.families import blocks_path, get_blocks, weight_matrix
from lmcompress.models.layouts import HeadShape, Layout, head_shape, structure_layout
from lmcompress.models.params import count_params
from lmcompress.transforms.prune import owl_pass

log = logging.getLogger(__name__)

STRUCTURES = ("ffn", "heads")
ALLOCATIONS = ("uniform", "owl")


@dataclass
class StructureConfig:
    """What to remove and how. ``ratio`` is the fraction of FFN channels / KV groups of heads removed per block."""

    structure: str = "ffn"  # "ffn", "heads" or "ffn,heads"
    ratio: float = 0.3
    criterion: str = "wanda"
    correction: str = "none"
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    damp: float = 0.01  # ridge λ of the least-squares correction, fraction of the mean diagonal

    def __post_init__(self) -> None:
        self.validate()

    @property
    def structures(self) -> tuple[str, ...]:
        """Heads first: the FFN then sees (and is corrected for) the already-pruned attention."""
        parts = {p.strip().lower() for p in self.structure.split(",") if p.strip()}
        return tuple(s for s in ("heads", "ffn") if s in parts)

    @property
    def needs_calibration(self) -> bool:
        return self.criterion != "magnitude" or self.correction != "none" or self.allocation == "owl"

    def validate(self) -> None:
        parts = {p.strip().lower() for p in str(self.structure).split(",") if p.strip()}
        if not parts or parts - set(STRUCTURES):
            raise UserError(f"unknown structure {self.structure!r}: choose ffn, heads or ffn,heads", param="structure")
        if not isinstance(self.ratio, int | float) or not 0.0 < self.ratio < 1.0:
            raise UserError(f"ratio must be a fraction in (0, 1), got {self.ratio}", param="ratio")
        if self.criterion not in CRITERIA:
            raise UserError(
                f"unknown criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}", param="criterion"
            )
        if self.correction not in CORRECTIONS:
            raise UserError(
                f"unknown correction {self.correction!r}: choose one of {', '.join(CORRECTIONS)}", param="correction"
            )
        if self.allocation not in ALLOCATIONS:
            raise UserError(
                f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}", param="allocation"
            )
        if self.owl_m <= 0 or not 0.0 <= self.owl_lambda < 0.5:
            raise UserError("owl_m must be positive and owl_lambda in [0, 0.5)", param=("owl_m", "owl_lambda"))
        if self.damp < 0:
            raise UserError(f"damp must be >= 0, got {self.damp}", param="damp")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StructureReport:
    config: dict
    ffn_widths: list[int] | None  # FFN channels kept per block
    heads: list[int] | None  # query heads kept per block
    kv_heads: list[int] | None  # KV heads kept per block
    block_ratios: dict[str, list[float]]  # target removal ratio per block and structure
    removed: dict[str, list[int]] = field(default_factory=dict)  # "<block>.<structure>" → removed unit indices
    uniform: bool = True  # same shapes in every block (config updated, plain from_pretrained loads it)
    surgery: list[dict] = field(default_factory=list)  # records for lmcompress.load where the config cannot say
    params_before: int = 0
    params_after: int = 0
    outlier_ratios: list[float] | None = None
    wall_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe_fields(self) -> dict:
        """What the recipe (``lmcompress.json``) says this run did: its config's fields, then the new shapes."""
        return {
            **self.config,
            "uniform": self.uniform,
            "ffn_widths": self.ffn_widths,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "block_ratios": self.block_ratios,
            "removed_units": self.removed,
            "outlier_ratios": self.outlier_ratios,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "surgery": self.surgery,
        }


# --------------------------------------------------------------------------------------------------- surgery


def _new_layer(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A layer of ``old``'s type, dtype and device holding ``weight`` ``[out, in]`` and ``bias``."""
    ref = old.weight
    n_out, n_in = weight.shape
    if isinstance(old, Conv1D):
        new = Conv1D(n_out, n_in).to(device=ref.device, dtype=ref.dtype)
        new.weight.data.copy_(weight.t())
        new.bias.data.copy_(bias if bias is not None else torch.zeros(n_out))
    else:
        new = nn.Linear(n_in, n_out, bias=bias is not None, device=ref.device, dtype=ref.dtype)
        new.weight.data.copy_(weight)
        if bias is not None:
            new.bias.data.copy_(bias)
    new.requires_grad_(ref.requires_grad)
    return new


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.data


def _keep_rows(module: nn.Module, rows: torch.Tensor) -> nn.Module:
    bias = _bias(module)
    return _new_layer(module, weight_matrix(module)[rows], None if bias is None else bias[rows])


def _replace(block: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, attr, new)


class _BlockResult:
    """What pruning one structure of one block did: which modules changed, and which got a new bias."""

    def __init__(self) -> None:
        self.resized: list[str] = []
        self.bias_added: list[str] = []
        self.removed: list[int] = []


def _finish_reader(block: nn.Module, path: str, weight: torch.Tensor, bias: torch.Tensor | None, res) -> None:
    old = block.get_submodule(path)
    if old.bias is None and bias is not None:
        res.bias_added.append(path)
    _replace(block, path, _new_layer(old, weight, bias))
    res.resized.append(path)


def prune_ffn_block(
    block: nn.Module, layout: Layout, n_remove: int, config: StructureConfig, stats: UnitStats | None
) -> _BlockResult:
    """Remove the ``n_remove`` least important FFN channels of one block (in place)."""
    res = _BlockResult()
    out = block.get_submodule(layout.ffn_out)
    w = weight_matrix(out).float()
    width = w.shape[1]
    ins = {p: block.get_submodule(p) for p in layout.ffn_in}
    h = layout.ffn_halves
    w_in = torch.cat(
        [weight_matrix(m).float().reshape(h, width, -1).transpose(0, 1).reshape(width, -1) for m in ins.values()], 1
    )
    keep = units_to_keep(unit_scores(config.criterion, w, stats, w_in=w_in), n_remove)
    gone = torch.ones(width, dtype=torch.bool)
    gone[keep.cpu()] = False
    res.removed = gone.nonzero().flatten().tolist()
    method = config.correction if n_remove else "none"  # nothing removed: nothing to correct
    fix = correct(method, w, _bias(out), stats, keep.to(w.device), config.damp)
    rows = torch.cat([keep + i * width for i in range(h)]).to(w.device)
    for path, module in ins.items():
        _replace(block, path, _keep_rows(module, rows))
        res.resized.append(path)
    _finish_reader(block, layout.ffn_out, fix.weight, fix.bias, res)
    return res


def block_heads(block: nn.Module, layout: Layout, shape: HeadShape) -> tuple[int, int]:
    """(query heads, KV heads) of one block, read from its weights."""
    heads = weight_matrix(block.get_submodule(layout.o)).shape[1] // shape.head_dim
    return heads, heads // shape.group


def prune_heads_block(
    block: nn.Module,
    layout: Layout,
    shape: HeadShape,
    n_remove: int,
    config: StructureConfig,
    stats: UnitStats | None,
) -> _BlockResult:
    """Remove the ``n_remove`` least important KV groups (a KV head with all its query heads) of one block."""
    res = _BlockResult()
    hd, group = shape.head_dim, shape.group
    heads, kv = block_heads(block, layout, shape)
    o = block.get_submodule(layout.o)
    w = weight_matrix(o).float()
    if layout.qkv is not None:
        fused = weight_matrix(block.get_submodule(layout.qkv))
        v_rows = fused[(heads + kv) * hd :]
    else:
        v_rows = weight_matrix(block.get_submodule(layout.v))
    w_in = v_rows.float().reshape(kv, -1)
    keep = units_to_keep(unit_scores(config.criterion, w, stats, unit_size=group * hd, w_in=w_in), n_remove)
    gone = torch.ones(kv, dtype=torch.bool)
    gone[keep.cpu()] = False
    res.removed = gone.nonzero().flatten().tolist()
    keep = keep.to(w.device)
    q_rows = unit_columns(keep, group * hd)  # query heads of group g are heads g·group … g·group + group − 1
    kv_rows = unit_columns(keep, hd)
    fix = correct(config.correction if n_remove else "none", w, _bias(o), stats, q_rows, config.damp)
    if layout.qkv is not None:
        rows = torch.cat([q_rows, heads * hd + kv_rows, (heads + kv) * hd + kv_rows])
        _replace(block, layout.qkv, _keep_rows(block.get_submodule(layout.qkv), rows))
        res.resized.append(layout.qkv)
    else:
        for path, r in ((layout.q, q_rows), (layout.k, kv_rows), (layout.v, kv_rows)):
            _replace(block, path, _keep_rows(block.get_submodule(path), r))
            res.resized.append(path)
    _finish_reader(block, layout.o, fix.weight, fix.bias, res)
    attn = block.get_submodule(layout.attn)
    for attr, value in (("num_heads", len(keep) * group), ("num_key_value_heads", len(keep))):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)
    return res


# ---------------------------------------------------------------------------------------------------- driver


def _unit_count(model: nn.Module, layout: Layout, structure: str) -> int:
    block = get_blocks(model)[0]
    if structure == "ffn":
        return weight_matrix(block.get_submodule(layout.ffn_out)).shape[1]
    return block_heads(block, layout, head_shape(model.config))[1]


def _n_remove(ratio: float, units: int, structure: str, where: str = "") -> int:
    n = round(ratio * units)
    what = "FFN channels" if structure == "ffn" else "KV groups of attention heads"
    if n >= units:
        raise UserError(
            f"ratio {ratio:g} would remove all {units} {what}{where}; use a smaller value "
            f"(at most {(units - 1) / units:.3g})",
            param="ratio",
        )
    return n


def _set_bias_flag(
    model: nn.Module, blocks, prefix: str, flag: tuple[str, tuple[str, ...]] | None, bias_added: list[str]
) -> list[str]:
    """Describe biases that a correction added to bias-less layers with a config flag, where the family has one.

    The flag (LLaMA's ``mlp_bias`` / ``attention_bias``) gives every layer it governs a bias, so the layers that
    got none from the correction get zeros; plain ``from_pretrained`` then builds the same model. Returns the
    added biases the config still cannot describe (they stay surgery records).
    """
    if flag is None:
        return bias_added
    key, paths = flag
    governed = {f"{prefix}.{i}.{p}" for i in range(len(blocks)) for p in paths}
    if not governed & set(bias_added):
        return bias_added
    setattr(model.config, key, True)
    for block in blocks:
        for path in paths:
            module = block.get_submodule(path)
            if module.bias is None:
                w = weight_matrix(module)
                _replace(block, path, _new_layer(module, w, torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)))
    return [name for name in bias_added if name not in governed]


def structured_prune(
    model: nn.Module,
    config: StructureConfig,
    calib: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> StructureReport:
    """Remove FFN channels and/or attention heads from ``model`` in place; see the module docstring."""
    start = time.perf_counter()
    config.validate()
    layouts = {s: structure_layout(model.config, s) for s in config.structures}
    layout = next(iter(layouts.values()))
    device = torch.device(device)
    if config.needs_calibration and (calib is None or calib.numel() == 0):
        raise UserError(f"criterion {config.criterion!r} / correction {config.correction!r} needs calibration data")
    if "heads" in config.structures and config.allocation != "uniform" and layout.heads == "uniform":
        raise UserError(
            f"{model.config.model_type} models read their head count from the config in forward, so heads can "
            "only be removed with one ratio for all blocks: use allocation uniform",
            param="allocation",
        )
    blocks = get_blocks(model)
    n_blocks = len(blocks)
    prefix = blocks_path(model)
    shape = head_shape(model.config) if "heads" in config.structures else None
    units = {s: _unit_count(model, layout, s) for s in config.structures}
    model.eval()
    params_before = count_params(model)

    # Per-block removal counts, all checked before anything is changed.
    outliers = None
    block_ratios = {s: [config.ratio] * n_blocks for s in config.structures}
    if config.allocation == "owl":
        outliers, owl = owl_pass(model, calib, device, config.ratio, config.owl_m, config.owl_lambda, progress=progress)
        block_ratios = {s: list(owl.sparsities) for s in config.structures}
    n_remove = {
        s: [_n_remove(r, units[s], s, f" in block {i}") for i, r in enumerate(block_ratios[s])]
        for s in config.structures
    }
    notes: list[str] = []
    if config.allocation == "owl" and owl.shrunk:
        notes.append(f"OWL λ {config.owl_lambda:g} shrunk to {owl.lam:.4g} to keep every block's ratio in [0, 0.99]")
    for s, counts in n_remove.items():
        if not any(counts):
            what = "FFN channels" if s == "ffn" else "KV groups of attention heads"
            notes.append(
                f"ratio {config.ratio:g} removes no {what}: {units[s]} per block, so it rounds to 0; "
                f"a ratio above {0.5 / units[s]:.3g} removes at least one"
            )
            log.warning(notes[-1])
    uniform = all(len(set(c)) == 1 for c in n_remove.values())

    # Forward code that reads head counts from the config (phi3's fused qkv) must see the counts of the block
    # being run: the dense ones while it is measured, the pruned ones while its outputs are passed on.
    dense_heads = (shape.heads, shape.kv_heads) if shape else None
    kept_heads = None
    if shape and uniform:
        kept_groups = shape.kv_heads - n_remove["heads"][0]
        kept_heads = (kept_groups * shape.group, kept_groups)
        model.config.head_dim = shape.head_dim

    def set_heads(counts: tuple[int, int] | None) -> None:
        if counts is not None and layout.heads == "uniform":
            model.config.num_attention_heads, model.config.num_key_value_heads = counts

    resized: list[str] = []
    bias_added: list[str] = []
    removed: dict[str, list[int]] = {}

    def unit_stats(_name: str, module: nn.Module) -> UnitStats:  # Σ x xᵀ only for the least-squares refit
        return UnitStats(weight_matrix(module).shape[1], device, covariance=config.correction == "lstsq")

    def prune_block(i: int, block: nn.Module, inputs: BlockInputs | None) -> None:
        set_heads(dense_heads)
        for s in config.structures:
            path = layouts[s].o if s == "heads" else layouts[s].ffn_out
            stats = None
            if inputs is not None and (config.criterion != "magnitude" or config.correction != "none"):
                stats = collect(block, inputs, [path], unit_stats)[path]
            if s == "heads":
                res = prune_heads_block(block, layouts[s], shape, n_remove[s][i], config, stats)
                set_heads(kept_heads)  # the FFN below is measured behind the pruned attention
            else:
                res = prune_ffn_block(block, layouts[s], n_remove[s][i], config, stats)
            resized.extend(f"{prefix}.{i}.{p}" for p in res.resized)
            bias_added.extend(f"{prefix}.{i}.{p}" for p in res.bias_added)
            removed[f"{i}.{s}"] = res.removed
        set_heads(kept_heads)

    if config.needs_calibration:
        walk_blocks(model, calib, device, prune_block, desc="structured", progress=progress)
    else:
        for i in tqdm(range(n_blocks), desc="structured", disable=not progress, unit="block"):
            prune_block(i, blocks[i], None)

    # Describe the new shapes: in the config when every block agrees, else as surgery records.
    ffn_widths = heads = kv_heads = None
    if "ffn" in config.structures:
        ffn_widths = [weight_matrix(b.get_submodule(layouts["ffn"].ffn_out)).shape[1] for b in blocks]
    if shape:
        heads, kv_heads = map(list, zip(*(block_heads(b, layouts["heads"], shape) for b in blocks), strict=True))
    if uniform:
        if ffn_widths:
            setattr(model.config, layouts["ffn"].ffn_width, ffn_widths[0])
        if heads:
            model.config.num_attention_heads = heads[0]
            if hasattr(model.config, "num_key_value_heads"):
                model.config.num_key_value_heads = kv_heads[0]
            model.config.head_dim = shape.head_dim
        for s in config.structures:
            bias_added = _set_bias_flag(model, blocks, prefix, layouts[s].bias_flag(s), bias_added)
        changed = sorted(set(bias_added))
    else:
        changed = sorted(set(resized))
    from lmcompress.models.surgery import record_linear

    surgery = [record_linear(name, model.get_submodule(name)) for name in changed]
    return StructureReport(
        config=config.to_dict(),
        ffn_widths=ffn_widths,
        heads=heads,
        kv_heads=kv_heads,
        block_ratios=block_ratios,
        removed=removed,
        uniform=uniform,
        surgery=surgery,
        params_before=params_before,
        params_after=count_params(model),
        outlier_ratios=outliers,
        wall_time_s=time.perf_counter() - start,
        notes=notes,
    )
