"""The largest average sparsity within a perplexity loss: bisection over the level grid, a search at each step."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lmcompress.errors import UserError
from lmcompress.measure.perplexity import PerplexityResult, increase_upper_bound, perplexity
from lmcompress.search.config import SearchConfig, SearchReport
from lmcompress.search.loop import search


def search_max_loss(
    model: nn.Module,
    config: SearchConfig,
    calib: torch.Tensor,
    fitness_windows: torch.Tensor,
    work: str | Path,
    *,
    max_loss: float | None = None,
    confidence: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SearchReport:
    """The largest average sparsity on the level grid whose searched model stays within ``config.max_loss``
    perplexity (``max_loss`` and ``confidence``, if given, replace the config's ``max_loss`` and
    ``max_loss_confidence``); ``config.target`` is not used.

    Bisection over the budget: at each tried sparsity a search (``config.generations`` generations) finds the
    best allocation, and its perplexity on the held-out windows is compared with the dense model's on the same
    windows: a sparsity passes when the upper bound of the increase at the confidence (over the windows, see
    :func:`increase_upper_bound`; 0.5: the point estimate) is within the loss. The quality is assumed to fall
    as sparsity grows. Every step shares one level database and keeps its own search state, so a killed run
    resumes. The report's ``bisection`` lists every step.
    """
    if max_loss is not None or confidence is not None:
        loss = config.max_loss if max_loss is None else max_loss
        sure = config.max_loss_confidence if confidence is None else confidence
        config = replace(config, max_loss=loss, max_loss_confidence=sure)
    if config.max_loss is None:
        raise UserError("a max-loss search needs the allowed loss: give max_loss (0.05 = +5% perplexity)")
    levels = config.validate()
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense = perplexity(model, fitness_windows, device=device, progress=False)
    bisect = _Bisection(model, config, calib, fitness_windows, Path(work), dense, device, progress)
    lo, hi = -1, len(levels)  # levels[lo] is known to pass (−1: dense), levels[hi] to fail (len: beyond the grid)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        model.load_state_dict(dense_state)
        if bisect.step(levels[mid]):
            lo = mid
        else:
            hi = mid
    model.load_state_dict(dense_state)
    if bisect.best is None:
        raise bisect.nothing_passes(levels[0])
    final = search(model, replace(config, target=bisect.best.config["target"]), calib, fitness_windows, work,
                   device=device, progress=False)  # fmt: skip  # resumes from its finished state: the same allocation
    final.bisection = bisect.steps
    return final


class _Bisection:
    """One search per tried sparsity, its perplexity against the dense model's, and the best passing report."""

    def __init__(self, model, config: SearchConfig, calib, fitness_windows, work: Path, dense: PerplexityResult,
                 device, progress: bool) -> None:  # fmt: skip
        self.model, self.config, self.calib, self.fitness_windows, self.work = (
            model,
            config,
            calib,
            fitness_windows,
            work,
        )
        self.dense, self.device, self.progress = dense, device, progress
        self.steps: list[dict] = []
        self.best: SearchReport | None = None

    def step(self, sparsity: float) -> bool:
        """Search at ``sparsity`` and say whether it stays within the loss (the model then holds its allocation)."""
        config, confidence = self.config, self.config.max_loss_confidence
        report = search(self.model, replace(config, target=sparsity), self.calib, self.fitness_windows, self.work,
                        device=self.device, progress=self.progress)  # fmt: skip
        result = perplexity(self.model, self.fitness_windows, device=self.device, progress=False)
        upper = increase_upper_bound(result.window_nll, self.dense.window_nll, confidence)
        ok = upper <= config.max_loss
        self.steps.append(
            {
                "sparsity": sparsity,
                "perplexity": result.perplexity,
                "dense_perplexity": self.dense.perplexity,
                "increase": result.perplexity / self.dense.perplexity - 1,
                "upper_bound": upper,
                "confidence": confidence,
                "within": ok,
            }
        )
        # sequential databases differ per budget: keep only the one the final model needs (dense ones are shared)
        if ok:
            old, self.best = self.best, report
            if old is not None and old.database != report.database:
                shutil.rmtree(old.database, ignore_errors=True)
        elif self.best is None or self.best.database != report.database:
            shutil.rmtree(report.database, ignore_errors=True)
        return ok

    def nothing_passes(self, lowest: float) -> UserError:
        last, loss = self.steps[-1], self.config.max_loss
        return UserError(
            f"even the lowest level ({lowest:g}) may cost more than +{loss:.1%} perplexity "
            f"({last['perplexity']:.3g} against dense {self.dense.perplexity:.3g}, up to "
            f"+{last['upper_bound']:.1%} at confidence {self.config.max_loss_confidence:g}); allow more loss, a lower "
            "confidence or add lower levels"
        )
