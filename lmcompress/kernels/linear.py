"""Linear layers that multiply by quantized weights straight from their integer codes, never holding the
dequantized matrix.

A quantized weight (:class:`~lmcompress.algorithms.quant.QuantizedTensor`) stands for ``W = (q − z) · s`` with
codes ``q``, an integer zero point ``z`` and a scale ``s`` per (output row, group of inputs).

:class:`PackedLinear` (``kernels="auto"`` where it builds: x86-64 with AVX2)
    lmcompress's own kernel (:mod:`lmcompress.kernels.cpu_ext`): codes of up to 4 bits packed two a byte, of 5 to
    8 bits one a byte, a float32 scale ``s`` and offset ``t = −z · s`` per (row, group), any group size that is a
    multiple of 32 (or one group per row; act-order groups are made contiguous by permuting the inputs), float32
    activations and accumulation. Up to
    :data:`DECODE_ROWS` input rows are multiplied from the codes directly (decode); more rows (prefill) by
    dequantizing a slice of a few MB of rows at a time and one float32 GEMM per slice. Outputs equal the
    dequantized float32 matmul up to summation order.

Where that kernel cannot be had (another CPU, no compiler; ``kernels="aten"`` asks for these), two kernels of
``torch.ops.aten`` run such grids directly:

``_weight_int8pack_mm(x, w, s)`` (:class:`Int8Linear`)
    ``y = x · (w · s)ᵀ`` with ``w`` int8 ``[out, in]`` and one scale per output row: per-channel grids only.
    A row's codes are stored as ``w = q − o`` with the integer ``o`` nearest ``z`` that keeps ``w`` in int8
    (``o = z`` for every grid of up to 7 bits and for symmetric 8-bit grids); when ``o ≠ z`` (asymmetric
    8-bit rows) the exact correction ``− (z − o) · s · Σ_k x_k`` is added in float32, as
    ``(q − z)s = (q − o)s − (z − o)s``.
``_weight_int4pack_mm_for_cpu(x, w4, g, sz)`` (:class:`Int4Linear`)
    ``W = (q − 8) · s + t`` per group of ``g ∈ {32, 64, 128, 256}`` inputs, with ``sz[group, row] = (s, t)``
    and codes in 0..15 packed by ``_convert_weight_to_int4pack_for_cpu`` (which needs ``out`` divisible by 16).
    Our grid maps onto it exactly by shifting each group's codes by the integer ``o`` nearest ``8 − z`` that
    keeps them in 0..15: codes ``q + o`` and ``t = (8 − o − z) · s``, since ``(q − z)s = (q + o − 8)s + t``.
    ``t`` is then 0 for symmetric grids and for all grids of up to 3 bits with integer zero points (a small
    ``t`` matters: in bfloat16 ``(q − 8)s + t`` would cancel digits). Grids of 2 to 4 bits fit. A partial
    last group (``g`` not dividing ``in``) is padded to a whole group and the input padded with zeros, which
    adds exact zeros to every output.

Both kernels are fast with bfloat16 activations only (their float32 paths are about ten times slower than a
dense float32 matmul on the AVX2 machines measured), so by default a layer rounds its input, scales and
``t`` to bfloat16, computes in bfloat16 and returns the caller's dtype: outputs then match the dequantized
float32 matmul to about ``2⁻⁷ · (|x| · |W|ᵀ)`` (bfloat16 keeps 8 significant bits), not bit for bit. Pass
``compute_dtype=torch.float32`` for outputs within float32 rounding (slow).

Layers the kernels cannot run exactly stay ``nn.Linear`` holding the dequantized weight, and
:class:`KernelReport` says why: for lmcompress's kernel, group sizes that are not a multiple of 32 and act-order
groups of unequal sizes; for PyTorch's, grouped grids of 5 to 8 bits (the int8 kernel has one scale per row),
act-order groups (``g_idx``), int4 group sizes other than 32/64/128/256, ``out`` not a multiple of 16.
2:4 and 4:8 sparse weights (quantized or float) run on lmcompress's sparse kernel (:mod:`lmcompress.kernels.sparse_cpu`,
``kernels="auto"``), which reads the kept values and their positions only; unstructured sparsity on its bitmask
kernel where that decodes faster than the dense one (``sparse_cpu.BITMASK_MIN_SPARSITY``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.errors import UserError

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "aten", "none")  # auto: lmcompress's kernel where it builds, else aten's; none: dense
DECODE_ROWS = 4  # PackedLinear multiplies up to this many input rows from the codes; more: dequantized slices
INT4_GROUP_SIZES = (32, 64, 128, 256)
REPORT_ATTR = "lmcompress_kernels"  # the KernelReport of a model whose layers were swapped


class QuantizedLinear(nn.Module):
    """Common part of the kernel layers: shape, optional bias, the compute dtype.

    The packed weight lives in non-persistent buffers, so ``state_dict`` holds only the bias: a model with
    these layers is not saved through ``save_pretrained`` (save the packed folder instead).
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        dtype = str(self.compute_dtype).removeprefix("torch.")
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, compute={dtype}"


class Int8Linear(QuantizedLinear):
    """``y = x · ((q − z) · s)ᵀ + b`` for a per-channel grid of up to 8 bits, by ``_weight_int8pack_mm``."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, compute_dtype=torch.bfloat16):
        out_features, in_features = q.codes.shape
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.bits = q.spec.bits
        codes = q.codes.to(torch.int16)
        zero = q.zero[:, 0].float()
        lo, hi = codes.amax(1).float() - 127, codes.amin(1).float() + 128  # o in [lo, hi] keeps q − o in int8
        o = torch.minimum(torch.maximum(torch.round(zero), lo), hi) if codes.numel() else torch.round(zero)
        scale = q.scale[:, 0].float()
        self.register_buffer(
            "qweight", (codes - o.to(torch.int16)[:, None]).to(torch.int8).contiguous(), persistent=False
        )
        self.register_buffer("scales", scale.to(compute_dtype).contiguous(), persistent=False)
        offset = (zero - o) * scale  # 0 unless an 8-bit row's zero point is far from its middle
        self.register_buffer("offset", offset if bool(offset.any()) else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(x2.to(self.compute_dtype).contiguous(), self.qweight, self.scales)
        if self.offset is not None:
            y = y.float() - x2.float().sum(-1, keepdim=True) * self.offset
        return self._finish(y, x)


class Int4Linear(QuantizedLinear):
    """``y = x · ((q − z) · s)ᵀ + b`` for a grouped grid of 2 to 4 bits, by ``_weight_int4pack_mm_for_cpu``."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, compute_dtype=torch.bfloat16):
        out_features, in_features = q.codes.shape
        super().__init__(in_features, out_features, bias, compute_dtype)
        self.bits = q.spec.bits
        self.group_size = g = q.spec.group_size
        groups = q.spec.groups(in_features)
        self.padded_in = groups * g
        codes = torch.empty((out_features, self.padded_in), dtype=torch.int32)
        codes[:, :in_features] = q.codes.to(torch.int32)
        codes[:, in_features:] = codes[:, (groups - 1) * g : (groups - 1) * g + 1]  # padding: meets zero inputs
        blocks = codes.reshape(out_features, groups, g)
        zero = q.zero.float()
        lo, hi = -blocks.amin(2).float(), 15 - blocks.amax(2).float()  # o in [lo, hi] keeps q + o in 0..15
        o = torch.minimum(torch.maximum(torch.round(8 - zero), lo), hi)
        blocks = blocks + o.to(torch.int32)[:, :, None]
        self.register_buffer(
            "qweight",
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.reshape(out_features, -1), 1),
            persistent=False,
        )  # uint8 [out, padded_in / 2]
        scale = q.scale.float()
        shift = (8 - o - zero) * scale  # (q − z)s = (q + o − 8)s + (8 − o − z)s
        sz = torch.stack([scale.t(), shift.t()], dim=-1)  # [groups, out, 2]
        self.register_buffer("scales_and_zeros", sz.to(compute_dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.contiguous(), self.qweight, self.group_size, self.scales_and_zeros
        )
        return self._finish(y, x)


class PackedLinear(QuantizedLinear):
    """``y = x · (q · s + t)ᵀ + b`` with ``t = −z · s``, by lmcompress's AVX2 kernel, in float32 throughout."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        from lmcompress.kernels import cpu_ext

        out_features, in_features = q.codes.shape
        super().__init__(in_features, out_features, bias, torch.float32)
        self.ext = cpu_ext.extension()
        if self.ext is None:
            raise RuntimeError(f"lmcompress's CPU kernel is unavailable: {cpu_ext.unavailable_reason()}")
        self.bits = q.spec.bits
        self.storage_bits = cpu_ext.storage_bits(q.spec.bits)
        grouped = q.spec.groups(in_features) > 1
        self.group = q.spec.group_size if grouped else cpu_ext.padded_cols(in_features, q.spec.bits)
        codes, perm = q.codes, None
        if _scattered_groups(q):  # act-order: inputs sorted by group make every group a run of consecutive columns
            perm = torch.argsort(q.g_idx.long().cpu(), stable=True)
            codes = codes[:, perm]
        self.register_buffer("perm", perm, persistent=False)  # x[:, perm] meets the permuted codes
        self.register_buffer("qweight", cpu_ext.pack(codes, q.spec.bits), persistent=False)
        scale = q.scale.float().clone()  # a copy: q.scale may be a view of the whole packed file read into memory
        self.register_buffer("scales", scale, persistent=False)
        self.register_buffer("shifts", (-q.zero.float() * scale).contiguous(), persistent=False)
        self.slice_rows = max(16, 2**20 // max(in_features, 1))  # prefill: about 4 MB of float32 weights a slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        args = (self.qweight, self.scales, self.shifts, self.storage_bits)
        if x2.shape[0] <= DECODE_ROWS:
            y = self.ext.gemv(x2, *args, self.group)
        else:  # many rows: dequantize a slice of rows at a time, one float32 GEMM each (yᵀ slices are contiguous)
            yt = x2.new_empty(self.out_features, x2.shape[0])
            buffer = _workspace(self.slice_rows * self.in_features)
            for start in range(0, self.out_features, self.slice_rows):
                stop = min(start + self.slice_rows, self.out_features)
                w = self.ext.dequantize(*args, self.in_features, self.group, start, stop, buffer)
                torch.mm(w, x2.t(), out=yt[start:stop])
            y = yt.t()
        return self._finish(y, x)


_WORKSPACE = threading.local()  # per thread, one float32 buffer shared by every PackedLinear (a few MB)


def _workspace(numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements, reused across calls: prefill dequantizes each slice of rows
    into it instead of allocating (glibc keeps many freed few-MB blocks resident)."""
    buffer = getattr(_WORKSPACE, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACE.buffer = torch.empty(numel)
    return buffer


def _scattered_groups(q: QuantizedTensor) -> bool:
    """True when act-order's ``g_idx`` puts columns in groups other than ``c // group_size``."""
    cols = q.codes.shape[1]
    return q.g_idx is not None and not torch.equal(q.g_idx.long().cpu(), torch.arange(cols) // q.spec.width(cols))


def _packed_fits(q: QuantizedTensor) -> str | None:
    """Why :class:`PackedLinear` cannot run ``q`` (None when it can)."""
    cols = q.codes.shape[1]
    spec = q.spec
    if _scattered_groups(q):  # sorted by group, act-order's groups must be runs of group_size columns
        in_order = torch.sort(q.g_idx.long().cpu()).values
        if not torch.equal(in_order, torch.arange(cols) // spec.width(cols)):
            return "act-order groups (g_idx) of unequal sizes: no CPU kernel runs them"
    if spec.groups(cols) > 1 and spec.group_size % 32:
        return f"group size {spec.group_size}: lmcompress's kernel takes multiples of 32"
    return None


def kernel_for(q: QuantizedTensor, mode: str = "auto") -> tuple[str | None, str]:
    """Which kernel runs ``q`` exactly (``"sparse"``, ``"bitmask"``, ``"packed"``, ``"int8"``, ``"int4"`` or None)
    and a short description or the reason none does. ``mode="auto"`` prefers lmcompress's own kernels where they
    build (the sparse one for 2:4 / 4:8 sparse codes, the bitmask one for unstructured codes where it pays),
    ``"aten"`` takes PyTorch's ops only."""
    spec = q.spec
    groups = spec.groups(q.codes.shape[1])
    packed_why = None  # why lmcompress's kernel cannot run q, where that kernel is available
    if mode == "auto":
        from lmcompress.kernels import cpu_ext
        from lmcompress.kernels.sparse_cpu import cpu_sparse_kernel_for

        sparse_kind, sparse_why = cpu_sparse_kernel_for(q)  # sparse codes: the kept ones and their positions only
        if sparse_kind is not None:
            return sparse_kind, sparse_why
        if cpu_ext.extension() is not None:
            packed_why = _packed_fits(q)
            if packed_why is None:
                layout = f"g{spec.group_size}" if groups > 1 else "per-channel"
                act = ", act-order (inputs permuted)" if _scattered_groups(q) else ""
                note = f" (not sparse: {sparse_why})" if sparse_why else ""
                return "packed", f"lmcompress AVX2 kernel, {spec.bits}-bit {layout}{act}, float32{note}"
    kind, why = _aten_kernel_for(q)
    if kind is None and packed_why is not None:
        return None, packed_why  # the reason of the kernel that would otherwise have run it
    return kind, why


def _aten_kernel_for(q: QuantizedTensor) -> tuple[str | None, str]:
    """:func:`kernel_for` among PyTorch's ops: ``"int8"``, ``"int4"`` or None with the reason."""
    rows, cols = q.codes.shape
    spec = q.spec
    groups = spec.groups(cols)
    if _scattered_groups(q):
        return None, "act-order groups (g_idx): PyTorch's kernels read no scattered groups"
    if groups == 1:
        return "int8", f"int8 kernel, {spec.bits}-bit per-channel grid"
    if spec.bits > 4:
        return None, (
            f"{spec.bits}-bit grid with groups of {spec.group_size}: the int8 kernel has one scale per output "
            "channel (quantize with group_size -1 to run it), the int4 kernel holds codes up to 15"
        )
    if spec.group_size not in INT4_GROUP_SIZES:
        return None, f"group size {spec.group_size}: the int4 kernel takes groups of 32, 64, 128 or 256"
    if rows % 16:
        return None, f"{rows} outputs: the int4 kernel packs rows in multiples of 16"
    pad = f", inputs padded {cols}→{groups * spec.group_size}" if spec.has_partial_group(cols) else ""
    return "int4", f"int4 kernel, {spec.bits}-bit g{spec.group_size}{pad}"


@dataclass
class KernelReport:
    """What :func:`swap_quantized_linears` did: layers now run by a kernel, and those left dense, with why."""

    mode: str
    device: str
    compute_dtype: str
    swapped: dict[str, str] = field(default_factory=dict)  # module name → kernel description
    dense: dict[str, str] = field(default_factory=dict)  # parameter name → why it stays a dequantized matrix
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: how many layers each kernel runs, how many stay dense, and the commonest reason."""
        if self.note and not self.swapped:
            return f"kernels {self.mode}: {self.note}"
        kinds: dict[str, int] = {}
        for desc in self.swapped.values():
            kind = desc.split(" kernel")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        parts = [f"{n} layers {k}" for k, n in sorted(kinds.items())]
        if self.dense:
            reasons: dict[str, int] = {}
            for why in self.dense.values():
                reasons[why] = reasons.get(why, 0) + 1
            top = max(reasons, key=reasons.get)
            parts.append(f"{len(self.dense)} quantized layers dense ({top})")
        text = ", ".join(parts) or "nothing swapped"
        return f"kernels {self.mode} ({self.compute_dtype} compute): {text}" + (f"; {self.note}" if self.note else "")


def check_mode(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise UserError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}", param="kernels")
    return mode


def _module_of(model: nn.Module, param: str) -> tuple[str, nn.Module | None]:
    name = param.removesuffix(".weight")
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        return name, None


def swap_quantized_linears(
    model: nn.Module,
    quantized: dict[str, QuantizedTensor],
    mode: str = "auto",
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.bfloat16,
) -> KernelReport:
    """Replace the linear layers of ``model`` named by ``quantized`` (parameter name → codes and grids, ``[out,
    in]``) by :class:`Int8Linear` / :class:`Int4Linear` where a kernel runs their grid exactly; in place.

    Layers left alone keep whatever weight they hold (the caller fills them with the dequantized matrix); the
    returned :class:`KernelReport` (also stored as ``model.lmcompress_kernels``) lists both with reasons.
    ``mode="none"`` swaps nothing. The kernels are CPU kernels: on another device nothing is swapped.
    """
    from transformers.pytorch_utils import Conv1D

    check_mode(mode)
    device = torch.device(device)
    report = KernelReport(mode, str(device), str(compute_dtype).removeprefix("torch."))
    setattr(model, REPORT_ATTR, report)
    if not quantized:
        report.note = "no quantized layers (not a packed quantized folder): the model runs dense"
        return report
    if mode == "none":
        report.dense = dict.fromkeys(quantized, "kernels none")
        report.note = "kernels none: quantized layers run as dequantized matrices"
        return report
    if device.type != "cpu":
        report.dense = dict.fromkeys(quantized, f"the weight-only kernels are CPU kernels, not {device.type}")
        report.note = "quantized layers run as dequantized matrices on " + str(device)
        return report
    for param, q in quantized.items():
        name, module = _module_of(model, param)
        if not isinstance(module, (nn.Linear, Conv1D)) or not name:
            report.dense[param] = "not a linear layer's weight"
            continue
        kind, why = kernel_for(q, mode)
        if kind is None:
            report.dense[param] = why
            continue
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        if kind in ("sparse", "bitmask"):
            from lmcompress.kernels.sparse_cpu import sparse_layer

            layer: nn.Module = sparse_layer(kind, q.to("cpu"), bias)
        elif kind == "packed":
            layer = PackedLinear(q.to("cpu"), bias)
        else:
            layer = (Int8Linear if kind == "int8" else Int4Linear)(q.to("cpu"), bias, compute_dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        report.swapped[name] = why
    dtypes = {
        "float32" if getattr(m, "compute_dtype", None) == torch.float32 else report.compute_dtype
        for m in _swapped(model, report)
    }
    if len(dtypes) == 1:
        report.compute_dtype = dtypes.pop()
    elif dtypes:
        report.compute_dtype = "float32 and " + report.compute_dtype
    release_freed_memory()
    log.debug("%s", report.summary())
    return report


def _swapped(model: nn.Module, report: KernelReport) -> list[nn.Module]:
    return [model.get_submodule(name) for name in report.swapped]


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; nothing elsewhere). Packing layer after layer
    frees many few-MiB temporaries that glibc keeps otherwise, which would count as resident memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def kernel_report(model: nn.Module) -> KernelReport | None:
    """The :class:`KernelReport` of a model loaded with kernels (None if it was not)."""
    return getattr(model, REPORT_ATTR, None)
