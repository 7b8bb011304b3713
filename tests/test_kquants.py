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


# llama.cpp's reference K-quantizers (quantize_row_q*_K_ref with make_qkx2_quants / make_q3_quants /
# make_qx_quants), re-stated in float32 numpy one sub-block at a time: an oracle for the RTN error comparison.
F = np.float32


def _nearest(v):
    return np.rint(v).astype(np.int64)  # nearest_int: round half to even


def _ref_min_scale(x, w, nmax, rmin, rdelta, nstep, mad):
    """make_qkx2_quants: ``(scale, −min, codes)`` of one sub-block; the minimum found so far moves the grid."""
    lo, hi = min(F(x.min()), F(0)), F(x.max())
    if hi == lo:
        return F(0), -lo, np.zeros(x.size, np.int64)
    dist = np.abs if mad else np.square
    iscale = F(nmax) / (hi - lo)
    scale = F(1) / iscale
    codes = np.clip(_nearest(iscale * (x - lo)), 0, nmax)
    best = F((w * dist(scale * codes + lo - x)).sum())
    sw, sx = F(w.sum()), F((w * x).sum())
    for i in range(nstep + 1):
        lv = np.clip(_nearest(F(rmin + rdelta * i + nmax) / (hi - lo) * (x - lo)), 0, nmax).astype(F)
        sl, sl2, sxl = F((w * lv).sum()), F((w * lv * lv).sum()), F((w * lv * x).sum())
        det = sw * sl2 - sl * sl
        if det > 0:
            s, m = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
            if m > 0:
                s, m = sxl / sl2, F(0)
            err = F((w * dist(s * lv + m - x)).sum())
            if err < best:
                best, scale, lo, codes = err, s, m, lv.astype(np.int64)
    return scale, -lo, codes


def _ref_min_block(x, nmax, sub, top, search, weights):
    """One super-block of Q2_K / Q4_K / Q5_K, dequantized."""
    xs = x.reshape(-1, sub)
    found = [_ref_min_scale(b, weights(b), nmax, *search) for b in xs]
    scales, mins = np.array([f[0] for f in found], F), np.array([f[1] for f in found], F)
    codes = np.stack([f[2] for f in found])
    ls = np.minimum(top, _nearest((F(top) / scales.max() if scales.max() > 0 else F(0)) * scales))
    lm = np.minimum(top, _nearest((F(top) / mins.max() if mins.max() > 0 else F(0)) * mins))
    d, dmin = F(np.float16(scales.max() / F(top))), F(np.float16(mins.max() / F(top)))
    out = np.empty_like(xs)
    for j in range(len(xs)):
        dj, mj = d * F(ls[j]), dmin * F(lm[j])
        if dj:
            codes[j] = np.clip(_nearest((xs[j] + mj) / dj), 0, nmax)
        out[j] = dj * codes[j] - mj
    return out.reshape(-1)


def _ref_q3_scale(x, nmax=4):
    """make_q3_quants with do_rmse: weights x², one pass of code moves at a time while the fit improves."""
    mx = x[np.argmax(np.abs(x))]
    if abs(mx) < 1e-15:
        return F(0)
    lv, w = np.clip(_nearest(F(-nmax) / mx * x), -nmax, nmax - 1), x * x
    slx_t, sl2_t = F((w * x * lv).sum()), F((w * lv * lv).sum())
    for _ in range(5):
        changed = 0
        for i in range(x.size):
            slx = slx_t - w[i] * x[i] * lv[i]
            if slx > 0:
                sl2 = sl2_t - w[i] * lv[i] * lv[i]
                new = int(np.clip(_nearest(x[i] * sl2 / slx), -nmax, nmax - 1))
                if new != lv[i]:
                    slx, sl2 = slx + w[i] * x[i] * new, sl2 + w[i] * new * new
                    if sl2 > 0 and slx * slx * sl2_t > slx_t * slx_t * sl2:
                        lv[i], slx_t, sl2_t, changed = new, slx, sl2, changed + 1
        if not changed:
            break
    return slx_t / sl2_t if sl2_t > 0 else F(0)


def _ref_q6_scale(x, nmax=32):
    """make_qx_quants with rmse_type 1 (weights x²): the best of 19 roundings by (Σwxl)² / Σwl²."""
    mx = x[np.argmax(np.abs(x))]
    if abs(mx) < 1e-15:
        return F(0)

    def fit(iscale):
        lv = np.clip(_nearest(iscale * x), -nmax, nmax - 1).astype(F)
        return F((x**3 * lv).sum()), F((x * x * lv * lv).sum())

    slx, sl2 = fit(F(-nmax) / mx)
    scale = slx / sl2 if sl2 else F(0)
    best = scale * slx
    for i in [i for i in range(-9, 10) if i]:
        slx, sl2 = fit(-(F(nmax) + F(0.1) * F(i)) / mx)
        if sl2 > 0 and slx * slx > best * sl2:
            scale = slx / sl2
            best = scale * slx
    return scale


def _ref_sym_block(x, nmax, top, sub_scale):
    """One super-block of Q3_K (top −32) / Q6_K (top −128), dequantized."""
    xs = x.reshape(16, 16)
    scales = np.array([sub_scale(b) for b in xs], F)
    out = np.zeros_like(xs)
    ext = scales[np.argmax(np.abs(scales))]
    if not ext:
        return out.reshape(-1)
    iscale = F(top) / ext
    ls, d = np.clip(_nearest(iscale * scales), top, -top - 1), F(np.float16(F(1) / iscale))
    for j in range(16):
        if d * F(ls[j]):
            out[j] = d * F(ls[j]) * np.clip(_nearest(xs[j] / (d * F(ls[j]))), -nmax, nmax - 1)
    return out.reshape(-1)


def _rms_abs(b):
    return np.sqrt(F((b * b).mean())) + np.abs(b)


REFERENCE = {
    "q2_k": lambda x: _ref_min_block(x, 3, 16, 15, (-0.5, 0.1, 15, True), np.abs),
    "q3_k": lambda x: _ref_sym_block(x, 4, -32, _ref_q3_scale),
    "q4_k": lambda x: _ref_min_block(x, 15, 32, 63, (-1.0, 0.1, 20, False), _rms_abs),
    "q5_k": lambda x: _ref_min_block(x, 31, 32, 63, (-0.5, 0.1, 15, False), _rms_abs),
    "q6_k": lambda x: _ref_sym_block(x, 32, -128, _ref_q6_scale),
}


def reference_dequantized(name: str, w: torch.Tensor) -> torch.Tensor:
    x = w.numpy().astype(F).reshape(-1, K.QK_K)
    return torch.from_numpy(np.stack([REFERENCE[name](b) for b in x]).reshape(w.shape))


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
def test_rtn_error_is_no_worse_than_llama_cpps_reference_quantizer(name):
    """The gguf package cannot quantize K-quants (checked, so this notices when it can); held instead against the
    re-stated reference quantizer above, and against minmax RTN of the same bits and groups with float scales."""
    kind = K.KTYPES[name]
    with pytest.raises(NotImplementedError):
        gguf.quants.quantize(np.zeros((1, 256), np.float32), GGMLQuantizationType[name.upper()])
    gen = torch.Generator().manual_seed(3)
    gaussian, heavy = torch.randn(8, 512, generator=gen), torch.randn(8, 512, generator=gen) ** 3
    for w in (gaussian, heavy):
        ours = (rtn_quantize(w, kquant_spec(name)).dequantize() - w).square().mean()
        llama = (reference_dequantized(name, w) - w).square().mean()
        assert ours < llama  # the same searches (Q2_K–Q5_K), or wider ones, plus the ±1 refinement of the integers
    # on Gaussian weights the scale search more than pays for the integer sub-block scales (not so for Q2_K's
    # 4-bit scales on heavy tails, where small sub-blocks get few scale levels)
    ours = (rtn_quantize(gaussian, kquant_spec(name)).dequantize() - gaussian).square().mean()
    plain = rtn_quantize(gaussian, QuantSpec(kind.bits, kind.sub, not kind.has_min)).dequantize()
    assert ours < (plain - gaussian).square().mean()


def test_more_bits_less_error_and_importance_weights_the_search():
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(4))
    errors = [(rtn_quantize(w, kquant_spec(n)).dequantize() - w).square().mean().item() for n in TYPES]
    assert errors == sorted(errors, reverse=True)
    importance = torch.ones(512)
    importance[::2] = 100.0  # the even inputs matter most: their error must drop
    for name in TYPES:
        plain = (rtn_quantize(w, kquant_spec(name)).dequantize() - w)[:, ::2].square().mean()
        weighted = (rtn_quantize(w, kquant_spec(name), importance).dequantize() - w)[:, ::2].square().mean()
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


@pytest.mark.parametrize(("act_order", "static_groups"), [(False, False), (True, True)])
def test_gptq_on_the_q4_1_grid_is_llama_cpps_q4_1(act_order, static_groups):
    """GPTQ on llama.cpp's Q4_1 grid (``d = (max − min) / 15``, ``m = min``): without error to spread its codes are
    RTN's, which are llama.cpp's own; with a Hessian it beats RTN's output error and the codes stay Q4_1 blocks."""
    from lmcompress.algorithms.gptq import gptq_quantize
    from lmcompress.checkpoint.gguf_export import exact_block_type

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 128, generator=g)
    x = torch.randn(512, 128, generator=g) * torch.linspace(0.1, 3, 128)
    spec = QuantSpec(4, 32, False, "q4_1")
    rtn = rtn_quantize(w, spec)
    assert torch.equal(gptq_quantize(w.clone(), torch.eye(128), spec).quantized.codes, rtn.codes)
    res = gptq_quantize(w.clone(), 2 * x.t() @ x / 512, spec, act_order=act_order, static_groups=static_groups)
    assert exact_block_type(res.quantized) == ("q4_1", "") and res.quantized.g_idx is None
    err = lambda v: float(((v - w) @ x.t()).pow(2).mean())  # noqa: E731
    assert err(res.weight) < err(rtn.dequantize())
