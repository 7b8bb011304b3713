"""W8A8 on CPU: int8 activations × int8 weights → int32, with dynamic per-token activation scales.

An int8 :class:`~lmcompress.algorithms.actquant.ActQuantLinear` simulates in float32 what a W8A8 kernel
computes; :class:`Int8ActLinear` computes it with integers. For an input row (token) ``x`` of length ``K``:

    s_x = max(max_k |x_k| / divisor, 10⁻¹²),   q_x = round(clamp(x / s_x, −128, 127))    (round half to even)
    y[n] = (Σ_k q_x[k] · q_W[n, k]) · s_x · s_W[n] + b[n]

with the weight's int8 codes ``q_W`` and per-row scales ``s_W`` as stored. The codes and scales of ``x`` are
those of ``ActScheme("int8").fake_quantize`` (same float32 operations); the sum is an exact int32 (``|q| ≤ 128``,
``K < 2¹⁷``), so the output differs from the simulated float32 one by float rounding only. With asymmetric
activations (a zero point ``z_x`` per token, ``ActScheme(symmetric=False)``; codes of
:func:`~lmcompress.algorithms.actquant.quantize_per_token_int8_asym`) the zero point is taken out after the
product, ``y[n] = (Σ_k q_x[k] · q_W[n, k] − z_x · Σ_k q_W[n, k]) · s_x · s_W[n] + b[n]``, the correction in int64.

What runs it (:func:`int8_path`):

* the product: ``torch._int_mm`` (PyTorch's int8 GEMM, oneDNN on x86-64: VNNI instructions where the CPU has
  them), for every number of tokens; where it is missing or refuses the shapes (old PyTorch), lmcompress's
  own AVX2 int8 kernel (``int8_gemv`` in ``csrc/qmatmul.cpp``: both operands widened to int16,
  ``_mm256_madd_epi16``, int32 accumulation), else the codes multiplied in float64 (exact, slow);
* the per-token quantization and the final scaling: one fused pass each in lmcompress's kernel
  (:mod:`lmcompress.kernels.cpu_ext`), PyTorch's elementwise ops where it cannot be built.

FP8 layers are not run by a kernel (no CPU has FP8 matrix units PyTorch uses): they stay simulated.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lmcompress.algorithms.actquant import ActQuantLinear, quantize_per_token_int8, quantize_per_token_int8_asym

log = logging.getLogger(__name__)

DECODE_ROWS = 0  # up to this many tokens use lmcompress's fused int8 gemv instead of _int_mm (0: never)
_STATE: dict[str, object] = {}


def _int_mm_works() -> bool:
    """Whether ``torch._int_mm`` multiplies int8 CPU matrices of any shape here (probed once, exactly)."""
    if "int_mm" not in _STATE:
        ok = hasattr(torch, "_int_mm")
        if ok:
            try:
                a = torch.tensor([[1, -128, 127]], dtype=torch.int8)
                b = torch.tensor([[3, 2, -1], [-128, -128, 5]], dtype=torch.int8)
                ok = torch._int_mm(a, b.t()).tolist() == [[-380, 16891]]
            except (RuntimeError, NotImplementedError):
                ok = False
        _STATE["int_mm"] = ok
    return bool(_STATE["int_mm"])


def _extension():
    from lmcompress.kernels import cpu_ext

    ext = cpu_ext.extension()
    return ext if ext is not None and hasattr(ext, "int8_gemv") else None


def int8_path(symmetric: bool = True) -> str:
    """What runs the int8 × int8 product of :class:`Int8ActLinear` on this machine (``symmetric``: activations
    without a zero point), in words."""
    ext = _extension()
    fused = "lmcompress's fused quantize/rescale" if ext is not None else "PyTorch elementwise quantize/rescale"
    if not symmetric:
        fused = "PyTorch elementwise quantize/rescale with a zero point per token"
    if _int_mm_works():
        own = f" (up to {DECODE_ROWS} tokens: lmcompress's fused AVX2 int8 gemv)" if ext and DECODE_ROWS > 0 else ""
        return f"torch._int_mm int8 GEMM{own}, {fused}"
    if ext is not None and symmetric:
        return f"lmcompress AVX2 int8 kernel (madd_epi16, int32), {fused}"
    return f"int8 codes multiplied in float64 (exact; no int8 kernel here), {fused}"


class Int8ActLinear(nn.Module):
    """``y = (q_x · q_Wᵀ) · s_x[token] · s_W[row] + b`` with an exact int32 product (module docstring).

    ``codes``: int8 ``[out, in]``; ``weight_scale``: ``[out, 1]`` (or ``[out]``); ``divisor``: the activation
    scale's divisor (``ActScheme.divisor``); ``symmetric=False``: activations with a zero point per token. Inputs
    of any leading shape and float dtype; the output has the input's dtype, as :class:`ActQuantLinear`'s does.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        divisor: float,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"Int8ActLinear needs int8 [out, in] codes, got {codes.dtype} {tuple(codes.shape)}")
        self.out_features, self.in_features = codes.shape
        if self.in_features >= 2**17:
            raise ValueError(f"{self.in_features} inputs: int32 accumulation is exact below 2^17")
        self.register_buffer("codes", codes.detach().cpu().contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(-1).cpu().contiguous())
        b = None if bias is None else bias.detach().float().reshape(-1).cpu().contiguous()
        self.register_buffer("bias", b)
        self.divisor = float(divisor)
        self.symmetric = symmetric
        # Σ_k q_W[n, k] per output row: the zero point's share of the product (asymmetric activations)
        self.register_buffer("code_sums", None if symmetric else self.codes.long().sum(1))

    @classmethod
    def from_act_quant(cls, m: ActQuantLinear) -> Int8ActLinear:
        """The same layer as an int8 :class:`ActQuantLinear` (int8 weight codes, int8 activations)."""
        if m.act.kind != "int8" or m.codes.dtype != torch.int8:
            raise ValueError(f"only int8 weights with int8 activations run as int8, got {m.codes.dtype} / {m.act.kind}")
        return cls(m.codes, m.weight_scale, m.bias, m.act.divisor, m.act.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if not self.symmetric:
            y = self._asymmetric(x2)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        ext = _extension()
        if ext is not None and (x2.shape[0] <= DECODE_ROWS or not _int_mm_works()):
            y = ext.int8_gemv(x2, self.codes, self.weight_scale, self.bias, self.divisor)  # quantize, dot, scale
        else:
            if ext is not None:
                q, sx = ext.quantize_per_token(x2, self.divisor)
            else:
                q, sx = quantize_per_token_int8(x2, self.divisor)
            if _int_mm_works():
                acc = torch._int_mm(q, self.codes.t())
            else:  # exact: |Σ| < 2⁵³
                acc = (q.double() @ self.codes.double().t()).to(torch.int32)
            if ext is not None:
                y = ext.int8_rescale(acc, sx, self.weight_scale, self.bias)
            else:
                y = acc.float() * sx * self.weight_scale
                if self.bias is not None:
                    y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _asymmetric(self, x2: torch.Tensor) -> torch.Tensor:
        """``[tokens, in]`` → ``[tokens, out]`` with a zero point per token (PyTorch's ops; the fused
        quantize / rescale of lmcompress's extension are symmetric only)."""
        q, sx, zx = quantize_per_token_int8_asym(x2)
        if _int_mm_works():
            acc = torch._int_mm(q, self.codes.t()).long()
        else:  # exact: |Σ| < 2⁵³
            acc = (q.double() @ self.codes.double().t()).long()
        acc = acc - zx.long() * self.code_sums
        y = acc.float() * sx * self.weight_scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        zero = "" if self.symmetric else ", zero point per token"
        bias = self.bias is not None
        return f"in={self.in_features}, out={self.out_features}, bias={bias}, int8 x int8 -> int32{zero}"


def swap_act_quant_linears(model: nn.Module) -> dict[str, str]:
    """Replace, in place, every int8 :class:`ActQuantLinear` under ``model`` by an :class:`Int8ActLinear` (CPU).

    Returns module name → what runs it: :func:`int8_path` for the swapped layers, and for the others (FP8
    weights or activations) why they stay simulated in float32.
    """
    report: dict[str, str] = {}
    paths = {sym: int8_path(sym) for sym in (True, False)}
    for name, module in list(model.named_modules()):
        if not isinstance(module, ActQuantLinear) or not name:
            continue
        if module.act.kind != "int8" or module.codes.dtype != torch.int8:
            kind = "FP8" if module.act.kind == "fp8" else str(module.codes.dtype).removeprefix("torch.")
            report[name] = f"{kind} W8A8 layer: no CPU kernel, simulated in float32 (ActQuantLinear)"
            continue
        if module.codes.device.type != "cpu":
            report[name] = f"on {module.codes.device.type}: the int8 kernel is a CPU kernel, simulated in float32"
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8ActLinear.from_act_quant(module))
        report[name] = paths[module.act.symmetric]
    return report


__all__ = ["Int8ActLinear", "int8_path", "swap_act_quant_linears"]
