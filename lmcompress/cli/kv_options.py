"""The ``--kv-*`` options ``generate`` and ``eval`` share (the compressed KV cache, docs/kv_cache.md)."""

from __future__ import annotations

import typer

KV_BUDGET = typer.Option(
    None,
    "--kv-budget",
    help="H2O eviction: KV tokens kept per layer and head, as a fraction of the sequence (0.2; of the prompt in "
    "generate, of the window in perplexity) or a token count (256); the rest are evicted. Runs eager attention.",
)
KV_RECENT = typer.Option(
    0.25,
    "--kv-recent",
    help="With --kv-budget: the fraction of the budget kept for the most recent tokens (the H2O paper: 0.5).",
)
KV_BITS = typer.Option(
    16,
    "--kv-bits",
    help="Store the KV cache in 8 or 4 bits (asymmetric min-max, float16 scale and minimum; values per token, per "
    "KV head, per --kv-group channels; keys per --kv-key-grid); 16: not quantized.",
)
KV_GROUP = typer.Option(
    None,
    "--kv-group",
    help="With --kv-bits 8|4: channels per scale of the per-token grid, a divisor of the head dimension "
    "[default: the whole head at 8 bits, 32 at 4 bits].",
)
KV_KEY_GRID = typer.Option(
    None,
    "--kv-key-grid",
    help="With --kv-bits 8|4: the keys' grid, channel (one scale per channel over --kv-key-tokens consecutive "
    "tokens, the newest tokens of an unfilled group kept exact; not with --kv-budget) or token (per token, per "
    "--kv-group channels, like the values) [default: channel at 4 bits without --kv-budget, else token].",
)
KV_KEY_TOKENS = typer.Option(
    None,
    "--kv-key-tokens",
    help="With --kv-key-grid channel: tokens per key scale [default: 32].",
)
KV_SINKS = typer.Option(
    0,
    "--kv-sinks",
    help="With --kv-budget: the first N tokens are never evicted (attention sinks, as in StreamingLLM; taken from "
    "the budget before its recent / heavy split).",
)
KV_SCORE = typer.Option(
    "mean",
    "--kv-score",
    help="With --kv-budget: rank older tokens by their mean attention over the queries that saw them (mean), by "
    "their accumulated attention (sum: the H2O paper; with --kv-recent 0.5), or by a decayed sum (decay, "
    "--kv-decay).",
)
KV_POOL = typer.Option(
    1,
    "--kv-pool",
    help="With --kv-budget: rank each held token by the largest score among the N (odd) held tokens centred on "
    "it, so that a heavy hitter's neighbours are kept with it (1: no pooling, the H2O paper).",
)
KV_VALUE_NORM = typer.Option(
    False,
    "--kv-value-norm",
    help="With --kv-budget: multiply each token's score by the L1 norm of its value vector (VATP).",
)
KV_DECAY = typer.Option(
    0.99,
    "--kv-decay",
    help="With --kv-score decay: the weight a query k steps back counts is decay^k (in (0, 1]; 1: the plain sum).",
)
