"""llama.cpp's K-quant block types (Q2_K … Q6_K): grids, round-to-nearest codes, the exact block bytes.

A row is cut into super-blocks of ``QK_K = 256`` weights, each into sub-blocks of ``sub`` weights (32 for Q4_K /
Q5_K, 16 otherwise). Sub-block ``j`` of a super-block has an integer scale ``sc_j`` (and, for the types with a
minimum, an integer ``m_j``) under the super-block's fp16 ``d`` (and ``dmin``); a weight's code ``q`` is read as

* Q2_K, Q4_K, Q5_K (``bits`` 2 / 4 / 5, scales and minimums of 4 / 6 / 6 bits): ``w = d₁·q − m₁`` with
  ``d₁ = d·sc_j``, ``m₁ = dmin·m_j`` (float32; ``d₁·q`` is exact, so one rounding);
* Q3_K (``sc_j`` in −32…31, stored as ``sc_j + 32`` in 6 bits): ``w = d·sc_j·(q − 4)``, ``q`` in 0…7;
* Q6_K (``sc_j`` an int8): ``w = (d·sc_j)·(q − 32)``, ``q`` in 0…63.

The grid (everything but the codes) is chosen per sub-block by a weighted least-squares search over candidate
steps (with the minimum solved jointly for the types that have one, as llama.cpp's ``make_qkx2_quants`` does;
a signed step for the symmetric types), then the sub-block scales of a super-block are put on the super-block's
integer grid with the largest one at the top code (63, 15, −32 or −128: llama.cpp's reference convention, which
also makes :func:`grid_from_scales` exact), and each sub-block's integers are finally moved by ±1 where that
lowers the weighted error of its rounded codes (:func:`_refine`). Element weights are ``rms + |w|`` (``rms``
over the sub-block: llama.cpp's Q4_K / Q5_K weighting, used here for every type) or, with an importance vector
``a`` per input (an imatrix, or GPTQ's ``diag H``), llama.cpp's imatrix weighting ``a·sqrt(σ² + w²)`` with
``σ²`` the super-block's mean square.

As a :class:`~lmcompress.algorithms.quant.QuantizedTensor` (``group_size = sub``) a sub-block has
``scale = d₁`` and ``zero = m₁ / d₁`` (the min types) or the middle code 4 / 32: lmcompress's weight
``(q − zero)·scale`` is llama.cpp's exactly for Q3_K / Q6_K and within a few float32 ulps of ``d₁·q − m₁`` for
the min types; the codes and the stored integers are the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmcompress.errors import UserError

QK_K = 256


@dataclass(frozen=True)
class KType:
    """One K-quant block type: code ``bits``, ``sub`` weights per sub-block, whether it has minimums, the top
    integer of its sub-block scales (negative: signed scales, the extreme one stored at that value), bytes per
    256-weight block, its GGML type id and llama.cpp's fallback when a row is not a multiple of 256."""

    name: str
    bits: int
    sub: int
    has_min: bool
    scale_top: int
    block_bytes: int
    ggml_type: int
    fallback: str

    @property
    def nsub(self) -> int:
        return QK_K // self.sub

    @property
    def mid(self) -> int:
        """The code read as 0 on the symmetric types (0 for the min types, whose codes are all ≥ 0)."""
        return 0 if self.has_min else 2 ** (self.bits - 1)


KTYPES: dict[str, KType] = {
    "q2_k": KType("q2_k", 2, 16, True, 15, 84, 10, "q4_0"),
    "q3_k": KType("q3_k", 3, 16, False, -32, 110, 11, "q4_0"),
    "q4_k": KType("q4_k", 4, 32, True, 63, 144, 12, "q5_0"),
    "q5_k": KType("q5_k", 5, 32, True, 63, 176, 13, "q5_1"),
    "q6_k": KType("q6_k", 6, 16, False, -128, 210, 14, "q8_0"),
}


def ktype(name: str) -> KType:
    if name not in KTYPES:
        raise UserError(f"K-quant type {name!r} is unknown: choose one of {', '.join(KTYPES)}", param="grid")
    return KTYPES[name]


def check_row(kind: KType, cols: int, layer: str = "") -> None:
    """UserError unless a row of ``cols`` weights is whole 256-weight super-blocks."""
    if cols % QK_K:
        where = f"{layer} has" if layer else "a row of"
        raise UserError(
            f"{where} {cols} inputs, not a multiple of {QK_K}, so it cannot be stored as {kind.name.upper()}: "
            f"llama.cpp falls back to {kind.fallback.upper()} for such tensors; quantize those layers on another "
            "grid (for example q4_0 / minmax) or leave them dense",
            param="grid",
        )


@dataclass
class KGrid:
    """A K-quant grid for ``[rows, cols]`` weights: integer sub-block ``scales`` / ``mins`` (int16,
    ``[rows, cols / sub]``; ``mins`` zero for the symmetric types) and fp16 ``d`` / ``dmin``
    (``[rows, cols / 256]``)."""

    kind: KType
    scales: torch.Tensor
    mins: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor

    def step(self) -> torch.Tensor:
        """``d₁ = d·sc`` per sub-block, float32 (exact: an fp16 times an integer of at most 8 bits)."""
        return self.d.float().repeat_interleave(self.kind.nsub, 1) * self.scales.float()

    def offset(self) -> torch.Tensor:
        """``m₁ = dmin·m`` per sub-block, float32 (exact); zero for the symmetric types."""
        return self.dmin.float().repeat_interleave(self.kind.nsub, 1) * self.mins.float()

    def zero(self) -> torch.Tensor:
        """The zero point in codes per sub-block: ``m₁ / d₁`` (0 where ``d₁ = 0``), or the middle code."""
        if not self.kind.has_min:
            return torch.full(self.scales.shape, float(self.kind.mid), device=self.scales.device)
        step = self.step()
        return torch.where(step == 0, torch.zeros_like(step), self.offset() / torch.where(step == 0, 1.0, step))


def _expand(per_sub: torch.Tensor, sub: int) -> torch.Tensor:
    return per_sub.repeat_interleave(sub, 1)


def _element_weights(w: torch.Tensor, kind: KType, importance: torch.Tensor | None) -> torch.Tensor:
    """Least-squares weight of each element, ``[rows, cols]`` (see the module docstring)."""
    rows, cols = w.shape
    if importance is not None:
        sigma2 = w.reshape(rows, -1, QK_K).square().mean(2, keepdim=True)
        return (importance.float().reshape(1, -1, QK_K) * (sigma2 + w.reshape(rows, -1, QK_K).square()).sqrt()).reshape(
            rows, cols
        )
    rms = w.reshape(rows, -1, kind.sub).square().mean(2, keepdim=True).sqrt()
    return (rms + w.reshape(rows, -1, kind.sub).abs()).reshape(rows, cols)


def _search_min(x: torch.Tensor, wt: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per row of ``x`` ([n, k]): the step ``s ≥ 0`` and minimum ``m ≥ 0`` of the grid ``s·l − m`` (``l`` in
    0…nmax) with the least weighted squared error. Starting from ``−m = min(x, 0)``, it tries the roundings at
    steps ``(max − (−m)) / (nmax + rmin + rdelta·i)`` from the best ``−m`` so far and, for each, the weighted
    least-squares ``(s, −m)`` (``−m`` clipped at 0, so the range holds 0), keeping whichever lowers the error."""
    hi = x.amax(1)
    lo = x.amin(1).clamp(max=0.0)
    span = hi - lo
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    best_s, best_lo = span / nmax, lo.clone()
    levels = torch.clamp(torch.round((x - lo[:, None]) * (nmax / span)[:, None]), 0, nmax)
    best = (wt * (best_s[:, None] * levels + lo[:, None] - x).square()).sum(1)
    sw, sx = wt.sum(1), (wt * x).sum(1)
    for i in range(nstep + 1):
        span = (hi - best_lo).clamp(min=torch.finfo(x.dtype).tiny)
        levels = torch.round((x - best_lo[:, None]) * ((rmin + rdelta * i + nmax) / span)[:, None]).clamp(0, nmax)
        sl, sl2, sxl = (wt * levels).sum(1), (wt * levels.square()).sum(1), (wt * levels * x).sum(1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s, m = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
        clip = m > 0
        s = torch.where(clip, sxl / sl2.clamp(min=1e-30), s)
        m = torch.where(clip, torch.zeros_like(m), m)
        err = (wt * (s[:, None] * levels + m[:, None] - x).square()).sum(1)
        better = ok & (err < best)
        best, best_s, best_lo = (
            torch.where(better, err, best),
            torch.where(better, s, best_s),
            torch.where(better, m, best_lo),
        )
    best_s = torch.where(flat, torch.zeros_like(best_s), best_s.clamp(min=0.0))
    return best_s, -best_lo


def _search_sym(x: torch.Tensor, wt: torch.Tensor, nmax: int) -> torch.Tensor:
    """Per row of ``x`` ([n, k]): the step ``s`` (signed, of the sign that puts the extreme at ``−nmax``) of the grid
    ``s·l`` (``l`` in −nmax…nmax−1) with the least weighted squared error, over the roundings at
    ``iscale = −(nmax + 0.1·i) / x_ext`` (``i`` in −9…9), each with its least-squares step ``Σwxl / Σwl²``."""
    ext = x.gather(1, x.abs().argmax(1, keepdim=True)).squeeze(1)
    tiny = ext.abs() < 1e-15
    ext = torch.where(tiny, torch.ones_like(ext), ext)
    best_gain = torch.full_like(ext, -1.0)
    best_levels = torch.zeros_like(x)
    for i in range(-9, 10):
        levels = torch.clamp(torch.round(x * (-(nmax + 0.1 * i) / ext)[:, None]), -nmax, nmax - 1)
        slx, sl2 = (wt * x * levels).sum(1), (wt * levels.square()).sum(1)
        gain = torch.where(sl2 > 0, slx.square() / sl2.clamp(min=1e-30), torch.zeros_like(slx))  # error drop
        better = gain > best_gain
        best_gain, best_levels = torch.where(better, gain, best_gain), torch.where(better[:, None], levels, best_levels)
    slx, sl2 = (wt * x * best_levels).sum(1), (wt * best_levels.square()).sum(1)
    best_s = torch.where(sl2 > 0, slx / sl2.clamp(min=1e-30), -ext / nmax)
    return torch.where(tiny, torch.zeros_like(best_s), best_s)


def _super_scales(s: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the sub-block steps ``s`` ([rows, blocks, nsub]) on each super-block's integer grid: ``(ints, d)`` with
    the step of largest ``|s|`` at ``top`` (ints in 0…top, or top…−top−1 for a negative ``top``) and ``d`` its fp16
    step ``s_ext / top``; ``d = 0`` (ints 0) where every step is 0."""
    ext = s.gather(2, s.abs().argmax(2, keepdim=True)).squeeze(2)
    zero = ext == 0
    inv = torch.where(zero, torch.zeros_like(ext), top / torch.where(zero, torch.ones_like(ext), ext))
    lo, hi = (0, top) if top > 0 else (top, -top - 1)
    ints = torch.clamp(torch.round(inv[..., None] * s), lo, hi)
    d = torch.where(zero, torch.zeros_like(ext), ext / top).half()
    ints = torch.where(d[..., None] == 0, torch.zeros_like(ints), ints)  # an fp16 underflow holds nothing
    return ints.to(torch.int16), d


def kquant_grid(weight: torch.Tensor, kind: KType | str, importance: torch.Tensor | None = None) -> KGrid:
    """The grid (sub-block scales / minimums and super-block ``d`` / ``dmin``) of ``weight`` ([rows, cols], ``cols``
    a multiple of 256) for ``kind``, weighted by ``importance`` ([cols], ≥ 0) when given (see the module docstring).

    With minimums, a sub-block whose minimum is not 0 keeps a step of at least 1 (so ``m₁ / d₁`` is finite)."""
    kind = ktype(kind) if isinstance(kind, str) else kind
    w = weight.detach().float()
    rows, cols = w.shape
    check_row(kind, cols)
    wt = _element_weights(w, kind, importance).reshape(-1, kind.sub)
    x = w.reshape(-1, kind.sub)
    nmax = 2**kind.bits - 1
    if kind.has_min:
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if kind.name == "q4_k" else (-0.5, 0.1, 15)
        s, m = _search_min(x, wt, nmax, rmin, rdelta, nstep)
        sc, d = _super_scales(s.reshape(rows, -1, kind.nsub), kind.scale_top)
        mins, dmin = _super_scales(m.reshape(rows, -1, kind.nsub), kind.scale_top)
        need = (mins > 0) & (sc == 0)  # a minimum needs a step: the smallest (or, with no step at all, the top)
        no_step = d == 0
        d = torch.where(no_step & need.any(2), torch.tensor(2.0**-24, dtype=d.dtype, device=d.device), d)
        sc = torch.where(need, torch.where(no_step[..., None], kind.scale_top, 1), sc).to(torch.int16)
    else:
        s = _search_sym(x, wt, 2 ** (kind.bits - 1))
        sc, d = _super_scales(s.reshape(rows, -1, kind.nsub), kind.scale_top)
        mins, dmin = torch.zeros_like(sc), torch.zeros_like(d)
    grid = KGrid(kind, sc.reshape(rows, -1), mins.reshape(rows, -1), d, dmin)
    return _refine(grid, w, wt.reshape(rows, cols))


def _grid_error(w: torch.Tensor, wt: torch.Tensor, grid: KGrid) -> torch.Tensor:
    """Weighted squared error of each sub-block, ``[rows, cols / sub]``, with the codes rounded on ``grid``."""
    rows = w.shape[0]
    diff = kquant_dequantize(kquant_codes(w, grid), grid) - w
    return (wt * diff.square()).reshape(rows, -1, grid.kind.sub).sum(2)


def _refine(grid: KGrid, w: torch.Tensor, wt: torch.Tensor) -> KGrid:
    """Move each sub-block's integer scale (and minimum) by −1, 0 or +1 to whichever gives the least weighted
    error of its rounded codes under the super-block's fixed ``d`` / ``dmin``. Integers at the top (the ones
    that define ``d`` / ``dmin``) stay, and a non-zero minimum keeps a non-zero step."""
    kind = grid.kind
    top = kind.scale_top
    lo, hi = (0, top) if top > 0 else (top, -top - 1)
    best_sc, best_m = grid.scales.clone(), grid.mins.clone()
    best = _grid_error(w, wt, grid)
    steps = [(a, b) for a in (-1, 0, 1) for b in ((-1, 0, 1) if kind.has_min else (0,)) if a or b]
    for a, b in steps:
        sc = torch.where(grid.scales == top, grid.scales, (grid.scales + a).clamp(lo, hi))
        mins = torch.where(grid.mins == top, grid.mins, (grid.mins + b).clamp(0, top)) if kind.has_min else grid.mins
        err = _grid_error(w, wt, KGrid(kind, sc, mins, grid.d, grid.dmin))
        better = (err < best) & ~((mins > 0) & (sc == 0))
        best = torch.where(better, err, best)
        best_sc, best_m = torch.where(better, sc, best_sc), torch.where(better, mins, best_m)
    return KGrid(kind, best_sc, best_m, grid.d, grid.dmin)


def kquant_codes(weight: torch.Tensor, grid: KGrid) -> torch.Tensor:
    """Codes of ``weight`` ([rows, k], the first ``k`` inputs of the grid's rows, ``k`` a multiple of ``sub``)
    rounded to the nearest point of the fixed ``grid``: ``clamp(round((w + m₁) / d₁), 0, 2^bits − 1)`` or
    ``clamp(round(w / d₁), −mid, mid − 1) + mid``; a sub-block with ``d₁ = 0`` gets the code read as its minimum."""
    kind = grid.kind
    k = weight.shape[1]
    step = _expand(grid.step()[:, : k // kind.sub], kind.sub)
    empty = step == 0
    safe = torch.where(empty, torch.ones_like(step), step)
    if kind.has_min:
        offset = _expand(grid.offset()[:, : k // kind.sub], kind.sub)
        q = torch.clamp(torch.round((weight.float() + offset) / safe), 0, 2**kind.bits - 1)
        return torch.where(empty, torch.zeros_like(q), q).to(torch.uint8)
    q = torch.clamp(torch.round(weight.float() / safe), -kind.mid, kind.mid - 1) + kind.mid
    return torch.where(empty, torch.full_like(q, kind.mid), q).to(torch.uint8)


def kquant_dequantize(codes: torch.Tensor, grid: KGrid) -> torch.Tensor:
    """The float32 weight llama.cpp computes from these codes and grid (its ``dequantize_row_q*_K``)."""
    kind = grid.kind
    step = _expand(grid.step(), kind.sub)
    if kind.has_min:
        return step * codes.float() - _expand(grid.offset(), kind.sub)
    return step * (codes.float() - kind.mid)


def rtn_kquant(
    weight: torch.Tensor, kind: KType | str, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, KGrid]:
    """Round-to-nearest K-quantization of ``weight`` ([rows, cols]): :func:`kquant_grid`, then
    :func:`kquant_codes` on it; ``(codes, grid)``."""
    grid = kquant_grid(weight, kind, importance)
    return kquant_codes(weight, grid), grid


def grid_from_scales(scale: torch.Tensor, zero: torch.Tensor, kind: KType | str) -> KGrid:
    """The integer grid behind per-sub-block ``scale = d₁`` and ``zero`` ([rows, cols / sub], as
    :meth:`KGrid.step` / :meth:`KGrid.zero` give them): ``d = d₁_ext / top`` from each super-block's step of
    largest ``|d₁|``, ``sc = d₁ / d``, and likewise ``dmin`` and ``m`` from ``m₁ = zero·d₁``. ValueError unless
    the grid rebuilt from those integers gives back the same scales and zero points exactly."""
    kind = ktype(kind) if isinstance(kind, str) else kind
    rows = scale.shape[0]
    if scale.shape[1] % kind.nsub:
        raise ValueError(f"{scale.shape[1]} sub-blocks are not whole {kind.name.upper()} super-blocks")
    step = scale.float()
    sc, d = _integers(step.reshape(rows, -1, kind.nsub), kind.scale_top)
    mins, dmin = torch.zeros_like(sc), torch.zeros_like(d)
    if kind.has_min:
        mins, dmin = _integers((zero.float() * step).reshape(rows, -1, kind.nsub), kind.scale_top)
    grid = KGrid(kind, sc.reshape(rows, -1), mins.reshape(rows, -1), d, dmin)
    if not (torch.equal(grid.step(), step) and torch.equal(grid.zero(), zero.float())):
        raise ValueError(f"these scales and zero points are not a {kind.name.upper()} grid (fp16 d, integer scales)")
    return grid


def _integers(values: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the super-block step: ``d = fp16(v_ext / top)`` and ``round(v / d)`` per super-block."""
    ext = values.gather(2, values.abs().argmax(2, keepdim=True)).squeeze(2)
    d = (ext / top).half()
    safe = torch.where(d == 0, torch.ones_like(d), d).float()
    ints = torch.where(d[..., None] == 0, 0.0, torch.round(values / safe[..., None]))
    return ints.to(torch.int16), d


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 ``[rows, blocks]`` as little-endian bytes ``[rows, blocks, 2]``."""
    return torch.from_numpy(x.cpu().numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2))


def _from_fp16_bytes(b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b.numpy()).view("<f2")[..., 0].astype(np.float16))


def _pack_crumbs(low: torch.Tensor, width: int, run: int = 32) -> torch.Tensor:
    """Codes ``[..., 256]`` of ``width`` bits (2 or 4) packed as llama.cpp does: chunks of ``run·8/width`` codes, the
    ``i``-th run of ``run`` codes of a chunk at bit ``width·i`` of the chunk's ``run`` bytes."""
    per = 8 // width
    c = low.reshape(*low.shape[:-1], -1, per, run).to(torch.int32)
    shifts = (torch.arange(per, dtype=torch.int32) * width).reshape(per, 1)
    return (c << shifts).sum(-2).reshape(*low.shape[:-1], -1).to(torch.uint8)


def _unpack_crumbs(packed: torch.Tensor, width: int, run: int = 32) -> torch.Tensor:
    per = 8 // width
    b = packed.reshape(*packed.shape[:-1], -1, 1, run).to(torch.int32)
    shifts = (torch.arange(per, dtype=torch.int32) * width).reshape(per, 1)
    return ((b >> shifts) & (2**width - 1)).reshape(*packed.shape[:-1], -1)


def _pack_bits_by_run(bit: torch.Tensor, runs: int) -> torch.Tensor:
    """One bit per code ``[..., runs·32]``: code ``32·r + l`` at bit ``r`` of byte ``l`` (Q3_K's hmask, Q5_K's qh)."""
    b = bit.reshape(*bit.shape[:-1], runs, 32).to(torch.int32)
    return (b << torch.arange(runs, dtype=torch.int32).reshape(runs, 1)).sum(-2).to(torch.uint8)


def _unpack_bits_by_run(packed: torch.Tensor, runs: int) -> torch.Tensor:
    b = packed.to(torch.int32).unsqueeze(-2) >> torch.arange(runs, dtype=torch.int32).reshape(runs, 1)
    return (b & 1).reshape(*packed.shape[:-1], runs * 32)


def _pack_scales12(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: eight 6-bit scales ``a`` and minimums ``b`` ([..., 8]) in 12 bytes: bytes 0–3 hold ``a[0:4]``
    and the top two bits of ``a[4:8]`` in bits 6–7, bytes 4–7 the same for ``b``, bytes 8–11 the low nibbles of
    ``a[4:8]`` (bits 0–3) and ``b[4:8]`` (bits 4–7)."""
    a, b = a.to(torch.int32), b.to(torch.int32)
    first = a[..., :4] | ((a[..., 4:] >> 4) << 6)
    second = b[..., :4] | ((b[..., 4:] >> 4) << 6)
    third = (a[..., 4:] & 15) | ((b[..., 4:] & 15) << 4)
    return torch.cat([first, second, third], -1).to(torch.uint8)


def _unpack_scales12(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.to(torch.int32)
    first, second, third = s[..., :4], s[..., 4:8], s[..., 8:]
    a = torch.cat([first & 63, (third & 15) | ((first >> 6) << 4)], -1)
    b = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], -1)
    return a, b


def _pack_q3_scales(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K: sixteen scales (stored as ``sc + 32``, 6 bits) in 12 bytes: byte ``j < 8`` holds the low nibbles of
    scales ``j`` and ``j + 8``; byte ``8 + k`` the top two bits of scales ``k, k + 4, k + 8, k + 12`` at bits 0, 2,
    4, 6."""
    raw = (sc.to(torch.int32) + 32) & 63
    low = (raw[..., :8] & 15) | ((raw[..., 8:] & 15) << 4)
    high = raw.reshape(*raw.shape[:-1], 4, 4) >> 4  # [..., t, k]: scale k + 4t
    high = (high << (2 * torch.arange(4, dtype=torch.int32)).reshape(4, 1)).sum(-2)
    return torch.cat([low, high], -1).to(torch.uint8)


def _unpack_q3_scales(s: torch.Tensor) -> torch.Tensor:
    s = s.to(torch.int32)
    low = torch.cat([s[..., :8] & 15, s[..., :8] >> 4], -1)
    high = (s[..., 8:].unsqueeze(-2) >> (2 * torch.arange(4, dtype=torch.int32)).reshape(4, 1)) & 3
    return (low | (high.reshape(*s.shape[:-1], 16) << 4)) - 32


def pack(codes: torch.Tensor, grid: KGrid) -> np.ndarray:
    """The bytes of llama.cpp's blocks for ``codes`` ([rows, cols], uint8) on ``grid``: ``[rows, cols / 256 ·
    block_bytes]`` uint8, each row the blocks of one GGUF row (``ne0 = cols``) in order."""
    kind = grid.kind
    rows, cols = codes.shape
    check_row(kind, cols)
    L = codes.cpu().to(torch.int32).reshape(rows, -1, QK_K)
    sc = grid.scales.cpu().to(torch.int32).reshape(rows, -1, kind.nsub)
    mn = grid.mins.cpu().to(torch.int32).reshape(rows, -1, kind.nsub)
    d, dmin = _fp16_bytes(grid.d), _fp16_bytes(grid.dmin)
    if kind.name == "q2_k":
        parts = [(sc | (mn << 4)).to(torch.uint8), _pack_crumbs(L, 2), d, dmin]
    elif kind.name == "q3_k":
        parts = [_pack_bits_by_run(L >> 2, 8), _pack_crumbs(L & 3, 2), _pack_q3_scales(sc), d]
    elif kind.name == "q4_k":
        parts = [d, dmin, _pack_scales12(sc, mn), _pack_crumbs(L, 4)]
    elif kind.name == "q5_k":
        parts = [d, dmin, _pack_scales12(sc, mn), _pack_bits_by_run(L >> 4, 8), _pack_crumbs(L & 15, 4)]
    else:  # q6_k
        parts = [_pack_crumbs(L & 15, 4, 64), _pack_crumbs(L >> 4, 2), sc.to(torch.int8).view(torch.uint8), d]
    blocks = torch.cat(parts, -1)
    assert blocks.shape[-1] == kind.block_bytes, (kind.name, blocks.shape)
    return blocks.reshape(rows, -1).numpy()


def unpack(data: np.ndarray, kind: KType | str, cols: int) -> tuple[torch.Tensor, KGrid]:
    """Inverse of :func:`pack`: ``(codes, grid)`` from ``[rows, cols / 256 · block_bytes]`` bytes."""
    kind = ktype(kind) if isinstance(kind, str) else kind
    check_row(kind, cols)
    b = torch.from_numpy(np.array(data, dtype=np.uint8)).reshape(-1, cols // QK_K, kind.block_bytes)  # a copy
    rows = b.shape[0]
    cuts = {
        "q2_k": (16, 64, 2, 2),
        "q3_k": (32, 64, 12, 2),
        "q4_k": (2, 2, 12, 128),
        "q5_k": (2, 2, 12, 32, 128),
        "q6_k": (128, 64, 16, 2),
    }[kind.name]
    p = list(torch.split(b, cuts, -1))
    zeros = torch.zeros(rows, cols // QK_K, kind.nsub, dtype=torch.int32)
    none = torch.zeros(rows, cols // QK_K, dtype=torch.float16)
    if kind.name == "q2_k":
        sc, mn, L, d, dmin = p[0].to(torch.int32) & 15, p[0].to(torch.int32) >> 4, _unpack_crumbs(p[1], 2), p[2], p[3]
    elif kind.name == "q3_k":
        L = _unpack_crumbs(p[1], 2) | (_unpack_bits_by_run(p[0], 8) << 2)
        sc, mn, d, dmin = _unpack_q3_scales(p[2]), zeros, p[3], None
    elif kind.name == "q4_k":
        (sc, mn), L, d, dmin = _unpack_scales12(p[2]), _unpack_crumbs(p[3], 4), p[0], p[1]
    elif kind.name == "q5_k":
        (sc, mn), d, dmin = _unpack_scales12(p[2]), p[0], p[1]
        L = _unpack_crumbs(p[4], 4) | (_unpack_bits_by_run(p[3], 8) << 4)
    else:
        L = _unpack_crumbs(p[0], 4, 64) | (_unpack_crumbs(p[1], 2) << 4)
        sc, mn, d, dmin = p[2].contiguous().view(torch.int8).to(torch.int32), zeros, p[3], None
    grid = KGrid(
        kind,
        sc.reshape(rows, -1).to(torch.int16),
        mn.reshape(rows, -1).to(torch.int16),
        _from_fp16_bytes(d),
        none if dmin is None else _from_fp16_bytes(dmin),
    )
    return L.reshape(rows, cols).to(torch.uint8), grid


def dequantize_bytes(data: np.ndarray, kind: KType | str, cols: int) -> torch.Tensor:
    """llama.cpp's float32 weights ``[rows, cols]`` from K-quant block bytes."""
    codes, grid = unpack(data, kind, cols)
    return kquant_dequantize(codes, grid)
