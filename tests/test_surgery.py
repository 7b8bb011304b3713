"""Surgery records: a resized / factorized model saved with its records loads back through lmcompress.load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lmcompress
from lmcompress.checkpoint.save import save_model
from lmcompress.errors import UserError
from lmcompress.models.surgery import LowRankLinear, apply_surgery, record_linear, record_lowrank
from lmcompress.models.tiny import build_tiny_model


def _shrink_ffn(model: nn.Module, layer: int, keep: int) -> list[dict]:
    """Keep the first ``keep`` intermediate channels of one LLaMA MLP; returns the surgery records."""
    mlp = model.model.layers[layer].mlp
    records = []
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, keep, bias=False)
        new.weight.data = old.weight.data[:keep].clone()
        setattr(mlp, name, new)
        records.append(record_linear(f"model.layers.{layer}.mlp.{name}", new))
    old = mlp.down_proj
    new = nn.Linear(keep, old.out_features, bias=False)
    new.weight.data = old.weight.data[:, :keep].clone()
    mlp.down_proj = new
    records.append(record_linear(f"model.layers.{layer}.mlp.down_proj", new))
    return records


def test_resized_and_factorized_model_round_trips(tmp_path, tokenizer):
    model = build_tiny_model("llama", tokenizer.vocab_size)
    records = _shrink_ffn(model, 0, 40)
    attn = model.model.layers[1].self_attn
    w = attn.o_proj.weight.data
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    low = LowRankLinear(w.shape[1], w.shape[0], rank=w.shape[0], bias=False)
    low.up.weight.data, low.down.weight.data = u * s, vh
    attn.o_proj = low
    records.append(record_lowrank("model.layers.1.self_attn.o_proj", low))
    x = torch.randint(0, tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        expected = model(x).logits
    out = save_model(model, tokenizer, tmp_path / "out", {"kind": "test", "surgery": records})
    assert json.loads((out / "lmcompress.json").read_text())["surgery"] == records
    loaded, _ = lmcompress.load(out)
    assert loaded.model.layers[0].mlp.up_proj.out_features == 40
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    # the generic loader (used by `lmcompress eval`) takes the same path
    again, _ = lmcompress.load_model(out)
    with torch.no_grad():
        assert torch.equal(again(x).logits, expected)


def test_unknown_record_is_a_clear_error(tokenizer):
    model = build_tiny_model("llama", tokenizer.vocab_size)
    with pytest.raises(UserError, match="unknown surgery record kind"):
        apply_surgery(model, [{"module": "model.layers.0.mlp.up_proj", "kind": "sparse-magic"}])
    with pytest.raises(UserError, match="does not have"):
        apply_surgery(
            model, [{"module": "model.layers.9.mlp.up_proj", "kind": "linear", "in_features": 1, "out_features": 1}]
        )


def test_weights_that_do_not_fit_are_refused(tmp_path, tokenizer):
    model = build_tiny_model("llama", tokenizer.vocab_size)
    records = _shrink_ffn(model, 0, 40)
    records[0]["out_features"] = 41  # the recipe no longer matches the weights
    out = save_model(model, tokenizer, tmp_path / "bad", {"kind": "test", "surgery": records})
    with pytest.raises(UserError):
        lmcompress.load(out)
