"""AWQ (Lin et al., 2024): activation-aware per-input-channel scales searched before weight quantization.

For the linear layers that read one input ``X`` ([tokens, in]), channel ``j`` gets ``s_j = mean_t |X_tj|^a``
(normalized so that ``√(max s · min s) = 1``; only ratios matter). The weights are quantized as
``Q(W · diag(s))`` and the input divided by ``s`` (folded into the layer that produced it, as SmoothQuant
does), so the layer computes ``X · diag(s)⁻¹ · Q(W · diag(s))ᵀ``: channels that see large inputs get a
finer grid relative to their weights. The exponent ``a ∈ [0, 1]`` is chosen on a grid by the output error
of the quantized group (``a = 0`` is plain quantization, ``s = 1``). RTN or GPTQ then runs on the folded
weights ``W · diag(s)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
from lmcompress.algorithms.smoothquant import check_alpha, search_grid

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # [out, in] float weight → its dequantized quantization


def rtn_quantizer(spec: QuantSpec) -> Quantizer:
    """Round-to-nearest on ``spec``'s grid, dequantized (float32)."""
    return lambda w: rtn_quantize(w, spec).dequantize()


def awq_scales(act_absmean: torch.Tensor, exponent: float) -> torch.Tensor:
    """``s_j = mean|X_j|^a`` divided by ``√(max s · min s)`` (float32, ``[in]``; dead channels get the floor)."""
    exponent = check_alpha(exponent, "exponent")
    s = act_absmean.float().cpu().clamp(min=1e-4).pow(exponent)
    return s / (s.max() * s.min()).sqrt()


def effective_weight(weight: torch.Tensor, scales: torch.Tensor, quantize: Quantizer) -> torch.Tensor:
    """``Q(W · diag(s)) · diag(s)⁻¹``: the weight that, on the unscaled input, computes what the folded and
    quantized layer computes on the scaled one (float32)."""
    s = scales.to(weight.device)
    return quantize(weight.float() * s) / s


def group_output_error(
    x: torch.Tensor, weights: Sequence[torch.Tensor], scales: torch.Tensor, quantize: Quantizer
) -> float:
    """``Σ_l mean((X · (W_effˡ − Wˡ)ᵀ)²)``: the squared output error of the group's quantized layers on ``X``."""
    x = x.reshape(-1, x.shape[-1]).float()
    total = 0.0
    for w in weights:
        diff = effective_weight(w, scales, quantize) - w.float()
        total += float((x.to(diff.device) @ diff.t()).pow(2).mean())
    return total


@dataclass
class AwqResult:
    scales: torch.Tensor  # [in], float32: multiply the weights' columns, divide the producer's outputs
    exponent: float
    losses: dict[float, float] = field(default_factory=dict)  # loss of each exponent tried


def awq_search(
    x: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    quantize: Quantizer,
    grid: Sequence[float] | int = 21,
    loss: Callable[[torch.Tensor], float] | None = None,
    tie: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    act_absmean: torch.Tensor | None = None,
) -> AwqResult:
    """The exponent on ``grid`` (see ``smoothquant.search_grid``) whose scales give the lowest loss.

    ``x``: calibration inputs of the group ([..., in]); ``weights``: its ``[out, in]`` weights. ``loss(scales)``
    defaults to :func:`group_output_error`; a caller can pass one that runs the whole block with the
    :func:`effective_weight` s in place (the block output error). ``tie(values, "mean")`` makes inputs that
    must share a scale share their mean (grouped-query attention's ``o_proj``; see ``models.smoothing``).
    ``act_absmean`` ([in], the mean ``|x_j|`` over more tokens than ``x`` holds) replaces ``x``'s own; ``x``
    may then be None when ``loss`` is given.
    """
    if act_absmean is None and x is None:
        raise ValueError("awq_search needs the inputs x or their act_absmean")
    if x is None and loss is None:
        raise ValueError("awq_search's default loss needs the inputs x")
    absmean = (
        act_absmean.float().cpu()
        if act_absmean is not None
        else x.detach().reshape(-1, x.shape[-1]).abs().float().mean(dim=0)
    )
    if tie is not None:
        absmean = tie(absmean, "mean")
    if loss is None:

        def loss(scales: torch.Tensor) -> float:
            return group_output_error(x, weights, scales, quantize)

    best, losses = search_grid(lambda a: loss(awq_scales(absmean, a)), grid)
    return AwqResult(awq_scales(absmean, best), best, losses)
