"""lmcompress's own CPU kernel for quantized linear layers: float32 activations, AVX2 + FMA, built at first use.

PyTorch's weight-only CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are fast only with
bfloat16 activations, and on the AVX2 machine measured (no AVX-512) slower than they need to be (docs/kernels.md).
``csrc/qmatmul.cpp`` multiplies float32 activations by ``W = q · s + t`` (codes ``q``, scale ``s`` and offset
``t = −z · s`` per row and group) straight from 4- or 8-bit codes, so a layer reads ½ or 1 byte per weight and
computes in float32: outputs equal the dequantized float32 matmul up to summation order.

:func:`extension` compiles it once with ``torch.utils.cpp_extension`` (needs a C++ compiler and ``ninja``; the
build is cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and returns None, with
:func:`unavailable_reason` saying why, where it cannot: a CPU without AVX2, no compiler, a failed build, or
``LMCOMPRESS_CPU_KERNEL=0`` in the environment. Callers then fall back to PyTorch's kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "qmatmul.cpp"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++17"]  # OpenMP: at::parallel_for splits rows over threads
_state: dict[str, object] = {}


def unavailable_reason() -> str | None:
    """Why :func:`extension` gives None (after it was called), else None."""
    return _state.get("why")  # type: ignore[return-value]


def extension():
    """The compiled kernel module (functions ``gemv`` and ``dequantize``; for W8A8, ``quantize_per_token``,
    ``int8_gemv`` and ``int8_rescale``: :mod:`lmcompress.kernels.int8act`), or None where it cannot be had."""
    return _extension(_state, SOURCE, "lmcompress_qmatmul", "lmcompress's CPU kernel")


SPARSE_SOURCE = Path(__file__).with_name("csrc") / "sparse_nm.cpp"
_sparse_state: dict[str, object] = {}


def sparse_extension():
    """The compiled N:M sparse kernel (``nm_gemv``, ``nm_expand``, ``has_avx512``:
    :mod:`lmcompress.kernels.sparse_cpu`), or None where it cannot be had (:func:`sparse_unavailable_reason`
    says why); same build rules as :func:`extension`. Its AVX-512 variant is compiled in and chosen at run time."""
    return _extension(_sparse_state, SPARSE_SOURCE, "lmcompress_sparse_nm", "lmcompress's sparse CPU kernel")


def sparse_unavailable_reason() -> str | None:
    """Why :func:`sparse_extension` gives None (after it was called), else None."""
    return _sparse_state.get("why")  # type: ignore[return-value]


def _extension(state: dict, source: Path, prefix: str, what: str):
    """Build (once, cached on disk) and load ``source`` as a torch extension; None with ``state["why"]`` if not."""
    if "ext" in state or "why" in state:
        return state.get("ext")
    why = None
    if os.environ.get("LMCOMPRESS_CPU_KERNEL", "1") == "0":
        why = "LMCOMPRESS_CPU_KERNEL=0"
    elif platform.machine().lower() not in ("x86_64", "amd64"):
        why = f"the kernel is x86-64 AVX2 code; this machine is {platform.machine()}"
    elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        why = f"this CPU lacks AVX2 (PyTorch reports {torch.backends.cpu.get_cpu_capability()})"
    if why is None:
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            _put_ninja_on_path()

            digest = hashlib.sha1(source.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
            name = f"{prefix}_{digest}"
            if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
                log.info("building %s once (about 30 s; cached in %s)", what, _get_build_directory(name, False))
            state["ext"] = load(
                name=name,
                sources=[str(source)],
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as err:  # no compiler, no ninja, a failed build: PyTorch's kernels still work
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            why = f"building the kernel failed ({type(err).__name__}: {first[:200]})"
    if why is not None:
        state["why"] = why
        log.info("%s unavailable: %s", what, why)
    return state.get("ext")


def _put_ninja_on_path() -> None:
    """torch.utils.cpp_extension runs ``ninja`` from PATH; the ``ninja`` package's binary is not on it when a
    virtual environment's ``lmcompress`` is run without activating the environment."""
    try:
        import ninja
    except ImportError:
        return
    folder = str(getattr(ninja, "BIN_DIR", ""))
    if folder and folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([folder, os.environ.get("PATH", "")])


def storage_bits(bits: int) -> int:
    """Bits a code takes in the kernel's layout: 4 for grids of up to 4 bits, else 8."""
    return 4 if bits <= 4 else 8


def padded_cols(cols: int, bits: int) -> int:
    """Columns of a row in the kernel's layout: whole units of 32 (pairs of units, 64, for 4-bit codes)."""
    unit = 64 if storage_bits(bits) == 4 else 32
    return -(-cols // unit) * unit


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[N, K]`` codes (values below ``2^bits``) in the kernel's layout, ``[N, bytes]`` uint8.

    The row is padded with zero codes to :func:`padded_cols` and cut in blocks of 8 little-endian 32-bit words:
    for 8-bit codes a block is 32 columns, byte ``i`` of word ``l`` holding column ``8i + l``; for 4-bit codes a
    block is 64 columns, nibble ``i`` of word ``l`` holding column ``8i + l``. Shifting the 8 words right by ``8i``
    (``4i``) bits then gives columns ``8i … 8i + 7`` in order (``csrc/qmatmul.cpp``).
    """
    rows, cols = codes.shape
    width = storage_bits(bits)
    per_word = 32 // width
    full = torch.zeros(rows, padded_cols(cols, bits), dtype=torch.uint8)
    full[:, :cols] = codes
    fields = full.reshape(rows, -1, per_word, 8)  # [row, block, i, l]: column 8i + l of the block
    if width == 4:  # byte j of word l holds fields 2j (low nibble) and 2j + 1 (high nibble)
        fields = fields[:, :, 0::2] | (fields[:, :, 1::2] << 4)
    # little-endian words: the bytes of word l are its fields j = 0..3 in order
    return fields.transpose(2, 3).reshape(rows, -1).contiguous()


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack`: ``[N, cols]`` uint8 codes."""
    width = storage_bits(bits)
    per_word = 32 // width
    rows = packed.shape[0]
    words = packed.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    blocks = words.reshape(rows, -1, 1, 8)
    shifts = (torch.arange(per_word, dtype=torch.int64) * width)[:, None]
    codes = (blocks >> shifts) & (2**width - 1)  # [row, block, i, l]
    return codes.reshape(rows, -1)[:, :cols].to(torch.uint8)
