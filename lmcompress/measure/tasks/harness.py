"""Hand an in-memory (possibly compressed) model to lm-evaluation-harness and fold its numbers into ours.

lmcompress does not re-implement the harness's task zoo: ``--harness arc_easy,hellaswag`` runs those tasks
through ``lm_eval.simple_evaluate`` with the HFLM wrapper around the model object itself, so what is
measured is exactly the model in memory (no save/reload).
"""

from __future__ import annotations

import logging

from torch import nn

from lmcompress.errors import UserError

log = logging.getLogger(__name__)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError(
            "harness needs lm-evaluation-harness, which is not installed: pip install lm-eval "
            '(or pip install -e ".[harness]")',
            param="harness",
        ) from None
    return lm_eval, HFLM


def fold_results(raw: dict) -> tuple[dict[str, dict[str, float]], dict[str, bool]]:
    """``simple_evaluate``'s output as ``{task: {metric: value}}`` and ``{"task/metric": higher_is_better}``.

    The harness keys metrics as ``"acc,none"`` (metric, filter); the filter is kept only when it is not
    ``none`` (``"exact_match[strict-match]"``). Non-numeric entries (aliases) are dropped.
    """
    results: dict[str, dict[str, float]] = {}
    directions: dict[str, bool] = {}
    hib = raw.get("higher_is_better", {})
    for task, metrics in raw.get("results", {}).items():
        out: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}[{filt}]"
            out[name] = float(value)
            if not metric.endswith("_stderr") and metric != "sample_len":  # sample_len counts, it does not score
                directions[f"{task}/{name}"] = bool(hib.get(task, {}).get(metric, True))
        results[task] = out
    return results, directions


def run_harness(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict:
    """Run lm-evaluation-harness ``tasks`` on ``model``; ``{"results", "higher_is_better", "version"}``."""
    if not tasks:
        raise UserError("harness needs at least one lm-evaluation-harness task name", param="harness")
    lm_eval, HFLM = _import_lm_eval()
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        raw = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), num_fewshot=shots, limit=limit)
    except (KeyError, ValueError) as exc:  # unknown task names and similar
        raise UserError(f"lm-evaluation-harness could not run {', '.join(tasks)}: {exc}") from None
    results, directions = fold_results(raw or {})
    return {
        "results": results,
        "higher_is_better": directions,
        "version": getattr(lm_eval, "__version__", "unknown"),
        "shots": shots,
        "limit": limit,
    }
