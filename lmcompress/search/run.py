"""The search's driver: one call that runs what a :class:`SearchConfig` asks for (per-unit levels under a budget,
the largest sparsity within a loss, or tuned OWL), and the names the rest of lmcompress imports from here.

The search lives in the files beside this one: level grids (``levels``), the config and report (``config``), the
work folder's state files (``state``) and keys (``keys``), candidate scoring (``score``), the evolutionary loop
(``loop``), the max-loss bisection (``max_loss``), OWL tuning (``tune``) and the whole job's work folder
(``work``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmcompress.checkpoint.allocation import read_layer_levels
from lmcompress.errors import UserError
from lmcompress.search import latency
from lmcompress.search.config import SearchConfig, SearchReport
from lmcompress.search.levels import parse_levels
from lmcompress.search.loop import check_start, model_on, search
from lmcompress.search.max_loss import search_max_loss
from lmcompress.search.score import prepare
from lmcompress.search.tune import tune_owl

__all__ = [
    "SearchConfig",
    "SearchReport",
    "check_start",
    "model_on",
    "parse_levels",
    "prepare",
    "read_start",
    "run_search",
    "search",
    "search_max_loss",
]


def run_search(
    model: nn.Module,
    config: SearchConfig,
    calib: torch.Tensor,
    fitness_windows: torch.Tensor,
    work: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SearchReport:
    """What ``config`` asks for: tuned OWL (``tune``), the largest sparsity within ``max_loss``, or per-unit levels
    at ``target``. On return the model holds the chosen allocation."""
    if config.tune == "owl":
        return tune_owl(model, config, calib, fitness_windows, work, device=device, progress=progress)
    if config.max_loss is not None:
        return search_max_loss(model, config, calib, fitness_windows, work, device=device, progress=progress)
    if config.decode is None:
        return search(model, config, calib, fitness_windows, work, device=device, progress=progress)
    return _decode_search(model, config, calib, fitness_windows, work, device=device, progress=progress)


def _decode_search(model, config, calib, fitness_windows, work, *, device, progress) -> SearchReport:
    """:func:`search` under a decode budget: the latency table built (or read) and the budget checked before the
    level database is; the report's ``decode`` says what the chosen model is predicted to take per token."""
    if torch.device(device).type != "cpu":
        raise UserError(
            f"a decode budget is timed with lmcompress's CPU kernels on this machine, not on {device}: search with "
            "--device cpu"
        )
    costs = latency.costs_of(model, config)
    latency.check_budget(costs)
    report = search(model, config, calib, fitness_windows, work, device=device, progress=progress)
    index = {label: k for k, label in enumerate(costs.labels)}
    report.decode = costs.describe({layer: index[label] for layer, label in report.layer_levels.items()})
    for key in ("budget", "predicted", "fixed"):  # the space counted nanoseconds there, not bytes
        (report.size or {}).pop(key, None)
    report.achieved = report.decode["predicted_s"]
    return report


def read_start(path: str | Path, kind: str) -> dict[str, float]:
    """Per-layer levels to start a search from: an earlier search's ``search.json`` (or its output folder) of the
    same kind, or a JSON object ``{"layer name": level, ...}``."""
    return read_layer_levels(path, kind, what="start", hint="; give a search of the same budget kind")
