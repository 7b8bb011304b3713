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

Unstructured sparsity and other N:M patterns have no kernel here: such layers run as before (dense, or from their
codes by :class:`~lmcompress.kernels.linear.PackedLinear`), and :func:`sparse_kernel_for` says why.
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


class SparseLinear(nn.Module):
    """``y = x · Wᵀ + b`` for an N:M sparse ``W`` (float, or quantized ``(q − z) · s``) from its kept values.

    Like :class:`~lmcompress.kernels.linear.PackedLinear` the weight lives in non-persistent buffers."""

    def __init__(self, weight: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        pattern, why = sparse_kernel_for(weight)
        if pattern is None:
            raise UserError(f"this layer cannot run on the sparse CPU kernel: {why}")
        self.ext = _ext()
        self.n, self.m = pattern
        self.description = why
        self.compute_dtype = torch.float32
        quantized = isinstance(weight, QuantizedTensor)
        shape = weight.codes.shape if quantized else weight.shape
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] <= DECODE_ROWS:
            y = self.ext.nm_gemv(x2, self.vals, self.pos, self.hi, self.scales, self.zeros, *self._meta)
        else:  # many rows: expand a slice of rows at a time into one buffer, one float32 GEMM each
            yt = x2.new_empty(self.out_features, x2.shape[0])
            buffer = _workspace(self.slice_rows * self.in_features)
            for start in range(0, self.out_features, self.slice_rows):
                stop = min(start + self.slice_rows, self.out_features)
                w = self.ext.nm_expand(*self._args(), self.in_features, start, stop, buffer)
                torch.mm(w, x2.t(), out=yt[start:stop])
            y = yt.t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight the layer multiplies by (expanded; for tests and checks)."""
        out = torch.empty(self.out_features * self.in_features)
        return self.ext.nm_expand(*self._args(), self.in_features, 0, self.out_features, out).clone()

    def extra_repr(self) -> str:
        kind = {KIND_FLOAT: "float32", KIND_INT4: "4-bit codes", KIND_INT8: "8-bit codes"}[self.kind]
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.n}:{self.m}, {kind}"


def swap_sparse_linears(model: nn.Module, report=None, *, skip: set[str] | None = None) -> dict[str, str]:
    """Replace every float ``nn.Linear`` of ``model`` whose weight is 2:4 or 4:8 sparse by :class:`SparseLinear`,
    in place; ``{module name: description}``, also added to ``report.swapped`` when a
    :class:`~lmcompress.kernels.linear.KernelReport` is given. Quantized layers are swapped by
    :func:`~lmcompress.kernels.linear.swap_quantized_linears` instead."""
    swapped: dict[str, str] = {}
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name and name not in (skip or set()) and module.weight.device.type == "cpu"
    ]
    for name, module in candidates:
        w = module.weight.detach()
        if not w.is_floating_point() or w.dim() != 2 or nm_pattern(w[:1] != 0) is None:  # cheap test on row 0
            continue
        pattern, why = sparse_kernel_for(w)
        if pattern is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = module.bias.detach() if module.bias is not None else None
        setattr(parent, child, SparseLinear(w, bias))
        swapped[name] = why
    if report is not None and swapped:
        note = f"{len(swapped)} float N:M layers on the sparse kernel"
        if not report.swapped:  # nothing else swapped: the note said the model runs dense
            report.compute_dtype, report.note = "float32", note
        else:
            report.note = (report.note + "; " if report.note else "") + note
        report.swapped.update(swapped)
    return swapped
