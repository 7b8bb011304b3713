"""llama.cpp's K-quant blocks (Q2_K … Q6_K): codes ↔ bytes, dequantization against the gguf package, RTN grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcompress.algorithms import kquants as K
from lmcompress.algorithms.quant import (
    QuantizedTensor,
    QuantSpec,
    kquant_grid_of,
    kquant_spec,
    kquant_tensor,
    rtn_quantize,
)
from lmcompress.checkpoint.packing import pack_quantized, unpack_quantized
from lmcompress.errors import UserError
from lmcompress.transforms.quantize import QuantConfig

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

TYPES = list(K.KTYPES)


def awkward_weights(rows: int = 12, cols: int = 768, seed: int = 0) -> torch.Tensor:
    """Gaussian rows of growing scale plus the cases that decide grids: an all-zero super-block, a constant
    negative sub-block, an all-positive sub-block, exact zeros, a tiny super-block and an outlier."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.linspace(0.01, 1.0, rows)[:, None]
    w[0, :256] = 0.0
    w[1, :32] = -0.25
    w[2, 32:64] = w[2, 32:64].abs() + 0.1
    w[3, 100:140] = 0.0
    w[4, 256:512] *= 1e-6
    w[5, 7] = 40.0
    return w


def random_grid(kind: K.KType, rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, K.KGrid]:
    """Any codes and integers the block can hold (not a quantizer's output): every bit of the layout is used."""
    nsub = cols // kind.sub
    lo, hi = (0, kind.scale_top) if kind.scale_top > 0 else (kind.scale_top, -kind.scale_top - 1)
    scales = torch.randint(lo, hi + 1, (rows, nsub), generator=gen, dtype=torch.int16)
    mins = torch.randint(0, 64 if kind.bits > 2 else 16, (rows, nsub), generator=gen, dtype=torch.int16)
    mins = mins if kind.has_min else torch.zeros_like(mins)
    d = (torch.rand(rows, cols // 256, generator=gen) * 0.02 - 0.005).half()
    dmin = (torch.rand(rows, cols // 256, generator=gen) * 0.01).half() if kind.has_min else torch.zeros_like(d)
    codes = torch.randint(0, 2**kind.bits, (rows, cols), generator=gen).to(torch.uint8)
    return codes, K.KGrid(kind, scales, mins, d, dmin)


def same_grid(a: K.KGrid, b: K.KGrid) -> bool:
    return (
        torch.equal(a.scales, b.scales)
        and torch.equal(a.mins, b.mins)
        and torch.equal(a.d.view(torch.int16), b.d.view(torch.int16))
        and torch.equal(a.dmin.view(torch.int16), b.dmin.view(torch.int16))
    )


@pytest.mark.parametrize("name", TYPES)
def test_layout_constants_are_ggmls(name):
    kind = K.KTYPES[name]
    qtype = GGMLQuantizationType[name.upper()]
    assert kind.ggml_type == qtype.value and GGML_QUANT_SIZES[qtype] == (K.QK_K, kind.block_bytes)


@pytest.mark.parametrize("name", TYPES)
def test_codes_bytes_codes_and_dequantization_equal_gguf(name):
    """Arbitrary codes / integers → bytes → the same; our dequantization of the bytes is the gguf package's."""
    kind = K.KTYPES[name]
    codes, grid = random_grid(kind, 6, 512, torch.Generator().manual_seed(1))
    data = K.pack(codes, grid)
    assert data.shape == (6, 2 * kind.block_bytes) and data.dtype == np.uint8
    back, grid_back = K.unpack(data, name, 512)
    assert torch.equal(back, codes) and same_grid(grid_back, grid)
    reference = gguf_dequantize(data, GGMLQuantizationType[name.upper()])
    ours = K.dequantize_bytes(data, name, 512)
    assert np.array_equal(ours.numpy(), reference)  # bit for bit, the formulas of dequantize_row_q*_K
    assert torch.equal(K.kquant_dequantize(codes, grid), ours)


@pytest.mark.parametrize("name", TYPES)
def test_rtn_round_trips_and_holds_llama_cpps_weights(name):
    w = awkward_weights()
    q = rtn_quantize(w, kquant_spec(name))
    grid = kquant_grid_of(q)  # the integers are recovered exactly from scale / zero point
    data = K.pack(q.codes, grid)
    codes, grid_back = K.unpack(data, name, w.shape[1])
    assert torch.equal(codes, q.codes) and same_grid(grid_back, grid)
    llama = torch.from_numpy(gguf_dequantize(data, GGMLQuantizationType[name.upper()]))
    held = q.dequantize()
    if K.KTYPES[name].has_min:  # (q − m₁/d₁)·d₁ against d₁·q − m₁: a few float32 ulps
        assert torch.allclose(held, llama, rtol=0, atol=4 * torch.finfo(torch.float32).eps * w.abs().max().item())
    else:
        assert torch.equal(held, llama)
    assert bool((held[0, :256] == 0).all()) and bool((held[4, 256:512].abs() <= 2e-5).all())
    stored = unpack_quantized(pack_quantized(q))  # lmcompress's own packed storage keeps the grid exactly
    assert stored.spec == q.spec and torch.equal(stored.scale, q.scale) and torch.equal(stored.zero, q.zero)


@pytest.mark.parametrize("name", TYPES)
def test_rtn_error_is_no_worse_than_a_plain_grid_of_the_same_bits(name):
    """The gguf package cannot quantize K-quants (checked, so this notices when it can); instead the K-quant RTN
    is held against minmax RTN with the same bits and groups and float32 scales: the scale search more than pays
    for the integer sub-block scales."""
    kind = K.KTYPES[name]
    with pytest.raises(NotImplementedError):
        gguf.quants.quantize(np.zeros((1, 256), np.float32), GGMLQuantizationType[name.upper()])
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    ours = (rtn_quantize(w, kquant_spec(name)).dequantize() - w).square().mean()
    plain = (rtn_quantize(w, QuantSpec(kind.bits, kind.sub, not kind.has_min)).dequantize() - w).square().mean()
    assert ours < plain


def test_more_bits_less_error_and_importance_weights_the_search():
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(4))
    errors = [(rtn_quantize(w, kquant_spec(n)).dequantize() - w).square().mean().item() for n in TYPES]
    assert errors == sorted(errors, reverse=True)
    importance = torch.ones(512)
    importance[:64] = 100.0  # the first inputs matter most: their error must drop
    plain = (rtn_quantize(w, kquant_spec("q3_k")).dequantize() - w)[:, :64].square().mean()
    weighted = (rtn_quantize(w, kquant_spec("q3_k"), importance).dequantize() - w)[:, :64].square().mean()
    assert weighted < plain


@pytest.mark.parametrize("name", TYPES)
def test_rows_not_whole_super_blocks_are_refused_naming_the_fallback(name):
    fallback = K.KTYPES[name].fallback.upper()
    with pytest.raises(UserError, match=f"576 inputs, not a multiple of 256.*falls back to {fallback}"):
        rtn_quantize(torch.randn(4, 576), kquant_spec(name))
    with pytest.raises(UserError, match="multiple of 256"):
        K.pack(torch.zeros(4, 576, dtype=torch.uint8), K.kquant_grid(torch.randn(4, 512), name))


def test_bad_specs_and_grids_are_refused():
    with pytest.raises(ValueError, match="q4_k grid is 4-bit asymmetric in groups of 32"):
        QuantSpec(4, 32, True, "q4_k")
    with pytest.raises(UserError, match="use bits 6 with group_size 16 and sym"):
        QuantConfig(bits=4, group_size=128, grid="q6_k").validate()
    QuantConfig(bits=5, group_size=32, sym=False, grid="q5_k").validate()
    with pytest.raises(UserError, match="unknown"):
        K.ktype("q7_k")
    q = rtn_quantize(torch.randn(4, 256), kquant_spec("q4_k"))
    with pytest.raises(ValueError, match="not a Q4_K grid"):
        kquant_grid_of(QuantizedTensor(q.codes, q.scale * 1.1, q.zero, q.spec))


def test_kquant_tensor_of_unpacked_bytes_is_the_same_tensor():
    w = awkward_weights(rows=6, cols=512, seed=2)
    q = rtn_quantize(w, kquant_spec("q5_k"))
    codes, grid = K.unpack(K.pack(q.codes, kquant_grid_of(q)), "q5_k", 512)
    again = kquant_tensor(codes, grid)
    assert torch.equal(again.codes, q.codes) and torch.equal(again.scale, q.scale) and torch.equal(again.zero, q.zero)
