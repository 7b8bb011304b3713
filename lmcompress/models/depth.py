"""What depth pruning must know per family: where a block's sublayers are, and which config fields are per layer.

- :data:`DEPTH_LAYOUTS` / :func:`depth_layout`: the families whose decoder blocks can be removed whole
  (``shrink blocks``) and, where the block is two residual sublayers in a row, whose attention or FFN sublayer
  can be skipped (``shrink sublayers``).
- :data:`CONFIG_FIELDS` / :func:`renumber_config`: the config fields that hold one entry per layer, a list of
  layer indices, an index threshold or a period, and how each is kept consistent when blocks are removed.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcompress.errors import UserError

# ------------------------------------------------------------------------------------------------ block layouts


@dataclass(frozen=True)
class DepthLayout:
    """Where a family keeps the two sublayers of a decoder block (paths inside the block).

    ``sequential``: the block computes ``h' = h + f_attn(h)`` then ``out = h' + f_ffn(h')`` (norms inside the
    ``f``), so each sublayer can be skipped alone: a skipped sublayer adds zero to the residual stream. Families
    with a parallel residual (``out = h + f_attn(h) + f_ffn(h)``) can only lose whole blocks.
    ``ffn`` is None where the FFN is not one module (OPT's fc1 / fc2 sit in the block itself).
    """

    attention: str | None  # the attention module; called as attention(hidden_states, ...) → (output, weights)
    ffn: str | None  # the FFN module; called as ffn(hidden) → output
    sequential: bool = True
    # config flags whose truth makes the forward depend on the block's index (so renumbering changes the model)
    index_dependent: tuple[str, ...] = ()


_LLAMA_LIKE = DepthLayout("self_attn", "mlp")
DEPTH_LAYOUTS: dict[str, DepthLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,  # post-attention / post-FFN norms: norm(0) = 0, so a skipped sublayer still adds 0
    "gemma3_text": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "starcoder2": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "gpt2": DepthLayout("attn", "mlp", index_dependent=("scale_attn_by_inverse_layer_idx",)),
    "opt": DepthLayout("self_attn", None),
    "phi": DepthLayout("self_attn", "mlp", sequential=False),  # attention and FFN read the same normed input
    "gpt_neox": DepthLayout("attention", "mlp", sequential=False),  # parallel residual (use_parallel_residual)
}


def depth_layout(config) -> DepthLayout:
    """The depth layout of ``config``'s family, or a UserError naming the families depth pruning supports."""
    model_type = getattr(config, "model_type", None)
    layout = DEPTH_LAYOUTS.get(model_type)
    if layout is None:
        raise UserError(
            f"depth pruning (shrink blocks / sublayers) is not supported for {model_type!r} models: it works for "
            f"{', '.join(sorted(DEPTH_LAYOUTS))} (the table is lmcompress/models/depth.py)"
        )
    for flag in layout.index_dependent:
        if getattr(config, flag, False):
            raise UserError(
                f"this {model_type} model sets {flag}, so each block's forward depends on its index: removing "
                "blocks would change the blocks that stay"
            )
    return layout


def sublayer_path(config, sublayer: str) -> str:
    """The path (inside a block) of ``sublayer`` (``attention`` or ``ffn``), or a UserError where it cannot be
    skipped alone."""
    layout = depth_layout(config)
    model_type = config.model_type
    if not layout.sequential:
        raise UserError(
            f"{model_type} blocks add attention and FFN to the residual stream in parallel: their sublayers "
            "cannot be skipped one at a time; remove whole blocks (shrink blocks) instead"
        )
    path = layout.attention if sublayer == "attention" else layout.ffn
    if path is None:
        raise UserError(
            f"{model_type} blocks keep their {sublayer} as separate layers, not one module, so it cannot be "
            "skipped; remove whole blocks (shrink blocks) instead"
        )
    return path


# ----------------------------------------------------------------------------------------- per-layer config fields

# How a config field depends on the block index:
#   "per_layer": a list with one entry per block (filtered to the kept blocks);
#   "indices":   a list of block indices (renumbered; removed blocks dropped);
#   "threshold": blocks with index < value form a group (value becomes the number of kept blocks below it);
#   "period":    every value-th block is special (kept only where it is 1 or 0: it then still holds).
CONFIG_FIELDS: dict[str, str] = {
    "layer_types": "per_layer",  # sliding / full attention per block (Gemma 2/3, Qwen 2/3, Cohere 2, Mistral...)
    "no_rope_layers": "per_layer",  # SmolLM3: 1 where the block applies RoPE
    "mlp_only_layers": "indices",  # Qwen-MoE: blocks with a dense MLP
    "max_window_layers": "threshold",  # Qwen 2/3: blocks below it use full attention
    "first_k_dense_replace": "threshold",  # DeepSeek: the first k blocks are dense
    "decoder_sparse_step": "period",  # Qwen-MoE: every k-th block is sparse
}
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count_key(config) -> str:
    """The config key that holds the number of blocks."""
    for key in _LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            return key
    raise UserError(f"the {config.model_type} config names no layer count ({', '.join(_LAYER_COUNT_KEYS)})")


def renumbered_fields(config, keep: list[int]) -> dict[str, object]:
    """The config fields (layer count included) of a model that keeps only the blocks ``keep`` (old indices,
    ascending); a UserError for a field that cannot stay consistent, or an unknown list with one entry per block.
    """
    key = layer_count_key(config)
    n = getattr(config, key)
    new: dict[str, object] = {key: len(keep)}
    for field, kind in CONFIG_FIELDS.items():
        value = getattr(config, field, None)
        if value is None:
            continue
        if kind == "per_layer":
            if len(value) != n:
                raise UserError(f"config field {field} has {len(value)} entries for {n} blocks: the config is broken")
            new[field] = [value[i] for i in keep]
        elif kind == "indices":
            position = {old: i for i, old in enumerate(keep)}
            new[field] = [position[i] for i in value if i in position]
        elif kind == "threshold":
            if isinstance(value, int) and value < n:
                new[field] = sum(i < value for i in keep)
        elif kind == "period" and isinstance(value, int) and value > 1:
            raise UserError(
                f"config field {field}={value} marks every {value}-th block; with blocks removed the pattern would "
                "move to other blocks, so depth pruning refuses this model"
            )
    unknown = [
        name
        for name, value in vars(config).items()
        if isinstance(value, list) and len(value) == n and n > 1 and name not in CONFIG_FIELDS
        and name not in ("architectures",)
    ]  # fmt: skip
    if unknown:
        raise UserError(
            f"the config has lists with one entry per block that lmcompress does not know ({', '.join(unknown)}): "
            "removing blocks could leave them inconsistent. Add them to CONFIG_FIELDS in lmcompress/models/depth.py"
        )
    return new
