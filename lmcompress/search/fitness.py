"""Fitness of a compressed candidate (lower is better).

- ``kl``: KL divergence of its next-token distribution to the dense model's, ``KL(p‖q) = Σ_v p_v (log p_v −
  log q_v)`` per predicted token, averaged over tokens, with ``p`` the dense model and ``q`` the candidate. The
  dense log-probabilities are computed once and kept (fp16 to halve the memory; the sum is done in fp32).
- ``ppl``: the candidate's own mean negative log-likelihood of the windows' next tokens (log perplexity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def log_probs(model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu", batch_size: int = 4):
    """``log softmax(logits)`` of every position but the last, ``[n, seqlen − 1, vocab]``, fp32."""
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        out.append(F.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out)


class KLFitness:
    """Mean per-token KL(dense ‖ candidate) on the first ``n`` of the held-out ``windows``."""

    def __init__(self, dense: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu") -> None:
        self.windows = windows
        self.device = device
        self.reference = log_probs(dense, windows, device=device).to(torch.float16)

    @torch.no_grad()
    def __call__(self, model: nn.Module, n: int | None = None) -> float:
        n = self.windows.shape[0] if n is None else min(n, self.windows.shape[0])
        total, tokens = 0.0, 0
        for i in range(n):
            q = log_probs(model, self.windows[i : i + 1], device=self.device)[0]
            p = self.reference[i].float()
            total += (p.exp() * (p - q)).sum().item()
            tokens += p.shape[0]
        return total / max(tokens, 1)


class NLLFitness:
    """Mean per-token negative log-likelihood of the first ``n`` ``windows`` (log of their perplexity)."""

    def __init__(self, windows: torch.Tensor, *, device: str | torch.device = "cpu") -> None:
        self.windows = windows
        self.device = device

    @torch.no_grad()
    def __call__(self, model: nn.Module, n: int | None = None) -> float:
        n = self.windows.shape[0] if n is None else min(n, self.windows.shape[0])
        total, tokens = 0.0, 0
        for i in range(n):
            ids = self.windows[i : i + 1]
            q = log_probs(model, ids, device=self.device)[0]
            total -= q.gather(1, ids[0, 1:].unsqueeze(1)).sum().item()
            tokens += q.shape[0]
        return total / max(tokens, 1)


def make_fitness(kind: str, dense: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu"):
    """The fitness called ``kind`` (``kl`` or ``ppl``) on ``windows``."""
    if kind == "kl":
        return KLFitness(dense, windows, device=device)
    if kind == "ppl":
        return NLLFitness(windows, device=device)
    raise ValueError(f"unknown fitness {kind!r}")
