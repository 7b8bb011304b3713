"""Agreement of a compressed model with its dense reference on the same token windows (what llama.cpp's
``perplexity --kl-divergence`` reports).

At every predicted position ``t`` of every window (the next token after ``t``), with ``p`` the reference's
next-token distribution and ``q`` the model's:

- ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` in nats: its mean, median and 99th percentile over all positions;
- top-1 agreement: the share of positions where both models' most likely token is the same;
- ``Δp = q(y) − p(y)``, the change in the probability of the token ``y`` that actually follows: its mean.

Memory is bounded: ``batch_size`` windows at a time go through both models (by default as many as keep both
models' logits under :data:`BATCH_BYTES`, at least one), the distributions are compared a chunk of positions at
a time, and only per-position numbers are kept. Intervals (95%) are Student-t intervals over
windows of the per-window means (windows as the sample, as for perplexity); the median and 99th percentile
have none.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmcompress.errors import UserError
from lmcompress.measure.intervals import mean_interval

BATCH_BYTES = 1 << 30  # both models' logits for one batch of windows (float32)
CHUNK_BYTES = 1 << 28  # the log-probability work tensors of one chunk of positions
KEYS = ("kl_mean", "kl_median", "kl_p99", "top1_agreement", "delta_p_mean")
HIGHER_IS_BETTER = {"kl_mean": False, "kl_median": False, "kl_p99": False, "top1_agreement": True,
                    "delta_p_mean": True}  # fmt: skip


def window_agreement(logits: torch.Tensor, ref_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position numbers for windows ``ids`` ``[b, s]`` from both models' logits ``[b, s, vocab]``: ``kl``
    ``[b, s−1]`` (nats), ``agree`` (same top-1 token) and ``delta_p`` (``q(y) − p(y)``, ``y`` the next token).
    Positions are taken in chunks, so the float32 work tensors stay near :data:`CHUNK_BYTES`."""
    step = max(1, CHUNK_BYTES // (4 * 4 * ids.shape[0] * logits.shape[-1]))
    parts = [
        _positions(logits, ref_logits, ids, a, min(a + step, ids.shape[1] - 1))
        for a in range(0, ids.shape[1] - 1, step)
    ]
    return {key: torch.cat([part[key] for part in parts], dim=1) for key in parts[0]}


def _positions(logits, ref_logits, ids, start: int, stop: int) -> dict[str, torch.Tensor]:
    """:func:`window_agreement` for the predictions made at positions ``start .. stop − 1``."""
    logq = F.log_softmax(logits[:, start:stop].float(), dim=-1)
    logp = F.log_softmax(ref_logits[:, start:stop].float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)  # rounding can give -1e-7 for identical models
    target = ids[:, start + 1 : stop + 1].to(logq.device)[..., None]
    delta_p = logq.gather(-1, target).squeeze(-1).exp() - logp.gather(-1, target).squeeze(-1).exp()
    agree = logq.argmax(-1) == logp.argmax(-1)
    return {"kl": kl, "agree": agree, "delta_p": delta_p}


def summarize(kl: torch.Tensor, agree: torch.Tensor, delta_p: torch.Tensor) -> dict:
    """The reported numbers from per-position tensors ``[windows, positions]`` (see the module docstring)."""
    flat = kl.double().flatten().numpy()
    per_window = {"kl_mean": kl.double().mean(1), "top1_agreement": agree.double().mean(1),
                  "delta_p_mean": delta_p.double().mean(1)}  # fmt: skip
    out: dict = {
        "kl_mean": float(flat.mean()),
        "kl_median": float(np.quantile(flat, 0.5)),
        "kl_p99": float(np.quantile(flat, 0.99)),
        "top1_agreement": float(agree.double().mean()),
        "delta_p_mean": float(delta_p.double().mean()),
    }
    for key, values in per_window.items():
        ci = mean_interval(values.tolist())
        out[f"{key}_ci"] = None if ci is None else [ci[0], ci[1]]
    out["windows"], out["tokens"] = kl.shape[0], kl.numel()
    return out


@torch.no_grad()
def agreement(
    model: nn.Module,
    reference: nn.Module,
    windows: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    progress: bool = False,
) -> dict:
    """KL divergence, top-1 agreement and Δp of ``model`` against ``reference`` on ``windows`` ``[n, seqlen]``.

    Returns ``kl_mean``, ``kl_median``, ``kl_p99`` (nats per token), ``top1_agreement`` (0..1), ``delta_p_mean``
    and the 95% intervals ``kl_mean_ci``, ``top1_agreement_ci``, ``delta_p_mean_ci`` (``[low, high]``, ``None``
    for one window), plus ``windows`` and ``tokens``. Both models must share the vocabulary (same logits width).
    ``batch_size``: windows per forward (default: what :data:`BATCH_BYTES` allows, at most 8).
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise UserError(f"agreement needs windows of at least 2 tokens, got {list(windows.shape)}; use a larger seqlen")
    if batch_size is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1 << 17
        batch_size = max(1, min(8, BATCH_BYTES // (2 * 4 * windows.shape[1] * vocab)))
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}", param="batch_size")
    device = torch.device(device)
    homes = [(net, next(net.parameters()).device) for net in (model, reference)]
    parts: dict[str, list[torch.Tensor]] = {"kl": [], "agree": [], "delta_p": []}
    try:
        for net, _ in homes:
            net.eval().to(device)
        bar = tqdm(total=windows.shape[0], desc="agreement", disable=not progress, unit="window")
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            logits = model(ids, use_cache=False).logits
            ref_logits = reference(ids, use_cache=False).logits
            if logits.shape != ref_logits.shape:
                raise UserError(
                    f"the model's logits {list(logits.shape)} and the reference's {list(ref_logits.shape)} differ: "
                    "the reference must be the same model family with the same vocabulary"
                )
            if not (torch.isfinite(logits).all() and torch.isfinite(ref_logits).all()):
                raise UserError(f"NaN or infinite logits on windows {start}..{start + ids.shape[0] - 1}")
            for key, value in window_agreement(logits, ref_logits, ids).items():
                parts[key].append(value.cpu())
            del logits, ref_logits
            bar.update(ids.shape[0])
        bar.close()
    finally:
        for net, home in homes:
            net.to(home)
    return summarize(*(torch.cat(parts[k]) for k in ("kl", "agree", "delta_p")))


def check_same_vocabulary(tokenizer, reference_tokenizer) -> None:
    """Refuse a reference whose tokenizer maps text to other ids (its logits would not be comparable)."""
    if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise UserError(
            "the reference model's tokenizer has another vocabulary than the model's: give the dense model this "
            "one was compressed from"
        )
