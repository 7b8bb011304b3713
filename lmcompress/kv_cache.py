"""A compressed KV cache for ``transformers`` causal LMs: H2O eviction and int8 / int4 storage (docs/kv_cache.md).

:class:`KVCache` is a ``DynamicCache`` whose layers (:class:`CompressedKVLayer`) store each layer's keys and
values quantized (``bits`` 8 or 4, the grid of :mod:`lmcompress.algorithms.kv`) and/or keep at most ``budget``
tokens per KV head (H2O). Eviction needs the attention weights of every forward: :func:`attach` switches the model
to eager attention and hooks each attention module so that its weights reach the cache after the attention is
computed; the cache then adds them to its accumulated scores and evicts down to the budget.

Order of one forward of ``q`` new tokens through a layer holding ``T`` tokens: the new keys and values are
appended (quantized on write), attention runs over the ``T + q`` stored tokens (causal among the new ones), the
weights are accumulated, and the layer evicts down to ``budget``. So with one token per forward, each token's
logits come from the compressed cache of the tokens before it plus itself (the H2O paper's protocol).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lmcompress.algorithms.kv import (
    budget_tokens,
    check_bits,
    check_decay,
    check_group,
    check_key_grid,
    check_key_tokens,
    check_pool,
    check_recent,
    check_score,
    check_sinks,
    dequantize_kv,
    dequantize_kv_channels,
    h2o_keep,
    kv_bytes_per_token,
    parse_budget,
    quantize_kv,
    quantize_kv_channels,
    recent_tokens,
)
from lmcompress.errors import UserError

ATTR = "lmcompress_kv"  # the KVSettings attached to a model by attach()


@dataclass(frozen=True)
class KVSettings:
    """What the cache does. ``budget``: tokens kept per layer and KV head (an int), or a fraction of the sequence
    (a float in (0, 1]), or ``None`` (no eviction); ``recent``: the fraction of the budget given to the newest
    tokens; ``bits``: 16 (no quantization), 8 or 4; ``group``: channels per scale (``None``: the whole head);
    ``chunk``: tokens per forward after the prefill when perplexity is streamed through an evicting cache;
    ``sinks``: first tokens never evicted (taken from the budget before it is split into recent and heavy);
    ``score``: how older tokens are ranked, ``"sum"`` (accumulated attention, the H2O paper), ``"mean"`` (per query
    that saw the token) or ``"decay"`` (a query ``k`` steps back weighted ``decay^k``); ``pool``: an odd window of
    held tokens the ranking is max-pooled over (1: none); ``value_norm``: the score times the L1 norm of the token's
    value (per KV head). The defaults (a quarter recent, ``mean``) were chosen on
    WikiText-2 valid (docs/kv_cache.md); ``recent=0.5, score="sum"`` is the H2O paper's cache."""

    budget: float | int | None = None
    recent: float = 0.25
    bits: int = 16
    group: int | None = None
    chunk: int = 1
    sinks: int = 0
    score: str = "mean"
    decay: float = 0.99
    pool: int = 1
    value_norm: bool = False
    key_grid: str | None = None  # "channel" | "token"; None: channel at 4 bits without eviction, else token
    key_tokens: int | None = None  # tokens per key scale with the channel grid (None: 32)

    @property
    def evicts(self) -> bool:
        return self.budget is not None

    @property
    def quantizes(self) -> bool:
        return self.bits < 16

    @property
    def channel_tokens(self) -> int | None:
        """Tokens per key scale when the keys use the channel grid (checked), else ``None``."""
        if check_key_grid(self.key_grid, self.bits, self.evicts) != "channel":
            return None
        return check_key_tokens(self.key_tokens)

    def to_dict(self) -> dict:
        """The settings, with the key grid resolved (``key_grid``, and ``key_tokens`` for the channel grid)."""
        tokens = self.channel_tokens
        return asdict(self) | {"key_grid": "token" if tokens is None else "channel", "key_tokens": tokens}


def kv_settings(
    budget: str | float | int | None = None,
    recent: float = 0.25,
    bits: int = 16,
    group: int | None = None,
    chunk: int = 1,
    sinks: int = 0,
    score: str = "mean",
    decay: float = 0.99,
    pool: int = 1,
    value_norm: bool = False,
    key_grid: str | None = None,
    key_tokens: int | None = None,
) -> KVSettings | None:
    """Checked settings from the CLI's ``--kv-*`` options; ``None`` when they ask for nothing (the plain cache)."""
    value = parse_budget(budget)
    check_recent(recent)
    check_sinks(sinks)
    check_score(score)
    check_decay(decay)
    check_pool(pool)
    check_bits(bits)
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise UserError(f"--kv-group must be a positive channel count, got {group!r}", param="kv_group")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise UserError(f"--kv-chunk must be a positive token count, got {chunk!r}", param="kv_chunk")
    if bits == 16 and (key_grid is not None or key_tokens is not None):
        raise UserError(
            "--kv-key-grid / --kv-key-tokens apply to a quantized cache: add --kv-bits 8|4", param="kv_bits"
        )
    grid = check_key_grid(key_grid, bits, value is not None)
    if key_tokens is not None and grid != "channel":
        raise UserError(
            f"--kv-key-tokens sets the token group of the channel key grid, but the keys use the {grid} grid: add "
            "--kv-key-grid channel or drop --kv-key-tokens",
            param="kv_key_tokens",
        )
    check_key_tokens(key_tokens)
    if value is None and bits == 16:
        return None
    settings = KVSettings(
        value, float(recent), int(bits), group, chunk, int(sinks), score, float(decay), pool, bool(value_norm)
    )
    return replace(settings, key_grid=grid, key_tokens=key_tokens)


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def cache_shape(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a causal LM's config; a model with sliding-window or linear-attention
    layers is a :class:`UserError` (the compressed cache replaces full-attention layers only)."""
    text = _text_config(config)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise UserError(
            f"the compressed KV cache supports models whose every layer uses full attention; this one has "
            f"{sorted(kinds)} layers",
            param=("kv_budget", "kv_bits"),
        )
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


class CompressedKVLayer(DynamicLayer):
    """One layer's cache: keys and values ``[B, H_kv, T, D]``, stored as float (``bits`` 16) or as codes with
    float16 scales and minima; at most ``budget`` tokens per KV head once :meth:`observe` has evicted.

    ``seen`` counts every token that went in (positions and masks follow it); ``stored`` is what is held.
    Eviction keeps the first ``sinks`` tokens, the newest ``recent`` and the rest of ``budget`` by ``score``."""

    is_croppable = False

    def __init__(
        self,
        budget: int | None,
        recent: int,
        bits: int,
        group: int,
        sinks: int = 0,
        score: str = "sum",
        decay: float = 1.0,
        pool: int = 1,
        value_norm: bool = False,
    ) -> None:
        super().__init__()
        self.budget, self.recent, self.bits, self.group = budget, recent, bits, group
        self.sinks, self.score, self.decay, self.pool, self.value_norm = sinks, score, decay, pool, value_norm
        self.seen = 0
        self.scores: torch.Tensor | None = None  # [B, H_kv, stored] accumulated (decayed) attention, evicting only
        self.counts: torch.Tensor | None = None  # [B, H_kv, stored] weights summed into each score (mean only)
        self.qkeys: tuple[torch.Tensor, ...] | None = None  # (codes, scale, low) when quantized
        self.qvalues: tuple[torch.Tensor, ...] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype

    @property
    def stored(self) -> int:
        if not self.is_initialized:
            return 0
        return self.qkeys[0].shape[-2] if self.bits < 16 and self.qkeys is not None else self.keys.shape[-2]

    def _append(self, old: tuple | None, new: tuple) -> tuple:
        return new if old is None else tuple(torch.cat([a, b], dim=-2) for a, b in zip(old, new, strict=True))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens (quantized on write) and return every stored key and value, dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        if self.bits == 16:
            return super().update(key_states, value_states)
        self.qkeys = self._append(self.qkeys, quantize_kv(key_states, self.bits, self.group))
        self.qvalues = self._append(self.qvalues, quantize_kv(value_states, self.bits, self.group))
        keys = dequantize_kv(*self.qkeys, self.bits, self.group, self.dtype)
        values = dequantize_kv(*self.qvalues, self.bits, self.group, self.dtype)
        return keys, values

    def ranking(self) -> torch.Tensor:
        """What eviction ranks the held tokens by ``[B, H_kv, stored]``: the accumulated attention (``sum``), it
        divided by the number of (query, query head) weights that went into it (``mean``), or the decayed sum;
        with ``value_norm``, times the L1 norm of the token's (stored) value; with ``pool`` > 1, each token's is
        the largest of the ``pool`` held tokens centred on it."""
        rank = self.scores / self.counts if self.score == "mean" else self.scores
        if self.value_norm:
            values = (
                self.values if self.bits == 16 else dequantize_kv(*self.qvalues, self.bits, self.group, torch.float32)
            )
            rank = rank * values.float().abs().sum(-1)
        if self.pool > 1:
            rank = F.max_pool1d(rank, self.pool, stride=1, padding=self.pool // 2)
        return rank

    def observe(self, weights: torch.Tensor) -> None:
        """Add a forward's attention weights ``[B, H_q, q, T]`` to the scores (summed over the queries and over
        the query heads sharing each KV head) and evict down to the budget. The ``q`` new tokens are the last
        ``q`` keys, causal among themselves: the ``i``-th of them is seen by ``q − i`` queries, a held one by all.
        With ``score="decay"`` the ``i``-th new query's weights count ``decay^(q−1−i)`` and the held scores are
        multiplied by ``decay^q`` first (a row whose largest score falls below 1e-30 is rescaled to 1: the ranking
        is unchanged)."""
        if self.budget is None:
            return
        q_heads, queries, length = weights.shape[1], weights.shape[2], weights.shape[3]
        if length != self.stored:
            raise RuntimeError(f"attention over {length} keys but the cache holds {self.stored}")
        kv_heads = (self.keys if self.bits == 16 else self.qkeys[0]).shape[1]
        group = q_heads // kv_heads
        weights = weights.float()
        if self.score == "decay":
            ages = torch.arange(queries - 1, -1, -1, device=weights.device, dtype=torch.float32)
            weights = weights * (self.decay**ages).unsqueeze(-1)
        acc = weights.unflatten(1, (kv_heads, group)).sum(dim=(2, 3))
        counts = None
        if self.score == "mean":
            counts = torch.full((length,), float(queries * group), device=acc.device)
            counts[length - queries :] = torch.arange(queries, 0, -1, device=acc.device, dtype=torch.float32) * group
            counts = counts.expand_as(acc).clone()
        if self.scores is not None:
            old = self.scores * self.decay**queries if self.score == "decay" else self.scores
            acc[..., : self.scores.shape[-1]] += old
            if counts is not None:
                counts[..., : self.counts.shape[-1]] += self.counts
        if self.score == "decay":
            top = acc.amax(-1, keepdim=True)
            acc = torch.where(top < 1e-30, acc / top.clamp(min=torch.finfo(torch.float32).tiny), acc)
        self.scores, self.counts = acc, counts
        if length <= self.budget:
            return
        keep = h2o_keep(self.ranking(), self.budget, self.recent, self.sinks)
        self.scores = acc.gather(-1, keep)
        self.counts = None if counts is None else counts.gather(-1, keep)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.gather(2, keep.unsqueeze(-1).expand(*keep.shape, t.shape[-1]))

        if self.bits == 16:
            self.keys, self.values = take(self.keys), take(self.values)
        else:
            self.qkeys = tuple(take(t) for t in self.qkeys)
            self.qvalues = tuple(take(t) for t in self.qvalues)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The stored tokens are placed just before the new ones (offset ``seen − stored``): all of them visible
        to every new query, the new ones causal among themselves."""
        return self.stored + query_length, self.seen - self.stored

    def stored_bytes(self) -> int:
        """Bytes of the stored keys and values (codes, scales and minima when quantized), scores excluded."""
        if not self.is_initialized:
            return 0
        parts = (self.keys, self.values) if self.bits == 16 else (*(self.qkeys or ()), *(self.qvalues or ()))
        return sum(t.numel() * t.element_size() for t in parts)

    def reset(self) -> None:
        super().reset()
        self.seen, self.scores, self.counts, self.qkeys, self.qvalues = 0, None, None, None, None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a compressed KV cache does not support beam search")


class ChannelKeyLayer(CompressedKVLayer):
    """A quantized layer whose keys use the channel grid (:func:`~lmcompress.algorithms.kv.quantize_kv_channels`,
    ``tokens`` per scale) and whose values the per-token grid; no eviction.

    The keys of the newest ``seen mod tokens`` tokens (the residual) are held in the model's dtype. A forward reads
    the stored groups dequantized and the residual and its own new keys exact; after that forward's keys have been
    returned, every group the new tokens completed is quantized and leaves the residual. So with one token per
    forward, token ``t`` sees exact keys for the tokens of its own group up to ``t`` and quantized keys before it;
    feeding ``tokens`` tokens per forward, aligned to the groups, gives the same."""

    def __init__(self, bits: int, group: int, tokens: int) -> None:
        super().__init__(None, 0, bits, group)
        self.tokens = tokens
        self.residual: torch.Tensor | None = None  # [B, H_kv, < tokens, D] keys not yet in a full group

    @property
    def stored(self) -> int:
        return 0 if self.qvalues is None else self.qvalues[0].shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens and return every stored key and value (module docstring for what is exact)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.qvalues = self._append(self.qvalues, quantize_kv(value_states, self.bits, self.group))
        values = dequantize_kv(*self.qvalues, self.bits, self.group, self.dtype)
        fresh = key_states.to(self.dtype)
        exact = fresh if self.residual is None else torch.cat([self.residual, fresh], dim=-2)
        if self.qkeys is None:
            keys = exact
        else:
            keys = torch.cat([dequantize_kv_channels(*self.qkeys, self.bits, self.tokens, self.dtype), exact], dim=-2)
        full = exact.shape[-2] // self.tokens * self.tokens
        if full:
            self.qkeys = self._append(self.qkeys, quantize_kv_channels(exact[..., :full, :], self.bits, self.tokens))
        self.residual = exact[..., full:, :].clone()
        return keys, values

    def stored_bytes(self) -> int:
        """Bytes of the key codes, scales and minima, the residual keys, and the value codes, scales and minima."""
        parts = (*(self.qkeys or ()), *(self.qvalues or ()), *(() if self.residual is None else (self.residual,)))
        return sum(t.numel() * t.element_size() for t in parts)

    def reset(self) -> None:
        super().reset()
        self.residual = None


class KVCache(DynamicCache):
    """The compressed cache of one generation or one streamed window batch (:class:`CompressedKVLayer` per
    layer). ``length``: the sequence length a fractional budget is taken of (the prompt, or the window)."""

    def __init__(self, config, settings: KVSettings, length: int | None = None) -> None:
        layers, self.kv_heads, self.head_dim = cache_shape(config)
        self.settings = settings
        self.group = check_group(settings.group, self.head_dim, settings.bits)
        self.key_tokens = settings.channel_tokens  # None unless the keys use the channel grid (never evicting)
        if self.key_tokens is not None:
            self.budget = None
            layer = ChannelKeyLayer
            Cache.__init__(self, layers=[layer(settings.bits, self.group, self.key_tokens) for _ in range(layers)])
            return
        self.budget: int | None = None
        if settings.evicts:
            if isinstance(settings.budget, float) and length is None:
                raise ValueError("a fractional budget needs the sequence length")
            self.budget = budget_tokens(settings.budget, length or 0)
        sinks = min(settings.sinks, self.budget) if self.budget else 0
        recent = recent_tokens(self.budget - sinks, settings.recent) if self.budget else 0
        Cache.__init__(
            self,
            layers=[
                CompressedKVLayer(
                    self.budget,
                    recent,
                    settings.bits,
                    self.group,
                    sinks,
                    settings.score,
                    settings.decay,
                    settings.pool,
                    settings.value_norm,
                )
                for _ in range(layers)
            ],
        )

    def observe(self, layer_idx: int, weights: torch.Tensor) -> None:
        self.layers[layer_idx].observe(weights)

    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes() for layer in self.layers)


def memory_report(config, settings: KVSettings | None, dtype: torch.dtype = torch.float32) -> dict:
    """Cache bytes per token: full precision (the model's dtype and float16) and with ``settings``' grid; with
    eviction, H2O's float32 score per held token and KV head, and what the held tokens cost: per token of the
    sequence for a fractional budget ``f`` (``f`` · (bytes + score bytes) per token, ``evicted_bytes_per_token``),
    in total for a token budget ``B`` (``B`` · (bytes + score bytes), ``max_cache_bytes``). With the channel key grid
    ``bytes_per_token`` counts the keys of full token groups (codes plus the per-channel scale and minimum shared by
    ``key_tokens`` tokens) and ``key_residual_max_bytes`` the newest ``< key_tokens`` keys held in the model's dtype
    (once per sequence, at most ``key_tokens − 1`` tokens): a sequence of ``n`` tokens stores at most
    ``n · bytes_per_token + key_residual_max_bytes`` (exactly: ``lmcompress.algorithms.kv.kv_cache_bytes``).
    With ``score="mean"`` the score bytes double (a float32 count per held token and KV head as well)."""
    layers, kv_heads, head_dim = cache_shape(config)
    float_bytes = torch.empty((), dtype=dtype).element_size()
    out = {
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "bytes_per_token_model_dtype": kv_bytes_per_token(layers, kv_heads, head_dim, 16, head_dim, float_bytes),
        "bytes_per_token_fp16": kv_bytes_per_token(layers, kv_heads, head_dim, 16, head_dim, 2),
        "settings": settings.to_dict() if settings else None,
    }
    if settings is not None:
        group = check_group(settings.group, head_dim, settings.bits)
        out["group"] = group
        tokens = settings.channel_tokens
        out["key_grid"], out["key_tokens"] = ("token", None) if tokens is None else ("channel", tokens)
        out["bytes_per_token"] = kv_bytes_per_token(
            layers, kv_heads, head_dim, settings.bits, group, float_bytes, key_tokens=tokens
        )
        if tokens is not None:
            out["key_residual_max_bytes"] = layers * kv_heads * (tokens - 1) * head_dim * float_bytes
        if settings.evicts:
            out["score_bytes_per_token"] = 4 * layers * kv_heads * (2 if settings.score == "mean" else 1)
            held = out["bytes_per_token"] + out["score_bytes_per_token"]
            if isinstance(settings.budget, float):  # per token of the sequence, once the cache is at its budget
                out["evicted_bytes_per_token"] = held * settings.budget
            else:  # the whole cache, whatever the sequence length
                out["max_cache_bytes"] = held * settings.budget
    else:
        out["bytes_per_token"] = out["bytes_per_token_model_dtype"]
    return out


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "k_proj")]


def _hook(module: nn.Module, args, kwargs, output):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, KVCache) or cache.budget is None:
        return None
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None:
        raise RuntimeError("H2O needs the attention weights: the model must run eager attention (see attach)")
    cache.observe(module.layer_idx, weights)
    return None


@contextlib.contextmanager
def attach(model: nn.Module, settings: KVSettings | None) -> Iterator[nn.Module]:
    """Run ``model`` with the compressed cache inside the block: its ``generate`` gets a fresh :class:`KVCache`
    per call (the fractional budget taken of each prompt; with eviction, rows of a batch are generated one by
    one, as their padding would differ), perplexity streams through it (:func:`window_nll`), and with eviction
    attention runs eager with hooks feeding the weights to the cache. Everything is undone on exit."""
    if settings is None:
        yield model
        return
    if not hasattr(model, "generate") or not hasattr(model, "config"):
        raise UserError("the compressed KV cache applies to causal LMs with generate()", param="kv_budget")
    cache_shape(model.config)
    KVCache(model.config, settings, 1)  # a bad group is reported before any work
    handles, previous = [], None
    if settings.evicts:
        modules = _attention_modules(model)
        if not modules:
            raise UserError(
                f"H2O found no attention modules (with layer_idx and k_proj) in {type(model).__name__}",
                param="kv_budget",
            )
        previous = model.config._attn_implementation
        if previous != "eager":
            model.set_attn_implementation("eager")
        handles = [m.register_forward_hook(_hook, with_kwargs=True) for m in modules]
    original = model.generate
    model.generate = lambda *a, **kw: _generate(model, original, settings, *a, **kw)
    setattr(model, ATTR, settings)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        del model.generate
        delattr(model, ATTR)
        if previous is not None and previous != "eager":
            model.set_attn_implementation(previous)


def _generate(model, original, settings: KVSettings, input_ids=None, *args, **kwargs):
    """``generate`` with a fresh :class:`KVCache`; with eviction, each padded row alone (left padding dropped),
    returned left-padded again to the batch's prompt width and right-padded with ``pad_token_id``."""
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None or args:
        raise UserError("generate with a compressed KV cache takes input_ids (and keyword options)")
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones_like(input_ids)
    if input_ids.shape[0] == 1 or not settings.evicts:
        length = int(mask[0].sum()) if input_ids.shape[0] == 1 else input_ids.shape[1]
        cache = KVCache(model.config, settings, length)
        return original(input_ids, attention_mask=mask, cache=cache, **kwargs)
    pad = kwargs.get("pad_token_id") or 0
    width = input_ids.shape[1]
    rows = []
    for row, row_mask in zip(input_ids, mask, strict=True):
        ids = row[row_mask.bool()].unsqueeze(0)
        cache = KVCache(model.config, settings, ids.shape[1])
        out = original(ids, attention_mask=torch.ones_like(ids), cache=cache, **kwargs)
        rows.append(torch.cat([row.new_full((width - ids.shape[1],), pad), out[0]]))
    longest = max(r.numel() for r in rows)
    return torch.stack([torch.cat([r, r.new_full((longest - r.numel(),), pad)]) for r in rows])


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, settings: KVSettings, prefill: int | None = None) -> torch.Tensor:
    """Next-token NLL ``[B, L − 1]`` of the windows ``ids`` ``[B, L]`` run through a :class:`KVCache` (the
    model must be inside :func:`attach` when ``settings`` evict).

    Without eviction, one forward per window: every key and value the attention reads is quantized (the grid is
    per token, so this equals feeding the tokens one by one); with the channel key grid, one forward per token
    group of the keys, which also equals feeding the tokens one by one (:class:`ChannelKeyLayer`).

    With eviction: the first ``prefill`` tokens
    (default: the budget, so nothing is evicted before every later token is predicted) in one forward, then
    ``settings.chunk`` tokens per forward; with chunk 1 each token's logits see the compressed cache of the tokens
    before it (H2O's protocol). Tokens of one chunk also see the earlier tokens of their chunk, uncompressed."""
    batch, length = ids.shape
    cache = KVCache(model.config, settings, length)
    if not settings.evicts:
        step = cache.key_tokens or length  # the channel key grid: one token group per forward
        bounds = [(s, min(length, s + step)) for s in range(0, length, step)]
    else:
        first = min(length, max(1, cache.budget if prefill is None else prefill))
        starts = [0, *range(first, length, settings.chunk)]
        bounds = [(s, min(length, e)) for s, e in zip(starts, [*starts[1:], length], strict=True)]
    pieces = []
    for start, end in bounds:
        logits = model(ids[:, start:end], cache=cache, use_cache=True).logits
        targets = ids[:, start + 1 : end + 1]
        logits = logits[:, : targets.shape[1]].float()
        if not bool(torch.isfinite(logits).all()):
            raise UserError(f"the model's logits are NaN or infinite at tokens {start}..{end - 1} of a window")
        pieces.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(batch, -1))
    return torch.cat(pieces, dim=1)


def format_memory(report: dict) -> str:
    """One line for ``eval --profile``: KV cache bytes per token, full and compressed."""
    line = (
        f"KV cache: {report['bytes_per_token_model_dtype']:,} bytes/token in the model's dtype "
        f"({report['bytes_per_token_fp16']:,} in float16; {report['layers']} layers x {report['kv_heads']} KV heads "
        f"x {report['head_dim']} x K,V)"
    )
    settings = report.get("settings")
    if settings:
        if settings["bits"] < 16:
            if report.get("key_grid") == "channel":
                grid = (
                    f"keys per channel over {report['key_tokens']} tokens, values per token in groups of "
                    f"{report['group']} channels"
                )
            else:
                grid = f"keys and values per token in groups of {report['group']} channels"
            line += (
                f"; int{settings['bits']} ({grid}): {report['bytes_per_token']:,} bytes/token "
                f"({report['bytes_per_token'] / report['bytes_per_token_fp16']:.3f}x float16)"
            )
            if "key_residual_max_bytes" in report:
                line += (
                    f" plus at most {report['key_residual_max_bytes']:,} bytes of exact keys for the newest "
                    f"< {report['key_tokens']} tokens"
                )
        if settings["budget"] is not None:
            what = "tokens" if isinstance(settings["budget"], int) else "of the sequence"
            line += (
                f"; H2O keeps {settings['budget']} {what} per layer and head (recent {settings['recent']:.0%} of it"
                + (f", the first {settings['sinks']} always" if settings.get("sinks") else "")
                + (f", score {settings['score']}" if settings.get("score", "sum") != "sum" else "")
                + f"), plus {report['score_bytes_per_token']:,} bytes/token of float32 scores"
            )
            if "evicted_bytes_per_token" in report:
                line += f": {report['evicted_bytes_per_token']:,.0f} bytes per sequence token once full"
            else:
                line += f": at most {report['max_cache_bytes']:,} bytes in all"
    return line
