"""Fitness of a compressed candidate (lower is better).

- ``kl``: KL divergence of its next-token distribution to the dense model's, ``KL(p‖q) = Σ_v p_v (log p_v −
  log q_v)`` per predicted token, averaged over tokens, with ``p`` the dense model and ``q`` the candidate.
  What is kept of the dense model is computed once (see :class:`KLFitness`).
- ``ppl``: the candidate's own mean negative log-likelihood of the windows' next tokens (log perplexity).

A :class:`PrefixCache` keeps the hidden states entering every block of one *base* candidate; a candidate that
differs from the base only from block ``b`` on is then scored by running blocks ``b…`` only. Scoring can also
record the hidden states the candidate computes (``capture``), so that it becomes the next base without another
forward (:meth:`PrefixCache.rebased`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.models.families import get_blocks, skipped_blocks


@torch.no_grad()
def logits(model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu", batch_size: int = 4):
    """The logits of every position but the last, ``[n, seqlen − 1, vocab]``, fp32, on ``device`` (the model must
    be there)."""
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        out.append(model(ids, use_cache=False).logits[:, :-1].float())
    return torch.cat(out)


def log_probs(model: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu", batch_size: int = 4):
    """``log softmax(logits)`` of every position but the last, ``[n, seqlen − 1, vocab]``, fp32, on ``device``."""
    return F.log_softmax(logits(model, windows, device=device, batch_size=batch_size), dim=-1)


def logsumexp(x: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """``log Σ_v exp x[t, v]`` of each row of ``x`` ``[tokens, vocab]``. On a CPU the rows are taken ``chunk`` at a
    time, so that each chunk stays in cache between its passes (about 2× faster than one call over 50k-word rows)."""
    if x.device.type != "cpu":
        return torch.logsumexp(x, dim=-1)
    return torch.cat([torch.logsumexp(x[a : a + chunk], dim=-1) for a in range(0, x.shape[0], chunk)])


@contextmanager
def head_inputs(model: nn.Module, sink: list | None) -> Iterator[None]:
    """While open, every input of the output head (``get_output_embeddings()``) is appended to ``sink`` (when not
    None): the last hidden states ``h`` from which the logits are computed."""
    head = model.get_output_embeddings() if sink is not None else None
    handle = head.register_forward_hook(lambda m, args, out: sink.append(args[0].detach())) if head else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


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
            first = logits(model, windows[:1], device=device)[0]
            if max_bytes is not None:
                per_window = sum(h[0].numel() * h[0].element_size() for h in self.hidden)
                kept = max(1, min(kept, max_bytes // max(per_window, 1)))
            for i in range(1, kept):
                logits(model, windows[i : i + 1], device=device)
        finally:
            for h in handles:
                h.remove()
        self.tuple_output: bool | None = None
        start = len(blocks) - 1
        for tuple_output in (False, True):
            self.tuple_output = tuple_output
            try:
                same = torch.allclose(self.logits(model, 0, start), first, rtol=1e-4, atol=1e-4)
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

    def log_probs(
        self, model: nn.Module, i: int, start: int, capture: list[list[torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """``log softmax`` of :meth:`logits`."""
        return F.log_softmax(self.logits(model, i, start, capture), dim=-1)

    @torch.no_grad()
    def logits(
        self, model: nn.Module, i: int, start: int, capture: list[list[torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Window ``i``'s logits, ``[seqlen − 1, vocab]``, running blocks ``start…`` only.

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
                out = logits(model, self.windows[i : i + 1], device=self.device)[0]
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
    model: nn.Module,
    windows: torch.Tensor,
    device,
    prefix: PrefixCache | None,
    start: int,
    capture: list | None,
    hidden: bool,
) -> Callable:
    """Window index → the candidate's logits ``[seqlen − 1, vocab]`` and, with ``hidden``, the head's inputs
    ``[seqlen − 1, d]`` (else None), through ``prefix`` where it holds the window."""

    def run(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        sink: list | None = [] if hidden else None
        with head_inputs(model, sink):
            if prefix is not None and prefix.usable and i < prefix.cached:
                out = prefix.logits(model, i, start, capture)
            else:
                out = logits(model, windows[i : i + 1], device=device)[0]
        return out, (sink[-1][0, :-1].float() if sink else None)

    return run


class _WindowFitness:
    """A per-token mean over the first ``n`` of ``windows``, from each window's logits."""

    hidden = False  # whether window_sum needs the head's inputs

    def __init__(self, windows: torch.Tensor, *, device: str | torch.device = "cpu") -> None:
        self.windows = windows
        self.device = device

    def window_sum(self, i: int, logits: torch.Tensor, hidden: torch.Tensor | None) -> float:
        """The sum over window ``i``'s predicted tokens, from its logits (and the head's inputs)."""
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
        forward = _forward(model, self.windows, self.device, prefix, start, capture, self.hidden)
        total, tokens = 0.0, 0
        for i in range(n):
            out, h = forward(i)
            total += self.window_sum(i, out, h)
            tokens += out.shape[0]
        return total / max(tokens, 1)


def _head_output_is_logits(model: nn.Module, window: torch.Tensor, device) -> bool:
    """True when ``model`` returns its head's output as the logits unchanged: no scaling or capping after the head
    (Gemma 2's ``tanh`` soft cap, Cohere's logit scale). Checked by blowing the head's output up to about ±1000,
    beyond any cap, and comparing what comes out of the model."""
    seen: list[torch.Tensor] = []

    def blow_up(module, args, out):
        seen.append(out * (1e3 / out.abs().amax().clamp_min(1e-6)))
        return seen[-1]

    handle = model.get_output_embeddings().register_forward_hook(blow_up)
    try:
        out = logits(model, window, device=device)[0]
    finally:
        handle.remove()
    return torch.allclose(out, seen[-1][0, :-1].float(), rtol=1e-5, atol=1e-3)


class KLFitness(_WindowFitness):
    """Mean per-token KL(dense ‖ candidate) on the first ``n`` of the held-out ``windows``.

    With ``ℓ`` the candidate's logits of a token, ``KL = Σ_v p_v log p_v − Σ_v p_v ℓ_v + log Σ_v exp ℓ_v``. When
    the head is linear, ``ℓ = W h + b`` (checked on the first window, and that nothing scales or caps the head's
    output after it), the middle term is ``h · (Wᵀ p) + p · b``, so the dense model is kept as
    ``c = Σ_v p_v log p_v``, ``m = Wᵀ p`` and ``p · b`` per token: ``tokens × hidden`` floats instead of
    ``tokens × vocab`` (32 windows of 256 tokens of SmolLM2, in float64: 38 MB instead of 0.8 GB), and a
    candidate costs its log-sum-exp and a dot product on top of its logits. The head is the dense model's in
    every candidate (a search never compresses it). Otherwise the dense log-probabilities are kept in fp16 on
    ``device``, where the candidate's are computed; so too with ``head_changes`` (a size search gives the head
    levels of its own)."""

    def __init__(
        self, dense: nn.Module, windows: torch.Tensor, *, device: str | torch.device = "cpu", head_changes: bool = False
    ) -> None:
        super().__init__(windows, device=device)
        head = dense.get_output_embeddings() if hasattr(dense, "get_output_embeddings") else None
        weight = getattr(head, "weight", None) if isinstance(head, nn.Linear) and not head_changes else None
        self.hidden = weight is not None
        self.head_weight = weight  # the dense head's parameter, which every candidate must share (or equal)
        self.reference: torch.Tensor | None = None  # fp16 log p, [n, seqlen − 1, vocab], without a linear head
        self.entropy, self.mix, self.bias_term = [], [], []  # per window: c [T], m [T, d], p·b [T]
        forward = _forward(dense, windows, device, None, 0, None, self.hidden)
        for i in range(windows.shape[0]):
            out, h = forward(i)
            if self.hidden and i == 0:
                bias = head.bias.float() if head.bias is not None else 0.0
                linear = torch.allclose(h @ weight.float().t() + bias, out, rtol=1e-4, atol=1e-4)
                self.hidden = linear and _head_output_is_logits(dense, windows[:1], device)
            if not self.hidden:
                self.reference = torch.cat([log_probs(dense, windows[a : a + 4], device=device).half()
                                            for a in range(0, windows.shape[0], 4)])  # fmt: skip
                break
            # in float64: m is a sum over the vocabulary, and an error in it is multiplied by the (outlier-sized)
            # entries of h; in float32 it put the dense model's KL to itself at −2·10⁻⁴ on SmolLM2
            logp = F.log_softmax(out.double(), dim=-1)
            prob = logp.exp()
            self.entropy.append((prob * logp).sum(-1))
            self.mix.append(prob @ weight.double())
            bias_term = prob @ head.bias.double() if head.bias is not None else torch.zeros_like(prob[:, 0])
            self.bias_term.append(bias_term)

    def __call__(self, model: nn.Module, n: int | None = None, **kwargs) -> float:
        if self.reference is None:
            weight = model.get_output_embeddings().weight
            if weight is not self.head_weight and not torch.equal(weight, self.head_weight.to(weight.device)):
                raise ValueError(
                    "the candidate's output head differs from the dense model's: KLFitness reads the candidates' "
                    "logits through the dense head (a search never compresses it)"
                )
        return super().__call__(model, n, **kwargs)

    def window_sum(self, i: int, logits: torch.Tensor, hidden: torch.Tensor | None) -> float:
        if self.reference is not None:
            p = self.reference[i].float()
            return (p.exp() * (p - F.log_softmax(logits, dim=-1))).sum().item()
        cross = (hidden.double() * self.mix[i]).sum(-1) + self.bias_term[i]
        return (self.entropy[i] - cross + logsumexp(logits)).sum().item()


class NLLFitness(_WindowFitness):
    """Mean per-token negative log-likelihood of the first ``n`` ``windows`` (log of their perplexity):
    ``log Σ_v exp ℓ_v − ℓ_next`` per token."""

    def window_sum(self, i: int, logits: torch.Tensor, hidden: torch.Tensor | None) -> float:
        ids = self.windows[i, 1:].to(logits.device)
        return (logsumexp(logits) - logits.gather(1, ids.unsqueeze(1)).squeeze(1)).sum().item()


def make_fitness(
    kind: str,
    dense: nn.Module,
    windows: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    head_changes: bool = False,
):
    """The fitness called ``kind`` (``kl`` or ``ppl``) on ``windows``; ``head_changes``: candidates may change
    the output head."""
    if kind == "kl":
        return KLFitness(dense, windows, device=device, head_changes=head_changes)
    if kind == "ppl":
        return NLLFitness(windows, device=device)
    raise ValueError(f"unknown fitness {kind!r}")
