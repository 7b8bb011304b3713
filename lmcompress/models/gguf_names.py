"""What llama.cpp calls a Hugging Face model: architecture names, tensor names, rotary row order, pre-tokenizers.

All family knowledge the GGUF export (:mod:`lmcompress.checkpoint.gguf_export`) needs lives in
:data:`GGUF_FAMILIES` and :data:`PRE_TOKENIZERS`; tensor names come from the ``gguf`` package's own
``TensorNameMap`` (``gguf.get_tensor_name_map``), so they are llama.cpp's, not a copy.

Rotary layout. Hugging Face LLaMA attention rotates the pair of dimensions ``(i, i + d/2)`` of each head of
``d`` dimensions (``rotate_half``); llama.cpp's ``llama`` architecture ("normal" rope) rotates the adjacent
pair ``(2i, 2i + 1)``. The two compute the same attention when the rows of ``q_proj`` and ``k_proj`` (and
their biases) are reordered within every head so that GGUF row ``2i + h`` holds Hugging Face row
``h·d/2 + i`` (``h ∈ {0, 1}``, ``i < d/2``); ``k_proj`` is reordered per key-value head. Qwen2/Qwen3 use
llama.cpp's "neox" rope, which is the Hugging Face pairing, and need no reordering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcompress.errors import UserError


@dataclass(frozen=True)
class GGUFFamily:
    arch: str  # member of gguf.MODEL_ARCH (llama.cpp's general.architecture is gguf.MODEL_ARCH_NAMES[...])
    permute_qk: bool  # q/k rows reordered from half-split to interleaved rotary pairs (see the module docstring)
    activation: str = "silu"  # the gated-FFN activation llama.cpp's graph for this architecture applies
    moe_norm: bool | None = None  # MoE: llama.cpp's graph renormalizes the top-k routing weights (None: dense)


# Hugging Face model_type → llama.cpp architecture. llama.cpp converts Mistral checkpoints to its llama
# architecture (same graph; it has no sliding-window attention for it).
GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily("LLAMA", permute_qk=True),
    "mistral": GGUFFamily("LLAMA", permute_qk=True),
    "qwen2": GGUFFamily("QWEN2", permute_qk=False),
    "qwen3": GGUFFamily("QWEN3", permute_qk=False),
    # mixture of experts: llama.cpp runs Mixtral as its llama architecture with experts
    "mixtral": GGUFFamily("LLAMA", permute_qk=True, moe_norm=True),
    "qwen2_moe": GGUFFamily("QWEN2MOE", permute_qk=False, moe_norm=False),
    "qwen3_moe": GGUFFamily("QWEN3MOE", permute_qk=False, moe_norm=True),
    "olmoe": GGUFFamily("OLMOE", permute_qk=False, moe_norm=False),  # q/k norms over the whole projection
}

# Byte-level BPE pre-tokenizers (the split before merging, from tokenizer.json) → llama.cpp's
# tokenizer.ggml.pre name whose split regex is the same. Matched on the JSON of the HF pre-tokenizer.
_GPT2_BYTELEVEL = {"type": "ByteLevel", "use_regex": True}
_BYTELEVEL_NO_REGEX = {"type": "ByteLevel", "use_regex": False}
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, list[dict]] = {
    # the GPT-2 split alone (SmolLM2, GPT-2 style vocabularies)
    "gpt-2": [_GPT2_BYTELEVEL],
    # single digits, then the GPT-2 split (SmolLM v1, StarCoder)
    "smollm": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTELEVEL],
    "qwen2": [{"type": "Split", "regex": _QWEN2_SPLIT}, _BYTELEVEL_NO_REGEX],
    "llama-bpe": [{"type": "Split", "regex": _LLAMA3_SPLIT}, _BYTELEVEL_NO_REGEX],  # LLaMA 3
}


def gguf_family(config) -> GGUFFamily:
    """The GGUF row of ``config``'s model type; a UserError naming it and the supported types otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_FAMILIES:
        dense = sorted(k for k, f in GGUF_FAMILIES.items() if f.moe_norm is None)
        moe = sorted(k for k, f in GGUF_FAMILIES.items() if f.moe_norm is not None)
        raise UserError(
            f"GGUF export does not know the architecture {model_type!r}: lmcompress maps {', '.join(dense)} and the "
            f"mixture-of-experts {', '.join(moe)} to llama.cpp's names (models/gguf_names.py); export other models "
            "with --format compressed-tensors, or convert a plain folder with llama.cpp's convert_hf_to_gguf.py"
        )
    family = GGUF_FAMILIES[model_type]
    act = getattr(config, "hidden_act", "silu")
    if act != family.activation:
        raise UserError(
            f"this {model_type} model uses the activation {act!r}, but llama.cpp's {family.arch.lower()} graph "
            f"applies {family.activation}: the GGUF would compute a different model"
        )
    if family.moe_norm is not None:
        _check_moe(config, model_type, family)
    return family


def _check_moe(config, model_type: str, family: GGUFFamily) -> None:
    """UserError where llama.cpp's MoE graph for ``family`` would route differently from ``config``."""
    norm = True if model_type == "mixtral" else bool(getattr(config, "norm_topk_prob", False))
    if norm != family.moe_norm:
        raise UserError(
            f"this {model_type} model {'renormalizes' if norm else 'does not renormalize'} its top-k routing "
            f"weights (norm_topk_prob), but llama.cpp's {family.arch.lower()} graph "
            f"{'does' if family.moe_norm else 'does not'}: the GGUF would compute a different model"
        )
    heads = int(config.num_attention_heads)
    if model_type == "olmoe" and int(getattr(config, "num_key_value_heads", None) or heads) != heads:
        raise UserError(
            "this OLMoE model has grouped-query attention: llama.cpp's olmoe graph norms k over the whole hidden "
            "width and cannot load it; not exported to GGUF"
        )
    sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
    if getattr(config, "mlp_only_layers", None) or sparse_step != 1:
        raise UserError(
            f"this {model_type} model has dense-MLP blocks (mlp_only_layers / decoder_sparse_step), which "
            f"llama.cpp's {family.arch.lower()} graph does not have: not exported to GGUF"
        )


def tensor_name_map(family: GGUFFamily, n_blocks: int):
    """llama.cpp's name map for ``family`` (``gguf.TensorNameMap``): HF tensor name → GGUF tensor name."""
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), n_blocks)


def arch_name(family: GGUFFamily) -> str:
    """``general.architecture`` of ``family`` as llama.cpp spells it (``llama``, ``qwen2``, ...)."""
    import gguf

    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)]


def rotary_rows(hf_name: str, config) -> int | None:
    """The number of heads whose rows ``hf_name`` reorders for llama.cpp's rotary layout, or None if it keeps
    its row order: ``num_attention_heads`` for ``q_proj`` weights/biases, ``num_key_value_heads`` for ``k_proj``."""
    family = gguf_family(config)
    if not family.permute_qk:
        return None
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return int(config.num_attention_heads)
    if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def rotary_row_order(rows: int, n_heads: int) -> torch.Tensor:
    """Index ``order`` with ``gguf_rows = hf_rows[order]``: within each head of ``d = rows / n_heads`` rows,
    GGUF row ``2i + h`` is HF row ``h·d/2 + i``. Its inverse is ``torch.argsort(order)``."""
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even size")
    d = rows // n_heads
    head = torch.arange(n_heads).view(n_heads, 1, 1) * d
    i = torch.arange(d // 2).view(1, d // 2, 1)
    h = torch.arange(2).view(1, 1, 2)
    return (head + h * (d // 2) + i).reshape(-1)


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json ``pre_tokenizer`` object, or None if unknown."""
    if pre_tokenizer is None:
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    for name, pattern in PRE_TOKENIZERS.items():
        if len(steps) == len(pattern) and all(_matches(s, p) for s, p in zip(steps, pattern, strict=True)):
            return name
    return None


def _matches(step: dict, pattern: dict) -> bool:
    for key, want in pattern.items():
        have = step.get(key)
        if key == "regex":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex != want or step.get("behavior") not in ("Isolated", None) or step.get("invert"):
                return False
        elif have != want:
            return False
    return not (step.get("type") == "ByteLevel" and step.get("add_prefix_space"))
