"""Tuning OWL's two knobs (outlier threshold M and spread λ) with Optuna, scored like the search.

OWL sets block sparsity ``target − (r_b − mean r)`` from each block's outlier ratio ``r_b`` (the share of its
Wanda scores above M × their mean), min–max scaled to span 2λ. The ratios for any M come from one dense pass:
each block's scores divided by their mean are kept sorted, and ``r_b(M)`` is the fraction above M. A trial's
block sparsities are placed on the level grid at the budget and assembled from the level database, so it costs
one fitness evaluation. Trials are stored in an SQLite file in the work folder: a killed tuning continues.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lmcompress.algorithms.owl import owl_allocation
from lmcompress.algorithms.wanda import wanda_scores
from lmcompress.calibration.engine import BlockInputs, collect_input_stats, walk_blocks
from lmcompress.errors import UserError
from lmcompress.models.families import find_prunable, weight_matrix
from lmcompress.search.config import SearchConfig, SearchReport
from lmcompress.search.loop import model_on
from lmcompress.search.score import prepare

M_RANGE = (2.0, 12.0)
LAMBDA_RANGE = (0.0, 0.25)


@torch.no_grad()
def outlier_profile(model: nn.Module, calib: torch.Tensor, device, progress: bool = True) -> list[torch.Tensor]:
    """For each block: its Wanda scores over all its layers, divided by their mean, sorted (fp16)."""
    profile: list[torch.Tensor] = []

    def visit(_i: int, block: nn.Module, inputs: BlockInputs) -> None:
        layers = find_prunable(block)
        stats = collect_input_stats(block, inputs, list(layers), hessian=False)
        flat = torch.cat([wanda_scores(weight_matrix(m), stats[n].sq_sum).flatten() for n, m in layers.items()])
        profile.append(torch.sort(flat / flat.mean()).values.to(torch.float16).cpu())

    walk_blocks(model, calib, torch.device(device), visit, desc="OWL outlier profile", progress=progress)
    return profile


def ratios_at(profile: list[torch.Tensor], m: float) -> list[float]:
    """Each block's outlier ratio at threshold ``m``: the fraction of its normalised scores above ``m``."""
    out = []
    for scores in profile:
        above = scores.numel() - torch.searchsorted(scores.float(), torch.tensor([m]), right=True).item()
        out.append(above / scores.numel())
    return out


def tune_owl(
    model: nn.Module,
    config: SearchConfig,
    calib: torch.Tensor,
    fitness_windows: torch.Tensor,
    work: str | Path,
    *,
    trials: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SearchReport:
    """Find the M and λ whose OWL allocation scores best in ``trials`` trials (default: ``config.trials``); on
    return the model holds it (from the database)."""
    if trials is not None and trials != config.trials:
        config = replace(config, trials=trials)
    with model_on(model, device):
        return _tune_owl(model, config, calib, fitness_windows, work, device=device, progress=progress)


def _tune_owl(
    model: nn.Module,
    config: SearchConfig,
    calib: torch.Tensor,
    fitness_windows: torch.Tensor,
    work: str | Path,
    *,
    device: str | torch.device,
    progress: bool,
) -> SearchReport:
    if config.kind != "sparsity":
        raise UserError("tuning OWL needs a sparsity budget (budget sparsity=F)")
    start = time.perf_counter()
    work = Path(work)
    cand = prepare(model, config, calib, fitness_windows, work, device=device, progress=progress)
    final = len(config.stage_windows) - 1
    profile = outlier_profile(model, calib, device, progress)
    block_of = [cand.db.block_of[u[0]] for u in cand.units]

    def allocation(m: float, lam: float) -> list[int]:
        blocks = owl_allocation(ratios_at(profile, m), config.target, lam).sparsities
        return cand.place([blocks[b] for b in block_of], "OWL")

    starts = {"uniform": cand.place([config.target] * len(cand.units), "uniform")}
    starts["owl"] = allocation(config.owl_m, config.owl_lambda)
    baselines = {name: cand.score(levels, final) for name, levels in starts.items()}
    study = _study(cand, work, lambda m, lam: cand.score(allocation(m, lam), final), progress)
    best = study.best_params
    levels = allocation(best["m"], best["lambda"])
    chosen = cand.assignment(levels)
    cand.db.apply(model, chosen)
    return SearchReport(
        config={**config.to_dict(), "tune": "owl", "trials": config.trials},
        levels=cand.levels,
        units=cand.units,
        allocation=[cand.levels[k] for k in levels],
        layer_levels={layer: cand.levels[k] for layer, k in chosen.items()},
        achieved=1.0 - cand.space.total(levels) / sum(cand.db.sizes.values()),
        fitness=study.best_value,
        baselines=baselines,
        baseline_allocations={name: [cand.levels[k] for k in lv] for name, lv in starts.items()},
        history=_history(study),
        wall_time_s=time.perf_counter() - start,
        tuned={"owl_m": best["m"], "owl_lambda": best["lambda"]},
    )


def _study(cand, work: Path, score, progress: bool):
    """The Optuna study of this search's key in ``work`` (resumed when it exists), run up to ``config.trials``
    complete trials; the first trial is OWL's default M and λ."""
    import optuna

    config = cand.config

    def objective(trial) -> float:
        return score(trial.suggest_float("m", *M_RANGE), trial.suggest_float("lambda", *LAMBDA_RANGE))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    study = optuna.create_study(
        study_name=hashlib.sha256(cand.key.encode()).hexdigest()[:16],
        storage=f"sqlite:///{work / 'optuna.db'}",
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=config.seed),
    )
    study.enqueue_trial({"m": config.owl_m, "lambda": config.owl_lambda}, skip_if_exists=True)
    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if done < config.trials:
        study.optimize(objective, n_trials=config.trials - done, show_progress_bar=progress)
    return study


def _history(study) -> list[dict]:
    """Every complete trial: its own fitness and the best so far (as a search's history is)."""
    import optuna

    history = [
        {"generation": t.number + 1, "fitness": t.value, "m": t.params["m"], "lambda": t.params["lambda"]}
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]
    running = float("inf")
    for h in history:
        running = min(running, h["fitness"])
        h["trial_fitness"], h["fitness"] = h["fitness"], running
    return history
