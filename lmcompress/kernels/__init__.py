"""Run compressed weights without expanding them: CPU kernels for quantized linear layers
(:mod:`lmcompress.kernels.linear`; lmcompress's own AVX2 kernel in :mod:`lmcompress.kernels.cpu_ext`, PyTorch's
weight-only ops where it cannot be built) and, on CUDA only, 2:4 semi-structured sparse matmuls
(:mod:`lmcompress.kernels.sparse`). See docs/kernels.md for which formats run faster today."""

from lmcompress.kernels import cpu_ext
from lmcompress.kernels.linear import (
    DECODE_ROWS,
    KERNEL_MODES,
    Int4Linear,
    Int8Linear,
    KernelReport,
    PackedLinear,
    QuantizedLinear,
    kernel_for,
    kernel_report,
    swap_quantized_linears,
)

__all__ = [
    "DECODE_ROWS",
    "KERNEL_MODES",
    "Int4Linear",
    "Int8Linear",
    "KernelReport",
    "PackedLinear",
    "QuantizedLinear",
    "cpu_ext",
    "kernel_for",
    "kernel_report",
    "swap_quantized_linears",
]
