"""Low-rank factorization: SVD math, rank policies, where layers are replaced, save/load round trips, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli as run
from torch import nn

import lmcompress
from lmcompress.algorithms.lowrank import (
    auto_threshold,
    break_even_rank,
    cholesky_scale,
    diagonal_scale,
    energy_rank,
    factors,
    params_after,
    saves_params,
    threshold_rank,
    whitened_svd,
)
from lmcompress.errors import UserError
from lmcompress.jobs import factorize_pretrained
from lmcompress.models.families import find_prunable, get_blocks, weight_matrix
from lmcompress.models.surgery import LowRankLinear
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.factorize import FactorizeConfig, _replace, factorize, factorize_linear


def _with_spectrum(sigma: list[float], n_out: int, n_in: int, seed: int = 0) -> torch.Tensor:
    """A ``[n_out, n_in]`` matrix with exactly the singular values ``sigma`` (random singular vectors)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(sigma)
    u, _ = torch.linalg.qr(torch.randn(n_out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_in, k, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


# ---- pure functions ------------------------------------------------------------------------------------


def test_energy_rank_on_known_spectrum():
    # σ² = 16, 4, 1, 1 (total 22): cumulative fractions .727, .909, .955, 1
    w = _with_spectrum([4.0, 2.0, 1.0, 1.0], 12, 10)
    sigma = whitened_svd(w).sigma
    torch.testing.assert_close(sigma[:4], torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=sigma.dtype))
    assert [energy_rank(sigma, f) for f in (0.5, 0.72, 0.73, 0.9, 0.91, 0.95, 0.96, 1.0)] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_threshold_rank_and_break_even():
    sigma = torch.tensor([10.0, 5.0, 2.0, 1.0])
    assert [threshold_rank(sigma, t) for t in (0.05, 0.1, 0.2, 0.5, 0.9)] == [4, 4, 3, 2, 1]
    assert break_even_rank(64, 128) == 42  # 42·192 = 8064 < 8192 ≤ 43·192
    assert saves_params(42, 64, 128) and not saves_params(43, 64, 128)
    assert params_after(43, 64, 128) == 64 * 128 and params_after(10, 64, 128) == 10 * 192


@pytest.mark.parametrize("whitening", [None, "diag", "cholesky"])
def test_full_rank_factors_are_exact(whitening):
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    x = torch.randn(200, 40) * torch.linspace(0.1, 3.0, 40)
    scale = None
    if whitening == "diag":
        scale = diagonal_scale((x * x).sum(0), x.shape[0])
    elif whitening == "cholesky":
        scale = cholesky_scale(x.T @ x, damp=0.01)
    up, down = factors(whitened_svd(w, scale), 24)
    torch.testing.assert_close(up @ down, w, atol=1e-4, rtol=1e-4)


def test_whitened_svd_minimizes_output_error():
    """With S Sᵀ = XᵀX, truncating SVD(W S) gives a smaller error ||(W − W')Xᵀ|| than truncating SVD(W)."""
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    x = torch.randn(500, 48) @ torch.randn(48, 48)  # correlated inputs
    out_err = {}
    for name, scale in [("plain", None), ("cholesky", cholesky_scale(x.T @ x, damp=0.0))]:
        up, down = factors(whitened_svd(w, scale), 8)
        out_err[name] = ((w - up @ down) @ x.T).pow(2).sum().item()
    assert out_err["cholesky"] < 0.9 * out_err["plain"]


def test_cholesky_survives_dead_inputs():
    x = torch.randn(100, 16)
    x[:, 3] = 0  # an input that is never active: XᵀX singular
    s = cholesky_scale(x.T @ x, damp=0.0)
    assert torch.isfinite(s).all() and (s.diagonal() > 0).all()


def test_auto_threshold_factorizes_fast_decay_and_keeps_flat_dense():
    fast = torch.tensor([2.0**-i for i in range(32)])  # decays fast: low rank suffices
    flat = torch.linspace(1.0, 0.8, 32)  # flat: any useful rank would cut most of it
    shapes = [(32, 32), (32, 32)]
    tau = auto_threshold([fast, flat], shapes, target=0.3)
    assert threshold_rank(fast, tau) < break_even_rank(32, 32)  # factorized
    assert not saves_params(threshold_rank(flat, tau), 32, 32)  # stays dense
    saved = (
        1 - sum(params_after(threshold_rank(s, tau), *sh) for s, sh in zip([fast, flat], shapes, strict=True)) / 2048
    )
    assert saved >= 0.3


# ---- on models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_full_rank_factorized_model_gives_identical_logits(family, calib, tokenizer):
    """Every block linear (Conv1D too) replaced by its full-rank factors: the model's output is unchanged."""
    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
    ref = model(calib[:2]).logits
    for block in get_blocks(model):
        for name, module in find_prunable(block).items():
            w = weight_matrix(module)
            _replace(block, name, factorize_linear(module, whitened_svd(w), min(w.shape)))
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    torch.testing.assert_close(model(calib[:2]).logits, ref, atol=1e-4, rtol=1e-4)


def test_replaced_only_where_it_saves_parameters(tokenizer):
    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256)
    report = factorize(model, FactorizeConfig(rank_policy="rank:30"), progress=False)
    flags = {r.factorized for r in report.layers.values()}
    assert flags == {True, False}  # 64×64 and 64×128 layers save at rank 30, 64→32 (k/v) layers do not
    for name, r in report.layers.items():
        assert r.factorized == saves_params(min(30, r.full_rank), r.in_features, r.out_features)
        module = model.get_submodule(name)
        assert isinstance(module, LowRankLinear) == r.factorized
        if r.factorized:
            assert module.rank == 30
    assert report.params_after < report.params_before
    assert report.linear_params_before - report.linear_params_after == report.params_before - report.params_after
    assert len(report.surgery) == sum(r.factorized for r in report.layers.values())


def test_energy_one_replaces_nothing(tokenizer):
    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256)
    report = factorize(model, FactorizeConfig(rank_policy="energy:1.0"), progress=False)
    assert not report.surgery and report.params_after == report.params_before
    assert report.notes


def test_activation_aware_lowers_block_output_error(tokenizer, calib):
    """Same ranks, whitened vs plain: the activation-aware model stays closer to the dense one on calibration text."""
    errs = {}
    for aware in (False, True):
        model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256)
        with torch.no_grad():
            ref = model(calib).logits
        factorize(model, FactorizeConfig(rank_policy="rank:12", activation_aware=aware), calib, progress=False)
        with torch.no_grad():
            errs[aware] = (model(calib).logits - ref).pow(2).mean().item()
    assert errs[True] < errs[False]


def test_bad_config_is_a_clear_error(tokenizer):
    for policy in ("energy:1.5", "energy", "auto:1.2", "rank:0", "rank:2.5", "svd:3"):
        with pytest.raises(UserError, match="rank_policy"):
            FactorizeConfig(rank_policy=policy)
    with pytest.raises(UserError, match="whitening"):
        FactorizeConfig(whitening="zca")
    with pytest.raises(UserError, match="calibration"):
        factorize(build_tiny_model("llama", 64), FactorizeConfig(activation_aware=True), None, progress=False)


@pytest.mark.parametrize("policy,aware", [("auto", False), ("energy:0.8", True)])
def test_factorize_save_load_round_trip(policy, aware, tmp_path, tiny_folder, calib_text, calib):
    src = tiny_folder("llama")
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text(calib_text[:20000])
    out = tmp_path / "lr"
    args = ["factorize", str(src), "--rank-policy", policy, "-q", "-o", str(out)]
    if aware:
        args += ["--activation-aware", "--calib-data", str(calib_file), "--nsamples", "4", "--seqlen", "32"]
    assert run(args) == 0
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["kind"] == "factorize" and recipe["surgery"]
    loaded, _ = lmcompress.load(out)
    lowrank = {n for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank == {r["module"] for r in recipe["surgery"]}
    # the same job in memory gives the same model
    model, tok = lmcompress.load(src)
    config = FactorizeConfig(rank_policy=policy, activation_aware=aware)
    windows = None
    if aware:
        windows = lmcompress.calibration.draw(tok, str(calib_file), nsamples=4, seqlen=32)[0]
    factorize(model, config, windows, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib[:2]).logits, model(calib[:2]).logits, atol=1e-5, rtol=1e-5)
        assert sum(p.numel() for p in loaded.parameters()) == recipe["params_after"]
    assert recipe["params_after"] < recipe["params_before"]


def test_cli_refuses_existing_output_and_bad_policy(tmp_path, tiny_folder, capsys):
    src = tiny_folder("llama")
    assert run(["factorize", str(src), "--rank-policy", "energy:2", "-o", str(tmp_path / "x")]) == 2
    assert "energy fraction" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert run(["factorize", str(src), "-o", str(src)]) == 2


def test_lowrank_linear_is_an_nn_module_drop_in():
    lin = nn.Linear(20, 30)
    svd = whitened_svd(lin.weight.data)
    new = factorize_linear(lin, svd, 20)
    x = torch.randn(5, 20)
    torch.testing.assert_close(new(x), lin(x), atol=1e-5, rtol=1e-5)


def test_moe_models_are_refused_before_writing(tmp_path, tiny_folder, capsys):
    """Their checkpoints could not be read back next to surgery records yet: refused, nothing written."""
    out = tmp_path / "moe-lr"
    assert run(["factorize", str(tiny_folder("qwen2_moe")), "--rank-policy", "rank:8", "-q", "-o", str(out)]) == 2
    assert "mixture-of-experts" in capsys.readouterr().err
    assert not out.exists()


def test_compressing_a_resized_source_keeps_its_surgery(tmp_path, tiny_folder):
    """Factorizing, pruning or quantizing an OWL-resized folder carries its records: the output still loads."""
    from lmcompress.jobs import prune_pretrained, quantize_pretrained, structured_prune_pretrained
    from lmcompress.transforms.prune import PruneConfig
    from lmcompress.transforms.quantize import QuantConfig
    from lmcompress.transforms.shrink import StructureConfig

    owl = tmp_path / "owl"
    calib = dict(calib_data="bundled:wikitext2-valid", nsamples=4, seqlen=32, progress=False)
    structured_prune_pretrained(tiny_folder("llama"), StructureConfig("ffn", 0.3, allocation="owl"), owl, **calib)
    widths = {r["module"]: r["in_features"] for r in json.loads((owl / "lmcompress.json").read_text())["surgery"]}
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    outputs = {
        "lr": lambda o: factorize_pretrained(owl, FactorizeConfig("rank:4"), o, progress=False),
        "mag": lambda o: prune_pretrained(owl, PruneConfig(method="magnitude", sparsity=0.5), o, progress=False),
        "rtn": lambda o: quantize_pretrained(owl, QuantConfig(method="rtn", bits=4, group_size=-1), o, progress=False),
    }
    for name, make in outputs.items():
        make(tmp_path / name)
        model, _ = lmcompress.load(tmp_path / name)
        for module, width in widths.items():
            if module.endswith("down_proj"):
                assert model.get_submodule(module).in_features == width, (name, module)
        assert torch.isfinite(model(ids).logits).all()
    assert isinstance(lmcompress.load(tmp_path / "lr")[0].model.layers[0].mlp.down_proj, LowRankLinear)


def test_profile_of_a_factorized_model_counts_the_factors(tokenizer):
    from lmcompress.measure.profile import flops_breakdown
    from lmcompress.models.params import count_params

    model = build_tiny_model("llama", tokenizer.vocab_size)
    dense = flops_breakdown(model, 32)
    report = factorize(model, FactorizeConfig("rank:8"), progress=False)
    after = flops_breakdown(model, 32)
    saved = sum(r.in_features * r.out_features - 8 * (r.in_features + r.out_features) for r in report.layers.values())
    assert after["linear"] == dense["linear"] - 2 * saved
    assert after["attention"] == dense["attention"] and count_params(model) == report.params_after
