"""Perplexity, measured the way the SparseGPT/Wanda papers do: non-overlapping windows, mean token NLL, with a
95% interval over windows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmcompress.errors import UserError
from lmcompress.measure.intervals import exp_interval, mean_interval

_NONFINITE_HINT = (
    "the model is numerically broken (damaged weights, or an overflow in float16/bfloat16: try dtype float32)"
)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # number of predicted tokens
    seqlen: int
    windows: int
    window_nll: list[float] = field(default_factory=list)  # mean NLL of each window, in order
    perplexity_ci: tuple[float, float] | None = None  # 95% interval (see perplexity_interval); None: one window


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    batch_size: int = 8,
) -> PerplexityResult:
    """exp(mean NLL) over every predicted token of ``windows`` ``[n, seqlen]``; each window is independent.

    Windows are run ``batch_size`` at a time (they have no padding, so batching does not change the result).
    Non-finite logits or loss are an error (naming the window), never a perplexity of NaN.
    ``perplexity_ci``: :func:`perplexity_interval` of the per-window NLLs. A model inside
    ``lmcompress.kv_cache.attach`` streams each window through its compressed KV cache (``window_nll``).
    """
    from lmcompress.kv_cache import ATTR, window_nll

    kv = getattr(model, ATTR, None)
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise UserError(
            f"perplexity needs windows of at least 2 tokens (one to predict from, one predicted), got "
            f"{list(windows.shape)}; use a larger seqlen"
        )
    model.eval()
    device = torch.device(device)
    home = next(model.parameters()).device
    model.to(device)
    total, count = 0.0, 0
    per_window: list[float] = []
    try:
        bar = tqdm(total=windows.shape[0], desc="perplexity", disable=not progress, unit="window")
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            where = f"windows {start}..{start + ids.shape[0] - 1}"
            if kv is not None:
                token_nll = window_nll(model, ids, kv).flatten()
            else:
                logits = model(ids, use_cache=False).logits.float()
                if not bool(torch.isfinite(logits).all()):
                    raise UserError(f"the model's logits are NaN or infinite on {where}: {_NONFINITE_HINT}")
                token_nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            nll = token_nll.sum()
            if not math.isfinite(nll.item()):
                raise UserError(f"the loss is NaN or infinite on {where}: {_NONFINITE_HINT}")
            total += nll.item()
            per_window += token_nll.view(ids.shape[0], -1).mean(1).tolist()
            count += ids[:, 1:].numel()
            bar.update(ids.shape[0])
        bar.close()
    finally:
        model.to(home)
    mean = total / count
    ci = perplexity_interval(per_window)
    return PerplexityResult(math.exp(mean), mean, count, windows.shape[1], windows.shape[0], per_window, ci)


def perplexity_interval(window_nll: list[float]) -> tuple[float, float] | None:
    """95% interval of the perplexity from the mean NLL of each (equal-length) window: the Student-t interval
    of the mean of the window NLLs (windows as the sample; their mean is the mean token NLL), then ``exp`` of
    both ends. ``None`` for a single window (no spread to estimate)."""
    return exp_interval(mean_interval(window_nll))


def check_confidence(confidence: float) -> None:
    """Refuse a confidence outside ``[0.5, 1)``."""
    if not 0.5 <= confidence < 1:
        raise UserError(f"the confidence must be in [0.5, 1) (0.5: the point estimate), got {confidence}")


def increase_upper_bound(nll: list[float], reference_nll: list[float], confidence: float) -> float:
    """One-sided upper confidence bound of the perplexity increase ``ppl / ppl_ref − 1`` on the same windows.

    With equal-length windows, ``log(ppl / ppl_ref) = mean_i d_i``, ``d_i = nll_i − ref_i`` (per-window mean NLLs).
    Treating the windows as a sample, the bound is ``exp(mean d + z · sd(d) / √n) − 1`` with ``z`` the normal
    quantile at ``confidence`` (0.5 gives the point estimate; one window has no spread, so it gives that too).
    """
    if len(nll) != len(reference_nll) or not nll:
        raise ValueError("need the same, non-empty windows for both models")
    check_confidence(confidence)
    d = [a - b for a, b in zip(nll, reference_nll, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    return math.exp(mean + NormalDist().inv_cdf(confidence) * sd / math.sqrt(n)) - 1


def ratio_interval(nll: list[float], reference_nll: list[float]) -> tuple[float, float, float] | None:
    """``ppl / ppl_ref`` on the same equal-length windows and its two-sided 95% interval: the Student-t interval
    of the mean per-window difference ``d_i = nll_i − ref_i`` (paired, so the windows' shared difficulty cancels),
    then ``exp``. ``(ratio, low, high)``; ``None`` for fewer than two windows."""
    if len(nll) != len(reference_nll):
        raise ValueError("need the same windows for both models")
    d = [a - b for a, b in zip(nll, reference_nll, strict=True)]
    interval = exp_interval(mean_interval(d))
    return None if interval is None else (math.exp(sum(d) / len(d)), *interval)
