"""Joint levels under a size budget: every layer at a sparsity and a bit width, the output head (and the input
embedding tied to it) at a bit width, costed in the exact bytes the packed save writes.

A layer at joint level ``s/b`` is pruned by SparseGPT at sparsity ``s`` (or an N:M pattern) with its kept
weights quantized to ``b`` bits on GPTQ's grid in the same pass (``transforms.prune``'s joint mode); at
sparsity 0 it is GPTQ alone, at ``b = 16`` SparseGPT alone (the weights stay floats, stored in the checkpoint's
16-bit dtype). The head is one more unit: at level ``k`` it is rounded to nearest on the same grid at the
fewest bits of the levels ``0…k`` (non-increasing in ``k``, as every unit's cost must be), or kept as floats.

Cost of a tensor = the bytes of its packed parts (:func:`lmcompress.checkpoint.packed.pack_named`, the code the
save runs) plus an upper bound on its entries in the safetensors header (offsets written with as many digits as
the dense file's size has). The budget is the size of ``model.packed.safetensors``: the searched tensors, the
rest of the model's tensors (norms, biases, an untied input embedding) as the save stores them, and the header.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmcompress.algorithms.evolution import LevelSpace
from lmcompress.algorithms.gptq import gptq_quantize
from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec, rtn_quantize
from lmcompress.checkpoint.load import source_dtype
from lmcompress.checkpoint.packed import PACKED_FILE, pack_named
from lmcompress.errors import UserError
from lmcompress.models.families import blocks_path, find_prunable, get_blocks
from lmcompress.search.levels import DROP, FLOAT_BITS, JointLevel
from lmcompress.transforms.prune import PruneConfig, prune_layers

HEAD_BLOCK = -1  # the head's "block": changing it changes the logits (and, when tied, the embeddings)
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint8": "U8", "int8": "I8", "int16": "I16",
           "int32": "I32", "int64": "I64", "bool": "BOOL", "float64": "F64", "float8_e4m3fn": "F8_E4M3"}  # fmt: skip
_METADATA = {"format": "pt", "lmcompress_storage": "packed"}  # what save_packed writes into the header


FLOATS_16 = (torch.bfloat16, torch.float16)


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a size search saves floats in: the model's config dtype (what ``jobs`` saves in) when it is a
    16-bit one, else bfloat16 (a model loaded to compute in float32 records float32 there)."""
    dtype = source_dtype(model.config) or next(p.dtype for p in model.parameters() if p.is_floating_point())
    return dtype if dtype in FLOATS_16 else torch.bfloat16


def store_floats_in_16_bits(model: nn.Module) -> None:
    """Record :func:`storage_dtype` as the model's dtype, so that the save stores its floats in it."""
    dtype = storage_dtype(model)
    model.config.dtype = dtype


def head_of(model: nn.Module) -> tuple[str, bool] | None:
    """The output head's module name and whether its weight is the input embedding's (tied), or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    embed = model.get_input_embeddings()
    return name, embed is not None and embed.weight is head.weight


def head_bits(levels: list[JointLevel]) -> list[int]:
    """The head's bit width at each level: the fewest bits of the levels up to it (16: floats)."""
    out, low = [], FLOAT_BITS
    for level in levels:
        low = low if level.drop else min(low, level.bits)  # a block's drop does not touch the head
        out.append(low)
    return out


def joint_compressor(levels: list[JointLevel], group_size: int, sym: bool, percdamp: float = 0.01):
    """A :data:`lmcompress.search.database.Compressor` over joint levels (called with their labels)."""
    by_label = {lv.label: lv for lv in levels}

    def one_level(level: JointLevel, weights, stats, names):
        if level.drop:  # zero weights: the block adds nothing to the residual stream (checked: check_drop)
            return [(torch.zeros_like(w), None) for w in weights]
        if level.sparsity == 0 and not level.quantized:
            return [(w, None) for w in weights]
        if level.sparsity == 0:
            spec = QuantSpec(level.bits, group_size, sym)
            out = []
            for w, name in zip(weights, names, strict=True):
                qt = gptq_quantize(w, stats.hessian, spec, percdamp=percdamp, layer=name).quantized
                out.append((qt.dequantize(), qt))
            return out
        config = PruneConfig(
            method="sparsegpt",
            sparsity=None if level.pattern != "unstructured" else level.sparsity,
            pattern=level.pattern,
            bits=level.bits if level.quantized else None,
            group_size=group_size,
            sym=sym,
            percdamp=percdamp,
        )
        results = prune_layers(config, weights, stats, [config.target] * len(weights), names)
        return [(r.weight, r.quantized) for r in results]

    def compress(weights, stats, labels, names):
        return [one_level(by_label[label], weights, stats, names) for label in labels]

    return compress, True, True


def head_levels(model: nn.Module, levels: list[JointLevel], group_size: int, sym: bool):
    """The head's weight (and codes) at every level: rounded to nearest at :func:`head_bits`. With a ``drop``
    level, first checks that a block with zero weights passes its input through (:func:`check_drop`)."""
    if any(level.drop for level in levels):
        check_drop(model)
    name, _ = head_of(model)
    w = dict(model.named_modules())[name].weight.data.float()
    cache: dict[int, tuple[torch.Tensor, QuantizedTensor | None]] = {}
    out = []
    for bits in head_bits(levels):
        if bits not in cache:
            if bits == FLOAT_BITS:
                cache[bits] = (w.clone(), None)
            else:
                qt = rtn_quantize(w, QuantSpec(bits, group_size, sym))
                cache[bits] = (qt.dequantize(), qt)
        out.append(cache[bits])
    return name, out


class ByteCost:
    """Exact bytes of tensors as the packed save stores them, with their header entries bounded from above."""

    def __init__(self, model: nn.Module) -> None:
        self.dtype = storage_dtype(model)
        dense = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        self.digits = len(str(8 * dense + (1 << 20)))  # more than any offset of the packed file

    def tensors(self, state: dict[str, torch.Tensor], quantized: dict[str, QuantizedTensor] | None = None) -> int:
        tensors, _ = pack_named(state, set(), quantized=quantized, dtype=self.dtype)
        return sum(t.numel() * t.element_size() + self.entry(k, t) for k, t in tensors.items())

    def entry(self, key: str, t: torch.Tensor) -> int:
        big = 10**self.digits - 1
        dtype = _DTYPES.get(str(t.dtype).removeprefix("torch."), "F8_E4M3")
        value = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [big, big]}
        return len(json.dumps({key: value}, separators=(",", ":"))) - 2 + 1  # without the braces, with a comma

    def layer(self, param: str, weight: torch.Tensor, qt: QuantizedTensor | None, label: str | None = None) -> int:
        """A weight ``[out, in]`` at one level: its codes and grids, or its floats (zeros left out by a layout);
        nothing at level ``drop`` (its block is removed before the save)."""
        if label == DROP:
            return 0
        if qt is None:
            return self.tensors({param: weight.to(self.dtype)})
        return self.tensors({param: qt.dequantize()}, {param: qt})

    @staticmethod
    def constant() -> int:
        """The header's length prefix, braces, metadata and padding (to 8 bytes) at most."""
        meta = len(json.dumps({"__metadata__": _METADATA}, separators=(",", ":"))) - 2 + 1
        return 8 + 2 + meta + 7


def fixed_bytes(model: nn.Module, searched: set[str], cost: ByteCost) -> int:
    """Bytes of every tensor the search does not choose a level for (norms, biases, an untied embedding), plus
    the header's constant part. Tensors that share storage with a searched weight (a tied embedding) are
    stored once, as that weight."""
    state = model.state_dict()
    taken = {state[f"{name}.weight"].data_ptr() for name in searched}
    rest = {k: v for k, v in state.items() if v.data_ptr() not in taken or not v.numel()}
    return cost.tensors(rest) + ByteCost.constant()


def parse_size(text: str) -> tuple[float, bool]:
    """``60MB``, ``1.5GB``, ``123456`` (bytes; KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024) → (bytes,
    False); ``0.3x`` → (0.3, True): that fraction of the model's 16-bit size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(x|b|kb|mb|gb|kib|mib|gib)?\s*", text.lower())
    if not m:
        raise UserError(f"size {text!r} must be bytes (60MB, 1.2GB, 500MiB, 123456) or a fraction of 16-bit (0.3x)")
    value, unit = float(m.group(1)), m.group(2) or "b"
    if unit == "x":
        if not 0 < value < 1:
            raise UserError(f"size {text!r}: a fraction of the 16-bit size must be in (0, 1), e.g. 0.3x")
        return value, True
    scale = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}[unit]
    if value * scale < 1:
        raise UserError(f"size {text!r} must be positive")
    return math.floor(value * scale), False


def sixteen_bit_bytes(model: nn.Module) -> int:
    """The model's tensors at 2 bytes per element, each storage once: what ``size=1x`` means."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += 2 * t.numel()
    return total


def budget_bytes(model: nn.Module, target: float, relative: bool) -> int:
    return math.floor(target * sixteen_bit_bytes(model)) if relative else int(target)


@dataclass(frozen=True)
class SizeSpace(LevelSpace):
    """A :class:`LevelSpace` in bytes, with the bytes no level changes (``fixed``) and the budget (``budget_bytes``,
    the whole file's) beside it."""

    fixed: int = 0
    budget_bytes: int = 0


def size_space(cost: list[list[float]], fixed: int, budget: int, labels: list[str], heads: list[int] = ()) -> SizeSpace:
    """The level space of a size budget: ``cost[u][k]`` bytes of unit ``u`` at level ``k``; a candidate's
    total plus ``fixed`` is at most ``budget`` and within the largest single level step of a unit other than
    the ``heads`` (whose steps, a fifth of a small model, are balanced by several steps of the others)."""
    for c in cost:
        for k in range(len(c) - 1):
            if c[k + 1] > c[k]:
                raise UserError(
                    f"level {labels[k + 1]} takes more bytes than {labels[k]} on some layer ({c[k + 1]:.0f} > "
                    f"{c[k]:.0f}): the levels must get smaller in this order; drop one of the two from --levels"
                )
    lo, hi = fixed + sum(c[-1] for c in cost), fixed + sum(c[0] for c in cost)
    if budget < lo:
        raise UserError(
            f"a size budget of {budget} bytes is below the smallest this model takes at these levels ({lo} bytes, "
            f"every layer at {labels[-1]}); raise the budget or add a smaller level"
        )
    others = [c for u, c in enumerate(cost) if u not in heads] or cost
    steps = [abs(c[k] - c[k + 1]) for c in others for k in range(len(c) - 1)]
    return SizeSpace(tuple(tuple(c) for c in cost), float(min(budget, hi) - fixed), max(steps), fixed, budget)


def uniform_values(levels: list[JointLevel], group_size: int) -> list[float]:
    """Each level's nominal bits per weight: where uniform starts are placed."""
    return [lv.nominal_bits(group_size) for lv in levels]


def packed_size(folder: str | Path) -> int:
    """Bytes of a packed folder's weights file (what a size budget counts)."""
    return (Path(folder) / PACKED_FILE).stat().st_size


def place_uniform(space: LevelSpace, values: list[float], target: float) -> list[int]:
    """Every unit at the first level whose nominal bits per weight (``values``, falling) are at most ``target``;
    units moved one level down, biggest saving first, until the total is within the budget; then moved one level
    up, in unit order round after round, while the total stays within it. Raises ValueError when the result
    is still below the budget by more than the slack."""
    first = next((k for k, v in enumerate(values) if v <= target), len(values) - 1)
    levels = [first] * space.units
    cost, hi = space.cost, space.budget + space.tolerance
    while space.total(levels) > hi:
        down = [(cost[u][lv] - cost[u][lv + 1], u) for u, lv in enumerate(levels) if lv + 1 < space.levels]
        if not down:
            break
        levels[max(down)[1]] += 1
    moved = True
    while moved:
        moved = False
        for u in range(space.units):
            if levels[u] > 0 and space.total(levels) + cost[u][levels[u] - 1] - cost[u][levels[u]] <= hi:
                levels[u] -= 1
                moved = True
    if not space.feasible(levels):
        raise ValueError("the uniform start cannot be placed on the budget")
    return levels


@torch.no_grad()
def check_drop(model: nn.Module) -> None:
    """UserError unless the first block, with every linear layer's weight zero, returns its input unchanged (a
    residual block whose output projections have no bias): the search scores a dropped block that way, and the
    save removes it."""
    block = get_blocks(model)[0]
    layers = list(find_prunable(block).values())
    saved = [m.weight.data.clone() for m in layers]
    seen: list[torch.Tensor] = []
    hooks = [
        block.register_forward_pre_hook(lambda m, a, k: seen.append(_hidden(a, k).clone()), with_kwargs=True),
        block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)),
    ]
    try:
        for m in layers:
            m.weight.data.zero_()
        device = next(model.parameters()).device
        model(torch.arange(8, device=device).unsqueeze(0) % model.config.vocab_size, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for m, w in zip(layers, saved, strict=True):
            m.weight.data.copy_(w)
    if len(seen) < 2 or not torch.equal(seen[0], seen[1]):
        raise UserError(
            "the level drop needs blocks that pass their input through when their weights are zero (residual "
            "blocks whose output projections have no bias); this model's do not: leave drop out of --levels"
        )


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def remove_dropped(model: nn.Module, chosen: dict[str, str], block_of: dict[str, int], quantized: dict) -> list[int]:
    """Remove the blocks whose layers are at ``drop`` (``chosen``: layer → label) from ``model``, and rename the
    codes in ``quantized`` (parameter name → codes) after the renumbered blocks. Returns the removed blocks."""
    from lmcompress.transforms.depth import remove_blocks

    drop = sorted({block_of[layer] for layer, label in chosen.items() if label == DROP})
    if not drop:
        return []
    if len(drop) >= len(get_blocks(model)):
        raise UserError(
            "the searched model drops every block: the size budget is too small to keep one; raise the budget or "
            "leave drop out of --levels"
        )
    prefix = blocks_path(model)
    remove_blocks(model, drop)
    renamed = {}
    for name, qt in quantized.items():
        if name.startswith(prefix + "."):
            index, _, rest = name[len(prefix) + 1 :].partition(".")
            old = int(index)
            if old in drop:
                continue
            name = f"{prefix}.{old - sum(d < old for d in drop)}.{rest}"
        renamed[name] = qt
    quantized.clear()
    quantized.update(renamed)
    return drop
