"""Model-family adapters: one small table saying where each architecture keeps its decoder blocks.

Everything else is found generically: the prunable layers are the ``nn.Linear`` / GPT-2 ``Conv1D``
modules inside a block, and the inputs of block 0 are captured by running the model's own forward.
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
    final_norm: str  # dotted path of the norm applied before the output head (used with --include-head)


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


def get_blocks(model: nn.Module) -> nn.ModuleList:
    return operator.attrgetter(family_of(model.config).blocks)(model)


def get_final_norm(model: nn.Module) -> nn.Module:
    return operator.attrgetter(family_of(model.config).final_norm)(model)


def context_length(config) -> int | None:
    """The longest sequence the model was built for, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
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
