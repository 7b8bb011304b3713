"""Any decoder-only model: families with no FAMILIES row, found generically, through prune, quantize and eval.

Also: the generic search agrees with the table rows, blocks get the per-layer masks and rotary tables of the
model's own forward (Gemma 2/3, Cohere 2, Qwen 3 with sliding layers), and models that cannot be handled
are refused with a clear UserError.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, T5Config, ViTConfig

import lmcompress
from lmcompress import PruneConfig
from lmcompress.algorithms.wanda import wanda_mask
from lmcompress.calibration.engine import BlockInputs, capture_block_inputs, choose_batch, run_block, walk_blocks
from lmcompress.checkpoint.load import load_model
from lmcompress.checkpoint.save import save_model
from lmcompress.errors import UserError
from lmcompress.jobs import prune_pretrained
from lmcompress.measure.perplexity import perplexity
from lmcompress.models import families
from lmcompress.models.families import (
    FAMILIES,
    GENERIC_DECODER,
    blocks_path,
    family_of,
    find_prunable,
    get_blocks,
    get_final_norm,
    get_head,
    weight_matrix,
)
from lmcompress.models.tiny import TINY_CONFIGS, TINY_GENERIC_CONFIGS, build_tiny_model
from lmcompress.transforms.quantize import QuantConfig, quantize

GENERIC = sorted(TINY_GENERIC_CONFIGS)
ALTERNATING = ["cohere2", "gemma2", "gemma3_text", "qwen3-sliding"]  # sliding-window and global layers
CPU = torch.device("cpu")


def _build(family: str, vocab_size: int) -> nn.Module:
    if family == "qwen3-sliding":  # Qwen 3 with layer_types: block 0 global, block 1 sliding (window 8)
        return build_tiny_model(
            "qwen3",
            vocab_size,
            max_positions=128,
            seed=1,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        )
    return build_tiny_model(family, vocab_size, max_positions=128, seed=1)


@pytest.fixture
def model_of(tokenizer):
    return lambda family: _build(family, tokenizer.vocab_size)


@pytest.fixture(scope="module")
def windows(calib) -> torch.Tensor:
    return calib[:4]  # 4 windows of 64 tokens: longer than the sliding windows (8)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# --------------------------------------------------------------------------------------------- the search


@pytest.mark.parametrize("family", GENERIC)
def test_generic_family_is_found_without_a_table_row(family, model_of):
    model = model_of(family)
    assert model.config.model_type not in FAMILIES and family_of(model.config) is GENERIC_DECODER
    blocks = get_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers and find_prunable(blocks[0])
    assert blocks_path(model) in ("model.layers", "transformer.h")
    norm = get_final_norm(model)
    assert norm is model.get_submodule(blocks_path(model).rpartition(".")[0]).get_submodule(
        "ln_f" if blocks_path(model) == "transformer.h" else "norm"
    )
    assert get_head(model) is model.lm_head


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_search_agrees_with_the_table(family, model_of):
    """The rows kept in FAMILIES name what the generic search finds (by name and by watching the head's input)."""
    model = model_of(family)
    row = FAMILIES[family]
    assert families._find_blocks(model) == row.blocks
    assert families._find_final_norm(model) == row.final_norm
    assert families._final_norm_by_hook(model) == row.final_norm


def test_final_norm_found_by_the_heads_input_when_names_do_not_say(model_of):
    model = model_of("olmo")  # a parameter-free LayerNorm
    model.model._modules["final"] = model.model._modules.pop("norm")  # registered under a name the search ignores
    object.__setattr__(model.model, "norm", model.model.final)  # what the forward calls, not a registered child
    assert families._find_final_norm(model) == "model.final"
    torch.testing.assert_close(_logits(model, torch.arange(5)[None]), _logits(model_of("olmo"), torch.arange(5)[None]))


# ------------------------------------------------------------------------------------- per-block arguments


@pytest.mark.parametrize("family", [*GENERIC, "qwen3-sliding"])
def test_engine_reproduces_the_models_own_hidden_states(family, model_of, windows):
    """Every block's engine output equals the model's own forward (output_hidden_states), last one after the norm."""
    model = model_of(family)
    ids = windows[:2]
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    outs: list[torch.Tensor] = []
    walk_blocks(model, ids, CPU, lambda i, block, inputs: outs.append(run_block(block, inputs)), progress=False)
    assert len(outs) == len(get_blocks(model)) == len(ref) - 1
    for i, out in enumerate(outs[:-1]):
        torch.testing.assert_close(out, ref[i + 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(get_final_norm(model)(outs[-1]), ref[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ALTERNATING)
def test_sliding_and_global_layers_get_their_own_masks(family, model_of, windows):
    """A global layer run with the sliding layer's arguments (what block 0's capture alone gave) differs."""
    model = model_of(family)
    ids = windows[:2]
    seen: list[BlockInputs] = []

    def visit(i, block, inputs):
        seen.append(BlockInputs(inputs.hidden.clone(), inputs.args, inputs.kwargs))

    walk_blocks(model, ids, CPU, visit, progress=False)
    types = model.config.layer_types
    assert types[0] != types[1]
    assert seen[0].kwargs["attention_mask"] is not seen[1].kwargs["attention_mask"]
    block = get_blocks(model)[1]
    right = run_block(block, seen[1])
    wrong = run_block(block, BlockInputs(seen[1].hidden, seen[0].args, seen[0].kwargs))
    assert (right - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted({*TINY_CONFIGS, *GENERIC, "qwen3-sliding"}))
def test_windows_run_through_a_block_together(family, model_of, windows):
    """Every family's block takes several windows per call with window 0's arguments, and gives per window
    what it gives them one at a time."""
    model = model_of(family)
    inputs = capture_block_inputs(model, windows, CPU)
    block = get_blocks(model)[0]
    if family == "bloom":  # ALiBi biases are captured as [batch·heads, 1, seq]: window 0's fit one window only
        assert choose_batch(block, inputs) == 1
        return
    assert choose_batch(block, inputs) == windows.shape[0]  # 4 windows of 64 tokens: all in one call
    alone = run_block(block, inputs)
    inputs.batch = 4
    torch.testing.assert_close(run_block(block, inputs), alone, atol=1e-5, rtol=1e-4)


def test_a_block_that_cannot_take_several_windows_gets_one_at_a_time(windows):
    class OneWindow(nn.Module):  # reads a per-window tensor that was captured for window 0 alone
        def forward(self, hidden, bias):
            return hidden + bias.expand(hidden.shape[0], -1, -1).reshape(hidden.shape) * 0 + bias.view(1, 1, -1)[:, :1]

    class Shifting(nn.Module):  # broadcasts, but mixes windows: batched outputs differ from one at a time
        def forward(self, hidden):
            return hidden + hidden.mean(0, keepdim=True)

    hidden = torch.randn(4, 8, 6)
    assert choose_batch(OneWindow(), BlockInputs(hidden, (torch.randn(1, 8, 6),))) == 1
    assert choose_batch(Shifting(), BlockInputs(hidden)) == 1
    assert choose_batch(nn.Identity(), BlockInputs(hidden)) == 4


def test_arguments_shared_by_blocks_are_stored_once(model_of, windows):
    model = model_of("granite")
    tensors: list[set[int]] = []

    def visit(i, block, inputs):
        cos, sin = inputs.kwargs["position_embeddings"]
        tensors.append({id(cos), id(sin)})

    walk_blocks(model, windows[:2], CPU, visit, progress=False)
    assert tensors[0] == tensors[1]


# ------------------------------------------------------------------------------- prune, quantize, evaluate


def _wanda_by_hand(model: nn.Module, ids: torch.Tensor, sparsity: float, in_block: str = "parallel") -> None:
    """Sequential Wanda with the model's own forward: block i's input norms measured after pruning blocks < i;
    ``in_block="sequential"``: each layer's input norms measured after pruning the layers its block runs before
    it (one whole-model forward per layer)."""
    for block in get_blocks(model):
        everything = find_prunable(block)
        if in_block == "parallel":
            _wanda_layers_by_hand(model, everything, ids, sparsity)
            continue
        order: list[str] = []
        note = [lambda _m, _a, n=n, order=order: order.append(n) for n in everything]
        handles = [m.register_forward_pre_hook(f) for m, f in zip(everything.values(), note, strict=True)]
        with torch.no_grad():
            model(ids[:1], use_cache=False)
        for h in handles:
            h.remove()
        for name in dict.fromkeys(order):
            _wanda_layers_by_hand(model, {name: everything[name]}, ids, sparsity)


def _wanda_layers_by_hand(model: nn.Module, layers: dict[str, nn.Module], ids: torch.Tensor, sparsity: float) -> None:
    """Wanda on ``layers``, their input norms measured by one forward of the whole model."""
    norms = {name: torch.zeros(weight_matrix(m).shape[1], dtype=torch.float64) for name, m in layers.items()}

    def hook(name, norms=norms):
        def fn(_m, args, _out) -> None:  # returns None: the layer's output is left alone
            norms[name] += args[0].detach().double().pow(2).flatten(0, -2).sum(0)

        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    for name, m in layers.items():
        m.weight.data[wanda_mask(weight_matrix(m), norms[name], sparsity)] = 0  # the mask marks removals


@pytest.mark.parametrize("in_block", ["sequential", "parallel"])
@pytest.mark.parametrize("family", GENERIC)
def test_wanda_matches_pruning_by_hand(family, in_block, model_of, windows):
    """Both orders inside a block, against the model's own forward: "sequential" (the one-pass engine, each
    layer seeing the layers pruned before it) and "parallel" (every layer of a block seeing its dense inputs)."""
    model, reference = model_of(family), model_of(family)
    config = PruneConfig(method="wanda", sparsity=0.5, in_block=in_block)
    _, report = lmcompress.prune(model, config, windows, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert all(s == pytest.approx(0.5, abs=0.01) for s in report.layer_sparsity.values())
    assert report.in_block_fallback == {}  # every generic family's blocks compress in the order asked
    _wanda_by_hand(reference, windows, 0.5, in_block)
    for (name, layer), ref in zip(
        ((n, m) for b in get_blocks(model) for n, m in find_prunable(b).items()),
        (m for b in get_blocks(reference) for m in find_prunable(b).values()),
        strict=True,
    ):
        assert torch.equal(layer.weight == 0, ref.weight == 0), name
    torch.testing.assert_close(_logits(model, windows[:1]), _logits(reference, windows[:1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", GENERIC)
def test_sparsegpt_quantize_and_perplexity(family, model_of, windows, calib):
    dense = model_of(family)
    dense_ppl = perplexity(dense, calib[4:6], progress=False).perplexity
    model = model_of(family)
    _, report = lmcompress.prune(model, PruneConfig(method="sparsegpt", sparsity=0.5), windows, progress=False)
    assert all(s == pytest.approx(0.5, abs=0.01) for s in report.layer_sparsity.values())
    assert any(not torch.equal(m.weight, d.weight) for m, d in zip(model.modules(), dense.modules(), strict=True)
               if isinstance(m, nn.Linear))  # fmt: skip
    q = model_of(family)
    quant = quantize(q, QuantConfig(method="rtn", bits=4, group_size=32), progress=False)
    prefix = blocks_path(q)
    assert set(quant.quantized) == {
        f"{prefix}.{i}.{n}.weight" for i, b in enumerate(get_blocks(q)) for n in find_prunable(b)
    }
    for layer in (m for b in get_blocks(q) for m in find_prunable(b).values()):
        groups = weight_matrix(layer).reshape(-1, 32)
        assert max(len(torch.unique(g)) for g in groups) <= 16
    for net in (model, q):
        ppl = perplexity(net, calib[4:6], progress=False).perplexity
        assert torch.isfinite(torch.tensor(ppl)) and ppl > 1
        assert ppl != dense_ppl


@pytest.mark.parametrize("family", ["gemma2", "bloom"])
def test_whole_job_on_a_saved_generic_model(family, tokenizer, tmp_path):
    """Loading, pruning with the head included, saving and reloading a family with no FAMILIES row."""
    source, out = tmp_path / "src", tmp_path / "pruned"
    save_model(_build(family, tokenizer.vocab_size), tokenizer, source, {"kind": "test-model"})
    config = PruneConfig(method="wanda", sparsity=0.5, include_head=True)
    report = prune_pretrained(
        source, config, out, calib_data="bundled:wikitext2-valid", nsamples=4, seqlen=32, progress=False
    )
    assert report.layer_sparsity["lm_head"] == pytest.approx(0.5, abs=0.01)
    loaded, _ = load_model(out)
    assert type(loaded).__name__.lower().startswith(family[:5])
    assert (get_head(loaded).weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------------------------- refusals


class _NoBlocks(nn.Module):
    def __init__(self, n_layers: int = 2) -> None:
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=n_layers)
        self.net = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))


class _Blocks(_NoBlocks):
    def __init__(self, n_layers: int, lists: int = 1) -> None:
        super().__init__(n_layers)
        for k in range(lists):
            self.add_module(f"stack{k}", nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2)))

    def get_output_embeddings(self) -> nn.Module:
        return self.net[2]


def test_model_without_a_block_list_is_refused():
    with pytest.raises(UserError, match=r"cannot find the transformer blocks of _NoBlocks.*nn\.ModuleList"):
        lmcompress.prune(_NoBlocks(), PruneConfig(method="magnitude", sparsity=0.5), progress=False)


def test_block_list_of_the_wrong_length_is_refused():
    with pytest.raises(UserError, match="num_hidden_layers=3"):
        get_blocks(_Blocks(n_layers=3))
    assert len(get_blocks(_Blocks(n_layers=2))) == 2


def test_two_candidate_block_lists_are_refused():
    with pytest.raises(UserError, match="cannot tell which of stack0, stack1"):
        get_blocks(_Blocks(n_layers=2, lists=2))


def test_no_final_norm_refuses_include_head():
    model = _Blocks(n_layers=2)
    assert len(get_blocks(model)) == 2
    with pytest.raises(UserError, match=r"include_head is not supported.*no norm"):
        lmcompress.prune(model, PruneConfig(method="magnitude", sparsity=0.5, include_head=True), progress=False)


def test_encoder_decoder_and_non_lm_configs_are_refused():
    with pytest.raises(UserError, match=r"'t5'.*encoder-decoder"):
        family_of(T5Config())
    with pytest.raises(UserError, match=r"'vit'.*no causal-LM class"):
        family_of(ViTConfig())
