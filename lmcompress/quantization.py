"""Weight quantization of a whole model (RTN or GPTQ), block by block, and saving the result packed.

The linear layers of the transformer blocks are quantized; embeddings, norms and the output head keep
their dtype. The in-memory model ends up holding the dequantized weights (so it can be evaluated as is),
and the report holds each layer's :class:`QuantizedTensor` (integer codes + grids) for packed storage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.algorithms.gptq import gptq_quantize
from lmcompress.algorithms.quant import QuantizedTensor, rtn_quantize
from lmcompress.config import QuantConfig
from lmcompress.engine import BlockInputs, collect_input_stats, walk_blocks
from lmcompress.errors import UserError
from lmcompress.families import blocks_path, find_prunable, get_blocks, set_weight_matrix, weight_matrix
from lmcompress.packing import scale_storage_dtype

log = logging.getLogger(__name__)


@dataclass
class QuantReport:
    """What a quantization run did. ``quantized`` maps parameter names to codes + grids (not in to_dict)."""

    config: dict
    quantized: dict[str, QuantizedTensor]
    layer_loss: dict[str, float]  # GPTQ's estimate of ½‖WX − ŴX‖²/n per layer (empty for RTN)
    damping: dict[str, float] = field(default_factory=dict)  # layers that needed more than percdamp
    weights: int = 0  # number of quantized weights
    wall_time_s: float = 0.0

    @property
    def nominal_bits_per_weight(self) -> float:
        return nominal_bits_per_weight(self.quantized)

    def to_dict(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "quantized"}
        out["nominal_bits_per_weight"] = self.nominal_bits_per_weight
        return out


def nominal_bits_per_weight(quantized: dict[str, QuantizedTensor]) -> float:
    """Code bits plus each group's scale (in the dtype packed storage keeps it in: fp16 when that is exact, else
    fp32), its zero point when asymmetric, and any act-order group index, as :func:`pack_quantized` stores them.

    An estimate over the quantized weights stored densely (a sparse layout can take less); ``lmcompress info``
    reports what the saved files really take.
    """
    bits = weights = 0
    for q in quantized.values():
        per_group = 8 * scale_storage_dtype(q.scale).itemsize + (0 if q.spec.sym else q.spec.bits)
        g_idx = 0 if q.g_idx is None else q.g_idx.numel() * max(1, math.ceil(math.log2(q.scale.shape[1])))
        bits += q.codes.numel() * q.spec.bits + q.scale.numel() * per_group + g_idx
        weights += q.codes.numel()
    return bits / max(weights, 1)


def check_group_size(model: nn.Module, group_size: int) -> None:
    """UserError unless ``group_size`` divides the input width of every linear layer in the blocks."""
    if group_size == -1:
        return
    widths = {weight_matrix(m).shape[1] for block in get_blocks(model) for m in find_prunable(block).values()}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        divisors = [g for g in (256, 128, 64, 32, 16) if all(w % g == 0 for w in widths)]
        hint = f"use --group-size {divisors[0]}" if divisors else "use a group size that divides them"
        raise UserError(
            f"--group-size {group_size} does not divide the input width of every layer ({', '.join(map(str, bad))} "
            f"inputs); {hint}, or --group-size -1 for one grid per output channel"
        )


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> QuantReport:
    """Quantize the linear layers of ``model``'s blocks in place (they then hold the dequantized weights).

    GPTQ needs ``calib`` (token windows ``[nsamples, seqlen]``) and streams them through the model one block
    at a time, each block seeing the outputs of the already-quantized blocks before it. RTN needs no data.
    """
    start = time.perf_counter()
    config.validate()
    check_group_size(model, config.group_size)
    if config.needs_calibration and (calib is None or calib.numel() == 0):
        raise UserError("GPTQ needs calibration data (give --calib-data); RTN does not")
    device = torch.device(device)
    prefix = blocks_path(model)
    spec = config.spec
    model.eval()

    quantized: dict[str, QuantizedTensor] = {}
    layer_loss: dict[str, float] = {}
    damping: dict[str, float] = {}
    weights = 0

    def store(i: int, name: str, module: nn.Module, new: torch.Tensor, qt: QuantizedTensor) -> None:
        nonlocal weights
        set_weight_matrix(module, new)
        quantized[f"{prefix}.{i}.{name}.weight"] = qt.to("cpu")
        weights += new.numel()

    @torch.no_grad()
    def rtn_block(i: int, block: nn.Module) -> None:
        for name, module in find_prunable(block).items():
            qt = rtn_quantize(weight_matrix(module).to(device).float(), spec)
            store(i, name, module, qt.dequantize(), qt)

    @torch.no_grad()
    def gptq_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        layers = find_prunable(block)
        stats = collect_input_stats(block, inputs, list(layers), hessian=True)
        for name, module in layers.items():
            full = f"{prefix}.{i}.{name}"
            w = weight_matrix(module).float()
            mask = (w == 0) if config.keep_zeros else None
            if mask is not None and not mask.any():
                mask = None
            res = gptq_quantize(
                w,
                stats[name].hessian,
                spec,
                blocksize=config.blocksize,
                percdamp=config.percdamp,
                act_order=config.act_order,
                static_groups=config.static_groups,
                mask=mask,
                layer=full,
            )
            store(i, name, module, res.weight, res.quantized)
            layer_loss[full] = res.loss
            if res.damping > config.percdamp:
                damping[full] = res.damping

    if config.method == "rtn":
        blocks = get_blocks(model)
        for i in tqdm(range(len(blocks)), desc="rtn", disable=not progress, unit="block"):
            rtn_block(i, blocks[i])
    else:
        walk_blocks(model, calib, device, gptq_block, desc="gptq", progress=progress)

    return QuantReport(
        config=config.to_dict(),
        quantized=quantized,
        layer_loss=layer_loss,
        damping=damping,
        weights=weights,
        wall_time_s=time.perf_counter() - start,
    )


def save_quantized(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    recipe: dict,
    quantized: dict[str, QuantizedTensor],
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save ``model`` with its quantized layers packed as codes + grids (``lmcompress.storage.save_packed``)."""
    from lmcompress.storage import save_packed

    return save_packed(model, tokenizer, out_dir, recipe, quantized=quantized, overwrite=overwrite, dtype=dtype)
