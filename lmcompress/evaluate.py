"""Perplexity, measured the way the SparseGPT/Wanda papers do: non-overlapping windows, mean token NLL."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # number of predicted tokens
    seqlen: int
    windows: int


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu", progress: bool = True
) -> PerplexityResult:
    """exp(mean NLL) over every predicted token of ``windows`` ``[n, seqlen]``; each window is independent."""
    model.eval()
    device = torch.device(device)
    home = next(model.parameters()).device
    model.to(device)
    total, count = 0.0, 0
    try:
        for row in tqdm(windows, desc="perplexity", disable=not progress, unit="window"):
            ids = row.unsqueeze(0).to(device)
            logits = model(ids, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total += nll.item()
            count += ids.shape[1] - 1
    finally:
        model.to(home)
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, windows.shape[1], windows.shape[0])
