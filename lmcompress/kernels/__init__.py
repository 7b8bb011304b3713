"""Run compressed weights without expanding them: CPU weight-only kernels for quantized linear layers
(:mod:`lmcompress.kernels.linear`) and, on CUDA only, 2:4 semi-structured sparse matmuls
(:mod:`lmcompress.kernels.sparse`). See docs/kernels.md for which formats run faster today."""

from lmcompress.kernels.linear import (
    KERNEL_MODES,
    Int4Linear,
    Int8Linear,
    KernelReport,
    QuantizedLinear,
    kernel_for,
    kernel_report,
    swap_quantized_linears,
)

__all__ = [
    "KERNEL_MODES",
    "Int4Linear",
    "Int8Linear",
    "KernelReport",
    "QuantizedLinear",
    "kernel_for",
    "kernel_report",
    "swap_quantized_linears",
]
