"""Expert importance in a mixture-of-experts layer, and which experts to keep.

Pure tensor functions over one MoE layer's calibration tokens. The criteria are the three one-shot
criteria compared in "Finding Fantastic Experts in MoEs" (Jaiswal et al., 2025):

* ``frequency``: the fraction of tokens whose top-k experts include the expert;
* ``router-weight``: the mean softmax probability the router gives the expert (over all tokens);
* ``reconstruction``: how much the layer's routed output changes, ``Σ ||y − y₋ₑ||²`` over the tokens, when
  the expert is removed (its router row dropped, so its tokens re-route to the next-best experts).

Routing follows the HF top-k routers: ``softmax`` over the experts still present, the top-k of it, then
(Mixtral always; Qwen-MoE and OLMoE when ``norm_topk_prob``) the k weights renormalized to sum to 1.
Removing an expert is the same as giving it a logit of −∞.
"""

from __future__ import annotations

import torch

CRITERIA = ("frequency", "router-weight", "reconstruction")


def routing_weights(
    logits: torch.Tensor, top_k: int, normalize: bool, alive: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense ``[tokens, experts]`` weights of the routed sum (zero outside each token's top-k).

    ``alive`` (bool ``[experts]``) marks the experts still present; the others cannot be chosen and take no
    softmax mass, exactly as if their router rows were deleted.
    """
    logits = logits.float()
    if alive is not None:
        if int(alive.sum()) < top_k:
            raise ValueError(f"top-k {top_k} needs at least {top_k} experts, only {int(alive.sum())} remain")
        logits = logits.masked_fill(~alive.to(logits.device), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    if normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, idx, top)


def moe_output(weights: torch.Tensor, expert_outputs: torch.Tensor) -> torch.Tensor:
    """The routed output ``Σₑ wₜₑ · expertₑ(xₜ)``: weights ``[tokens, E]``, outputs ``[E, tokens, hidden]``."""
    return torch.einsum("te,eth->th", weights.to(expert_outputs.dtype), expert_outputs)


def frequency_counts(logits: torch.Tensor, top_k: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """How many tokens route to each expert (``[E]``; divide by the token count for the frequency)."""
    logits = logits.float()
    if alive is not None:
        logits = logits.masked_fill(~alive.to(logits.device), float("-inf"))
    chosen = torch.topk(logits, top_k, dim=-1).indices  # top-k of the logits = top-k of the softmax
    return torch.bincount(chosen.flatten(), minlength=logits.shape[-1]).float()


def router_mass(logits: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax probability of each expert summed over the tokens (``[E]``; divide by tokens for the mean)."""
    logits = logits.float()
    if alive is not None:
        logits = logits.masked_fill(~alive.to(logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1).sum(0)


def reconstruction_errors(
    logits: torch.Tensor,
    expert_outputs: torch.Tensor,
    top_k: int,
    normalize: bool,
    alive: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σₜ ||y − y₋ₑ||²`` for each expert ``e`` (``[E]``; +inf for experts already removed).

    ``y`` is the routed output with the ``alive`` experts, ``y₋ₑ`` the same with ``e`` removed as well.
    ``expert_outputs`` ``[E, tokens, hidden]`` holds every expert's output on every token (dead ones unused).
    """
    n_experts = logits.shape[-1]
    alive = torch.ones(n_experts, dtype=torch.bool) if alive is None else alive.cpu()
    base = moe_output(routing_weights(logits, top_k, normalize, alive), expert_outputs)
    errors = torch.full((n_experts,), float("inf"))
    for e in torch.nonzero(alive).flatten().tolist():
        without = alive.clone()
        without[e] = False
        if int(without.sum()) < top_k:
            continue  # cannot be removed at all: stays +inf (must be kept)
        y = moe_output(routing_weights(logits, top_k, normalize, without), expert_outputs)
        errors[e] = (y - base).float().pow(2).sum().item()
    return errors


def select_keep(scores: torch.Tensor, keep: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the ``keep`` highest-scoring experts among the ``alive`` ones (ties: lower index)."""
    scores = scores.float().cpu().clone()
    if alive is not None:
        scores[~alive.cpu()] = float("-inf")
    available = int((scores > float("-inf")).sum())
    if not 0 < keep <= available:
        raise ValueError(f"cannot keep {keep} experts out of {available}")
    # stable sort on -score keeps the lower index first among equal scores
    order = torch.sort(-scores, stable=True).indices
    return torch.sort(order[:keep]).values
