"""The N:M sparse CPU kernel (lmcompress.kernels.sparse_cpu): outputs against the dense matmul of the same
(dequantized) weight for every pattern × value type × shape, both instruction sets, decode and prefill paths;
``load(kernels="auto")`` choosing it for a pruned 2:4 + 4-bit folder; the reasons where it does not run.

Tolerance: ``1e-5 · (|x| · |W|ᵀ)`` (float32 rounding, another summation order).
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec
from lmcompress.checkpoint.load import load
from lmcompress.cli import app
from lmcompress.errors import UserError
from lmcompress.kernels import kernel_for, kernel_report
from lmcompress.kernels import sparse_cpu as sc
from tests.conftest import check_matmul

pytestmark = pytest.mark.skipif(sc.unavailable_reason() is not None, reason=str(sc.unavailable_reason()))


def _nm_weight(rows: int, cols: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    """A random N:M weight with some groups keeping fewer than N (one all zero), and row 1 empty."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols // m, m, generator=g)
    keep = torch.rand(w.shape, generator=g).argsort(-1) < n
    keep &= torch.rand(w.shape[:2], generator=g)[..., None] > 0.1  # whole groups dropped
    keep[..., 0] &= torch.rand(w.shape[:2], generator=g) > 0.3  # groups keeping fewer than n
    w = (w * keep).reshape(rows, cols)
    if rows > 1:
        w[1] = 0
    return w


def _quantized(w: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """Random codes, scales and integer zero points for ``w``'s kept entries; dropped entries at the zero point."""
    rows, cols = w.shape
    spec = QuantSpec(bits=bits, group_size=group, sym=False)
    groups = spec.groups(cols)
    g = torch.Generator().manual_seed(rows + cols)
    scale = torch.rand(rows, groups, generator=g) * 0.1 + 0.01
    zero = torch.randint(0, 2**bits, (rows, groups), generator=g).float()
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g)
    gi = torch.arange(cols) // spec.width(cols)
    codes = torch.where(w != 0, codes, zero[:, gi].long())
    return QuantizedTensor(codes.to(torch.uint8), scale, zero, spec)


@pytest.mark.parametrize("wide", [True, False], ids=["avx512", "avx2"])
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)], ids=["2:4", "4:8"])
@pytest.mark.parametrize("values", ["float", 4, 8, 3])
@pytest.mark.parametrize("shape", [(37, 72), (16, 264), (5, 576), (3, 8), (2, 1000)])
def test_sparse_kernel_equals_dense(monkeypatch, wide, pattern, values, shape):
    """Widths not a multiple of the 32-input block (72, 264, 8, 1000), an empty row, all-zero groups, groups of
    32 or one per row, decode (1–4 rows) and prefill (more rows)."""
    if wide and not sc.use_avx512():
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("LMCOMPRESS_AVX512", "1" if wide else "0")
    rows, cols = shape
    n, m = pattern
    if cols % m:
        pytest.skip("not a multiple of M")
    w = _nm_weight(rows, cols, n, m)
    if values == "float":
        layer, dense = sc.SparseLinear(w), w
    else:
        q = _quantized(w, values, 32 if cols % 32 == 0 else -1)
        layer, dense = sc.SparseLinear(q), q.dequantize()
        assert layer.kind == (sc.KIND_INT4 if values <= 4 else sc.KIND_INT8)
    assert (layer.n, layer.m) == (2, 4) or pattern == (4, 8)  # a 2:4 weight is stored as 2:4
    assert torch.equal(layer.dense_weight(), dense)
    for batch in (1, 2, 3, 4, 7):
        check_matmul(layer, dense, batch)


def test_sparse_layer_bias_and_batch_shape():
    w = _nm_weight(24, 64, 2, 4)
    bias = torch.randn(24)
    layer = sc.SparseLinear(w, bias)
    x = torch.randn(2, 3, 64)
    assert torch.allclose(layer(x), x @ w.T + bias, atol=1e-5)
    assert torch.allclose(layer(x[:, :1]), x[:, :1] @ w.T + bias, atol=1e-5)


def test_pack_nm_layout_of_a_known_row():
    """2:4: kept j of a block lies in group j // 2; its position's two bits at bit 2j of the block's word."""
    w = torch.zeros(1, 32)
    w[0, 1], w[0, 3], w[0, 4], w[0, 30] = 1.0, 2.0, 3.0, 4.0  # group 0: 1, 3; group 1: 0 (+ first dropped 1)
    parts = sc.pack_nm(w, w != 0, 2, 4, sc.KIND_FLOAT)
    word = int(parts["pos"][0, 0]) & 0xFFFFFFFF
    assert [(word >> (2 * j)) & 3 for j in range(4)] == [1, 3, 0, 1]
    assert parts["vals"][0, :4].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert [(word >> (2 * j)) & 3 for j in (14, 15)] == [0, 2]  # group 7: 28 (filled), 30
    assert parts["vals"][0, 15] == 4.0


@pytest.mark.parametrize(
    "weight,message",
    [
        (torch.ones(4, 16), None),  # dense: no reason
        (torch.tensor([[1.0, 1, 1, 1, 1, 0, 0, 0] * 2] * 4), "up to 5 of every 8 kept"),
        (torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 4), "inputs are not a multiple of 4"),
    ],
)
def test_patterns_the_kernel_cannot_run_give_a_reason(weight, message):
    pattern, why = sc.sparse_kernel_for(weight)
    if message is None:
        assert pattern is None and why == ""
        return
    assert pattern is None and "not 2:4 or 4:8" in why and message in why
    with pytest.raises(UserError, match="cannot run on the sparse CPU kernel"):
        sc.SparseLinear(weight)


def test_quantized_fallbacks_name_why():
    w = _nm_weight(16, 64, 2, 4)
    q = _quantized(w, 4, 16)  # group 16: not a multiple of 32
    pattern, why = sc.sparse_kernel_for(q)
    assert pattern is None and "group size 16" in why
    unstructured = _quantized(torch.where(torch.rand(16, 64) < 0.5, torch.randn(16, 64), 0.0), 4, 32)
    kind, desc = kernel_for(unstructured, "auto")
    assert kind == "packed" and "not sparse" in desc and "not 2:4 or 4:8" in desc
    assert kernel_for(_quantized(w, 4, 32), "auto")[0] == "sparse"
    assert kernel_for(_quantized(w, 4, 32), "aten")[0] != "sparse"


@pytest.fixture(scope="module")
def pruned_24w4(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse") / "m-24w4"
    args = ["prune", str(tiny_folder("llama")), "--method", "sparsegpt", "--pattern", "2:4", "--bits", "4"]
    args += ["--group-size", "32", "--calib-data", "bundled:wikitext2-valid", "--nsamples", "4", "--seqlen", "64"]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_load_auto_picks_sparse_kernel_for_pruned_24_int4(pruned_24w4):
    dense, _ = load(pruned_24w4)
    fast, _ = load(pruned_24w4, kernels="auto")
    report = kernel_report(fast)
    assert len(report.swapped) == 14 and not report.dense  # 2 blocks × 7 linear layers
    assert all(d.startswith("lmcompress sparse kernel, 2:4 4-bit g32") for d in report.swapped.values())
    assert "14 layers lmcompress sparse" in report.summary()
    assert sum(isinstance(m, sc.SparseLinear) for m in fast.modules()) == 14
    ids = torch.randint(0, dense.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(ids).logits
        assert float((fast(ids).logits - ref).abs().max()) < 1e-4 * float(ref.abs().max())  # prefill
        one = dense(ids[:, :1]).logits
        assert float((fast(ids[:, :1]).logits - one).abs().max()) < 1e-4 * float(one.abs().max())  # decode


def test_generate_with_sparse_kernel_gives_dense_tokens(pruned_24w4):
    from lmcompress.cli.generate import generate_text

    model, tokenizer = load(pruned_24w4)
    plain = generate_text(model, tokenizer, "the history of", max_new_tokens=10)
    fast_model, _ = load(pruned_24w4, kernels="auto")
    fast = generate_text(fast_model, tokenizer, "the history of", max_new_tokens=10)
    assert fast["token_ids"] == plain["token_ids"]


def test_float_24_folder_runs_sparse(tiny_folder, tmp_path):
    out = tmp_path / "m-24"
    args = ["prune", str(tiny_folder("llama")), "--method", "magnitude", "--pattern", "2:4", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    dense, _ = load(out)
    fast, _ = load(out, kernels="auto")
    report = kernel_report(fast)
    assert len(report.swapped) == 14 and report.compute_dtype == "float32"
    assert all("2:4 float32" in d for d in report.swapped.values())
    ids = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(ids).logits
        assert float((fast(ids).logits - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    none, _ = load(out, kernels="none")
    assert not any(isinstance(m, sc.SparseLinear) for m in none.modules())
