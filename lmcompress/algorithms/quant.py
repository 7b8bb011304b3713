"""Uniform integer quantization of weight matrices: scales, zero points and round-to-nearest (RTN).

A weight row is split into groups of ``group_size`` consecutive inputs (``-1``: the whole row, i.e. one
scale per output channel). When ``group_size`` does not divide the row's ``in`` inputs, the last group is
shorter: inputs ``[k·g, in)`` with ``k = ⌊in / g⌋`` form group ``k`` (576 inputs at ``g = 128``: four groups
of 128 and one of 64), so input ``c`` is always in group ``c // g``. Each group gets a scale ``s`` and an
integer zero point ``z``; a weight ``w`` is stored as the code ``q = clamp(round(w / s) + z, 0, 2^bits − 1)``
and read back as ``(q − z) · s``.

Two grids (``QuantSpec.grid``):

* ``minmax`` (the GPTQ reference convention): asymmetric ``s = (max − min) / (2^bits − 1)``,
  ``z = round(−min / s)``; symmetric ``s = 2·max|w| / (2^bits − 1)``, ``z = 2^(bits−1)``, so the codes
  ``q − z`` run over ``−2^(bits−1) … 2^(bits−1) − 1`` and the largest positive weight is clipped to
  ``(2^(bits−1) − 1)·s``.
* ``q4_0`` (4-bit symmetric only): llama.cpp's ``Q4_0`` block quantization. With ``x`` the group's element of
  largest ``|w|`` (the first one on ties, keeping its sign), ``d = x / −8`` in float32, the code is
  ``q = min(15, ⌊w·(1/d) + 8.5⌋)`` (float32 arithmetic; ``1/d`` taken as 0 when ``d = 0``) and the stored
  scale is ``s = fp16(d)`` with ``z = 8``: ``x`` itself lands exactly on the code 0 (``−8·d``), whatever its
  sign, and the step is ``max|w| / 8``. On groups of 32 inputs of fp16 weights this gives llama.cpp's codes and
  scales bit for bit, and the weight lmcompress holds, ``(q − 8)·s``, is the one llama.cpp computes with. The
  scale is negative when the extreme is positive.
* ``q5_0`` (5-bit symmetric), the same with ``d = x / −16``, ``q = min(31, ⌊w·(1/d) + 16.5⌋)``, ``z = 16``.
* ``q5_1`` (5-bit asymmetric): llama.cpp's ``Q5_1``: ``d = (max − min) / 31`` (the group's own range, not
  widened to hold 0), ``q = min(31, ⌊(w − min)·(1/d) + 0.5⌋)``, stored ``s = fp16(d)`` and ``m = fp16(min)``;
  lmcompress's zero point is ``z = −m / s`` (not an integer), so ``(q − z)·s`` is llama.cpp's ``s·q + m`` within
  a few float32 ulps, and an exact zero is kept only up to that.
* ``q4_1`` (4-bit asymmetric): llama.cpp's ``Q4_1``, the same with ``d = (max − min) / 15``,
  ``q = min(15, ⌊(w − min)·(1/d) + 0.5⌋)``.
* ``q8_0`` (8-bit symmetric): llama.cpp's ``Q8_0``: ``d = max|w| / 127``, ``q − 128 = roundf(w·(1/d))``
  (half away from zero), ``s = fp16(d)``, ``z = 128``.
* ``q2_k``, ``q3_k``, ``q4_k``, ``q5_k``, ``q6_k``: llama.cpp's K-quant sub-blocks
  (:mod:`lmcompress.algorithms.kquants`; bits 2…6, groups of 16 or 32, with minimums for Q2_K / Q4_K / Q5_K,
  symmetric for Q3_K / Q6_K): the scale is the sub-block's ``d·sc``, the zero point ``dmin·m / (d·sc)`` or the
  middle code. Rows must be whole 256-weight super-blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcompress.algorithms.kquants import KTYPES, KGrid, grid_from_scales, rtn_kquant

# llama.cpp's 32-weight block types as grids: name → (bits, sym)
LEGACY: dict[str, tuple[int, bool]] = {
    "q4_0": (4, True),
    "q4_1": (4, False),
    "q5_0": (5, True),
    "q5_1": (5, False),
    "q8_0": (8, True),
}
WITH_MIN = ("q4_1", "q5_1")  # the block types storing the group's minimum m (w = d·q + m)
GRIDS = ("minmax", *LEGACY, *KTYPES)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # inputs per scale; -1 = one scale per output row
    sym: bool = True  # symmetric grid around zero (zero point fixed at the middle code)
    grid: str = "minmax"  # how a group's scale is chosen: "minmax", a llama.cpp block type (LEGACY) or K-quant

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be positive or -1 (per channel), got {self.group_size}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.grid in LEGACY and (self.bits, self.sym) != LEGACY[self.grid]:
            bits, sym = LEGACY[self.grid]
            kind = "symmetric" if sym else "asymmetric"
            raise ValueError(f"the {self.grid} grid is {bits}-bit {kind}, got bits={self.bits}, sym={self.sym}")
        if self.grid in KTYPES and (self.bits, self.group_size, self.sym) != kquant_shape(self.grid):
            bits, group, sym = kquant_shape(self.grid)
            raise ValueError(
                f"the {self.grid} grid is {bits}-bit {'symmetric' if sym else 'asymmetric'} in groups of {group}, "
                f"got bits={self.bits}, group_size={self.group_size}, sym={self.sym}"
            )

    @property
    def kquant(self) -> bool:
        """True on a K-quant grid (q2_k … q6_k)."""
        return self.grid in KTYPES

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def width(self, in_features: int) -> int:
        """Inputs per group (the last group may be shorter: see :meth:`last_width`)."""
        return in_features if self.group_size == -1 else self.group_size

    def last_width(self, in_features: int) -> int:
        """Inputs in the last group: ``width`` when it divides ``in_features``, else the remainder."""
        width = self.width(in_features)
        return in_features - (self.groups(in_features) - 1) * width if in_features else 0

    def has_partial_group(self, in_features: int) -> bool:
        """True when the last group is shorter than the others (``group_size`` does not divide the width)."""
        return self.group_size != -1 and in_features % self.group_size != 0


def kquant_shape(grid: str) -> tuple[int, int, bool]:
    """``(bits, group_size, sym)`` of a K-quant grid: the spec that :class:`QuantSpec` requires with it."""
    kind = KTYPES[grid]
    return kind.bits, kind.sub, not kind.has_min


def kquant_spec(grid: str) -> QuantSpec:
    return QuantSpec(*kquant_shape(grid), grid=grid)


def kquant_tensor(codes: torch.Tensor, grid: KGrid) -> QuantizedTensor:
    """K-quant codes and grid as a :class:`QuantizedTensor`: scale ``d·sc`` and zero point ``m₁ / d₁`` (or the
    middle code) per sub-block."""
    return QuantizedTensor(codes.to(torch.uint8), grid.step(), grid.zero(), kquant_spec(grid.kind.name))


def kquant_grid_of(q: QuantizedTensor) -> KGrid:
    """The integer K-quant grid behind ``q`` (ValueError unless ``q`` is on one, in natural column order)."""
    cols = q.codes.shape[1]
    if q.g_idx is not None and not torch.equal(q.group_index().cpu(), torch.arange(cols) // q.spec.group_size):
        raise ValueError("a K-quant grid has its sub-blocks in column order (no act-order group index)")
    return grid_from_scales(q.scale, q.zero, q.spec.grid)


def grid_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` (a group of columns), shapes ``[rows]``.

    The grid always contains 0 (the range is widened to include it) so that pruned weights stay exact. For the
    ``q4_0`` grid the scale is ``fp16(d)`` (as float32; :func:`q4_0_step` gives ``d`` itself).
    """
    if spec.grid in LEGACY:
        d, _, lo = legacy_step(w, spec.grid)
        scale = d.half().float()
        if spec.sym:
            return scale, torch.full_like(d, float((spec.maxq + 1) // 2))
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.where(scale == 0, torch.zeros_like(scale), -lo.half().float() / safe)
    w = w.float()
    lo = torch.clamp(w.min(dim=1).values, max=0.0)
    hi = torch.clamp(w.max(dim=1).values, min=0.0)
    if spec.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)  # an all-zero row: any positive scale reproduces it exactly
    lo[flat], hi[flat] = -1.0, 1.0
    scale = (hi - lo) / spec.maxq
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.round(-lo / scale)
    return scale, zero


def q4_0_step(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``Q4_0`` step per row of ``w`` ([rows, k]): ``(d, 1/d)`` in float32, ``d = x / −8`` with ``x``
    the row's first element of largest ``|w|``, and ``1/d = 0`` where ``d = 0`` (an all-zero row)."""
    w = w.float()
    extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)  # argmax: the first maximum
    d = extreme / -8.0
    inverse = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return d, inverse


def q4_0_codes(w: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``Q4_0`` codes ``clamp(⌊w·inverse + 8.5⌋, 0, 15)`` of ``w`` ([rows, k]) with ``inverse = 1/d`` per row
    (float32, as llama.cpp computes them; the lower clamp only matters for weights beyond the group's extreme,
    as GPTQ's updated columns can be)."""
    return torch.clamp(torch.floor(w.float() * inverse.unsqueeze(1) + 8.5), 0, 15)


def legacy_step(w: torch.Tensor, grid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's step of a 32-weight block type per row of ``w`` ([rows, k]): ``(d, 1/d, lo)`` in float32 with
    ``1/d = 0`` where ``d = 0``; ``lo`` is the row's minimum on ``q4_1`` / ``q5_1`` and 0 on the symmetric types."""
    w = w.float()
    lo = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if grid in ("q4_0", "q5_0"):
        extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)  # argmax: the first maximum
        d = extreme / -float(2 ** (LEGACY[grid][0] - 1))
    elif grid == "q8_0":
        d = w.abs().amax(1) / 127.0
    elif grid in WITH_MIN:
        lo, hi = w.amin(1), w.amax(1)
        d = (hi - lo) / float(2 ** LEGACY[grid][0] - 1)
    else:
        raise ValueError(f"{grid!r} is not one of llama.cpp's 32-weight block types {', '.join(LEGACY)}")
    return d, torch.where(d == 0, torch.zeros_like(d), 1.0 / d), lo


def legacy_codes(w: torch.Tensor, grid: str, inverse: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Codes (float, integer-valued) of ``w`` ([rows, k]) for a 32-weight block type from :func:`legacy_step`'s
    per-row ``inverse = 1/d`` and ``lo``, in llama.cpp's float32 arithmetic; clamped to the code range (weights
    beyond the group's range, as GPTQ's updated columns can be, take the end codes)."""
    w, inverse, lo = w.float(), inverse.unsqueeze(1), lo.unsqueeze(1)
    bits = LEGACY[grid][0]
    if grid == "q8_0":
        x = w * inverse
        return torch.clamp(torch.sign(x) * torch.floor(x.abs() + 0.5), -128, 127) + 128
    if grid in WITH_MIN:
        return torch.clamp(torch.floor((w - lo) * inverse + 0.5), 0, 2**bits - 1)
    mid = 2 ** (bits - 1)
    return torch.clamp(torch.floor(w * inverse + (mid + 0.5)), 0, 2**bits - 1)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of ``w`` ([rows, k]) on the grid given per row by ``scale`` and ``zero`` ([rows])."""
    return torch.clamp(torch.round(w.float() / scale.unsqueeze(1)) + zero.unsqueeze(1), 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero.unsqueeze(1)) * scale.unsqueeze(1)


@dataclass
class QuantizedTensor:
    """An ``[out, in]`` weight as integer codes plus per-(row, group) scales and zero points.

    Column ``c`` uses group ``c // group_size`` (the last group shorter when ``group_size`` does not divide
    ``in``) unless ``g_idx`` is given: GPTQ with act-order and groups
    forms its groups in activation order, so a group's columns are scattered and ``g_idx[c]`` names the
    group of column ``c``. Always in the ``[out, in]`` layout of ``families.weight_matrix`` (a GPT-2
    ``Conv1D`` parameter is the transpose).
    """

    codes: torch.Tensor  # uint8 [out, in], values in [0, 2^bits − 1]
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor  # float32 [out, groups], integer-valued
    spec: QuantSpec
    g_idx: torch.Tensor | None = None  # int32 [in]: group of each input column; None = c // group_size

    def group_index(self) -> torch.Tensor:
        """The group of every input column, ``[in]`` (int64)."""
        cols = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(cols, device=self.codes.device) // self.spec.width(cols)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the codes stand for."""
        g = self.group_index()
        return (self.codes.float() - self.zero[:, g]) * self.scale[:, g]

    def rows(self, start: int, stop: int) -> QuantizedTensor:
        """Output rows ``start:stop`` (one layer of a row-wise stack of layers quantized together)."""
        return QuantizedTensor(
            self.codes[start:stop], self.scale[start:stop], self.zero[start:stop], self.spec, self.g_idx
        )

    def to(self, device: str | torch.device) -> QuantizedTensor:
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        return QuantizedTensor(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.spec, g_idx)


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> QuantizedTensor:
    """Round-to-nearest quantization of ``weight`` ([out, in]) with per-group grids (a partial last group gets
    its own grid from its own, fewer, inputs). On a K-quant grid, ``importance`` ([in], e.g. an imatrix) weights
    the sub-block scale search (UserError when a row is not whole 256-weight super-blocks)."""
    if spec.kquant:
        codes, grid = rtn_kquant(weight, spec.grid, importance)
        return kquant_tensor(codes, grid)
    rows, cols = weight.shape
    width = spec.width(cols)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
    scales, zeros = [], []
    for g0 in range(0, cols, width):
        block = weight[:, g0 : g0 + width]
        scale, zero = grid_params(block, spec)
        if spec.grid in LEGACY:
            _, inverse, lo = legacy_step(block, spec.grid)
            q = legacy_codes(block, spec.grid, inverse, lo)
        else:
            q = quantize_codes(block, scale, zero, spec.maxq)
        codes[:, g0 : g0 + width] = q.to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedTensor(codes, torch.stack(scales, 1), torch.stack(zeros, 1), spec)


def scale_storage_dtype(scale: torch.Tensor) -> torch.dtype:
    """The narrowest float dtype (fp16, bf16, fp32) that holds every scale exactly: storage stays lossless."""
    for dtype in (torch.float16, torch.bfloat16):
        if scale.dtype.itemsize > dtype.itemsize and _float_is_exact(scale, dtype):
            return dtype
    return scale.dtype if scale.dtype.itemsize <= 4 else torch.float32


def _float_is_exact(t: torch.Tensor, dtype: torch.dtype) -> bool:
    low = t.to(dtype)
    return bool(torch.isfinite(low).all()) and torch.equal(low.to(t.dtype), t)
