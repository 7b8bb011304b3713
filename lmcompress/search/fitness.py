"""Fitness of a compressed candidate (lower is better).

- ``kl``: KL divergence of its next-token distribution to the dense model's, ``KL(p‖q) = Σ_v p_v (log p_v −
  log q_v)`` per predicted token, averaged over tokens, with ``p`` the dense model and ``q`` the candidate. The
  dense log-probabilities are computed once and kept (fp16 to halve the memory; the sum is done in fp32).
- ``ppl``: the candidate's own mean negative log-likelihood of the windows' next tokens (log perplexity).

A :class:`PrefixCache` keeps the hidden states entering every block of one *base* candidate; a candidate that
differs from the base only from block ``b`` on is then scored by running blocks ``b…`` only. Scoring can also
record the hidden states the candidate computes (``capture``), so that it becomes the next base without another
forward (:meth:`PrefixCache.rebased`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.models.families import get_blocks, skipped_blocks


@torch.no_grad()
def log_probs(model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu", batch_size: int = 4):
    """``log softmax(logits)`` of every position but the last, ``[n, seqlen − 1, vocab]``, fp32, on ``device``
    (the model must be there)."""
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        out.append(F.log_softmax(logits, dim=-1))
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
    Memory: ``blocks × windows × seqlen × hidden`` floats; with ``max_bytes`` only the first windows that fit
    are kept (at least one), and the others are scored by the full forward.
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        *,
        device: str | torch.device = "cpu",
        max_bytes: int | None = None,
    ) -> None:
        self.windows, self.device = windows, device
        blocks = get_blocks(model)
        self.hidden: list[list[torch.Tensor]] = [[] for _ in blocks]  # [block][window] → [1, seqlen, hidden]

        def keep(i: int):
            def hook(module, args, kwargs):
                self.hidden[i].append(_hidden_of(args, kwargs).detach().clone())

            return hook

        handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(blocks)]
        kept = windows.shape[0]
        try:
            first = log_probs(model, windows[:1], device=device)[0]
            if max_bytes is not None:
                per_window = sum(h[0].numel() * h[0].element_size() for h in self.hidden)
                kept = max(1, min(kept, max_bytes // max(per_window, 1)))
            for i in range(1, kept):
                log_probs(model, windows[i : i + 1], device=device)
        finally:
            for h in handles:
                h.remove()
        self.tuple_output: bool | None = None
        start = len(blocks) - 1
        for tuple_output in (False, True):
            self.tuple_output = tuple_output
            try:
                same = torch.allclose(self.log_probs(model, 0, start), first, rtol=1e-4, atol=1e-4)
            except Exception:  # a forward that cannot take a skipped block's output
                same = False
            if same:
                return
        self.tuple_output = None

    @property
    def usable(self) -> bool:
        return self.tuple_output is not None

    @property
    def cached(self) -> int:
        """How many of the windows are cached (the first ones)."""
        return len(self.hidden[-1])

    @torch.no_grad()
    def log_probs(
        self, model: nn.Module, i: int, start: int, capture: list[list[torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """``log softmax`` of window ``i``'s logits, ``[seqlen − 1, vocab]``, running blocks ``start…`` only.

        ``capture``: a list to which the hidden states entering blocks ``start+1…`` are appended (one list per
        window), for :meth:`rebased`.
        """
        blocks = get_blocks(model)
        cached = self.hidden[start][i]

        def swap(module, args, kwargs):
            if args:
                return (cached.to(args[0].device), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached.to(kwargs["hidden_states"].device)}

        row: list[torch.Tensor] = []

        def keep(module, args, kwargs):
            row.append(_hidden_of(args, kwargs).detach().clone())

        handles = [blocks[start].register_forward_pre_hook(swap, with_kwargs=True)]
        if capture is not None:
            handles += [b.register_forward_pre_hook(keep, with_kwargs=True) for b in blocks[start + 1 :]]
        try:
            with skipped_blocks(blocks[:start], tuple_output=bool(self.tuple_output)):
                out = log_probs(model, self.windows[i : i + 1], device=self.device)[0]
        finally:
            for h in handles:
                h.remove()
        if capture is not None:
            capture.append(row)
        return out

    def rebased(self, start: int, captured: list[list[torch.Tensor]]) -> PrefixCache:
        """The cache of a candidate that equals this base before block ``start`` and whose hidden states entering
        blocks ``start+1…`` were captured on every cached window (``log_probs(…, start, capture=captured)``)."""
        if len(captured) != self.cached or any(len(row) != len(self.hidden) - start - 1 for row in captured):
            raise ValueError("the capture does not cover every cached window from block start + 1 on")
        new = copy.copy(self)
        new.hidden = [list(h) for h in self.hidden[: start + 1]]
        new.hidden += [[row[b] for row in captured] for b in range(len(self.hidden) - start - 1)]
        return new


def _forward(
    model: nn.Module, windows: torch.Tensor, device, prefix: PrefixCache | None, start: int, capture: list | None
) -> Callable:
    """Window index → the candidate's log-probabilities, through ``prefix`` where it holds the window."""

    def run(i: int) -> torch.Tensor:
        if prefix is not None and prefix.usable and i < prefix.cached:
            return prefix.log_probs(model, i, start, capture)
        return log_probs(model, windows[i : i + 1], device=device)[0]

    return run


class _WindowFitness:
    """A per-token mean over the first ``n`` of ``windows``, from each window's log-probabilities."""

    def __init__(self, windows: torch.Tensor, *, device: str | torch.device = "cpu") -> None:
        self.windows = windows
        self.device = device

    def window_sum(self, i: int, q: torch.Tensor) -> float:
        """The sum over window ``i``'s predicted tokens, from its log-probabilities ``q``."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        n: int | None = None,
        *,
        prefix: PrefixCache | None = None,
        start: int = 0,
        capture: list | None = None,
    ) -> float:
        """``prefix``/``start``: the model equals ``prefix``'s base in blocks ``< start``; ``capture`` collects its
        hidden states for :meth:`PrefixCache.rebased` (see :class:`PrefixCache`)."""
        n = self.windows.shape[0] if n is None else min(n, self.windows.shape[0])
        forward = _forward(model, self.windows, self.device, prefix, start, capture)
        total, tokens = 0.0, 0
        for i in range(n):
            q = forward(i)
            total += self.window_sum(i, q)
            tokens += q.shape[0]
        return total / max(tokens, 1)


class KLFitness(_WindowFitness):
    """Mean per-token KL(dense ‖ candidate) on the first ``n`` of the held-out ``windows``.

    The dense log-probabilities are kept in fp16 on ``device`` (``windows × seqlen × vocab`` halves), where the
    candidate's are computed."""

    def __init__(self, dense: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu") -> None:
        super().__init__(windows, device=device)
        self.reference = torch.cat(
            [log_probs(dense, windows[i : i + 4], device=device).half() for i in range(0, windows.shape[0], 4)]
        )

    def window_sum(self, i: int, q: torch.Tensor) -> float:
        p = self.reference[i].float()
        return (p.exp() * (p - q)).sum().item()


class NLLFitness(_WindowFitness):
    """Mean per-token negative log-likelihood of the first ``n`` ``windows`` (log of their perplexity)."""

    def window_sum(self, i: int, q: torch.Tensor) -> float:
        ids = self.windows[i, 1:].to(q.device)
        return -q.gather(1, ids.unsqueeze(1)).sum().item()


def make_fitness(kind: str, dense: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu"):
    """The fitness called ``kind`` (``kl`` or ``ppl``) on ``windows``."""
    if kind == "kl":
        return KLFitness(dense, windows, device=device)
    if kind == "ppl":
        return NLLFitness(windows, device=device)
    raise ValueError(f"unknown fitness {kind!r}")
