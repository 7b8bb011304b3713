"""Routed experts of fused 3-D expert parameters pruned and quantized as layers: routed statistics, GPTQ per
expert, experts no token reaches, packed save / load, info, unpack, on tiny MoE models of every family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits_of, random_ids
from conftest import run_cli as run
from transformers import AutoModelForCausalLM

from lmcompress.algorithms.gptq import gptq_quantize
from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
from lmcompress.algorithms.routing import routing_weights
from lmcompress.calibration.engine import capture_block_inputs, choose_batch
from lmcompress.calibration.experts import collect_expert_stats, find_fused_experts, stack_quantized
from lmcompress.checkpoint.inspect import folder_info
from lmcompress.checkpoint.load import load
from lmcompress.checkpoint.packed import read_packed, save_packed
from lmcompress.checkpoint.save import save_model, save_quantized
from lmcompress.errors import UserError
from lmcompress.models.layouts import MOE_LAYOUTS
from lmcompress.models.tiny import build_tiny_model
from lmcompress.transforms.prune import PruneConfig, prune
from lmcompress.transforms.quantize import QuantConfig, quantize
from tests.conftest import tiny_deepseek_v3

MOE = sorted(MOE_LAYOUTS)  # mixtral, olmoe, qwen2_moe (shared expert), qwen3_moe
GU = "model.layers.0.mlp.experts.gate_up_proj"


def _moe_inputs(model, calib) -> torch.Tensor:
    """What block 0's MoE module reads on every calibration window, ``[tokens, hidden]`` (window order)."""
    seen = []
    handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for row in calib:
            model(row.unsqueeze(0))
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


def _direct(model, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Block 0's routed Hessians computed directly: ``H_e = 2/n_e Σ_t g_te² x xᵀ`` for gate/up and down."""
    moe, config = model.model.layers[0].mlp, model.config
    layout = MOE_LAYOUTS[config.model_type]
    normalize = True if layout.renormalize else bool(getattr(config, "norm_topk_prob", False))
    logits = x @ moe.gate.weight.t()
    g = routing_weights(logits, getattr(config, layout.topk_key), normalize)  # [T, E], 0 off the top-k
    experts = moe.experts
    h_gu, h_dn, counts = [], [], []
    for e in range(g.shape[1]):
        routed = g[:, e] > 0
        xe, ge = x[routed].double(), g[routed, e].double().unsqueeze(1)
        gate, up = (xe @ experts.gate_up_proj[e].double().t()).chunk(2, dim=-1)
        he = torch.nn.functional.silu(gate) * up
        n = max(int(routed.sum()), 1)
        h_gu.append((2 / n * (ge * xe).t() @ (ge * xe)).float())
        h_dn.append((2 / n * (ge * he).t() @ (ge * he)).float())
        counts.append(int(routed.sum()))
    return h_gu, h_dn, counts


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])  # renormalized top-k; raw softmax weights
def test_routed_statistics_equal_a_direct_computation(family, calib):
    model = build_tiny_model(family, 320)
    if family == "qwen2_moe":
        assert not model.config.norm_topk_prob  # the weights are the un-renormalized softmax probabilities
    inputs = capture_block_inputs(model, calib, torch.device("cpu"))
    block = model.model.layers[0]
    stats = collect_expert_stats(block, inputs, find_fused_experts(block), gate_up=True, down=True, hessian=True)
    (routed,) = stats.values()
    h_gu, h_dn, counts = _direct(model, _moe_inputs(model, calib))
    assert routed.tokens == counts and sum(counts) == calib.numel() * 2  # top-2: every token twice
    for e in range(len(counts)):
        torch.testing.assert_close(routed.gate_up[e].hessian, h_gu[e], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(routed.down[e].hessian, h_dn[e], rtol=1e-4, atol=1e-5)


def test_gptq_experts_equal_experts_quantized_as_separate_layers(calib):
    """Each expert of the fused parameters solved alone as a 2-D layer from the same routed Hessian: the same codes
    (bit for bit from the engine's statistics; from the direct float64 ones up to a few rounding ties)."""
    model = build_tiny_model("mixtral", 320)
    original = copy.deepcopy(model)
    config = QuantConfig(method="gptq", bits=4, group_size=32, in_block="parallel")
    report = quantize(model, config, calib, progress=False)
    block = original.model.layers[0]
    inputs = capture_block_inputs(original, calib, torch.device("cpu"))
    inputs.batch = choose_batch(block, inputs)  # windows per call as the walk runs them: the same sums
    fused_modules = find_fused_experts(block)
    (routed,) = collect_expert_stats(block, inputs, fused_modules, gate_up=True, down=True, hessian=True).values()
    h_gu, h_dn, _ = _direct(original, _moe_inputs(original, calib))
    for param, engine, direct in (("gate_up_proj", "gate_up", h_gu), ("down_proj", "down", h_dn)):
        w = getattr(block.mlp.experts, param).detach()
        fused = report.quantized[f"model.layers.0.mlp.experts.{param}"]
        assert fused.codes.shape == (w.shape[0] * w.shape[1], w.shape[2])
        for hessians, least in (([s.hessian for s in getattr(routed, engine)], 1.0), (direct, 0.999)):
            separate = [
                gptq_quantize(w[e].float(), hessians[e].clone(), config.spec, blocksize=128, percdamp=0.01).quantized
                for e in range(w.shape[0])
            ]
            reference = stack_quantized(separate)
            same = (fused.codes == reference.codes).float().mean().item()
            assert same >= least, f"{param}: {same:.5f} of the codes agree"
        # the model holds exactly what the stacked codes stand for
        torch.testing.assert_close(
            getattr(model.model.layers[0].mlp.experts, param).detach().reshape(fused.codes.shape), fused.dequantize()
        )
    assert report.expert_tokens[GU] and sum(report.expert_tokens[GU]) == calib.numel() * 2


def _starve(model, expert: int) -> None:
    """Block 0's router never picks ``expert`` (a hook rewrites its output as if that logit were −∞)."""
    gate = model.model.layers[0].mlp.gate

    def hook(module, _args, out):
        logits = out[0].clone()
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, module.top_k, dim=-1)
        return out[0], (top / top.sum(-1, keepdim=True)).to(out[1].dtype), idx

    gate.register_forward_hook(hook)


def test_expert_without_tokens_is_reported_and_rounded_to_nearest(calib):
    model = build_tiny_model("mixtral", 320)
    _starve(model, 7)
    w7 = model.model.layers[0].mlp.experts.gate_up_proj[7].detach().clone()
    w0 = model.model.layers[0].mlp.experts.gate_up_proj[0].detach().clone()
    report = quantize(model, QuantConfig(method="gptq", bits=4, group_size=32), calib, progress=False)
    assert report.expert_tokens[GU][7] == 0
    assert report.experts_few_tokens[f"{GU}.7"] == 0
    assert report.recipe_fields()["experts_few_tokens"][f"{GU}.7"] == 0
    rows = w7.shape[0]
    codes = report.quantized[GU].rows(7 * rows, 8 * rows)
    assert torch.equal(codes.codes, rtn_quantize(w7.float(), QuantSpec(4, 32, True)).codes)  # white inputs: RTN
    assert not torch.equal(model.model.layers[0].mlp.experts.gate_up_proj[7], w7)  # not left dense
    others = report.quantized[GU].rows(0, rows)  # an expert with tokens: GPTQ, not RTN
    assert not torch.equal(others.codes, rtn_quantize(w0.float(), QuantSpec(4, 32, True)).codes)


def test_wanda_expert_without_tokens_pruned_by_magnitude_per_row(calib):
    model = build_tiny_model("mixtral", 320)
    _starve(model, 3)
    w3 = model.model.layers[0].mlp.experts.down_proj[3].detach().clone()
    report = prune(model, PruneConfig(method="wanda", sparsity=0.5), calib, progress=False)
    assert report.experts_few_tokens["model.layers.0.mlp.experts.down_proj.3"] == 0
    k = w3.shape[1] // 2
    smallest = w3.abs().argsort(dim=1, stable=True)[:, :k]
    expected = w3.scatter(1, smallest, 0.0)
    torch.testing.assert_close(model.model.layers[0].mlp.experts.down_proj[3], expected)


def test_sequential_order_gives_down_the_compressed_gate_up(calib, monkeypatch):
    """In-block sequential: a gate/up pass first, then a down pass run with the quantized gate/up weights."""
    import lmcompress.calibration.experts as experts_module

    model = build_tiny_model("mixtral", 320, num_hidden_layers=1)
    original = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    seen = []
    collect = experts_module.collect_expert_stats

    def spy(block, inputs, fused, *, gate_up, down, hessian):
        (module,) = fused.values()
        seen.append((gate_up, down, not torch.equal(module.gate_up_proj, original)))
        return collect(block, inputs, fused, gate_up=gate_up, down=down, hessian=hessian)

    monkeypatch.setattr(experts_module, "collect_expert_stats", spy)
    quantize(model, QuantConfig(method="gptq", bits=4, group_size=32), calib, progress=False)
    assert seen == [(True, False, False), (False, True, True)]
    seen.clear()
    model = build_tiny_model("mixtral", 320, num_hidden_layers=1)
    quantize(model, QuantConfig(method="gptq", bits=4, group_size=32, in_block="parallel"), calib, progress=False)
    assert seen == [(True, True, False)]  # parallel: one pass through the unchanged experts


@pytest.mark.parametrize("family", MOE)
def test_quantized_experts_round_trip_packed(family, calib, tokenizer, tmp_path):
    model = build_tiny_model(family, tokenizer.vocab_size)
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    report = quantize(model, QuantConfig(method="gptq", bits=4, group_size=32), calib, progress=False)
    experts = [k for k in report.quantized if ".experts." in k]
    assert len(experts) == 2 * model.config.num_hidden_layers  # every routed expert, every block
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)  # routers stay dense
    if family == "qwen2_moe":  # the shared expert is an ordinary MLP of nn.Linear layers: quantized as such
        assert "model.layers.0.mlp.shared_expert.down_proj.weight" in report.quantized
    folder = save_quantized(model, tokenizer, tmp_path / "q", {"kind": "quantize"}, report.quantized)
    loaded, _ = load(folder)
    ids = random_ids(tokenizer.vocab_size)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)
    _, codes = read_packed(folder)
    for name in experts:
        assert torch.equal(codes[name].codes, report.quantized[name].codes)
    info = folder_info(folder)
    fused = model.model.layers[0].mlp.experts
    routed = (fused.gate_up_proj.numel() + fused.down_proj.numel()) * model.config.num_hidden_layers
    assert info["linear"]["params"] >= routed
    # kernels="auto" leaves the fused experts dequantized (no kernel runs them) and still gives the same logits
    fast, _ = load(folder, kernels="auto")
    torch.testing.assert_close(logits_of(fast, ids), logits_of(model, ids), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruned_experts_round_trip_packed(method, calib, tokenizer, tmp_path):
    model = build_tiny_model("olmoe", tokenizer.vocab_size)
    report = prune(model, PruneConfig(method=method, sparsity=0.5), calib, progress=False)
    gu = model.model.layers[1].mlp.experts.gate_up_proj
    for e in range(gu.shape[0]):  # each expert is its own layer at the target
        assert (gu[e] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        assert report.layer_sparsity[f"model.layers.1.mlp.experts.gate_up_proj.{e}"] == pytest.approx(0.5, abs=0.02)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)  # over the experts too
    if method != "magnitude":
        assert sum(report.expert_tokens["model.layers.1.mlp.experts.down_proj"]) == calib.numel() * 2
    folder = save_packed(model, tokenizer, tmp_path / "p", {"kind": "prune"})
    loaded, _ = load(folder)
    ids = random_ids(tokenizer.vocab_size)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)


def test_joint_sparsegpt_codes_of_experts_stacked(calib, tokenizer, tmp_path):
    model = build_tiny_model("qwen3_moe", tokenizer.vocab_size)
    report = prune(model, PruneConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=32), calib, progress=False)
    q = report.quantized["model.layers.0.mlp.experts.down_proj"]
    assert q.codes.shape[0] == 8 * model.config.hidden_size
    folder = save_quantized(model, tokenizer, tmp_path / "j", {"kind": "prune"}, report.quantized)
    loaded, _ = load(folder)
    ids = random_ids(tokenizer.vocab_size)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)


def test_head_bits_with_pruned_experts(calib, tokenizer, tmp_path):
    model = build_tiny_model("mixtral", tokenizer.vocab_size)
    report = prune(model, PruneConfig(method="wanda", sparsity=0.5, head_bits=8), calib, progress=False)
    assert set(report.quantized) == {"lm_head.weight"}  # the experts are pruned, not quantized
    folder = save_quantized(model, tokenizer, tmp_path / "h", {"kind": "prune"}, report.quantized)
    loaded, _ = load(folder)
    ids = random_ids(tokenizer.vocab_size)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)


def test_act_order_experts_share_one_group_index(calib):
    model = build_tiny_model("mixtral", 320)
    config = QuantConfig(method="gptq", bits=4, group_size=32, act_order=True)
    report = quantize(model, config, calib, progress=False)
    q = report.quantized[GU]
    rows = model.model.layers[0].mlp.experts.gate_up_proj.shape[1]
    torch.testing.assert_close(q.dequantize()[:rows], model.model.layers[0].mlp.experts.gate_up_proj[0].float())


def test_refusals_name_the_experts(calib):
    model = build_tiny_model("mixtral", 320)
    with pytest.raises(UserError, match="fused routed experts"):
        quantize(model, QuantConfig(method="rtn", gguf_mix="q4_k_m"), progress=False)
    with pytest.raises(UserError, match="fused routed experts"):
        quantize(model, QuantConfig(method="rtn", scheme="w8a8"), progress=False)


def test_cli_quantize_info_unpack(tiny_folder, calib_file, tmp_path):
    src = tiny_folder("mixtral")
    out = tmp_path / "q"
    args = ["quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32", "-o", str(out)]
    assert run([*args, "--calib-data", str(calib_file), "--nsamples", "4", "--seqlen", "32"]) == 0
    info = folder_info(out)
    assert info["linear"]["params"] > 2 * 8 * 3 * 64 * 64  # experts counted with the linear layers
    assert run(["unpack", str(out), "-o", str(tmp_path / "u")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    packed, _ = load(out)
    ids = random_ids(plain.config.vocab_size)
    torch.testing.assert_close(logits_of(plain, ids), logits_of(packed, ids), rtol=1e-5, atol=1e-5)
    dense = tmp_path / "d"
    save_model(build_tiny_model("mixtral", 320), None, dense, {"kind": "test"})
    assert folder_info(dense)["linear"]["params"] > 2 * 8 * 3 * 64 * 64  # a plain folder: per-expert tensors


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_gguf_export_writes_the_experts_as_exps_tensors(family, tokenizer, tmp_path):
    """Q4_0 from the experts' codes: blk.N.ffn_{gate,up,down}_exps [E, rows, in] hold each expert's matrices
    (gate and up split from gate_up_proj), the router is ffn_gate_inp, the expert counts are in the metadata."""
    gguf = pytest.importorskip("gguf")
    from lmcompress.checkpoint.gguf_export import export_gguf

    over = {"norm_topk_prob": True} if family == "qwen3_moe" else {}  # llama.cpp's qwen3moe graph renormalizes
    if family == "olmoe":
        over = {"num_key_value_heads": 4}  # llama.cpp's olmoe graph has no grouped-query attention
    model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256, **over)
    report = quantize(model, QuantConfig(method="rtn", bits=4, group_size=32), progress=False)
    folder = save_quantized(model, tokenizer, tmp_path / "q", {"kind": "quantize"}, report.quantized)
    summary = export_gguf(folder, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = fields["general.architecture"]
    assert fields[f"{arch}.expert_count"] == 8 and fields[f"{arch}.expert_used_count"] == 2
    moe = model.model.layers[1].mlp
    half = moe.experts.gate_up_proj.shape[1] // 2
    want = {
        "ffn_gate_exps": moe.experts.gate_up_proj[:, :half],
        "ffn_up_exps": moe.experts.gate_up_proj[:, half:],
        "ffn_down_exps": moe.experts.down_proj,
    }
    for part, w in want.items():
        t = tensors[f"blk.1.{part}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).copy())
        torch.testing.assert_close(got, w.detach().float(), rtol=0, atol=2e-3)  # fp16 block scales
    router = tensors["blk.1.ffn_gate_inp.weight"]
    assert router.tensor_type == gguf.GGMLQuantizationType.F32  # routing decisions are not rounded
    torch.testing.assert_close(torch.from_numpy(router.data.copy()).reshape(moe.gate.weight.shape), moe.gate.weight)
    assert summary is not None
    if family in ("qwen3_moe", "olmoe"):  # a model llama.cpp's graph would not reproduce is refused
        plain = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
        save_model(plain, tokenizer, tmp_path / "plain", {"kind": "test"})
        with pytest.raises(UserError, match="norm_topk_prob" if family == "qwen3_moe" else "grouped-query"):
            export_gguf(tmp_path / "plain", tmp_path / "p.gguf", qtype="f16")
        assert not (tmp_path / "p.gguf").exists()


def test_deepseek_v3_shared_and_routed_experts(calib, tokenizer, tmp_path):
    model = tiny_deepseek_v3(tokenizer.vocab_size)
    report = quantize(model, QuantConfig(method="gptq", bits=4, group_size=32), calib, progress=False)
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in report.quantized  # shared expert: linear layers
    assert "model.layers.0.mlp.down_proj.weight" in report.quantized  # the dense first block
    # routed tokens: every token twice (top-2), as the block's own router chose them
    assert sum(report.expert_tokens["model.layers.1.mlp.experts.gate_up_proj"]) == 2 * calib.numel()
    folder = save_quantized(model, tokenizer, tmp_path / "q", {"kind": "quantize"}, report.quantized)
    loaded, _ = load(folder)
    ids = random_ids(tokenizer.vocab_size)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)
