"""Packed layouts: every layout is an exact inverse, and the automatic choice is the smallest."""

from __future__ import annotations

import pytest
import torch

from lmcompress.algorithms.masks import Pattern, nm_mask
from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
from lmcompress.checkpoint.packing import (
    choose_layout,
    nm_index_bits,
    pack_bitmask,
    pack_bits,
    pack_quantized,
    pack_tensor,
    packed_nbytes,
    unpack_bitmask,
    unpack_bits,
    unpack_quantized,
    unpack_tensor,
)


def _sparse(shape, sparsity, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    return w.masked_fill(torch.rand(shape, generator=gen) < sparsity, 0)


def _nm(rows, cols, n, m, seed=0, dtype=torch.float32):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return w.masked_fill(nm_mask(w.float().abs(), Pattern(n, m)), 0)


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("count", [0, 1, 7, 9, 1001])
def test_pack_bits_round_trip(bits, count):
    values = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count).long(), values)


def test_pack_bits_is_dense_and_rejects_bad_input():
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]  # two int4 per byte, low nibble first
    assert pack_bits(torch.arange(8), 3).numel() == 3  # eight 3-bit codes in three bytes
    with pytest.raises(ValueError, match="do not fit"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (13, 17), (2, 3, 5)])
def test_bitmask_round_trip_odd_shapes(shape):
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.4
    packed = pack_bitmask(keep)
    assert packed.numel() == -(-keep.numel() // 8)
    assert torch.equal(unpack_bitmask(packed, shape), keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "make,layout",
    [
        (lambda d: _sparse((13, 17), 0.0, dtype=d), "dense"),
        (lambda d: _sparse((13, 17), 0.5, dtype=d), "bitmask"),
        (lambda d: _sparse((5, 3, 8), 0.7, dtype=d), "bitmask"),
        (lambda d: _nm(12, 32, 2, 4, dtype=d), "nm"),
        (lambda d: _nm(12, 32, 4, 8, dtype=d), "nm"),
        (lambda d: _nm(6, 48, 1, 4, dtype=d), "nm"),
    ],
)
def test_float_layouts_round_trip_exactly(make, layout, dtype):
    t = make(dtype)
    packed = pack_tensor(t)
    assert packed.layout == layout
    back = unpack_tensor(packed)
    assert back.dtype == t.dtype and torch.equal(back, t)
    for forced in ("dense", "bitmask"):  # every layout that applies is exact, chosen or not
        assert torch.equal(unpack_tensor(pack_tensor(t, forced)), t)


def test_nm_layout_sizes_and_underfilled_groups():
    t = _nm(16, 64, 2, 4, dtype=torch.float16)
    t[0, :8] = 0  # groups with fewer than 2 survivors still round-trip
    t[1, :4] = torch.tensor([0, 0, 0, 1.5])
    packed = pack_tensor(t)
    assert (packed.layout, packed.meta["n"], packed.meta["m"]) == ("nm", 2, 4)
    groups = t.numel() // 4
    assert nm_index_bits(2, 4) == 3 and nm_index_bits(4, 8) == 7  # combination rank, not 2 bits per position
    assert packed.nbytes == groups * 2 * 2 + packed_nbytes(groups, 3)
    assert packed.nbytes < t.numel() * 2 * 0.6
    assert torch.equal(unpack_tensor(packed), t)
    four_eight = pack_tensor(_nm(16, 64, 4, 8, dtype=torch.float16), "4:8")
    assert four_eight.parts["index"].numel() == packed_nbytes(16 * 64 // 8, 7)


def test_layout_choice_is_the_smallest():
    dense = torch.randn(8, 16)
    assert choose_layout(dense != 0, 32) == ("dense",)
    slightly = dense.clone()
    slightly[0, 0] = 0  # 1 zero: a bitmask costs more than it saves
    assert pack_tensor(slightly).layout == "dense"
    unstructured = _sparse((64, 64), 0.5)
    assert pack_tensor(unstructured).nbytes < pack_tensor(unstructured, "dense").nbytes
    assert pack_tensor(_nm(8, 16, 2, 4)).nbytes <= pack_tensor(_nm(8, 16, 2, 4), "bitmask").nbytes


def test_nm_layout_refuses_tensors_that_do_not_fit():
    with pytest.raises(ValueError, match="more than 2"):
        pack_tensor(_sparse((4, 8), 0.0), "2:4")
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_tensor(_sparse((4, 6), 0.9), "2:4")


def test_corrupted_parts_are_detected():
    packed = pack_tensor(_sparse((8, 16), 0.5))
    packed.parts["values"] = packed.parts["values"][:-1]
    with pytest.raises(ValueError, match="keeps"):
        unpack_tensor(packed)
    nm = pack_tensor(_nm(4, 8, 2, 4))
    nm.parts["index"] = torch.full_like(nm.parts["index"], 0xFF)  # rank 7 > C(4,2) − 1
    with pytest.raises(ValueError, match="corrupted N:M index"):
        unpack_tensor(nm)


def _assert_same_quantized(a, b):
    assert a.spec == b.spec
    assert torch.equal(a.codes, b.codes) and a.codes.dtype == torch.uint8
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    assert torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(
    "weight,group_size,layout",
    [
        (_sparse((12, 100), 0.0), 32, "dense"),  # odd width: last group partial
        (_sparse((12, 100), 0.6), 32, None),
        (_nm(12, 96, 2, 4), 32, "nm"),
        (_nm(10, 64, 4, 8), -1, "nm"),
        (_sparse((7, 33), 0.8), -1, "bitmask"),
    ],
)
def test_quantized_round_trip_exactly(weight, group_size, layout, bits, sym):
    q = rtn_quantize(weight, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    packed = pack_quantized(q)
    if layout is not None and bits >= 4:  # at 2-3 bits many kept weights round to the zero code: other choices
        assert packed.layout == layout
    _assert_same_quantized(unpack_quantized(packed), q)
    sizes = []
    for forced in ("dense", "bitmask", "2:4", "4:8"):
        try:
            other = pack_quantized(q, forced)
        except ValueError:  # N:M that does not fit this tensor
            continue
        _assert_same_quantized(unpack_quantized(other), q)
        sizes.append(other.nbytes)
    assert packed.nbytes == min(sizes)


def test_quantized_sizes():
    q = rtn_quantize(_nm(64, 256, 2, 4), QuantSpec(bits=4, group_size=128, sym=True))
    packed = pack_quantized(q)
    assert packed.layout == "nm" and "zero" not in packed.parts  # symmetric: zero point implied
    codes = packed.parts["codes"].numel() + packed.parts["index"].numel()
    assert codes == 64 * 256 // 2 // 2 + packed_nbytes(64 * 256 // 4, 3)  # 4-bit survivors + 3 bits per group
    asym = pack_quantized(rtn_quantize(torch.randn(16, 64), QuantSpec(bits=3, group_size=32, sym=False)))
    assert asym.parts["zero"].numel() == packed_nbytes(16 * 2, 3)  # zero points bit-packed like codes
    assert asym.parts["codes"].numel() == packed_nbytes(16 * 64, 3)


def test_scales_kept_exact_in_the_narrowest_dtype():
    q = rtn_quantize(torch.randn(8, 64), QuantSpec(bits=4, group_size=32))
    q16 = type(q)(q.codes, q.scale.half().float(), q.zero, q.spec)
    assert pack_quantized(q16).parts["scale"].dtype == torch.float16
    assert pack_quantized(q).parts["scale"].dtype == torch.float32  # fp32 scales are not rounded silently
    _assert_same_quantized(unpack_quantized(pack_quantized(q16)), q16)


def test_act_order_group_index_round_trips():
    w = _nm(8, 64, 2, 4)
    q = rtn_quantize(w, QuantSpec(bits=4, group_size=16))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    q = type(q)(q.codes, q.scale, q.zero, q.spec, (perm // 16).to(torch.int32))  # scattered groups
    packed = pack_quantized(q)
    assert packed.parts["g_idx"].numel() == packed_nbytes(64, 2)  # 4 groups: 2 bits per input
    back = unpack_quantized(packed)
    _assert_same_quantized(back, q)
    assert torch.equal(back.g_idx, q.g_idx) and back.g_idx.dtype == torch.int32
    plain = type(q)(q.codes, q.scale, q.zero, q.spec, torch.arange(64, dtype=torch.int32) // 16)
    assert "g_idx" not in pack_quantized(plain).parts
    assert torch.equal(unpack_quantized(pack_quantized(plain)).g_idx, plain.g_idx)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("kind", ["rtn", "gptq-act-order", "joint-2:4"])
def test_partial_last_group_round_trips_exactly(kind, sym):
    """72 inputs in groups of 32: the third group holds 8 inputs, with its own scale and zero point."""
    from lmcompress.algorithms import sparsegpt_prune
    from lmcompress.algorithms.gptq import ColumnQuantizer, gptq_quantize
    from lmcompress.transforms.quantize import nominal_bits_per_weight

    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(20, 72, generator=gen), torch.randn(200, 72, generator=gen)
    h, spec = 2 * x.t() @ x / 200, QuantSpec(bits=3, group_size=32, sym=sym)
    if kind == "rtn":
        q = rtn_quantize(w, spec)
    elif kind == "gptq-act-order":
        q = gptq_quantize(w, h, spec, act_order=True, blocksize=16).quantized
        assert q.g_idx is not None and torch.bincount(q.g_idx.long()).tolist() == [32, 32, 8]
    else:
        quantizer = ColumnQuantizer(spec, tuple(w.shape))
        sparsegpt_prune(w, h, 0.5, Pattern(2, 4), blocksize=16, quantizer=quantizer)
        q = quantizer.result()
    assert q.scale.shape == (20, 3)
    sizes = {}
    for layout in ("auto", "dense", "bitmask", "2:4"):
        try:
            packed = pack_quantized(q, layout)
        except ValueError:  # not a 2:4 tensor
            continue
        assert packed.parts["scale"].shape == (20, 3)
        if not sym:
            assert packed.parts["zero"].numel() == packed_nbytes(20 * 3, 3)  # the short group's zero point too
        if q.g_idx is not None:
            assert packed.parts["g_idx"].numel() == packed_nbytes(72, 2)  # 3 groups: 2 bits per input
        back = unpack_quantized(packed)
        _assert_same_quantized(back, q)
        assert torch.equal(back.dequantize()[:, 64:], q.dequantize()[:, 64:])
        sizes[layout] = packed.nbytes
    assert sizes["auto"] == min(sizes.values())
    dense = pack_quantized(q, "dense")
    stored_bits = 8 * sum(dense.parts[p].numel() * dense.parts[p].element_size() for p in dense.parts)
    assert nominal_bits_per_weight({"w": q}) == pytest.approx(stored_bits / w.numel(), abs=0.1)  # byte rounding
