"""KV-cache compression math: the H2O keep-set and the integer grid of a quantized KV cache.

H2O (Zhang et al., "H2O: Heavy-Hitter Oracle", 2023) keeps, per layer and KV head, ``budget`` cached tokens: the
``recent`` newest ones plus the ``budget − recent`` older ones with the largest accumulated attention (the sum,
over every query that has attended so far, of the softmax weight each query gave the token). Stated options
(docs/kv_cache.md): ``sinks`` — the first ``S`` tokens of the sequence are always kept (attention sinks, as in
StreamingLLM); ``score="mean"`` — older tokens are ranked by their mean attention over the queries that saw them
(the sum divided by that count), so that a token is not favoured merely for having been visible to more queries;
``score="decay"`` — by a decayed sum, the weight a token got from the query ``k`` steps back counting ``γ^k``;
``pool`` — a token's rank is the largest score among the ``pool`` held tokens centred on it (as SnapKV pools), so
that the neighbours of a heavy hitter are kept with it; ``value_norm`` — the score is multiplied by the L1 norm of
the token's value vector (as VATP, Guo et al. 2024: attention times what the token adds to the output).

The quantized KV cache stores values (and, with the ``token`` key grid, keys) on an asymmetric min–max grid per
token, per KV head and per group of ``group`` consecutive channels: ``scale = (max − min) / (2^bits − 1)`` and
``min`` are kept in float16, the codes ``q = round((x − min) / scale)`` clamped to ``[0, 2^bits − 1]`` (4-bit codes
packed two to a byte, channels ``2i`` and ``2i + 1``), and ``x̂ = q · scale + min``. Each token's grid depends on that
token alone, so quantizing a sequence at once or token by token gives the same codes.

The ``channel`` key grid (KIVI, Liu et al. 2024; KVQuant, Hooper et al. 2024) takes the minimum and maximum over a
group of ``tokens`` consecutive tokens of one channel instead: one (scale, min) pair per KV head, channel and token
group. A channel whose keys are large for every token (an outlier channel) then gets a grid of its own instead of
stretching the grid of its neighbours. A group is quantized once its ``tokens`` tokens are all cached; the newest
``< tokens`` tokens are kept in full precision until then (the cache's residual).
"""

from __future__ import annotations

import math
from typing import NoReturn

import torch

from lmcompress.errors import UserError

KV_BITS = (16, 8, 4)  # 16: no quantization
DEFAULT_INT4_GROUP = 32  # channels per scale at 4 bits unless --kv-group says otherwise
KEY_GRIDS = ("channel", "token")  # keys per channel over a token group, or per token like the values
DEFAULT_KEY_TOKENS = 32  # tokens per key scale with the channel grid unless --kv-key-tokens says otherwise


def _number(value, kind: type | tuple[type, ...]) -> bool:
    """``value`` is a ``kind`` number and not a bool (Python counts ``True`` as the int 1)."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _refuse(value, param: str, why: str) -> NoReturn:
    """Raise the UserError of option ``param`` (``kv_recent`` → ``--kv-recent``) given ``value``."""
    raise UserError(f"--{param.replace('_', '-')} {value!r}{why}", param=param)


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
    if not (_number(recent, (int, float)) and 0 <= recent <= 1):
        _refuse(
            recent,
            "kv_recent",
            ": give the fraction of the budget kept for the most recent tokens, in [0, 1] (0.5: half recent, half "
            "heavy hitters; 1: recent tokens only)",
        )
    return float(recent)


H2O_SCORES = ("sum", "mean", "decay")  # sum: the H2O paper's; mean: per query that saw the token; decay: γ^age


def check_sinks(sinks: int) -> int:
    """``--kv-sinks``: how many first tokens of the sequence are never evicted (0: none, the H2O paper)."""
    if not (_number(sinks, int) and sinks >= 0):
        why = ": give how many first tokens are never evicted, an integer >= 0 (4: StreamingLLM's attention sinks; "
        _refuse(sinks, "kv_sinks", why + "0: none)")
    return sinks


def check_score(score: str) -> str:
    """``--kv-score``: ``sum`` (accumulated attention, the H2O paper), ``mean`` (per query that saw the token) or
    ``decay`` (each query's weights counted ``γ^age``, ``--kv-decay``)."""
    if score not in H2O_SCORES:
        raise UserError(
            f"--kv-score {score!r}: use 'sum' (accumulated attention, as in the H2O paper), 'mean' (mean "
            "attention over the queries that saw the token) or 'decay' (a decayed sum, --kv-decay)",
            param="kv_score",
        )
    return score


def check_decay(decay: float) -> float:
    """``--kv-decay``: the factor ``γ`` in (0, 1] of ``--kv-score decay`` (1: the plain sum)."""
    if not (_number(decay, (int, float)) and 0 < decay <= 1):
        why = (
            ": give the per-query decay factor of --kv-score decay, in (0, 1] (0.99: a query 69 steps back counts half)"
        )
        _refuse(decay, "kv_decay", why)
    return float(decay)


def check_pool(pool: int) -> int:
    """``--kv-pool``: an odd window of held tokens the ranking is max-pooled over (1: none, the H2O paper)."""
    if not (_number(pool, int) and pool >= 1 and pool % 2 == 1):
        why = ": give an odd window of neighbouring tokens (1: no pooling; 7: each token ranked by the largest score "
        _refuse(pool, "kv_pool", why + "within 3 tokens of it)")
    return pool


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


def check_key_grid(grid: str | None, bits: int, evicts: bool) -> str:
    """``--kv-key-grid``: ``channel`` or ``token``; ``None`` → ``channel`` at 4 bits without eviction, else
    ``token``. The channel grid needs quantization (8 or 4 bits) and is refused with H2O eviction (evicting a token
    from a quantized token group would leave its group's scale and minimum to the others)."""
    if grid is None:
        return "channel" if bits == 4 and not evicts else "token"
    if grid not in KEY_GRIDS:
        raise UserError(
            f"--kv-key-grid {grid!r} is not a key grid: use channel (per channel over a group of tokens) or token "
            "(per token, like the values)",
            param="kv_key_grid",
        )
    if grid == "channel" and bits >= 16:
        raise UserError("--kv-key-grid channel quantizes keys: give --kv-bits 8 or 4", param="kv_key_grid")
    if grid == "channel" and evicts:
        raise UserError(
            "--kv-key-grid channel cannot be combined with --kv-budget (H2O eviction would remove tokens from a "
            "quantized token group); use --kv-key-grid token with --kv-budget",
            param=("kv_key_grid", "kv_budget"),
        )
    return grid


def check_key_tokens(tokens: int | None) -> int:
    """``--kv-key-tokens``: tokens per key scale with the channel grid, a positive integer (``None`` → 32)."""
    if tokens is None:
        return DEFAULT_KEY_TOKENS
    if not (_number(tokens, int) and tokens >= 1):
        why = " must be a positive token count (the keys of that many consecutive tokens share one scale per channel)"
        _refuse(tokens, "kv_key_tokens", why)
    return tokens


def budget_tokens(budget: float | int, length: int) -> int:
    """The budget in tokens for a sequence of ``length`` tokens: a count as is, a fraction ``f`` as
    ``max(1, round(f · length))``."""
    if isinstance(budget, int):
        return budget
    return max(1, round(budget * length))


def recent_tokens(budget: int, recent: float) -> int:
    """How many of ``budget`` slots go to the most recent tokens: ``round(recent · budget)``."""
    return min(budget, round(recent * budget))


def h2o_keep(scores: torch.Tensor, budget: int, recent: int, sinks: int = 0) -> torch.Tensor:
    """Indices ``[..., min(budget, T)]`` (ascending) of the tokens H2O keeps, from the ranking ``scores``
    ``[..., T]`` (one row per batch row and KV head; column ``t`` is the ``t``-th held token, oldest first).

    Kept: the first ``sinks`` held tokens, the last ``recent``, and among the ``T − sinks − recent`` between them
    the ``budget − sinks − recent`` with the largest score (ties to the older token, as ``topk`` on CPU returns
    them)."""
    if budget < 1 or recent < 0 or sinks < 0 or sinks + recent > budget:
        raise ValueError(
            f"need budget >= 1 and sinks, recent >= 0 with sinks + recent <= budget, got budget {budget}, recent "
            f"{recent}, sinks {sinks}"
        )
    length = scores.shape[-1]
    if length <= budget:
        return torch.arange(length, device=scores.device).expand(*scores.shape[:-1], length)
    lead = scores.shape[:-1]
    head = torch.arange(sinks, device=scores.device).expand(*lead, sinks)
    tail = torch.arange(length - recent, length, device=scores.device).expand(*lead, recent)
    heavy = budget - recent - sinks
    if heavy == 0:
        return torch.cat([head, tail], dim=-1).contiguous()
    top = scores[..., sinks : length - recent].topk(heavy, dim=-1, sorted=False).indices + sinks
    return torch.cat([head, top.sort(dim=-1).values, tail], dim=-1)


def _grid(xg: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpacked uint8 codes (shape of ``xg``) and float16 ``scale``, ``low`` (``dim`` reduced) of the min–max grid
    taken over ``dim``. A constant group gets scale 0 and is stored exactly (to float16)."""
    qmax = 2**bits - 1
    xg = xg.float()
    low = xg.amin(dim).clamp(-65504, 65504).half()
    scale = ((xg.amax(dim) - low.float()) / qmax).clamp(max=65504).half()
    s, m = scale.float().unsqueeze(dim), low.float().unsqueeze(dim)
    q = torch.where(s > 0, (xg - m) / torch.where(s > 0, s, 1.0), 0.0)
    return q.round().clamp(0, qmax).to(torch.uint8), scale, low


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2) if bits == 4 else codes


def quantize_kv(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and minima of ``x`` ``[..., D]`` on the per-token grid (module docstring).

    Returns ``codes`` uint8 ``[..., D]`` (4 bits: ``[..., D/2]``, the even channel in the low nibble), and
    ``scale``, ``low`` float16 ``[..., D/group]``."""
    codes, scale, low = _grid(x.unflatten(-1, (x.shape[-1] // group, group)), bits, -1)
    return _pack(codes.flatten(-2), bits), scale, low


def dequantize_kv(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """``x̂ = q · scale + min`` of :func:`quantize_kv`'s output, in ``dtype``."""
    codes = _unpack(codes, bits)
    q = codes.float().unflatten(-1, (codes.shape[-1] // group, group))
    return (q * scale.float().unsqueeze(-1) + low.float().unsqueeze(-1)).flatten(-2).to(dtype)


def quantize_kv_channels(x: torch.Tensor, bits: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and minima of keys ``x`` ``[..., T, D]`` on the channel grid: one (scale, min) per channel
    and per group of ``tokens`` consecutive tokens (``T`` a multiple of ``tokens``).

    Returns ``codes`` uint8 ``[..., T, D]`` (4 bits: ``[..., T, D/2]``, packed as in :func:`quantize_kv`), and
    ``scale``, ``low`` float16 ``[..., T/tokens, D]``."""
    length = x.shape[-2]
    if length % tokens:
        raise ValueError(f"{length} tokens are not whole groups of {tokens}")
    codes, scale, low = _grid(x.unflatten(-2, (length // tokens, tokens)), bits, -2)
    return _pack(codes.flatten(-3, -2), bits), scale, low


def dequantize_kv_channels(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, tokens: int, dtype: torch.dtype
) -> torch.Tensor:
    """``x̂ = q · scale + min`` of :func:`quantize_kv_channels`'s output ``[..., T, D]``, in ``dtype``."""
    q = _unpack(codes, bits).float().unflatten(-2, (codes.shape[-2] // tokens, tokens))
    return (q * scale.float().unsqueeze(-2) + low.float().unsqueeze(-2)).flatten(-3, -2).to(dtype)


def kv_bytes_per_token(
    layers: int,
    kv_heads: int,
    head_dim: int,
    bits: int,
    group: int,
    float_bytes: int = 2,
    key_tokens: int | None = None,
) -> int | float:
    """Bytes the cache stores per token (keys and values of every layer and KV head): ``float_bytes`` per
    element unquantized; quantized, ``bits/8`` per element plus a float16 scale and minimum per channel group
    (``4 · D / group`` bytes per token and head); with the channel key grid (``key_tokens`` given) the keys' pair
    is per channel and token group instead (``4 · D / key_tokens``, a fraction where ``key_tokens`` does not
    divide ``4 · D``). The channel grid's residual of full-precision keys is not a per-token cost:
    :func:`kv_cache_bytes` counts it."""
    if bits >= 16:
        return 2 * layers * kv_heads * head_dim * float_bytes
    values = head_dim * bits // 8 + (head_dim // group) * 4
    # per token, the channel grid's scales are 4 · D / key_tokens bytes: an integer only on average
    keys = values if key_tokens is None else head_dim * bits // 8 + head_dim * 4 / key_tokens
    total = layers * kv_heads * (keys + values)
    return int(total) if float(total).is_integer() else total


def kv_cache_bytes(
    length: int,
    layers: int,
    kv_heads: int,
    head_dim: int,
    bits: int,
    group: int,
    float_bytes: int = 2,
    key_tokens: int | None = None,
) -> int:
    """Bytes the cache stores for a sequence of ``length`` tokens (nothing evicted). With the channel key grid the
    ``⌊length / key_tokens⌋`` full token groups are codes plus a float16 scale and minimum per channel, and the
    ``length mod key_tokens`` newest keys are held in full precision (``float_bytes`` per element)."""
    if bits >= 16 or key_tokens is None:
        return length * kv_bytes_per_token(layers, kv_heads, head_dim, bits, group, float_bytes)
    values = length * (head_dim * bits // 8 + (head_dim // group) * 4)
    groups, residual = divmod(length, key_tokens)
    keys = groups * key_tokens * head_dim * bits // 8 + groups * head_dim * 4 + residual * head_dim * float_bytes
    return layers * kv_heads * (keys + values)
