"""Low-rank factorization of a model's block linear layers, recorded as surgery so ``lmcompress.load`` rebuilds it.

Each ``nn.Linear`` / GPT-2 ``Conv1D`` of every transformer block gets a rank from its singular value spectrum
(see :mod:`lmcompress.algorithms.lowrank`) and is replaced by a :class:`~lmcompress.models.surgery.LowRankLinear`
(``down`` then ``up``) only where that has fewer parameters; otherwise it stays dense. Activation-aware
factorization walks the blocks on calibration data (block by block, each seeing the already factorized
blocks before it) and whitens each layer by its inputs' statistics.

Rank policies: ``energy:F`` (per layer, keep a fraction F of Σσ²), ``auto[:P]`` (WeLore-style: one threshold on
normalized singular values σᵢ/σ₁ for all layers, chosen so the factorized layers save a fraction P of the block
linear parameters, default 0.3; fast-decaying layers get low rank, flat ones stay dense), ``rank:N`` (fixed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.algorithms.lowrank import (
    SVD,
    auto_threshold,
    cholesky_scale,
    diagonal_scale,
    energy_rank,
    factors,
    kept_energy,
    saves_params,
    threshold_rank,
    whitened_svd,
)
from lmcompress.calibration.engine import BlockInputs, collect_input_stats, walk_blocks
from lmcompress.calibration.stats import InputStats
from lmcompress.errors import UserError
from lmcompress.models.families import blocks_path, find_prunable, get_blocks, weight_matrix
from lmcompress.models.params import count_params
from lmcompress.models.surgery import LowRankLinear, record_lowrank

log = logging.getLogger(__name__)

WHITENINGS = ("cholesky", "diag")
DEFAULT_AUTO_SAVING = 0.3


@dataclass
class FactorizeConfig:
    """Which rank each layer gets and whether the SVD is whitened by calibration statistics."""

    rank_policy: str = "energy:0.9"  # energy:F | auto[:P] | rank:N
    activation_aware: bool = False
    whitening: str = "cholesky"  # cholesky (full XᵀX) | diag (per-input RMS)
    damp: float = 0.01  # Cholesky dampening, fraction of the mean diagonal of XᵀX

    def __post_init__(self) -> None:
        self.validate()

    @property
    def policy(self) -> tuple[str, float]:
        """``(kind, value)``: ("energy", F), ("auto", P) or ("rank", N)."""
        text = self.rank_policy.strip().lower()
        kind, _, value = text.partition(":")
        if kind == "auto" and not value:
            return "auto", DEFAULT_AUTO_SAVING
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        return kind, number

    def validate(self) -> None:
        kind, value = self.policy
        hint = "use energy:F with F in (0, 1], auto, auto:P with P in (0, 1), or rank:N"
        if kind not in ("energy", "auto", "rank") or value != value:
            raise UserError(f"unknown rank_policy {self.rank_policy!r}: {hint}", param="rank_policy")
        if kind == "energy" and not 0.0 < value <= 1.0:
            raise UserError(f"rank_policy energy:{value:g}: the energy fraction must be in (0, 1]", param="rank_policy")
        if kind == "auto" and not 0.0 < value < 1.0:
            raise UserError(f"rank_policy auto:{value:g}: the parameter saving must be in (0, 1)", param="rank_policy")
        if kind == "rank" and (value < 1 or value != int(value)):
            raise UserError(f"rank_policy rank:{value:g}: the rank must be a positive integer", param="rank_policy")
        if self.whitening not in WHITENINGS:
            raise UserError(
                f"unknown whitening {self.whitening!r}: choose one of {', '.join(WHITENINGS)}", param="whitening"
            )
        if not 0.0 <= self.damp < 1.0:
            raise UserError(f"damp must be in [0, 1), got {self.damp}", param="damp")

    @property
    def needs_calibration(self) -> bool:
        return self.activation_aware

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerResult:
    rank: int  # rank the policy chose
    full_rank: int  # min(in, out)
    in_features: int
    out_features: int
    factorized: bool  # replaced by LowRankLinear (only when it saves parameters)
    energy: float  # fraction of Σσ² kept at ``rank`` (output energy when activation-aware)


@dataclass
class FactorizeReport:
    config: dict
    layers: dict[str, LayerResult]
    surgery: list[dict]  # records for lmcompress.models.surgery.apply_surgery
    params_before: int  # whole model
    params_after: int
    linear_params_before: int  # block linear layers only
    linear_params_after: int
    threshold: float | None = None  # auto policy: the shared σᵢ/σ₁ threshold
    wall_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe_fields(self) -> dict:
        """What the recipe (``lmcompress.json``) says this run did: its config's fields, then each layer's rank."""
        return {
            **self.config,
            "threshold": self.threshold,
            "layers": {k: asdict(v) for k, v in self.layers.items()},
            "params_before": self.params_before,
            "params_after": self.params_after,
            "linear_params_before": self.linear_params_before,
            "linear_params_after": self.linear_params_after,
            "surgery": self.surgery,
        }


def _scale(stats: InputStats | None, config: FactorizeConfig) -> torch.Tensor | None:
    if stats is None:
        return None
    if config.whitening == "diag":
        return diagonal_scale(stats.sq_sum, stats.tokens)
    return cholesky_scale(stats.xtx, config.damp)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def factorize_linear(module: nn.Module, svd: SVD, rank: int) -> LowRankLinear:
    """A :class:`LowRankLinear` holding the rank-``rank`` factors of ``module`` (its bias kept)."""
    n_out, n_in = weight_matrix(module).shape
    bias = _bias(module)
    ref = module.weight
    new = LowRankLinear(n_in, n_out, rank, bias=bias is not None, dtype=ref.dtype, device=ref.device)
    up, down = factors(svd, rank)
    with torch.no_grad():
        new.up.weight.copy_(up.to(ref))
        new.down.weight.copy_(down.to(ref))
        if bias is not None:
            new.up.bias.copy_(bias.detach().to(ref))
    return new


def _choose_rank(config: FactorizeConfig, sigma: torch.Tensor, threshold: float | None) -> int:
    kind, value = config.policy
    if kind == "energy":
        return energy_rank(sigma, value)
    if kind == "rank":
        return min(int(value), sigma.numel())
    return threshold_rank(sigma, threshold)


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, attr, new)


@torch.no_grad()
def _block_svds(block: nn.Module, stats: dict[str, InputStats] | None, config: FactorizeConfig):
    """Yield ``(name, module, svd)`` for the linear layers of a block, one SVD alive at a time.

    Layers that read the same input (q/k/v, gate/up) share one ``InputStats`` and so one whitening factor.
    """
    scales: dict[int, torch.Tensor | None] = {}
    for name, module in find_prunable(block).items():
        layer_stats = stats[name] if stats else None
        key = id(layer_stats)
        if key not in scales:
            scales[key] = _scale(layer_stats, config)
        yield name, module, whitened_svd(weight_matrix(module), scales[key])


@torch.no_grad()
def factorize(
    model: nn.Module,
    config: FactorizeConfig,
    calib: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FactorizeReport:
    """Factorize the block linear layers of ``model`` in place; returns what was done and the surgery records."""
    start = time.perf_counter()
    config.validate()
    device = torch.device(device)
    if config.needs_calibration and (calib is None or calib.numel() == 0):
        raise UserError(
            "activation_aware needs calibration data (calib_data)", param=("activation_aware", "calib_data")
        )
    model.eval()
    prefix = blocks_path(model)
    blocks = get_blocks(model)
    params_before = count_params(model)
    kind, value = config.policy

    def each_block(visit, desc: str) -> None:
        """``visit(i, block, stats)`` for every block, with input statistics when activation-aware."""
        if config.activation_aware:

            def walker_visit(i: int, block: nn.Module, inputs: BlockInputs) -> None:
                names = list(find_prunable(block))
                stats = collect_input_stats(block, inputs, names, hessian=config.whitening == "cholesky")
                visit(i, block, stats)

            walk_blocks(model, calib, device, walker_visit, desc=desc, progress=progress)
        else:
            for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, unit="block"):
                home = next(blocks[i].parameters()).device
                blocks[i].to(device)
                visit(i, blocks[i], None)
                blocks[i].to(home)

    threshold = None
    if kind == "auto":  # first pass: every layer's spectrum (on the dense model), then one shared threshold
        spectra: list[torch.Tensor] = []
        shapes: list[tuple[int, int]] = []

        def measure(_i: int, block: nn.Module, stats) -> None:
            for _name, module, svd in _block_svds(block, stats, config):
                n_out, n_in = weight_matrix(module).shape
                spectra.append(svd.sigma.cpu())
                shapes.append((n_in, n_out))

        each_block(measure, "spectra")
        threshold = auto_threshold(spectra, shapes, value)
        log.info("auto rank policy: threshold σᵢ/σ₁ ≥ %.4g", threshold)

    layers: dict[str, LayerResult] = {}
    records: list[dict] = []

    def apply(i: int, block: nn.Module, stats) -> None:
        for name, module, svd in _block_svds(block, stats, config):
            n_out, n_in = weight_matrix(module).shape
            rank = _choose_rank(config, svd.sigma, threshold)
            full = f"{prefix}.{i}.{name}"
            factorized = saves_params(rank, n_in, n_out)
            layers[full] = LayerResult(rank, min(n_in, n_out), n_in, n_out, factorized, kept_energy(svd.sigma, rank))
            if factorized:
                new = factorize_linear(module, svd, rank)
                _replace(block, name, new)
                records.append(record_lowrank(full, new))

    each_block(apply, "factorize" + (" (activation-aware)" if config.activation_aware else ""))
    lin_before = sum(r.in_features * r.out_features for r in layers.values())
    lin_after = sum(
        r.rank * (r.in_features + r.out_features) if r.factorized else r.in_features * r.out_features
        for r in layers.values()
    )
    notes = []
    if not records:
        notes.append("no layer was factorized: at the chosen ranks none would have saved parameters")
    return FactorizeReport(
        config=config.to_dict(),
        layers=layers,
        surgery=records,
        params_before=params_before,
        params_after=count_params(model),
        linear_params_before=lin_before,
        linear_params_after=lin_after,
        threshold=threshold,
        wall_time_s=time.perf_counter() - start,
        notes=notes,
    )
