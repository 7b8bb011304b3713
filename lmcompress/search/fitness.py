"""Fitness of a compressed candidate (lower is better).

- ``kl``: KL divergence of its next-token distribution to the dense model's, ``KL(p‖q) = Σ_v p_v (log p_v −
  log q_v)`` per predicted token, averaged over tokens, with ``p`` the dense model and ``q`` the candidate. The
  dense log-probabilities are computed once and kept (fp16 to halve the memory; the sum is done in fp32).
- ``ppl``: the candidate's own mean negative log-likelihood of the windows' next tokens (log perplexity).

A :class:`PrefixCache` keeps the hidden states entering every block of one *base* candidate; a candidate that
differs from the base only from block ``b`` on is then scored by running blocks ``b…`` only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.models.families import get_blocks, skipped_blocks


@torch.no_grad()
def log_probs(model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu", batch_size: int = 4):
    """``log softmax(logits)`` of every position but the last, ``[n, seqlen − 1, vocab]``, fp32."""
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        out.append(F.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out)


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class PrefixCache:
    """The hidden states entering every block of ``model`` as it is now (the *base*), on ``windows``.

    :meth:`log_probs` of a model that equals the base in blocks ``< start`` runs the model's own forward with those
    blocks skipped and block ``start``'s input replaced by the cached one: the same log-probabilities at the cost of
    blocks ``start…`` only. Whether the model's forward reads a block's output as a tensor or as ``out[0]`` is
    found by checking the cached path against the full forward on window 0; where neither matches (a family whose
    forward does more between blocks), :attr:`usable` is False and callers run the full forward.
    Memory: ``blocks × windows × seqlen × hidden`` floats.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu") -> None:
        self.windows, self.device = windows, device
        blocks = get_blocks(model)
        self.hidden: list[list[torch.Tensor]] = [[] for _ in blocks]  # [block][window] → [1, seqlen, hidden]

        def keep(i: int):
            def hook(module, args, kwargs):
                self.hidden[i].append(_hidden_of(args, kwargs).detach().clone())

            return hook

        handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            full = log_probs(model, windows, device=device, batch_size=1)
        finally:
            for h in handles:
                h.remove()
        self.tuple_output: bool | None = None
        start = len(blocks) - 1
        for tuple_output in (False, True):
            self.tuple_output = tuple_output
            try:
                same = torch.allclose(self.log_probs(model, 0, start), full[0], rtol=1e-4, atol=1e-4)
            except Exception:  # a forward that cannot take a skipped block's output
                same = False
            if same:
                return
        self.tuple_output = None

    @property
    def usable(self) -> bool:
        return self.tuple_output is not None

    @torch.no_grad()
    def log_probs(self, model: nn.Module, i: int, start: int) -> torch.Tensor:
        """``log softmax`` of window ``i``'s logits, ``[seqlen − 1, vocab]``, running blocks ``start…`` only."""
        blocks = get_blocks(model)
        cached = self.hidden[start][i]

        def swap(module, args, kwargs):
            if args:
                return (cached.to(args[0].device), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached.to(kwargs["hidden_states"].device)}

        handle = blocks[start].register_forward_pre_hook(swap, with_kwargs=True)
        try:
            with skipped_blocks(blocks[:start], tuple_output=bool(self.tuple_output)):
                return log_probs(model, self.windows[i : i + 1], device=self.device)[0]
        finally:
            handle.remove()


def _forward(model: nn.Module, windows: torch.Tensor, device, prefix: PrefixCache | None, start: int) -> Callable:
    """Window index → the candidate's log-probabilities, through ``prefix`` where it holds the window."""

    def run(i: int) -> torch.Tensor:
        if prefix is not None and prefix.usable and start > 0 and i < len(prefix.hidden[0]):
            return prefix.log_probs(model, i, start)
        return log_probs(model, windows[i : i + 1], device=device)[0]

    return run


class KLFitness:
    """Mean per-token KL(dense ‖ candidate) on the first ``n`` of the held-out ``windows``."""

    def __init__(self, dense: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu") -> None:
        self.windows = windows
        self.device = device
        self.reference = log_probs(dense, windows, device=device).to(torch.float16)

    @torch.no_grad()
    def __call__(self, model: nn.Module, n: int | None = None, *, prefix: PrefixCache | None = None, start: int = 0):
        """``prefix``/``start``: the model equals ``prefix``'s base in blocks ``< start`` (see :class:`PrefixCache`)."""
        n = self.windows.shape[0] if n is None else min(n, self.windows.shape[0])
        forward = _forward(model, self.windows, self.device, prefix, start)
        total, tokens = 0.0, 0
        for i in range(n):
            q = forward(i)
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
    def __call__(self, model: nn.Module, n: int | None = None, *, prefix: PrefixCache | None = None, start: int = 0):
        n = self.windows.shape[0] if n is None else min(n, self.windows.shape[0])
        forward = _forward(model, self.windows, self.device, prefix, start)
        total, tokens = 0.0, 0
        for i in range(n):
            ids = self.windows[i : i + 1]
            q = forward(i)
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
