"""KV-cache compression math: the H2O keep-set and the integer grid of a quantized KV cache.

H2O (Zhang et al., "H2O: Heavy-Hitter Oracle", 2023) keeps, per layer and KV head, ``budget`` cached tokens: the
``recent`` newest ones plus the ``budget − recent`` older ones with the largest accumulated attention (the sum,
over every query that has attended so far, of the softmax weight each query gave the token).

The quantized KV cache stores every key and value vector on an asymmetric min–max grid per token, per KV head
and per group of ``group`` consecutive channels: ``scale = (max − min) / (2^bits − 1)`` and ``min`` are kept in
float16, the codes ``q = round((x − min) / scale)`` clamped to ``[0, 2^bits − 1]`` (4-bit codes packed two to a
byte), and ``x̂ = q · scale + min``. Each token's grid depends on that token alone, so quantizing a sequence at
once or token by token gives the same codes.
"""

from __future__ import annotations

import math

import torch

from lmcompress.errors import UserError

KV_BITS = (16, 8, 4)  # 16: no quantization
DEFAULT_INT4_GROUP = 32  # channels per scale at 4 bits unless --kv-group says otherwise


def parse_budget(text: str | float | int | None) -> float | int | None:
    """``--kv-budget``: ``"0.2"`` (a fraction in (0, 1] of the sequence) → ``0.2``; ``"256"`` (a token count) →
    ``256``; ``None`` → ``None`` (no eviction). A number written with a point is a fraction, one without a
    token count."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise UserError(f"--kv-budget must be a fraction in (0, 1] or a token count, got {text!r}", param="kv_budget")
    if isinstance(text, int):
        value: float | int = text
    elif isinstance(text, float):
        value = text
    else:
        raw = str(text).strip()
        try:
            value = int(raw) if raw.lstrip("+-").isdigit() else float(raw)
        except ValueError:
            raise UserError(
                f"--kv-budget takes a fraction such as 0.2 or a token count such as 256, got {text!r}",
                param="kv_budget",
            ) from None
    if isinstance(value, int):
        if value < 1:
            raise UserError(
                f"--kv-budget {value}: a budget must keep at least one token (give a count ≥ 1 or a fraction in "
                "(0, 1])",
                param="kv_budget",
            )
        return value
    if not (math.isfinite(value) and 0 < value <= 1):
        raise UserError(
            f"--kv-budget {value}: a fractional budget must be in (0, 1] (0.2 keeps 20% of the tokens); for a "
            "token count write an integer",
            param="kv_budget",
        )
    return value


def check_recent(recent: float) -> float:
    """``--kv-recent``: the fraction in [0, 1] of the budget given to the most recent tokens."""
    if isinstance(recent, bool) or not isinstance(recent, (int, float)) or not (0 <= recent <= 1):
        raise UserError(
            f"--kv-recent {recent!r}: give the fraction of the budget kept for the most recent tokens, in [0, 1] "
            "(0.5: half recent, half heavy hitters; 1: recent tokens only)",
            param="kv_recent",
        )
    return float(recent)


def check_bits(bits: int) -> int:
    """``--kv-bits``: 16 (off), 8 or 4."""
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise UserError(f"--kv-bits {bits!r} is not supported: use 8 or 4 (16 = no quantization)", param="kv_bits")
    return int(bits)


def check_group(group: int | None, head_dim: int, bits: int) -> int:
    """The channel group size of the KV grid: ``None`` → the default (8 bits: the whole head; 4 bits: 32 channels
    where 32 divides ``head_dim``, else the whole head); it must divide ``head_dim`` (and ``head_dim`` be even at
    4 bits, where codes are packed in pairs)."""
    if group is None:
        group = DEFAULT_INT4_GROUP if bits == 4 and head_dim % DEFAULT_INT4_GROUP == 0 else head_dim
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or head_dim % group:
        raise UserError(
            f"--kv-group {group!r} must be a positive divisor of the head dimension {head_dim}", param="kv_group"
        )
    if bits == 4 and head_dim % 2:
        raise UserError(f"4-bit KV codes are packed in pairs: the head dimension {head_dim} is odd", param="kv_bits")
    return group


def budget_tokens(budget: float | int, length: int) -> int:
    """The budget in tokens for a sequence of ``length`` tokens: a count as is, a fraction ``f`` as
    ``max(1, round(f · length))``."""
    if isinstance(budget, int):
        return budget
    return max(1, round(budget * length))


def recent_tokens(budget: int, recent: float) -> int:
    """How many of ``budget`` slots go to the most recent tokens: ``round(recent · budget)``."""
    return min(budget, round(recent * budget))


def h2o_keep(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """Indices ``[..., min(budget, T)]`` (ascending) of the tokens H2O keeps, from accumulated attention
    ``scores`` ``[..., T]`` (one row per batch row and KV head; column ``t`` is token ``t``, oldest first).

    Kept: the last ``recent`` tokens, and among the ``T − recent`` older ones the ``budget − recent`` with the
    largest score (ties to the older token, as ``topk`` on CPU returns them)."""
    if budget < 1 or not 0 <= recent <= budget:
        raise ValueError(f"need budget >= 1 and 0 <= recent <= budget, got budget {budget}, recent {recent}")
    length = scores.shape[-1]
    if length <= budget:
        return torch.arange(length, device=scores.device).expand(*scores.shape[:-1], length)
    lead = scores.shape[:-1]
    tail = torch.arange(length - recent, length, device=scores.device).expand(*lead, recent)
    heavy = budget - recent
    if heavy == 0:
        return tail.contiguous()
    top = scores[..., : length - recent].topk(heavy, dim=-1, sorted=False).indices
    return torch.cat([top.sort(dim=-1).values, tail], dim=-1)


def quantize_kv(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and minima of ``x`` ``[..., D]`` on the KV grid (module docstring).

    Returns ``codes`` uint8 ``[..., D]`` (4 bits: ``[..., D/2]``, the even channel in the low nibble), and
    ``scale``, ``low`` float16 ``[..., D/group]``. A constant group gets scale 0 and is stored exactly (to
    float16)."""
    qmax = 2**bits - 1
    xg = x.float().unflatten(-1, (x.shape[-1] // group, group))
    low = xg.amin(-1).clamp(-65504, 65504).half()
    scale = ((xg.amax(-1) - low.float()) / qmax).clamp(max=65504).half()
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, (xg - low.float().unsqueeze(-1)) / torch.where(s > 0, s, 1.0), 0.0)
    codes = q.round().clamp(0, qmax).to(torch.uint8).flatten(-2)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale, low


def dequantize_kv(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """``x̂ = q · scale + min`` of :func:`quantize_kv`'s output, in ``dtype``."""
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)
    q = codes.float().unflatten(-1, (codes.shape[-1] // group, group))
    return (q * scale.float().unsqueeze(-1) + low.float().unsqueeze(-1)).flatten(-2).to(dtype)


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, bits: int, group: int, float_bytes: int = 2) -> int:
    """Bytes the cache stores per token (keys and values of every layer and KV head): ``float_bytes`` per
    element unquantized; quantized, ``bits/8`` per element plus a float16 scale and minimum per group."""
    if bits >= 16:
        per_head = head_dim * float_bytes
    else:
        per_head = head_dim * bits // 8 + (head_dim // group) * 4
    return 2 * layers * kv_heads * per_head
