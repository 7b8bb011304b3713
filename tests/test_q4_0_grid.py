"""The ``q4_0`` grid: llama.cpp's Q4_0 block quantization, for RTN, GPTQ, packed storage and the exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from lmcompress.algorithms.gptq import gptq_quantize
from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec, rtn_quantize
from lmcompress.checkpoint.packing import pack_quantized, unpack_quantized
from lmcompress.errors import UserError
from lmcompress.transforms.quantize import QuantConfig

Q4_0 = QuantSpec(4, 32, True, "q4_0")


def reference_q4_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's ``quantize_row_q4_0_ref`` restated in numpy, one 32-input block per row of ``x`` (float32):
    ``(codes uint8 [n, 32], fp16 d [n])``, walking each block in order as the C loop does."""
    codes = np.zeros(x.shape, dtype=np.uint8)
    ds = np.zeros(x.shape[0], dtype=np.float16)
    for i, block in enumerate(x.astype(np.float32)):
        amax, vmax = np.float32(0), np.float32(0)
        for v in block:
            if amax < abs(v):
                amax, vmax = abs(v), v
        d = np.float32(vmax / np.float32(-8))
        inv = np.float32(1) / d if d != 0 else np.float32(0)
        ds[i] = np.float16(d)
        for j, v in enumerate(block):
            codes[i, j] = min(15, int(np.float32(np.float32(v * inv) + np.float32(8.5))))  # int(): truncation
    return codes, ds


def awkward_weights(rows: int = 24, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """fp16-representable weights with the cases that decide codes: ties of |extreme| with both signs, positive
    and negative extremes, an all-zero group, exact zeros, and values at the rounding midpoints of the grid."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.linspace(0.01, 2.0, cols)
    w[0, :32] = 0.0  # an all-zero group
    w[1, 5], w[1, 9] = 3.0, -3.0  # a tie of |extreme|: the first (positive) one wins
    w[2, 7], w[2, 3] = 3.0, -3.0  # the first is negative this time
    w[3, 32:64] = torch.arange(32) * 0.25 - 4.0  # on and between grid points of d = 0.5
    w[4, 32:64] = (torch.arange(32) - 16) * 0.25 + 0.125  # midpoints between codes
    w[:, 100:110] = 0.0
    return w.half().float()


def test_rtn_is_llama_cpp_q4_0_bit_for_bit():
    w = awkward_weights()
    q = rtn_quantize(w, Q4_0)
    blocks = w.numpy().reshape(-1, 32)
    codes, d = reference_q4_0(blocks)
    assert np.array_equal(q.codes.numpy().reshape(-1, 32), codes)
    assert np.array_equal(q.scale.numpy().reshape(-1).astype(np.float16).view(np.uint16), d.view(np.uint16))
    assert torch.equal(q.scale, q.scale.half().float()) and bool((q.zero == 8).all())
    # the extreme of each group is exactly the code 0 whatever its sign, so the step is max|w| / 8
    big = q.codes.reshape(-1, 32).gather(1, w.reshape(-1, 32).abs().argmax(1, keepdim=True))
    assert bool((big[d != 0] == 0).all())
    assert bool(q.scale[0, 0] == 0) and bool((q.dequantize()[w == 0] == 0).all())
    assert float(q.scale[1, 0]) == -3.0 / 8 and float(q.scale[2, 0]) == 3.0 / 8


def test_rtn_matches_the_gguf_package_quantizer():
    gguf = pytest.importorskip("gguf")
    from lmcompress.checkpoint.gguf_export import pack_codes

    w = awkward_weights(seed=1)
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(pack_codes(rtn_quantize(w, Q4_0), "q4_0"), theirs)
    back = gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(back.reshape(w.shape), rtn_quantize(w, Q4_0).dequantize().numpy())


def test_q4_0_beats_minmax_rtn_on_gaussian_weights():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    err = {g: (rtn_quantize(w, QuantSpec(4, 32, True, g)).dequantize() - w).norm().item() for g in ("minmax", "q4_0")}
    assert err["q4_0"] < err["minmax"]


def test_bad_grids_are_refused():
    for bits, sym in ((3, True), (8, True), (4, False)):
        with pytest.raises(ValueError, match="q4_0"):
            QuantSpec(bits, 32, sym, "q4_0")
        with pytest.raises(UserError, match="q4_0"):
            QuantConfig(method="rtn", bits=bits, group_size=32, sym=sym, grid="q4_0")
    with pytest.raises(ValueError):
        QuantSpec(4, 32, True, "nf4")
    with pytest.raises(UserError, match="grid"):
        QuantConfig(grid="nf4")


def layer_problem(rows: int = 40, cols: int = 128, n: int = 500, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=gen) @ mix * (0.5 + torch.rand(cols, generator=gen))
    return torch.randn(rows, cols, generator=gen), x, 2 * x.t() @ x / n


@pytest.mark.parametrize(("act_order", "static_groups"), [(False, False), (True, False), (True, True)])
def test_gptq_on_the_q4_0_grid(act_order, static_groups):
    w, x, h = layer_problem()
    res = gptq_quantize(w, h, Q4_0, act_order=act_order, static_groups=static_groups, blocksize=64)
    q = res.quantized
    assert q.spec == Q4_0 and bool((q.zero == 8).all()) and int(q.codes.max()) <= 15
    assert torch.equal(q.scale, q.scale.half().float()), "scales are fp16 values"
    assert torch.equal(q.dequantize(), res.weight)
    rtn = rtn_quantize(w, Q4_0)
    out = {name: ((w - v) @ x.t()).pow(2).sum().item() for name, v in (("gptq", res.weight), ("rtn", rtn.dequantize()))}
    assert out["gptq"] < 0.9 * out["rtn"]
    if static_groups:  # grids fixed up front on the original weights: RTN's
        assert torch.equal(q.scale, rtn.scale)


def test_gptq_with_nothing_to_compensate_is_rtn():
    """A diagonal Hessian leaves no correlated column to absorb an error: GPTQ rounds exactly as RTN does."""
    w = awkward_weights()
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)) + 0.5)
    res = gptq_quantize(w, h, Q4_0, blocksize=64, percdamp=0.0)
    rtn = rtn_quantize(w, Q4_0)
    assert torch.equal(res.quantized.codes, rtn.codes) and torch.equal(res.quantized.scale, rtn.scale)


def test_packing_keeps_the_grid():
    q = rtn_quantize(awkward_weights(), Q4_0)
    packed = pack_quantized(q)
    assert packed.meta["grid"] == "q4_0" and packed.meta["zero"] == "mid"
    back = unpack_quantized(packed)
    assert back.spec == Q4_0 and torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale)
    old = pack_quantized(rtn_quantize(awkward_weights(), QuantSpec(4, 32)))
    assert "grid" not in old.meta and unpack_quantized(old).spec.grid == "minmax"  # folders written before grids


@pytest.fixture
def q4_0_folder(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q4"
    argv = ["quantize", str(tiny_folder("llama")), "--method", "rtn", "--group-size", "32", "--grid", "q4_0"]
    assert run_cli([*argv, "-o", str(out), "-q"]) == 0
    assert "q4_0 grid" in capsys.readouterr().out
    return out


def test_cli_folder_info_unpack(q4_0_folder, tmp_path, capsys):
    recipe = json.loads((q4_0_folder / "lmcompress.json").read_text())
    assert recipe["quantization"]["grid"] == "q4_0"
    from lmcompress.checkpoint.packed import read_packed

    _, quantized = read_packed(q4_0_folder, recipe)
    assert quantized and all(isinstance(q, QuantizedTensor) and q.spec.grid == "q4_0" for q in quantized.values())
    assert run_cli(["info", str(q4_0_folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["storage"] == "packed"
    assert run_cli(["unpack", str(q4_0_folder), "-o", str(tmp_path / "plain")]) == 0
    from lmcompress.checkpoint.load import load_model

    plain = dict(load_model(tmp_path / "plain")[0].named_parameters())
    for name, q in quantized.items():
        assert torch.equal(plain[name].data.float(), q.dequantize())
    assert run_cli(["quantize", str(q4_0_folder), "--method", "rtn", "--bits", "3", "--grid", "q4_0", "-o",
                    str(tmp_path / "bad"), "-q"]) == 2  # fmt: skip
    assert "q4_0" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_gguf_export_writes_the_codes_exactly(q4_0_folder, tmp_path):
    pytest.importorskip("gguf")
    from lmcompress.checkpoint.gguf_export import export_gguf

    summary = export_gguf(q4_0_folder, tmp_path / "m.gguf")
    assert summary["from_codes"]["tensors"] > 0 and summary["requantized"]["tensors"] == 0
    assert summary["from_codes"]["max_rel_error"] == 0.0  # fp16 scales: nothing is rounded on the way
    assert summary["file_type"] == "Q4_0"


def test_compressed_tensors_export_refuses_the_grid(q4_0_folder, tmp_path):
    from lmcompress.checkpoint.export import export_compressed_tensors

    with pytest.raises(UserError, match="q4_0 grid"):
        export_compressed_tensors(q4_0_folder, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
