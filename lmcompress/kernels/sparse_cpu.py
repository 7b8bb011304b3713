"""N:M sparse linear layers on CPU: the product reads only the kept values and their positions.

A weight is 2:4 (4:8) sparse when every group of 4 (8) consecutive inputs of a row holds at most 2 (4) non-zero
weights; a quantized weight (:class:`~lmcompress.algorithms.quant.QuantizedTensor`, ``W = (q − z) · s``) when at
most that many codes of a group differ from their zero point. :class:`SparseLinear` stores such a weight in the
layout of ``csrc/sparse_nm.cpp`` (:func:`pack_nm`): the 16 kept values of each block of 32 inputs (float32, or the
codes in 4 or 8 bits with the grid's ``s`` and ``z`` per row and group, any group size that is a multiple of 32 or
one group per row) and 2 bits of in-group position per kept value (3 for 4:8). Groups keeping fewer values store
zero weights (a float 0, or the code ``z``) at their first dropped positions. With 4-bit codes a 2:4 weight takes
(4 + 2) / 2 = 3 bits per weight against 4 dense, plus the same grid.

Up to :data:`DECODE_ROWS` input rows are multiplied from the kept values directly
(decode: AVX-512 where the CPU has it, else AVX2); more rows (prefill) by expanding a slice of rows at a time into
one reused float32 buffer and one GEMM per slice. Outputs equal the float32 matmul of the dequantized weight up to
summation order.

Unstructured sparsity runs on the bitmask kernel (``csrc/sparse_bitmask.cpp``, :class:`BitmaskLinear`,
:func:`pack_bitmask`): one bit per weight says which inputs a row keeps, and the kept values follow densely (float32,
or 8- / 4-bit codes with the same per-row, per-group ``s`` and ``z``, groups a multiple of 32). Decode expands the
kept values of every 16 inputs into their positions (AVX-512 ``vexpandps``; AVX2: a permutation looked up by the
mask's byte) and multiplies them with the dense inputs; prefill expands slices as above. It reads ``1 + (1 − p)·b``
bits per weight at sparsity ``p`` with ``b``-bit values, against ``b`` dense, but spends more per kept value than a
dense kernel spends per weight, so :func:`bitmask_kernel_for` chooses it only from the sparsity at which it decodes
faster than the dense kernel of the same values (:data:`BITMASK_MIN_SPARSITY`, measured: docs/kernels.md). Other
patterns run as before (dense, or from their codes by :class:`~lmcompress.kernels.linear.PackedLinear`), and
:func:`sparse_kernel_for` / :func:`bitmask_kernel_for` say why.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import nn

from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.errors import UserError

DECODE_ROWS = 4  # as lmcompress.kernels.linear: up to this many input rows from the kept values, more expanded
PATTERNS = ((2, 4), (4, 8))  # N:M the kernel runs: 16 kept values in every block of 32 inputs
KIND_FLOAT, KIND_INT4, KIND_INT8 = 0, 4, 8
BLOCK = 32  # inputs per block (16 kept)
MIN_SPARSITY = 0.25  # below this fraction of zeros a weight is not called sparse (no reason reported)
CHUNK = 8  # blocks whose 4-bit codes are one 64-byte load


_WORKSPACE = threading.local()  # per thread, one float32 buffer shared by every SparseLinear (a few MB)


def _workspace(numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements, reused across calls (prefill expands slices into it)."""
    buffer = getattr(_WORKSPACE, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACE.buffer = torch.empty(numel)
    return buffer


def _ext():
    from lmcompress.kernels import cpu_ext

    return cpu_ext.sparse_extension()


def unavailable_reason() -> str | None:
    """Why the sparse kernel cannot be had on this machine (None when it can; builds it at first call)."""
    from lmcompress.kernels import cpu_ext

    if _ext() is None:
        return cpu_ext.sparse_unavailable_reason() or "the sparse kernel did not build"
    return None


def use_avx512() -> bool:
    """Whether decode runs the AVX-512 variant: the CPU has AVX-512 F/BW/DQ/VL and ``LMCOMPRESS_AVX512`` is not 0."""
    ext = _ext()
    return ext is not None and bool(ext.has_avx512()) and os.environ.get("LMCOMPRESS_AVX512", "1") != "0"


def nm_pattern(keep: torch.Tensor) -> tuple[int, int] | None:
    """The first of :data:`PATTERNS` that ``keep`` (bool ``[out, in]``, True where the weight is non-zero) fits:
    at most N True in every group of M consecutive inputs; None if none fits (or ``in`` is no multiple of M)."""
    for n, m in PATTERNS:
        fits = keep.dim() == 2 and keep.shape[1] % m == 0
        if fits and (keep.numel() == 0 or int(keep.reshape(-1, m).sum(1, dtype=torch.int32).max()) <= n):
            return n, m
    return None


def _describe_miss(keep: torch.Tensor) -> str:
    """Why no pattern of :data:`PATTERNS` fits ``keep``."""
    cols = keep.shape[1]
    parts = []
    for _, m in PATTERNS:
        if cols % m:
            parts.append(f"{cols} inputs are not a multiple of {m}")
        else:
            parts.append(f"up to {int(keep.reshape(-1, m).sum(1).max())} of every {m} kept")
    zeros = 1 - float(keep.float().mean()) if keep.numel() else 0.0
    return (
        f"{100 * zeros:.0f}% zeros but not 2:4 or 4:8 ({'; '.join(parts)}): the sparse kernel runs 16 kept values "
        "in every 32 inputs only"
    )


def quantized_keep(q: QuantizedTensor) -> torch.Tensor:
    """Where the codes of ``q`` dequantize to a non-zero weight (code ≠ its group's zero point)."""
    return q.codes.to(torch.float32) != q.zero[:, q.group_index()]


def sparse_kernel_for(q: QuantizedTensor | torch.Tensor) -> tuple[tuple[int, int] | None, str]:
    """``((n, m), description)`` when :class:`SparseLinear` runs ``q`` (a quantized or float ``[out, in]``
    weight), else ``(None, why not)``; why is empty for weights with under :data:`MIN_SPARSITY` zeros."""
    quantized = isinstance(q, QuantizedTensor)
    keep = quantized_keep(q) if quantized else q.detach() != 0
    pattern = nm_pattern(keep)
    if pattern is None:
        dense = keep.numel() == 0 or float(keep.float().mean()) > 1 - MIN_SPARSITY
        return None, "" if dense else _describe_miss(keep)
    if quantized:
        spec = q.spec
        cols = q.codes.shape[1]
        if q.g_idx is not None and not torch.equal(q.g_idx.long().cpu(), torch.arange(cols) // spec.width(cols)):
            return None, "act-order groups (g_idx) scatter a group's inputs: the sparse kernel reads them in order"
        if spec.groups(cols) > 1 and spec.group_size % 32:
            return None, f"group size {spec.group_size}: the sparse kernel takes multiples of 32"
        if spec.bits > 8:
            return None, f"{spec.bits}-bit codes: the sparse kernel stores up to 8"
        if not torch.equal(q.zero, torch.round(q.zero)):
            return None, "zero points that are not integers: the sparse kernel takes integer ones"
    elif not q.is_floating_point():
        return None, f"{q.dtype} weight: the sparse kernel takes float or quantized weights"
    why = unavailable_reason()
    if why is not None:
        return None, f"sparse kernel unavailable: {why}"
    return pattern, _description(pattern, q)


def _description(pattern: tuple[int, int], q: QuantizedTensor | torch.Tensor) -> str:
    isa = "AVX-512" if use_avx512() else "AVX2"
    if isinstance(q, QuantizedTensor):
        groups = q.spec.groups(q.codes.shape[1])
        layout = f"g{q.spec.group_size}" if groups > 1 else "per-channel"
        values = f"{q.spec.bits}-bit {layout}"
    else:
        values = "float32"
    return f"lmcompress sparse kernel, {pattern[0]}:{pattern[1]} {values} ({isa}), float32"


def pack_nm(values: torch.Tensor, keep: torch.Tensor, n: int, m: int, kind: int) -> dict[str, torch.Tensor]:
    """The kernel's layout (``csrc/sparse_nm.cpp``) of an N:M ``[out, in]`` matrix of ``values`` (float32, or
    integer codes below ``2^kind``) whose kept entries are ``keep``: parts ``vals``, ``pos`` and (4:8) ``hi``.

    Raises ValueError when a group keeps more than ``n``."""
    if (n, m) not in PATTERNS:
        raise ValueError(f"the sparse kernel runs 2:4 and 4:8, not {n}:{m}")
    rows, cols = values.shape
    if cols % m:
        raise ValueError(f"{cols} inputs are not a multiple of {m}")
    padded = -(-max(cols, 1) // BLOCK) * BLOCK
    full = torch.zeros(rows, padded, dtype=torch.float32 if kind == KIND_FLOAT else torch.int32)
    full[:, :cols] = values.to(full.dtype)
    mask = torch.zeros(rows, padded, dtype=torch.bool)
    mask[:, :cols] = keep
    groups = mask.reshape(rows, -1, m)
    if groups.numel() and int(groups.sum(-1).max()) > n:
        raise ValueError(f"some groups of {m} keep more than {n} values: not {n}:{m}")
    # kept positions first, then the dropped ones, each ascending; the first n, ascending
    order = torch.sort((~groups).to(torch.int8), dim=-1, stable=True).indices[..., :n]
    positions = torch.sort(order, dim=-1).values  # [rows, groups, n]
    kept = full.reshape(rows, -1, m).gather(-1, positions)  # [rows, groups, n]
    blocks = padded // BLOCK
    per_block = positions.reshape(rows, blocks, 16).to(torch.int64)
    shifts = 2 * torch.arange(16, dtype=torch.int64)
    words = ((per_block & 3) << shifts).sum(-1)
    out = {"pos": (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32).contiguous()}
    if m == 8:
        bits = (((per_block >> 2) & 1) << torch.arange(16, dtype=torch.int64)).sum(-1)
        out["hi"] = (bits - (bits >= 2**15).to(torch.int64) * 2**16).to(torch.int16).contiguous()
    kept = kept.reshape(rows, blocks, 16)
    if kind == KIND_FLOAT:
        out["vals"] = kept.reshape(rows, -1).contiguous()
    elif kind == KIND_INT8:
        out["vals"] = kept.reshape(rows, -1).to(torch.uint8).contiguous()
    else:  # chunk of 8 blocks: 16 words, byte k of word l = kept l of blocks 2k (low nibble) and 2k + 1 (high)
        whole = torch.zeros(rows, -(-blocks // CHUNK) * CHUNK, 16, dtype=torch.uint8)
        whole[:, :blocks] = kept
        chunk = whole.reshape(rows, -1, CHUNK, 16)  # [row, chunk, block i, kept l]
        pairs = chunk[:, :, 0::2] | (chunk[:, :, 1::2] << 4)  # [row, chunk, k, l]
        out["vals"] = pairs.transpose(2, 3).reshape(rows, -1).contiguous()
    return out


class _ExpandingLinear(nn.Module):
    """The forward both sparse layers share: up to ``DECODE_ROWS`` rows by the kernel's own product
    (:meth:`_gemv`), more rows by expanding a slice of weight rows at a time into one reused buffer
    (:meth:`_expand`) and one float32 GEMM per slice; then the bias."""

    in_features: int
    out_features: int
    slice_rows: int

    def _layer(self, weight: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None, why: str) -> bool:
        """Shape, bias and description of the layer; whether ``weight`` holds quantized codes."""
        self.description = why
        self.compute_dtype = torch.float32
        quantized = isinstance(weight, QuantizedTensor)
        shape = weight.codes.shape if quantized else weight.shape
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return quantized

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _expand(self, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        elif x2.shape[0] <= DECODE_ROWS:
            y = self._gemv(x2)
        else:
            yt = x2.new_empty(self.out_features, x2.shape[0])
            buffer = _workspace(self.slice_rows * self.in_features)
            for start in range(0, self.out_features, self.slice_rows):
                stop = min(start + self.slice_rows, self.out_features)
                torch.mm(self._expand(start, stop, buffer), x2.t(), out=yt[start:stop])
            y = yt.t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight the layer multiplies by (expanded; for tests and checks)."""
        return self._expand(0, self.out_features, torch.empty(self.out_features * self.in_features)).clone()


class SparseLinear(_ExpandingLinear):
    """``y = x · Wᵀ + b`` for an N:M sparse ``W`` (float, or quantized ``(q − z) · s``) from its kept values.

    Like :class:`~lmcompress.kernels.linear.PackedLinear` the weight lives in non-persistent buffers."""

    def __init__(self, weight: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        pattern, why = sparse_kernel_for(weight)
        if pattern is None:
            raise UserError(f"this layer cannot run on the sparse CPU kernel: {why}")
        self.ext = _ext()
        self.n, self.m = pattern
        quantized = self._layer(weight, bias, why)
        if quantized:
            self.kind = KIND_INT4 if weight.spec.bits <= 4 else KIND_INT8
            groups = weight.spec.groups(self.in_features)
            self.group = weight.spec.group_size if groups > 1 else -(-max(self.in_features, 1) // BLOCK) * BLOCK
            parts = pack_nm(weight.codes, quantized_keep(weight), self.n, self.m, self.kind)
            scale, zero = weight.scale.float().clone(), weight.zero.float().clone()
        else:
            self.kind, self.group = KIND_FLOAT, BLOCK
            w = weight.detach().float().cpu()
            parts = pack_nm(w, w != 0, self.n, self.m, self.kind)
            scale = zero = torch.empty(0, 0)
        self.register_buffer("vals", parts["vals"], persistent=False)
        self.register_buffer("pos", parts["pos"], persistent=False)
        self.register_buffer("hi", parts.get("hi", torch.empty(0, dtype=torch.int16)), persistent=False)
        self.register_buffer("scales", scale.contiguous(), persistent=False)
        self.register_buffer("zeros", zero.contiguous(), persistent=False)
        self.slice_rows = max(16, 2**20 // max(self.in_features, 1))  # prefill: about 4 MB of float32 a slice
        self._meta = (self.kind, self.m, self.group, use_avx512())

    def _args(self) -> tuple:
        return (self.vals, self.pos, self.hi, self.scales, self.zeros, self.kind, self.m, self.group)

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        return self.ext.nm_gemv(x2, self.vals, self.pos, self.hi, self.scales, self.zeros, *self._meta)

    def _expand(self, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        return self.ext.nm_expand(*self._args(), self.in_features, start, stop, buffer)

    def extra_repr(self) -> str:
        kind = {KIND_FLOAT: "float32", KIND_INT4: "4-bit codes", KIND_INT8: "8-bit codes"}[self.kind]
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.n}:{self.m}, {kind}"


# ---- unstructured sparsity: a bitmask and the kept values (csrc/sparse_bitmask.cpp) --------------------------------

BITMASK_WORD = 32  # inputs per mask word
BITMASK_PAD = 16  # values (floats or bytes) after the last kept one: the kernel's loads read that far
# fraction of zeros from which the bitmask kernel decodes faster than the dense kernel of the same values (1 and 2
# threads, SmolLM2 and Qwen2.5-Coder-1.5B layer shapes; bench/sparse_kernel_bench.py --bitmask, docs/kernels.md)
# (None: at no sparsity measured, 50–90 %)
BITMASK_MIN_SPARSITY: dict[int, float | None] = {KIND_FLOAT: 0.5, KIND_INT8: None, KIND_INT4: None}
_bitmask_state: dict[str, object] = {}


def _bitmask_ext():
    from lmcompress.kernels import cpu_ext

    source = cpu_ext.SOURCE.with_name("sparse_bitmask.cpp")
    return cpu_ext._extension(_bitmask_state, source, "lmcompress_sparse_bitmask", "lmcompress's bitmask kernel")


def bitmask_unavailable_reason() -> str | None:
    """Why the bitmask kernel cannot be had on this machine (None when it can; builds it at first call)."""
    if _bitmask_ext() is None:
        return str(_bitmask_state.get("why") or "the bitmask kernel did not build")
    return None


def _value_kind(q: QuantizedTensor | torch.Tensor) -> int:
    if isinstance(q, QuantizedTensor):
        return KIND_INT4 if q.spec.bits <= 4 else KIND_INT8
    return KIND_FLOAT


def _bitmask_fits(q: QuantizedTensor | torch.Tensor) -> str | None:
    """Why the bitmask kernel cannot hold ``q`` whatever its sparsity (None when it can)."""
    if isinstance(q, QuantizedTensor):
        spec = q.spec
        cols = q.codes.shape[1]
        if q.g_idx is not None and not torch.equal(q.g_idx.long().cpu(), torch.arange(cols) // spec.width(cols)):
            return "act-order groups (g_idx) scatter a group's inputs: the bitmask kernel reads them in order"
        if spec.groups(cols) > 1 and spec.group_size % BITMASK_WORD:
            return f"group size {spec.group_size}: the bitmask kernel takes multiples of 32"
        if spec.bits > 8:
            return f"{spec.bits}-bit codes: the bitmask kernel stores up to 8"
        if not torch.equal(q.zero, torch.round(q.zero)):
            return "zero points that are not integers: the bitmask kernel takes integer ones"
    elif not q.is_floating_point() or q.dim() != 2:
        return f"{q.dtype} {q.dim()}-d weight: the bitmask kernel takes float or quantized [out, in] weights"
    return bitmask_unavailable_reason()


def bitmask_kernel_for(q: QuantizedTensor | torch.Tensor, min_sparsity: float | None = None) -> tuple[bool, str]:
    """``(True, description)`` when :class:`BitmaskLinear` runs ``q`` (a quantized or float ``[out, in]`` weight)
    and it has at least ``min_sparsity`` zeros (default: :data:`BITMASK_MIN_SPARSITY` of its value type, where the
    kernel decodes faster than the dense one), else ``(False, why not)``; why is empty under :data:`MIN_SPARSITY`."""
    quantized = isinstance(q, QuantizedTensor)
    keep = quantized_keep(q) if quantized else q.detach() != 0
    zeros = 1 - int(keep.sum()) / keep.numel() if keep.numel() else 0.0  # exact: 50 % is not 49.99997 %
    floor = BITMASK_MIN_SPARSITY[_value_kind(q)] if min_sparsity is None else min_sparsity
    if zeros < MIN_SPARSITY and (floor is None or floor >= MIN_SPARSITY):
        return False, ""
    values = _values_name(q)
    if floor is None:
        return False, (
            f"{100 * zeros:.0f}% zeros, unstructured: the bitmask kernel decodes {values} values no faster than the "
            "dense kernel at any sparsity measured"
        )
    why = _bitmask_fits(q)
    if why is not None:
        return False, why
    if zeros < floor:
        return False, f"{100 * zeros:.0f}% zeros: the bitmask kernel pays from {100 * floor:.0f}% ({values} values)"
    isa = "AVX-512" if bitmask_use_avx512() else "AVX2"
    return True, f"lmcompress bitmask kernel, {100 * zeros:.0f}% zeros, {values} ({isa}), float32"


def _values_name(q: QuantizedTensor | torch.Tensor) -> str:
    if isinstance(q, QuantizedTensor):
        layout = f"g{q.spec.group_size}" if q.spec.groups(q.codes.shape[1]) > 1 else "per-channel"
        return f"{q.spec.bits}-bit {layout}"
    return "float32"


def bitmask_use_avx512() -> bool:
    """Whether the bitmask kernel runs its AVX-512 variant (as :func:`use_avx512`)."""
    ext = _bitmask_ext()
    return ext is not None and bool(ext.has_avx512()) and os.environ.get("LMCOMPRESS_AVX512", "1") != "0"


def cpu_sparse_kernel_for(q: QuantizedTensor | torch.Tensor) -> tuple[str | None, str]:
    """``("sparse", description)`` for N:M weights (:func:`sparse_kernel_for`), ``("bitmask", description)`` for
    unstructured ones sparse enough (:func:`bitmask_kernel_for`), else ``(None, why neither)``."""
    pattern, nm_why = sparse_kernel_for(q)
    if pattern is not None:
        return "sparse", nm_why
    fits, bm_why = bitmask_kernel_for(q)
    if fits:
        return "bitmask", bm_why
    return None, "; ".join(why for why in (nm_why, bm_why) if why)


def pack_bitmask(values: torch.Tensor, keep: torch.Tensor, kind: int) -> dict[str, torch.Tensor]:
    """The bitmask kernel's layout (``csrc/sparse_bitmask.cpp``) of an ``[out, in]`` matrix of ``values`` (float32,
    or integer codes below ``2^kind``) whose kept entries are ``keep``: ``mask`` (int32 ``[out, ⌈in/32⌉]``, bit
    ``j`` of word ``b`` for input ``32b + j``), ``vals`` (the kept values row after row in input order, then
    :data:`BITMASK_PAD` zeros; 4-bit codes two a byte, low nibble first, each 16 inputs from a new byte) and
    ``offsets`` (int64 ``[out + 1]``: where each row's values start, in elements of ``vals``)."""
    rows, cols = values.shape
    padded = -(-max(cols, 1) // BITMASK_WORD) * BITMASK_WORD
    mask = torch.zeros(rows, padded, dtype=torch.bool)
    mask[:, :cols] = keep
    words = (mask.reshape(rows, -1, BITMASK_WORD).to(torch.int64) << torch.arange(BITMASK_WORD)).sum(-1)
    out = {"mask": (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32).contiguous()}
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    if kind in (KIND_FLOAT, KIND_INT8):
        dtype = torch.float32 if kind == KIND_FLOAT else torch.uint8
        kept = values.to(torch.float32 if kind == KIND_FLOAT else torch.int64)[keep].to(dtype)  # row-major order
        offsets[1:] = keep.sum(1).cumsum(0)
        out["vals"] = torch.cat([kept, torch.zeros(BITMASK_PAD, dtype=dtype)])
    else:
        halves = mask.reshape(rows, -1, 16)
        nbytes = (halves.sum(-1) + 1) // 2  # [rows, halves]
        start = (nbytes.reshape(-1).cumsum(0) - nbytes.reshape(-1)).reshape(nbytes.shape)  # exclusive sums
        total = int(nbytes.sum())
        rank = halves.to(torch.int64).cumsum(-1) - 1  # rank of a kept input among its half's kept ones
        codes = torch.zeros(rows, padded, dtype=torch.int64)
        codes[:, :cols] = values.to(torch.int64)
        codes = codes.reshape(rows, -1, 16)
        where = (start[..., None] + rank // 2)[halves]
        nibbles = (codes << (4 * (rank % 2)))[halves]
        buffer = torch.zeros(total + BITMASK_PAD, dtype=torch.int64)
        buffer.index_add_(0, where, nibbles)
        out["vals"] = buffer.to(torch.uint8)
        offsets[:rows] = start[:, 0] if start.numel() else 0
        offsets[rows] = total
    out["offsets"] = offsets
    return out


class BitmaskLinear(_ExpandingLinear):
    """``y = x · Wᵀ + b`` for an unstructured sparse ``W`` (float, or quantized ``(q − z) · s``) from its bitmask
    and kept values; any sparsity runs (the threshold is :func:`bitmask_kernel_for`'s choice, not a limit).

    Like :class:`~lmcompress.kernels.linear.PackedLinear` the weight lives in non-persistent buffers."""

    def __init__(self, weight: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        fits, why = bitmask_kernel_for(weight, min_sparsity=0.0)
        if not fits:
            raise UserError(f"this layer cannot run on the bitmask CPU kernel: {why}")
        self.ext = _bitmask_ext()
        quantized = self._layer(weight, bias, why)
        self.kind = _value_kind(weight)
        if quantized:
            groups = weight.spec.groups(self.in_features)
            padded = -(-max(self.in_features, 1) // BITMASK_WORD) * BITMASK_WORD
            self.group = weight.spec.group_size if groups > 1 else padded
            values, keep = weight.codes.cpu(), quantized_keep(weight).cpu()
            scale, zero = weight.scale.float().cpu().clone(), weight.zero.float().cpu().clone()
        else:
            self.group = BITMASK_WORD
            values = weight.detach().float().cpu()
            keep = values != 0
            scale = zero = torch.empty(0, 0)
        parts = pack_bitmask(values, keep, self.kind)
        self.sparsity = 1 - int(keep.sum()) / keep.numel() if keep.numel() else 0.0
        for name in ("mask", "vals", "offsets"):
            self.register_buffer(name, parts[name], persistent=False)
        self.register_buffer("scales", scale.contiguous(), persistent=False)
        self.register_buffer("zeros", zero.contiguous(), persistent=False)
        self.slice_rows = max(16, 2**20 // max(self.in_features, 1))  # prefill: about 4 MB of float32 a slice

    def _args(self) -> tuple:
        return (self.mask, self.vals, self.offsets, self.scales, self.zeros, self.kind, self.group)

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        return self.ext.bm_gemv(x2, *self._args(), bitmask_use_avx512())

    def _expand(self, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        return self.ext.bm_expand(*self._args(), self.in_features, start, stop, buffer, bitmask_use_avx512())

    def extra_repr(self) -> str:
        kind = {KIND_FLOAT: "float32", KIND_INT4: "4-bit codes", KIND_INT8: "8-bit codes"}[self.kind]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bitmask {100 * self.sparsity:.0f}% zeros, {kind}"
        )


def sparse_layer(kind: str, weight: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """The layer :func:`cpu_sparse_kernel_for`'s ``kind`` names: :class:`SparseLinear` (``"sparse"``) or
    :class:`BitmaskLinear` (``"bitmask"``)."""
    return BitmaskLinear(weight, bias) if kind == "bitmask" else SparseLinear(weight, bias)


def swap_sparse_linears(model: nn.Module, report=None, *, skip: set[str] | None = None) -> dict[str, str]:
    """Replace every float ``nn.Linear`` of ``model`` whose weight is 2:4 or 4:8 sparse by :class:`SparseLinear`,
    and every other one sparse enough for the bitmask kernel (:func:`bitmask_kernel_for`) by :class:`BitmaskLinear`,
    in place; ``{module name: description}``, also added to ``report.swapped`` when a
    :class:`~lmcompress.kernels.linear.KernelReport` is given. Quantized layers are swapped by
    :func:`~lmcompress.kernels.linear.swap_quantized_linears` instead."""
    swapped: dict[str, str] = {}
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name and name not in (skip or set()) and module.weight.device.type == "cpu"
    ]
    floor = BITMASK_MIN_SPARSITY[KIND_FLOAT]
    counts = {"sparse": 0, "bitmask": 0}
    for name, module in candidates:
        w = module.weight.detach()
        if not w.is_floating_point() or w.dim() != 2 or not w.shape[0]:
            continue
        zeros = 1 - int(torch.count_nonzero(w)) / w.numel()  # cheap tests: row 0 N:M, or sparse enough overall
        if nm_pattern(w[:1] != 0) is None and (floor is None or zeros < floor):
            continue
        kind, why = cpu_sparse_kernel_for(w)
        if kind is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = module.bias.detach() if module.bias is not None else None
        setattr(parent, child, sparse_layer(kind, w, bias))
        swapped[name] = why
        counts[kind] += 1
    if report is not None and swapped:
        parts = [f"{counts['sparse']} float N:M layers on the sparse kernel"] if counts["sparse"] else []
        parts += [f"{counts['bitmask']} float unstructured layers on the bitmask kernel"] if counts["bitmask"] else []
        note = ", ".join(parts)
        if not report.swapped:  # nothing else swapped: the note said the model runs dense
            report.compute_dtype, report.note = "float32", note
        else:
            report.note = (report.note + "; " if report.note else "") + note
        report.swapped.update(swapped)
    return swapped
