"""The unstructured (bitmask) sparse CPU kernel (lmcompress.kernels.sparse_cpu.BitmaskLinear): outputs against the
dense matmul of the same (dequantized) weight for every value type × shape × sparsity, both instruction sets,
decode and prefill paths; its layout; where ``load(kernels="auto")`` chooses it and where it does not, with why.

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

pytestmark = pytest.mark.skipif(
    sc.bitmask_unavailable_reason() is not None, reason=str(sc.bitmask_unavailable_reason())
)


def _weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Random unstructured zeros; row 0 empty (an all-zero mask), row 1 full (no zero), when there are rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) >= sparsity)
    if rows > 2:
        w[0] = 0
        w[1] = torch.randn(cols, generator=g).abs() + 0.1
    return w


def _quantized(w: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """Random codes, scales and integer zero points for ``w``'s non-zeros; its zeros at the zero point."""
    rows, cols = w.shape
    spec = QuantSpec(bits=bits, group_size=group, sym=False)
    g = torch.Generator().manual_seed(rows + cols + bits)
    scale = torch.rand(rows, spec.groups(cols), generator=g) * 0.1 + 0.01
    zero = torch.randint(0, 2**bits, scale.shape, generator=g).float()
    zero_of = zero[:, torch.arange(cols) // spec.width(cols)].long()
    codes = (zero_of + torch.randint(1, 2**bits, (rows, cols), generator=g)) % 2**bits  # never the zero point
    codes = torch.where(w != 0, codes, zero_of)
    return QuantizedTensor(codes.to(torch.uint8), scale, zero, spec)


@pytest.mark.parametrize("wide", [True, False], ids=["avx512", "avx2"])
@pytest.mark.parametrize("values", ["float", 8, 4, 3, 6])
@pytest.mark.parametrize("shape", [(37, 72), (16, 264), (5, 576), (3, 8), (2, 1000), (4, 17)])
@pytest.mark.parametrize("sparsity", [0.5, 0.93, 1.0, 0.0])
def test_bitmask_kernel_equals_dense(monkeypatch, wide, values, shape, sparsity):
    """Widths not a multiple of the 16/32-input mask word (72, 264, 8, 1000, 17), an empty row, a full row, all-zero
    and no-zero weights, groups of 32, 64 or one per row, decode (1–4 rows) and prefill (more rows)."""
    if wide and not sc.bitmask_use_avx512():
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("LMCOMPRESS_AVX512", "1" if wide else "0")
    rows, cols = shape
    w = _weight(rows, cols, sparsity)
    if values == "float":
        layer, dense = sc.BitmaskLinear(w), w
    else:
        group = 64 if cols % 64 == 0 else 32 if cols % 32 == 0 else -1
        q = _quantized(w, values, group)
        layer, dense = sc.BitmaskLinear(q), q.dequantize()
        assert layer.kind == (sc.KIND_INT4 if values <= 4 else sc.KIND_INT8)
    assert torch.equal(layer.dense_weight(), dense)
    assert abs(layer.sparsity - float((w == 0).float().mean())) < 1e-6
    for batch in (1, 2, 3, 4, 7):
        check_matmul(layer, dense, batch)


def test_bitmask_layer_bias_batch_shape_and_empty_input():
    w = _weight(24, 100, 0.7)
    bias = torch.randn(24)
    layer = sc.BitmaskLinear(w, bias)
    x = torch.randn(2, 3, 100)
    assert torch.allclose(layer(x), x @ w.T + bias, atol=1e-5)
    assert torch.allclose(layer(x[:, :1]), x[:, :1] @ w.T + bias, atol=1e-5)
    assert layer(torch.randn(0, 100)).shape == (0, 24)
    assert f"bitmask {100 * float((w == 0).float().mean()):.0f}% zeros, float32" in repr(layer)


def test_pack_bitmask_layout_of_a_known_row():
    """Bit j of word b is input 32b + j; float values in input order; 4-bit codes two a byte, low nibble first,
    each 16 inputs from a new byte; offsets where each row starts."""
    keep = torch.zeros(2, 40, dtype=torch.bool)
    keep[0, [1, 5, 17, 33]] = True  # half 0: inputs 1, 5; half 1: 17; word 1: 33
    keep[1, [0]] = True
    values = torch.zeros(2, 40)
    values[0, [1, 5, 17, 33]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    values[1, 0] = 5.0
    parts = sc.pack_bitmask(values, keep, sc.KIND_FLOAT)
    assert parts["mask"].shape == (2, 2)
    assert int(parts["mask"][0, 0]) == (1 << 1) | (1 << 5) | (1 << 17) and int(parts["mask"][0, 1]) == 1 << 1
    assert parts["vals"][:5].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and parts["vals"].numel() == 5 + sc.BITMASK_PAD
    assert parts["offsets"].tolist() == [0, 4, 5]
    codes = values.to(torch.int64) + 8 * keep  # 9, 10, 11, 12 | 13
    four = sc.pack_bitmask(codes, keep, sc.KIND_INT4)
    # row 0: half 0 (9, 10) → one byte; half 1 (11) → one byte; half 2 (12) → one byte; row 1: 13
    assert four["vals"][:4].tolist() == [9 | 10 << 4, 11, 12, 13]
    assert four["offsets"].tolist() == [0, 3, 4]


def test_bitmask_kernel_for_says_where_it_pays():
    floor = sc.BITMASK_MIN_SPARSITY[sc.KIND_FLOAT]
    assert floor is not None
    fits, desc = sc.bitmask_kernel_for(_weight(32, 64, min(floor + 0.2, 0.95)))
    assert fits and desc.startswith("lmcompress bitmask kernel") and "float32" in desc
    fits, why = sc.bitmask_kernel_for(_weight(64, 64, floor - 0.15))
    assert not fits and f"pays from {100 * floor:.0f}%" in why
    assert sc.bitmask_kernel_for(torch.randn(8, 64)) == (False, "")  # dense: no reason
    # a quantized weight: chosen only where measured to pay
    q = _quantized(_weight(32, 64, 0.8), 4, 32)
    fits, why = sc.bitmask_kernel_for(q)
    if sc.BITMASK_MIN_SPARSITY[sc.KIND_INT4] is None:
        assert not fits and "no faster than the dense kernel" in why
        kind, desc = kernel_for(q, "auto")
        assert kind == "packed" and "not sparse" in desc and "bitmask" in desc
    assert sc.bitmask_kernel_for(q, min_sparsity=0.5)[0]  # it runs, when asked for


def test_bitmask_layouts_it_cannot_hold_raise():
    q = _quantized(_weight(16, 64, 0.8), 4, 16)  # group 16: not a multiple of 32
    assert not sc.bitmask_kernel_for(q, min_sparsity=0.0)[0]
    with pytest.raises(UserError, match="group size 16"):
        sc.BitmaskLinear(q)
    with pytest.raises(UserError, match="bitmask CPU kernel"):
        sc.BitmaskLinear(torch.zeros(4, 8, dtype=torch.int32))


def test_cpu_sparse_kernel_prefers_nm():
    """A 2:4 weight is 50 % sparse too: the N:M kernel runs it, the bitmask kernel the unstructured one."""
    w = torch.randn(16, 64) * torch.tensor([1.0, 0.0, 1.0, 0.0] * 16)
    assert sc.cpu_sparse_kernel_for(w)[0] == "sparse"
    assert sc.cpu_sparse_kernel_for(_weight(16, 64, 0.9))[0] == "bitmask"
    assert isinstance(sc.sparse_layer("bitmask", _weight(16, 64, 0.9)), sc.BitmaskLinear)


def test_float_unstructured_folder_runs_on_bitmask_kernel(tiny_folder, tmp_path):
    out = tmp_path / "m-u80"
    args = ["prune", str(tiny_folder("llama")), "--method", "magnitude", "--sparsity", "0.8", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    dense, tokenizer = load(out)
    fast, _ = load(out, kernels="auto")
    report = kernel_report(fast)
    assert len(report.swapped) == 14 and report.compute_dtype == "float32"  # 2 blocks × 7 linear layers
    assert all(d.startswith("lmcompress bitmask kernel") for d in report.swapped.values())
    assert "unstructured layers on the bitmask kernel" in report.note
    assert sum(isinstance(m, sc.BitmaskLinear) for m in fast.modules()) == 14
    ids = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(ids).logits
        assert float((fast(ids).logits - ref).abs().max()) < 1e-4 * float(ref.abs().max())  # prefill
        one = dense(ids[:, :1]).logits
        assert float((fast(ids[:, :1]).logits - one).abs().max()) < 1e-4 * float(one.abs().max())  # decode
    from lmcompress.cli.generate import generate_text

    plain = generate_text(dense, tokenizer, "the history of", max_new_tokens=8)
    assert generate_text(fast, tokenizer, "the history of", max_new_tokens=8)["token_ids"] == plain["token_ids"]
    none, _ = load(out, kernels="none")
    assert not any(isinstance(m, sc.BitmaskLinear) for m in none.modules())


def test_float_folder_below_the_threshold_stays_dense(tiny_folder, tmp_path):
    floor = sc.BITMASK_MIN_SPARSITY[sc.KIND_FLOAT]
    out = tmp_path / "m-u30"
    args = ["prune", str(tiny_folder("llama")), "--method", "magnitude", "--sparsity", str(floor - 0.2)]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    fast, _ = load(out, kernels="auto")
    assert not any(isinstance(m, (sc.BitmaskLinear, sc.SparseLinear)) for m in fast.modules())


def test_swap_judges_the_whole_weight_not_its_first_row():
    """A layer sparse overall whose row 0 is dense (per-layer magnitude pruning) is swapped; one under the
    threshold is not."""
    floor = sc.BITMASK_MIN_SPARSITY[sc.KIND_FLOAT]
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(64, 64))
    with torch.no_grad():
        w = torch.randn(32, 64)
        w[1:, 24:] = 0  # row 0 full, the others keep 24 of 64: 1 − (64 + 31·24) / 2048 = 60.5 % zeros
        model[0].weight.copy_(w)
        model[1].weight.copy_(_weight(64, 64, floor - 0.15))
    assert 1 - int(torch.count_nonzero(w)) / w.numel() >= floor
    swapped = sc.swap_sparse_linears(model)
    assert list(swapped) == ["0"] and isinstance(model[0], sc.BitmaskLinear)
    x = torch.randn(3, 64)
    assert torch.allclose(model[0](x), x @ w.T + model[0].bias, atol=1e-5)
