"""Weight-and-activation quantization (W8A8 int8, FP8 E4M3), simulated as the exported checkpoint computes it.

Scales follow compressed-tensors' convention, so that the simulated model equals the one transformers / vLLM
load from a compressed-tensors export. Weights are symmetric (no zero point); int8 activations are symmetric
by default, or asymmetric per token (a zero point per token, vLLM's "azp" int8 kernels):

* **int8**: ``s = max|x| / 127.5`` over the scaled set (an output row of a weight; one token of an
  activation), code ``q = round(clamp(x / s, −128, 127))`` (round half to even), value ``q·s``. The largest
  magnitude lands on ±127.5, so a positive extreme is clipped to ``127·s`` and a negative one rounds to −128.
  (vLLM's own dynamic per-token kernel divides by 127 instead: ``divisor=127`` reproduces it.)
* **int8, asymmetric** (activations only): the token's range widened to hold 0, ``lo = min(min x, 0)``,
  ``hi = max(max x, 0)``; ``s = (hi − lo) / 255``, zero point ``z = round(clamp(−128 − lo / s, −128, 127))``,
  code ``q = round(clamp(x / s + z, −128, 127))``, value ``(q − z)·s``. A token whose values are all of one sign
  (after a norm, a few channels of large fixed sign) gets up to twice the resolution of the symmetric grid.
* **FP8 E4M3** (``torch.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, no infinities, largest finite
  ±448, smallest normal 2⁻⁶, subnormals down to 2⁻⁹): ``s = max|x| / 448``, value ``fp8(clamp(x / s, ±448))·s``
  with round-to-nearest-even in the cast. The cast is plain PyTorch and runs on any CPU; no FP8 hardware is
  needed to simulate it.

A W8A8 linear layer computes ``y = (Q(x) · Q(W)ᵀ) + b``: the integer (or FP8) product accumulated exactly,
then scaled by ``s_x[token] · s_W[row]``. :class:`ActQuantLinear` computes the same with the dequantized
values in float32, which differs from the integer product only by float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.errors import UserError

INT8_DIVISOR = 127.5  # compressed-tensors: max|x| / ((127 − (−128)) / 2)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn
_TINY = 1e-12  # floor on a scale, so that an all-zero row or token maps to codes 0


def absmax_scale(x: torch.Tensor, dim: int | None, divisor: float) -> torch.Tensor:
    """``max|x| / divisor`` over ``dim`` (kept as a size-1 dimension), or over the whole tensor when ``dim`` is None."""
    amax = x.detach().abs().amax() if dim is None else x.detach().abs().amax(dim=dim, keepdim=True)
    return torch.clamp(amax.float() / divisor, min=_TINY)


def int8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(clamp(x / scale, −128, 127))`` as int8 (``scale`` broadcasts against ``x``)."""
    return torch.round(torch.clamp(x.float() / scale, -128, 127)).to(torch.int8)


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fp8_e4m3(clamp(x / scale, −448, 448))`` (round to nearest even in the cast)."""
    return torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_token_int8(x: torch.Tensor, divisor: float = INT8_DIVISOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per token (the last dimension is the features): ``(codes int8, scale [..., 1])``."""
    scale = absmax_scale(x, -1, divisor)
    return int8_codes(x, scale), scale


def quantize_per_token_int8_asym(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic asymmetric int8 per token (module docstring): ``(codes int8, scale [..., 1], zero [..., 1])``, the
    zero point integer-valued in float32; the value is ``(codes − zero) · scale``."""
    x = x.float()
    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0.0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=_TINY)
    zero = torch.round(torch.clamp(-128.0 - lo / scale, -128, 127))
    codes = torch.round(torch.clamp(x / scale + zero, -128, 127)).to(torch.int8)
    return codes, scale, zero


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 E4M3 per token: ``(codes float8_e4m3fn, scale [..., 1])``."""
    scale = absmax_scale(x, -1, FP8_MAX)
    return fp8_codes(x, scale), scale


def quantize_weight_int8(weight: torch.Tensor, divisor: float = INT8_DIVISOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric int8 per output channel of an ``[out, in]`` weight: ``(codes, scale [out, 1])``."""
    scale = absmax_scale(weight, 1, divisor)
    return int8_codes(weight, scale), scale


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 per output channel of an ``[out, in]`` weight: ``(codes, scale [out, 1])``."""
    scale = absmax_scale(weight, 1, FP8_MAX)
    return fp8_codes(weight, scale), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes · scale`` in float32."""
    return codes.float() * scale


SCHEMES = ("w8a8", "fp8")


@dataclass
class FP8Weight:
    """An ``[out, in]`` weight as FP8 E4M3 codes (``float8_e4m3fn``) and one float32 scale per output row
    (``[out, 1]``): the value is ``codes · scale``."""

    codes: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> FP8Weight:
        """Per output channel, ``s = max|w| / 448`` (:func:`quantize_weight_fp8`)."""
        return cls(*quantize_weight_fp8(weight.detach()))

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale)

    def to(self, device: str | torch.device) -> FP8Weight:
        return FP8Weight(self.codes.to(device), self.scale.to(device))


@dataclass(frozen=True)
class ActScheme:
    """How a linear layer's input is quantized at run time.

    ``kind``: ``"int8"`` (per token, dynamic) or ``"fp8"``; for FP8 ``static_scale`` given means one
    per-tensor scale calibrated beforehand (``max|x| / 448`` over the calibration data), None means per token,
    dynamic. ``divisor`` is the symmetric int8 scale's divisor; ``symmetric=False``: int8 per token with a zero
    point (see the module docstring).
    """

    kind: str = "int8"
    static_scale: float | None = None
    divisor: float = INT8_DIVISOR
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("int8", "fp8"):
            raise UserError(f"activation quantization must be int8 or fp8, got {self.kind!r}")
        if self.static_scale is not None and (self.kind != "fp8" or not self.static_scale > 0):
            raise UserError("a static activation scale must be positive and is supported for fp8 only")
        if not self.symmetric and self.kind != "int8":
            raise UserError("asymmetric activations (a zero point per token) are supported for int8 only")

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantized and dequantized as the deployed kernel sees it (float32)."""
        if self.kind == "int8" and not self.symmetric:
            codes, scale, zero = quantize_per_token_int8_asym(x)
            return (codes.float() - zero) * scale
        if self.kind == "int8":
            return dequantize(*quantize_per_token_int8(x, self.divisor))
        if self.static_scale is None:
            return dequantize(*quantize_per_token_fp8(x))
        scale = torch.tensor(self.static_scale, dtype=torch.float32, device=x.device)
        return dequantize(fp8_codes(x, scale), scale)


def weight_scheme_quantize(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight half of a scheme: int8 or FP8 per output channel, ``(codes, scale [out, 1])``."""
    if kind == "int8":
        return quantize_weight_int8(weight)
    if kind == "fp8":
        return quantize_weight_fp8(weight)
    raise UserError(f"weight quantization must be int8 or fp8, got {kind!r}")


def static_fp8_scale(calibration_absmax: float) -> float:
    """The per-tensor FP8 activation scale from the largest ``|x|`` seen in calibration."""
    return max(float(calibration_absmax) / FP8_MAX, _TINY)


class ActQuantLinear(nn.Module):
    """A linear layer that quantizes its input, then multiplies by its quantized weight (both dequantized).

    ``codes`` / ``scale``: the weight as stored (``[out, in]`` int8 or FP8 codes, ``[out, 1]`` scales); the
    forward is ``F.linear(act.fake_quantize(x), codes · scale, bias)`` in float32, cast back to ``x``'s dtype.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, act: ActScheme) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("weight_scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act = act
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, act: ActScheme, weight_kind: str | None = None
    ) -> ActQuantLinear:
        """Round-to-nearest quantization of a float ``[out, in]`` weight (of ``act``'s kind unless given)."""
        codes, scale = weight_scheme_quantize(weight.detach(), weight_kind or act.kind)
        return cls(codes, scale, bias, act)

    @classmethod
    def from_quantized(cls, weight: QuantizedTensor, bias: torch.Tensor | None, act: ActScheme) -> ActQuantLinear:
        """From lmcompress's own 8-bit symmetric per-channel codes (RTN or GPTQ, ``QuantSpec(8, -1, sym=True)``):
        that grid is this module's int8 grid (``s = max|w| / 127.5``, ``q − 128 ∈ [−128, 127]``)."""
        spec = weight.spec
        if (spec.bits, spec.group_size, spec.sym, spec.grid) != (8, -1, True, "minmax") or weight.g_idx is not None:
            raise ValueError(f"W8A8 needs 8-bit symmetric per-channel minmax codes, got {spec}")
        codes = (weight.codes.to(torch.int16) - weight.zero.to(torch.int16)).to(torch.int8)
        return cls(codes, weight.scale.float(), bias, act)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.codes, self.weight_scale)

    def _apply(self, fn, recurse: bool = True):
        """``model.to(dtype)`` would cast the FP8 codes (a floating-point dtype) and the float32 scales: the
        codes and scales keep their dtype and move device only; the bias follows the model."""
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        y = F.linear(self.act.fake_quantize(x), self.dequantized_weight(), bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        static = "" if self.act.static_scale is None else f", static_scale={self.act.static_scale:.4g}"
        static += "" if self.act.symmetric else ", asymmetric"
        return f"in={self.in_features}, out={self.out_features}, weight={self.codes.dtype}, act={self.act.kind}{static}"


def _linear_names(root: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in root.named_modules() if n and isinstance(m, nn.Linear | Conv1D)]


@contextmanager
def recorded_input_absmax(root: nn.Module) -> Iterator[dict[str, float]]:
    """Within the ``with``, the largest ``|x|`` each linear layer under ``root`` receives, by name: the
    calibration of static per-tensor FP8 scales (:func:`static_fp8_scale`)."""
    absmax: dict[str, float] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            absmax[name] = max(absmax.get(name, 0.0), float(args[0].detach().abs().max()))

        return record

    handles = [root.get_submodule(n).register_forward_pre_hook(hook(n)) for n in _linear_names(root)]
    try:
        yield absmax
    finally:
        for h in handles:
            h.remove()


def simulate_linears(
    root: nn.Module, act: ActScheme, weight_kind: str | None = None, input_absmax: dict[str, float] | None = None
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` / GPT-2 ``Conv1D`` under ``root`` by an :class:`ActQuantLinear`
    quantized by round to nearest. Pass the blocks, not the whole model, to keep the head and embeddings in
    float. With ``input_absmax`` (from :func:`recorded_input_absmax`) every layer gets a static per-tensor FP8
    scale from its own calibrated maximum. Returns the replaced names (relative to ``root``)."""
    from transformers.pytorch_utils import Conv1D

    names = _linear_names(root)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        layer = getattr(parent, child)
        weight = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight
        scheme = act
        if input_absmax is not None:
            if name not in input_absmax:
                raise ValueError(f"no calibrated input maximum for {name}")
            scheme = ActScheme("fp8", static_scale=static_fp8_scale(input_absmax[name]))
        setattr(parent, child, ActQuantLinear.from_weight(weight, layer.bias, scheme, weight_kind))
    return names
