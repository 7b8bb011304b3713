"""Dropping whole experts from mixture-of-experts models, block by block on calibration data.

For each MoE layer the inputs of the layer are captured on the calibration windows (after the already
compressed blocks before it), every expert is scored by one criterion of
:mod:`lmcompress.algorithms.routing`, and the lowest-scoring experts are removed: their slices of the fused
expert tensors and their router rows are deleted, so the router now chooses among the rest. One-shot
scores once; ``iterative`` removes ``step`` experts at a time and re-scores the survivors (their routing
changes once others are gone).

Every MoE layer keeps the same number of experts, so the config's expert count is updated and the saved
folder loads with plain ``from_pretrained``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lmcompress.algorithms.routing import (
    CRITERIA,
    frequency_counts,
    moe_output,
    reconstruction_errors,
    router_mass,
    routing_weights,
    select_keep,
)
from lmcompress.calibration.engine import BlockInputs, collect, walk_blocks
from lmcompress.calibration.stats import InputRows
from lmcompress.errors import UserError
from lmcompress.models.families import blocks_path
from lmcompress.models.layouts import MoeLayout, moe_layout, moe_module
from lmcompress.models.params import count_params

log = logging.getLogger(__name__)


@dataclass
class ExpertConfig:
    """How many experts to keep in every MoE layer, and how to choose them."""

    keep: int = 6
    criterion: str = "reconstruction"  # frequency | router-weight | reconstruction
    iterative: bool = False  # drop ``step`` experts at a time, re-scoring the rest after each drop
    step: int = 1
    chunk_tokens: int = 4096  # tokens scored at once (bounds the [E, tokens, hidden] expert outputs)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.criterion not in CRITERIA:
            raise UserError(
                f"criterion {self.criterion!r} is unknown: choose one of the expert criteria {', '.join(CRITERIA)}",
                param="criterion",
            )
        if not isinstance(self.keep, int) or self.keep < 1:
            raise UserError(f"keep must be a positive number of experts, got {self.keep}", param="keep")
        if self.step < 1:
            raise UserError(f"step must be at least 1, got {self.step}", param="step")
        if self.chunk_tokens < 1:
            raise UserError(f"chunk_tokens must be positive, got {self.chunk_tokens}", param="chunk_tokens")

    def check_model(self, config) -> tuple[int, int]:
        """``(experts, top_k)`` of a model, after checking that ``keep`` fits them."""
        layout = moe_layout(config)
        n_experts, top_k = getattr(config, layout.count_key), getattr(config, layout.topk_key)
        if self.keep > n_experts:
            raise UserError(f"keep {self.keep} is more than the {n_experts} experts each layer has", param="keep")
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
        return True  # routing is data dependent: every criterion measures it


@dataclass
class ExpertReport:
    config: dict
    experts_before: int
    experts_after: int
    kept: dict[str, list[int]]  # MoE module path → indices (in the original numbering) of the kept experts
    scores: dict[str, list[float]]  # first-round score of every original expert (frequency and mass: per token)
    relative_error: dict[str, float]  # ||y − ŷ||² / ||y||² of the routed output on the calibration tokens
    params_before: int = 0
    params_after: int = 0
    wall_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe_fields(self) -> dict:
        """What the recipe (``lmcompress.json``) says this run did: its config's fields, then the experts kept."""
        return {
            **self.config,
            "experts_before": self.experts_before,
            "experts_after": self.experts_after,
            "kept_experts": self.kept,
            "expert_scores": self.scores,
            "relative_error": self.relative_error,
            "params_before": self.params_before,
            "params_after": self.params_after,
        }


def _router_logits(router: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = router(x)
    return (out[0] if isinstance(out, tuple | list) else out).reshape(x.shape[0], -1)


@torch.no_grad()
def _expert_outputs(experts: nn.Module, x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``[E, tokens, hidden]``: each alive expert applied to every token (the model's own expert code)."""
    n_experts = alive.numel()
    out = x.new_zeros((n_experts, *x.shape))
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    for e in torch.nonzero(alive).flatten().tolist():
        idx = torch.full((x.shape[0], 1), e, dtype=torch.long, device=x.device)
        out[e] = experts(x, idx, ones)
    return out


@torch.no_grad()
def _scores(
    x: torch.Tensor,
    router: nn.Module,
    experts: nn.Module,
    criterion: str,
    top_k: int,
    normalize: bool,
    alive: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Importance of every expert over all captured tokens ``x`` (``[tokens, hidden]``); dead ones −inf."""
    total = torch.zeros(alive.numel())
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        logits = _router_logits(router, xc).float()
        if criterion == "frequency":
            total += frequency_counts(logits, top_k, alive).cpu()
        elif criterion == "router-weight":
            total += router_mass(logits, alive).cpu()
        else:
            outs = _expert_outputs(experts, xc, alive).float()
            total += reconstruction_errors(logits, outs, top_k, normalize, alive).cpu()
    if criterion != "reconstruction":
        total /= x.shape[0]
    return total.masked_fill(~alive, float("-inf"))


@torch.no_grad()
def _relative_error(
    x: torch.Tensor, router: nn.Module, experts: nn.Module, top_k: int, normalize: bool, alive: torch.Tensor, chunk: int
) -> float:
    """``||y − ŷ||² / ||y||²``: routed output with all experts vs only the ``alive`` ones."""
    full = torch.ones_like(alive)
    err = ref = 0.0
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        logits = _router_logits(router, xc).float()
        outs = _expert_outputs(experts, xc, full).float()
        y = moe_output(routing_weights(logits, top_k, normalize, full), outs)
        y_hat = moe_output(routing_weights(logits, top_k, normalize, alive), outs)
        err += (y - y_hat).pow(2).sum().item()
        ref += y.pow(2).sum().item()
    return err / max(ref, 1e-30)


def slice_experts(moe: nn.Module, layout: MoeLayout, keep_idx: torch.Tensor) -> None:
    """Keep only experts ``keep_idx`` in ``moe``: fused expert tensors and router rows sliced on dim 0."""
    router, experts = moe.get_submodule(layout.router), moe.get_submodule(layout.experts)
    n_old = router.weight.shape[0]
    for module in (router, experts):
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == n_old:
                idx = keep_idx.to(p.device)
                setattr(module, name, nn.Parameter(p.data.index_select(0, idx).clone(), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.dim() >= 1 and b.shape[0] == n_old:
                setattr(module, name, b.index_select(0, keep_idx.to(b.device)).clone())
        if hasattr(module, "num_experts"):
            module.num_experts = int(keep_idx.numel())


@torch.no_grad()
def drop_experts(
    model: nn.Module,
    config: ExpertConfig,
    calib: torch.Tensor | None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ExpertReport:
    """Drop experts from every MoE layer of ``model`` in place, keeping ``config.keep`` per layer.

    ``calib`` holds calibration windows ``[nsamples, seqlen]``; every criterion needs them (routing is data
    dependent). The config's expert count is updated at the end.
    """
    start = time.perf_counter()
    config.validate()
    layout = moe_layout(model.config)
    n_experts, top_k = config.check_model(model.config)
    if calib is None or calib.numel() == 0:
        raise UserError("expert dropping needs calibration data (routing statistics are measured on it)")
    renorm = layout.renormalize
    normalize = bool(getattr(model.config, "norm_topk_prob", False)) if renorm is None else renorm
    prefix = blocks_path(model)
    params_before = count_params(model)
    model.eval()
    kept: dict[str, list[int]] = {}
    scores_out: dict[str, list[float]] = {}
    rel_err: dict[str, float] = {}

    def visit(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        moe = moe_module(block, layout)
        if moe is None:
            return
        name = f"{prefix}.{i}.{layout.moe}"
        # [tokens, hidden]: the MoE layer's inputs on every calibration token (re-scored after each drop)
        x = collect(block, inputs, [layout.moe], lambda _n, _m: InputRows())[layout.moe].rows
        router, experts = moe.get_submodule(layout.router), moe.get_submodule(layout.experts)
        alive = torch.ones(n_experts, dtype=torch.bool)
        first = None
        while int(alive.sum()) > config.keep:
            s = _scores(x, router, experts, config.criterion, top_k, normalize, alive, config.chunk_tokens)
            first = s if first is None else first
            target = config.keep
            if config.iterative:
                target = max(config.keep, int(alive.sum()) - config.step)
            alive = torch.zeros_like(alive).index_fill_(0, select_keep(s, target, alive), True)
        if first is None:  # keep == all experts: nothing to score away, but report the scores
            first = _scores(x, router, experts, config.criterion, top_k, normalize, alive, config.chunk_tokens)
        rel_err[name] = _relative_error(x, router, experts, top_k, normalize, alive, config.chunk_tokens)
        keep_idx = torch.nonzero(alive).flatten()
        slice_experts(moe, layout, keep_idx)
        kept[name] = keep_idx.tolist()
        scores_out[name] = [float(v) for v in first.tolist()]
        log.debug("%s: kept experts %s (relative error %.4f)", name, kept[name], rel_err[name])

    walk_blocks(model, calib, torch.device(device), visit, desc=f"experts ({config.criterion})", progress=progress)
    if not kept:
        raise UserError("this model has no mixture-of-experts layers to drop experts from")
    setattr(model.config, layout.count_key, config.keep)
    return ExpertReport(
        config=config.to_dict(),
        experts_before=n_experts,
        experts_after=config.keep,
        kept=kept,
        scores=scores_out,
        relative_error=rel_err,
        params_before=params_before,
        params_after=count_params(model),
        wall_time_s=time.perf_counter() - start,
    )
