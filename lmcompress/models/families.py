"""Model-family adapters: one small table saying where each architecture keeps its transformer blocks.

Everything else is found generically: the prunable layers are the ``nn.Linear`` / GPT-2 ``Conv1D``
modules inside a block, and the inputs of block 0 are captured by running the model's own forward.

Decoder paths are relative to the causal LM. Encoder paths (``kind="encoder"``) are relative to the bare
encoder (``model.base_model``), so the same entry serves ``BertModel`` (``encoder.layer``) and
``BertForMaskedLM`` (``bert.encoder.layer``); use :func:`blocks_path` for the full dotted path.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcompress.errors import UserError


@dataclass(frozen=True)
class Family:
    blocks: str  # dotted path of the ModuleList of transformer blocks
    final_norm: str | None  # dotted path of the norm before the output head (--include-head); None: unsupported
    kind: str = "decoder"  # "decoder" (causal LM) or "encoder" (BERT-style; paths relative to model.base_model)
    positions_after_pad: bool = False  # position ids start after pad_token_id (RoBERTa): context is shorter


FAMILIES: dict[str, Family] = {
    "llama": Family("model.layers", "model.norm"),
    "mistral": Family("model.layers", "model.norm"),
    "qwen2": Family("model.layers", "model.norm"),
    "qwen3": Family("model.layers", "model.norm"),
    "phi": Family("model.layers", "model.final_layernorm"),
    "phi3": Family("model.layers", "model.norm"),
    "opt": Family("model.decoder.layers", "model.decoder.final_layer_norm"),
    "gpt2": Family("transformer.h", "transformer.ln_f"),
    "gpt_neox": Family("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    # Mixture-of-experts decoders: attention (and Qwen2-MoE's shared expert) are nn.Linear and prunable; the
    # routed experts are fused 3-D parameters, not pruned by the unstructured methods (transforms.experts drops them)
    "mixtral": Family("model.layers", "model.norm"),
    "qwen2_moe": Family("model.layers", "model.norm"),
    "qwen3_moe": Family("model.layers", "model.norm"),
    "olmoe": Family("model.layers", "model.norm"),
    # BERT-style encoders: post-LN, so no final norm; embeddings, pooler and MLM head stay outside the blocks.
    "bert": Family("encoder.layer", None, kind="encoder"),
    "roberta": Family("encoder.layer", None, kind="encoder", positions_after_pad=True),
    "xlm-roberta": Family("encoder.layer", None, kind="encoder", positions_after_pad=True),
    "distilbert": Family("transformer.layer", None, kind="encoder"),
}


def family_of(config) -> Family:
    """The adapter for a model config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"unsupported architecture {model_type!r}: lmcompress supports {', '.join(sorted(FAMILIES))}. "
            "Other decoder-only models built from nn.Linear layers can be added with one line in "
            "lmcompress/families.py."
        )
    return FAMILIES[model_type]


def is_encoder(config) -> bool:
    """True for BERT-style encoders (bidirectional, evaluated by MLM perplexity and embedding similarity)."""
    return family_of(config).kind == "encoder"


def blocks_path(model: nn.Module) -> str:
    """Full dotted path of the block list in ``model`` (e.g. ``model.layers``, ``bert.encoder.layer``)."""
    family = family_of(model.config)
    if family.kind == "decoder":
        return family.blocks
    base = getattr(model, "base_model", model)
    prefix = "" if base is model else next(n for n, m in model.named_modules() if m is base)
    return f"{prefix}.{family.blocks}" if prefix else family.blocks


def get_blocks(model: nn.Module) -> nn.ModuleList:
    return operator.attrgetter(blocks_path(model))(model)


def get_final_norm(model: nn.Module) -> nn.Module:
    family = family_of(model.config)
    if family.final_norm is None:
        raise UserError(
            f"include_head is not supported for {model.config.model_type} models; prune the blocks only",
            param="include_head",
        )
    return operator.attrgetter(family.final_norm)(model)


def context_length(config) -> int | None:
    """The longest sequence the model was built for, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            family = FAMILIES.get(getattr(config, "model_type", None))
            if family is not None and family.positions_after_pad:  # RoBERTa: positions pad_id+1 .. max-1
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)


def find_prunable(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of a block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if is_prunable(m)}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (Conv1D stores it transposed)."""
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


def set_weight_matrix(module: nn.Module, weight: torch.Tensor) -> None:
    """Write back an ``[out, in]`` weight in the module's own layout, dtype and device."""
    target = module.weight.data
    value = weight.t() if isinstance(module, Conv1D) else weight
    target.copy_(value.to(dtype=target.dtype, device=target.device))


# Encoders: the Auto class that keeps the head named by the config's ``architectures`` (suffix → class name).
# A bare encoder (``BertModel``, sentence-embedding models) and unknown heads load with ``AutoModel``.
ENCODER_AUTO_CLASSES = {
    "ForMaskedLM": "AutoModelForMaskedLM",
    "LMHeadModel": "AutoModelForCausalLM",  # BertLMHeadModel (is_decoder=True): keep its head
    "ForPreTraining": "AutoModelForPreTraining",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForQuestionAnswering": "AutoModelForQuestionAnswering",
    "ForMultipleChoice": "AutoModelForMultipleChoice",
}
