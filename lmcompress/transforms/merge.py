"""Merging the experts of mixture-of-experts models (MC-SMoE, "Merge, Then Compress", Li et al., 2024).

For each MoE layer in turn, on the inputs the layer sees on the calibration windows (after the already
merged blocks before it):

1. the router's logits on every calibration token are computed, and the ``keep`` experts routed to most
   often (top-k frequency) become the dominant experts;
2. every other expert joins the dominant expert whose router-logit column is most similar (cosine);
3. with ``align``, each member's intermediate neurons are permuted to match its dominant expert's (weight
   matching, :func:`lmcompress.algorithms.merging.match_neurons`); permuting neurons keeps an expert's
   function, so this only changes which weights get averaged together;
4. each group becomes one expert: the average of its members' (aligned) weights, weighted by their routing
   frequency, stored in the dominant expert's slot; the other slots are deleted (fused tensors sliced on the
   expert dimension).

Router rows: MC-SMoE keeps the router whole (E rows) and lets every member of a group point at the merged
expert, so a token routed to any member runs the merged one. Transformers' MoE modules have no such E → K
map, so here the router keeps the rows of the dominant experts only (as when dropping experts): a token that
chose a merged-away expert now routes among the K experts that remain, and mostly to that expert's dominant
one, whose router logits were the most similar to its own (the grouping criterion). The config's expert
count becomes ``keep``, so the saved folder loads with plain ``from_pretrained``.

``refit`` (not part of MC-SMoE; off by default) then refits the merged experts' ``down_proj`` on the
calibration tokens: the layer's routed output before merging is the target, and one sweep of block coordinate
descent over the merged experts solves each one's down projection by damped least squares on the tokens the
new router sends to it, the other experts held fixed (:func:`refit_down`). Each solve can only lower the
calibration error (up to the damping).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lmcompress.algorithms.merging import (
    dominant_experts,
    group_by_router,
    least_squares_down,
    match_neurons,
    merge_weights,
    neuron_features,
    permute_neurons,
    weighted_average,
)
from lmcompress.algorithms.routing import frequency_counts, moe_output, routing_weights
from lmcompress.calibration.engine import BlockInputs, collect, walk_blocks
from lmcompress.calibration.stats import InputRows
from lmcompress.errors import UserError
from lmcompress.models.families import blocks_path
from lmcompress.models.layouts import MOE_LAYOUTS, MoeLayout, moe_layout, moe_module
from lmcompress.models.params import count_params
from lmcompress.transforms.experts import _expert_outputs, _router_logits, slice_experts

log = logging.getLogger(__name__)

FUSED = ("gate_up_proj", "down_proj")  # the fused expert tensors merged: [E, 2I, H] and [E, H, I]


@dataclass
class MergeConfig:
    """How many experts every MoE layer keeps after merging, and whether neurons are aligned first."""

    keep: int = 4
    align: bool = False  # permute each member's neurons to match its dominant expert's before averaging
    refit: bool = False  # then refit the merged experts' down_proj by least squares (not MC-SMoE; see the module)
    refit_damp: float = 0.01  # the refit's damping, a fraction of the mean diagonal of each expert's Gram matrix
    chunk_tokens: int = 4096  # tokens run through the experts at once (bounds the [E, tokens, hidden] outputs)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise UserError(f"keep must be a positive number of experts, got {self.keep}", param="keep")
        if not self.refit_damp >= 0:
            raise UserError(f"refit_damp must be ≥ 0, got {self.refit_damp}", param="refit_damp")
        if self.chunk_tokens < 1:
            raise UserError(f"chunk_tokens must be positive, got {self.chunk_tokens}", param="chunk_tokens")

    def check_model(self, config) -> tuple[int, int]:
        """``(experts, top_k)`` of a model, after checking that merging to ``keep`` experts makes sense."""
        model_type = getattr(config, "model_type", None)
        if model_type not in MOE_LAYOUTS:
            raise UserError(
                f"expert merging needs a mixture-of-experts model; {model_type!r} is not one lmcompress knows "
                f"(supported: {', '.join(sorted(MOE_LAYOUTS))})"
            )
        layout = moe_layout(config)
        n_experts, top_k = getattr(config, layout.count_key), getattr(config, layout.topk_key)
        if self.keep >= n_experts:
            raise UserError(
                f"keep {self.keep} is not fewer than the {n_experts} experts each layer has: merging needs "
                f"--keep below {n_experts}",
                param="keep",
            )
        if self.keep < top_k:
            raise UserError(
                f"keep {self.keep} is fewer than the {top_k} experts every token is routed to (top-k); "
                f"use at least {top_k} experts, or lower {layout.topk_key} in the config first",
                param="keep",
            )
        return n_experts, top_k

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_calibration(self) -> bool:
        return True  # dominance and grouping are measured on the routing of calibration tokens


@dataclass
class MergeReport:
    config: dict
    experts_before: int
    experts_after: int
    # MoE module path → one list per merged expert (in the new order): its dominant expert first, then the
    # experts merged into it, in the original numbering
    groups: dict[str, list[list[int]]]
    frequency: dict[str, list[float]]  # fraction of calibration tokens routed to each original expert
    similarity: dict[str, list[float]]  # router-logit cosine of each original expert with its dominant expert
    # mean cosine of matched neurons (features: gate row, up row, down column) of members vs their dominant
    # expert, [before alignment, after alignment] (equal without --align)
    neuron_cosine: dict[str, list[float]]
    relative_error: dict[str, float]  # ||y − ŷ||² / ||y||² of the routed output on the calibration tokens
    merged_error: dict[str, float] = field(default_factory=dict)  # the same before the refit (= it without)
    params_before: int = 0
    params_after: int = 0
    wall_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe_fields(self) -> dict:
        """What the recipe (``lmcompress.json``) says this run did: its config's fields, then the groups merged."""
        return {
            **self.config,
            "experts_before": self.experts_before,
            "experts_after": self.experts_after,
            "merged_groups": self.groups,
            "expert_frequency": self.frequency,
            "router_similarity": self.similarity,
            "neuron_cosine": self.neuron_cosine,
            "relative_error": self.relative_error,
            "merged_error": self.merged_error,
            "params_before": self.params_before,
            "params_after": self.params_after,
        }


def check_fused_experts(experts: nn.Module) -> None:
    """A UserError unless ``experts`` holds exactly the fused gated-FFN tensors that merging knows."""
    names = {n for n, _ in experts.named_parameters(recurse=False)}
    if names != set(FUSED):
        raise UserError(
            f"expert merging needs fused gated experts with parameters {', '.join(FUSED)}; "
            f"{type(experts).__name__} has {', '.join(sorted(names)) or 'none'}"
        )


def _mean_neuron_cosine(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean cosine of neuron ``i`` of ``ref`` with neuron ``i`` of ``other`` (both ``[I, 3H]`` features)."""
    return torch.nn.functional.cosine_similarity(ref.double(), other.double(), dim=1).mean().item()


@torch.no_grad()
def merge_group(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    members: list[int],
    weights: torch.Tensor,
    align: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """One merged expert from experts ``members`` (the dominant one first) of fused ``gate_up``/``down``.

    Returns its ``(gate_up [2I, H], down [H, I])`` and, per other member, its mean matched-neuron cosine with
    the dominant expert before and after alignment (flattened: before₁, after₁, before₂, ...).
    """
    d = members[0]
    ref = neuron_features(gate_up[d], down[d])
    gus, dns, cosines = [gate_up[d]], [down[d]], []
    for m in members[1:]:
        gu, dn = gate_up[m], down[m]
        before = _mean_neuron_cosine(ref, neuron_features(gu, dn))
        if align:
            gu, dn = permute_neurons(gu, dn, match_neurons(gate_up[d], down[d], gu, dn))
        cosines += [before, _mean_neuron_cosine(ref, neuron_features(gu, dn)) if align else before]
        gus.append(gu)
        dns.append(dn)
    return weighted_average(gus, weights), weighted_average(dns, weights), cosines


@torch.no_grad()
def refit_down(
    router: nn.Module,
    experts: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    y_hat: torch.Tensor,
    top_k: int,
    normalize: bool,
    damp: float,
) -> None:
    """Refit every expert's ``down_proj`` in place so that the routed output on tokens ``x`` approaches ``y``.

    ``y_hat`` ``[tokens, hidden]`` is the routed output as the experts stand (float32, updated in place). One
    sweep in expert order: expert ``k``'s tokens are those the router sends to it (weight ``gₜₖ > 0``), its
    inputs ``zₜ = gₜₖ · act(gateₖ xₜ) ⊙ (upₖ xₜ)``, and its new down projection the damped least-squares fit of
    ``yₜ − (ŷₜ − gₜₖ Dₖ hₜ)``, the output the other experts leave unexplained.
    """
    logits = _router_logits(router, x).float()
    g = routing_weights(logits, top_k, normalize).to(x.device)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    inter = down.shape[2]
    for k in range(down.shape[0]):
        tok = torch.nonzero(g[:, k] > 0).flatten()
        if tok.numel() == 0:
            continue
        gate, up = (x[tok].float() @ gate_up[k].float().T).split(inter, dim=-1)
        z = g[tok, k, None] * (experts.act_fn(gate) * up)
        own = z @ down[k].float().T
        new = least_squares_down(z, y[tok].float() - y_hat[tok] + own, damp).float()
        down.data[k] = new.to(down.dtype)
        y_hat[tok] += z @ new.T - own


@torch.no_grad()
def merge_experts(
    model: nn.Module,
    config: MergeConfig,
    calib: torch.Tensor | None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> MergeReport:
    """Merge the experts of every MoE layer of ``model`` in place down to ``config.keep`` per layer.

    ``calib`` holds calibration windows ``[nsamples, seqlen]`` (routing frequency and router logits are
    measured on them). The config's expert count is updated at the end.
    """
    start = time.perf_counter()
    config.validate()
    layout: MoeLayout = moe_layout(model.config)
    n_experts, top_k = config.check_model(model.config)
    if calib is None or calib.numel() == 0:
        raise UserError("expert merging needs calibration data (routing statistics are measured on it)")
    renorm = layout.renormalize
    normalize = bool(getattr(model.config, "norm_topk_prob", False)) if renorm is None else renorm
    prefix = blocks_path(model)
    params_before = count_params(model)
    model.eval()
    report = MergeReport(config.to_dict(), n_experts, config.keep, {}, {}, {}, {}, {}, params_before=params_before)
    chunk = config.chunk_tokens

    def routed(router: nn.Module, experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The routed output on tokens ``x`` (chunked), as the router and experts stand."""
        n = router.weight.shape[0]
        alive = torch.ones(n, dtype=torch.bool)
        out = []
        for s in range(0, x.shape[0], chunk):
            xc = x[s : s + chunk]
            w = routing_weights(_router_logits(router, xc).float(), top_k, normalize)
            out.append(moe_output(w, _expert_outputs(experts, xc, alive).float()).to(x.dtype))
        return torch.cat(out)

    def visit(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        moe = moe_module(block, layout)
        if moe is None:
            return
        name = f"{prefix}.{i}.{layout.moe}"
        router, experts = moe.get_submodule(layout.router), moe.get_submodule(layout.experts)
        check_fused_experts(experts)
        x = collect(block, inputs, [layout.moe], lambda _n, _m: InputRows())[layout.moe].rows
        logits = torch.cat([_router_logits(router, x[s : s + chunk]).float().cpu() for s in range(0, len(x), chunk)])
        freq = frequency_counts(logits, top_k) / logits.shape[0]
        dominant = dominant_experts(freq, config.keep)
        group, sim = group_by_router(logits, dominant)
        y = routed(router, experts, x)
        groups, cosines = [], []
        merged = {}
        for d in dominant.tolist():
            members = [d] + [e for e in range(n_experts) if e != d and int(group[e]) == d]
            gu, dn, cos = merge_group(
                experts.gate_up_proj.data, experts.down_proj.data, members, merge_weights(freq[members]), config.align
            )
            merged[d] = (gu, dn)
            groups.append(members)
            cosines += cos
        for d, (gu, dn) in merged.items():
            experts.gate_up_proj.data[d] = gu
            experts.down_proj.data[d] = dn
        slice_experts(moe, layout, dominant)
        y_hat = routed(router, experts, x).float()
        ref = max(y.float().pow(2).sum().item(), 1e-30)
        report.merged_error[name] = (y.float() - y_hat).pow(2).sum().item() / ref
        if config.refit:
            refit_down(router, experts, x, y, y_hat, top_k, normalize, config.refit_damp)
            y_hat = routed(router, experts, x).float()
        report.relative_error[name] = (y.float() - y_hat).pow(2).sum().item() / ref
        report.groups[name] = groups
        report.frequency[name] = [float(v) for v in freq.tolist()]
        report.similarity[name] = [float(v) for v in sim.tolist()]
        before, after = cosines[0::2], cosines[1::2]
        report.neuron_cosine[name] = [sum(before) / max(len(before), 1), sum(after) / max(len(after), 1)]
        log.debug("%s: merged groups %s (relative error %.4f)", name, groups, report.relative_error[name])

    walk_blocks(model, calib, torch.device(device), visit, desc="merge experts", progress=progress)
    if not report.groups:
        raise UserError("this model has no mixture-of-experts layers to merge experts in")
    setattr(model.config, layout.count_key, config.keep)
    report.params_after = count_params(model)
    report.wall_time_s = time.perf_counter() - start
    return report
