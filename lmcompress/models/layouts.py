"""Where each family keeps the layers that structured transforms act on: one table per concern.

- :data:`LAYOUTS` / :func:`structure_layout`: FFN channels and attention heads (``transforms.shrink``, FLOPs).
- :data:`MOE_LAYOUTS` / :func:`moe_layout`: routers and fused experts of mixture-of-experts blocks
  (``transforms.experts``, FLOPs); :func:`find_fused_experts`: the fused 3-D expert parameters, which pruning,
  quantization and packed storage treat as one layer per expert (``calibration.experts``).

Paths are relative to one transformer block (``models.families.get_blocks``). Unstructured pruning and
quantization need none of this: they find the linear layers of any block generically.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lmcompress.errors import UserError

# ------------------------------------------------------------------------------ FFN channels and attention heads


@dataclass(frozen=True)
class Layout:
    """Where a family keeps the layers around its FFN channels and attention heads (paths inside a block)."""

    ffn_in: tuple[str, ...]  # layers whose output rows are the FFN channels (gate, up / fc1)
    ffn_out: str  # the layer whose input columns are the FFN channels (down / fc2)
    ffn_width: str  # config key of the FFN width
    attn: str  # the attention module
    o: str  # the layer whose input columns are the heads (o_proj / dense / out_proj)
    q: str | None = None  # separate q/k/v projections
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # one fused projection, rows stacked [q; k; v]
    ffn_halves: int = 1  # 2 when gate and up are one stacked layer [gate; up]
    heads: str = "per-layer"  # "per-layer", "uniform" (forward reads head counts from the config) or "none"
    # config flags that give a group of layers a bias: structure → (config key, the layers it governs). With
    # them a bias correction on bias-less layers stays loadable by plain from_pretrained (the others get zeros).
    bias_flags: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def bias_flag(self, structure: str) -> tuple[str, tuple[str, ...]] | None:
        return next(((key, paths) for s, key, paths in self.bias_flags if s == structure), None)


_LLAMA = Layout(
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    ffn_width="intermediate_size",
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
)
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_BIASES = (
    ("ffn", "mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    ("heads", "attention_bias", _ATTENTION),
)

# Head removal needs a forward that derives head counts from the weights (reshape with -1) and a config that
# can keep head_dim when num_attention_heads changes; OPT, GPT-2 and GPT-NeoX compute head_dim = hidden/heads.
LAYOUTS: dict[str, Layout] = {
    "llama": replace(_LLAMA, bias_flags=_LLAMA_BIASES),
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": replace(_LLAMA, bias_flags=(("heads", "attention_bias", _ATTENTION),)),
    "phi3": Layout(
        ffn_in=("mlp.gate_up_proj",),
        ffn_out="mlp.down_proj",
        ffn_width="intermediate_size",
        ffn_halves=2,
        attn="self_attn",
        qkv="self_attn.qkv_proj",
        o="self_attn.o_proj",
        heads="uniform",  # its forward slices the fused qkv with config.num_attention_heads
    ),
    "phi": Layout(
        ffn_in=("mlp.fc1",),
        ffn_out="mlp.fc2",
        ffn_width="intermediate_size",
        attn="self_attn",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.dense",
    ),
    "opt": Layout(
        ffn_in=("fc1",), ffn_out="fc2", ffn_width="ffn_dim", attn="self_attn", o="self_attn.out_proj", heads="none"
    ),
    "gpt2": Layout(
        ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj", ffn_width="n_inner", attn="attn", o="attn.c_proj", heads="none"
    ),
    "gpt_neox": Layout(
        ffn_in=("mlp.dense_h_to_4h",),
        ffn_out="mlp.dense_4h_to_h",
        ffn_width="intermediate_size",
        attn="attention",
        o="attention.dense",
        heads="none",
    ),
}


def structure_layout(config, structure: str | None = None) -> Layout:
    """The layout of ``config``'s family, or a UserError naming the families that support ``structure``."""
    model_type = getattr(config, "model_type", None)
    layout = LAYOUTS.get(model_type)
    if structure == "heads":
        supported = sorted(n for n, lay in LAYOUTS.items() if lay.heads != "none")
        if layout is None or layout.heads == "none":
            raise UserError(
                f"attention-head removal is not supported for {model_type!r} models: it works for "
                f"{', '.join(supported)}. FFN-channel removal (structure ffn) works for {', '.join(sorted(LAYOUTS))}."
            )
    if layout is None:
        raise UserError(
            f"structured pruning is not supported for {model_type!r} models: it works for {', '.join(sorted(LAYOUTS))}"
        )
    return layout


@dataclass
class HeadShape:
    heads: int  # query heads
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads


def head_shape(config) -> HeadShape:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadShape(heads, kv, head_dim)


# ------------------------------------------------------------------------------------------- mixture of experts


@dataclass(frozen=True)
class MoeLayout:
    """Where one MoE family keeps its experts (transformers ≥ 5: fused 3-D expert tensors)."""

    moe: str  # the sparse-MoE module inside a decoder block (dense-MLP blocks lack ``experts``)
    router: str  # its router, relative to ``moe``: a weight [E, hidden], returns (logits, weights, indices)
    experts: str  # the fused experts, relative to ``moe``: gate_up_proj [E, 2I, hidden], down_proj [E, hidden, I]
    count_key: str  # config field holding the number of routed experts
    topk_key: str  # config field holding k (experts per token)
    renormalize: bool | None  # top-k weights renormalized to sum 1: True always, None = config.norm_topk_prob
    shared: str | None = None  # an always-on shared expert (kept as is; it does not depend on routing)


MOE_LAYOUTS: dict[str, MoeLayout] = {
    "mixtral": MoeLayout("mlp", "gate", "experts", "num_local_experts", "num_experts_per_tok", True),
    "qwen2_moe": MoeLayout("mlp", "gate", "experts", "num_experts", "num_experts_per_tok", None, "shared_expert"),
    "qwen3_moe": MoeLayout("mlp", "gate", "experts", "num_experts", "num_experts_per_tok", None),
    "olmoe": MoeLayout("mlp", "gate", "experts", "num_experts", "num_experts_per_tok", None),
}


def moe_layout(config) -> MoeLayout:
    """The MoE layout of ``config``'s family, or a UserError naming the families lmcompress knows."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MOE_LAYOUTS:
        raise UserError(
            f"expert dropping needs a mixture-of-experts model; {model_type!r} is not one lmcompress knows "
            f"(supported: {', '.join(sorted(MOE_LAYOUTS))})"
        )
    return MOE_LAYOUTS[model_type]


FUSED_EXPERTS = ("gate_up_proj", "down_proj")  # fused routed-expert parameters, in the order a token meets them
# The names (gate, up, down) of expert E's linears in a family's checkpoints (``...experts.E.<name>``), which
# transformers' conversion mapping fuses into gate_up_proj / down_proj on load (renaming Mixtral's
# ``block_sparse_moe`` to ``mlp`` too, and back on save); families not listed use the default.
EXPERT_CHECKPOINT_NAMES: dict[str, tuple[str, str, str]] = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def expert_checkpoint_names(config) -> tuple[str, str, str]:
    """The checkpoint names of one expert's gate, up and down linears in ``config``'s family."""
    return EXPERT_CHECKPOINT_NAMES.get(getattr(config, "model_type", None), DEFAULT_EXPERT_NAMES)


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding routed experts as ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, called as
    ``experts(hidden, top_k_index, top_k_weights)`` (transformers ≥ 5: Mixtral, Qwen-MoE, OLMoE). Other fused
    layouts (gpt-oss's transposed experts with biases) are not this one."""
    gu, dn = (getattr(module, n, None) for n in FUSED_EXPERTS)
    if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3):
        return False
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        return False
    e, two_i, h = gu.shape
    return two_i % 2 == 0 and tuple(dn.shape) == (e, h, two_i // 2) and hasattr(module, "act_fn")


def find_fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """The fused-expert modules (:func:`is_fused_experts`) of ``block`` by path inside it (empty: none)."""
    return {name: m for name, m in block.named_modules() if is_fused_experts(m)}


def moe_module(block: nn.Module, layout: MoeLayout) -> nn.Module | None:
    """The sparse-MoE module of ``block``, or None for a dense-MLP block."""
    try:
        moe = block.get_submodule(layout.moe)
    except AttributeError:
        return None
    try:
        moe.get_submodule(layout.experts)
    except AttributeError:
        return None  # a dense-MLP block (Qwen-MoE mlp_only_layers / decoder_sparse_step)
    return moe
