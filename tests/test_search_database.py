"""The level database rebuilds exactly what direct compression gives; KL fitness matches a direct computation."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lmcompress.models.families import prunable_layers
from lmcompress.models.tiny import build_tiny_model
from lmcompress.search.database import LevelDatabase, build_database, prune_from_reference_inputs, pruner
from lmcompress.search.fitness import KLFitness
from lmcompress.transforms.prune import PruneConfig, prune

LEVELS = [0.3, 0.5, 0.7]


@pytest.mark.parametrize("inputs", ["dense", "sequential"])
def test_database_candidate_equals_direct_compression_at_those_levels(tmp_path, tokenizer, calib, inputs):
    model = build_tiny_model("llama", tokenizer.vocab_size)
    dense = copy.deepcopy(model)
    config = PruneConfig(method="sparsegpt", sparsity=0.5)
    reference = dict.fromkeys(prunable_layers(model), 1) if inputs == "sequential" else None
    db = build_database(model, pruner(config), calib, LEVELS, tmp_path / "db", reference=reference, progress=False)
    for a, b in zip(model.parameters(), dense.parameters(), strict=True):
        assert torch.equal(a, b)  # building the database leaves the model dense
    rng = random.Random(0)
    assignment = {layer: rng.randrange(len(LEVELS)) for layer in db.layers}
    db.apply(model, assignment)
    direct = copy.deepcopy(dense)
    as_sparsity = {k: LEVELS[v] for k, v in (reference or {}).items()} if reference else None
    prune_from_reference_inputs(direct, config, calib, {k: LEVELS[v] for k, v in assignment.items()}, as_sparsity)
    for (n, a), (_, b) in zip(model.named_parameters(), direct.named_parameters(), strict=True):
        # the database solves a group's layers and levels stacked, the reference each layer alone: the same
        # masks, and weights equal up to the order of floating-point sums
        assert torch.equal(a == 0, b == 0) and torch.allclose(a, b, atol=1e-5, rtol=1e-5), n
    reopened = LevelDatabase.open(tmp_path / "db")
    assert reopened.layers == db.layers and reopened.sizes == db.sizes
    layer = db.layers[0]
    sparsity = (reopened.weight(layer, 2) == 0).float().mean().item()
    assert abs(sparsity - 0.7) < 0.02


def test_sequential_database_reference_candidate_is_sequential_pruning(tmp_path, tokenizer, calib):
    """Built along the uniform model's inputs, the all-reference candidate is what ``prune`` gives."""
    model = build_tiny_model("llama", tokenizer.vocab_size)
    dense = copy.deepcopy(model)
    config = PruneConfig(method="sparsegpt", sparsity=0.5)
    reference = dict.fromkeys(prunable_layers(model), 1)
    db = build_database(model, pruner(config), calib, LEVELS, tmp_path / "db", reference=reference, progress=False)
    db.apply(model, reference)
    sequential = copy.deepcopy(dense)
    prune(sequential, replace(config, in_block="parallel"), calib, progress=False)  # the database's order
    dense_db = build_database(dense, pruner(config), calib, LEVELS, tmp_path / "dense", progress=False)
    dense_db.apply(dense, reference)
    gap = 0.0
    for (n, a), (_, b), (_, c) in zip(
        model.named_parameters(), sequential.named_parameters(), dense.named_parameters(), strict=True
    ):
        assert torch.equal(a == 0, b == 0) and torch.allclose(a, b, atol=1e-5, rtol=1e-5), n
        gap = max(gap, (c - b).abs().max().item())
    assert gap > 1e-3  # the dense-input database does differ from sequential pruning after the first block


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # a linear head; a head that caps its logits (Gemma 2)
def test_kl_fitness_matches_a_direct_computation(tokenizer, calib, family):
    dense = build_tiny_model(family, tokenizer.vocab_size)
    other = copy.deepcopy(dense)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.model.layers.parameters():  # the blocks: a search never changes the embeddings or the head
            p.add_(0.05 * torch.randn_like(p))
    windows = calib[:3, :32]
    fit = KLFitness(dense, windows)
    # a linear head: the dense side is kept as tokens × hidden, not tokens × vocab; else as log-probabilities
    assert (fit.reference is None) == (family == "llama")
    with torch.no_grad():
        p = F.log_softmax(dense(windows).logits[:, :-1].float(), -1)
        q = F.log_softmax(other(windows).logits[:, :-1].float(), -1)
    expected = F.kl_div(q, p, log_target=True, reduction="sum").item() / (p.shape[0] * p.shape[1])
    assert abs(fit(other) - expected) < 1e-3 * max(expected, 1e-3)
    assert fit(dense) < 1e-3  # fp16 reference: zero up to rounding
    expected_one = F.kl_div(q[:1], p[:1], log_target=True, reduction="sum").item() / p.shape[1]
    assert abs(fit(other, 1) - expected_one) < 1e-3 * max(expected_one, 1e-3)
    if fit.reference is None:  # read through the dense head: a candidate with another head is refused
        with torch.no_grad():
            other.lm_head.weight.add_(0.01)
        with pytest.raises(ValueError, match="output head differs"):
            fit(other)
