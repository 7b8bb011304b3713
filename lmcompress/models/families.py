"""Model-family adapters: where an architecture keeps its transformer blocks, final norm and head.

Decoder-only models need no entry: the blocks are found as the longest ``nn.ModuleList`` of identical
modules holding linear layers (its length equal to ``config.num_hidden_layers`` when the config says), the
final norm as the norm registered beside the blocks after them (or, failing that, as the module whose
output the head reads), and the head by ``model.get_output_embeddings()``. Within a block, the prunable
layers are the ``nn.Linear`` / GPT-2 ``Conv1D`` modules, and what each block receives (masks, positions,
rotary tables) is captured from the model's own forward (``calibration.engine``).

The :data:`FAMILIES` table covers what cannot be found that way: encoders (``kind="encoder"``; paths
relative to the bare encoder ``model.base_model``, so the same entry serves ``BertModel`` and
``BertForMaskedLM``) and the decoders tested since before the generic search (their rows pin the paths
the search also finds; tests check the two agree). Use :func:`blocks_path` for the full dotted path.
"""

from __future__ import annotations

import operator
import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcompress.errors import UserError


@dataclass(frozen=True)
class Family:
    blocks: str | None  # dotted path of the ModuleList of transformer blocks; None: found by the generic search
    final_norm: str | None  # dotted path of the norm before the output head (--include-head); None: see below
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
    # routed experts are fused 3-D parameters, pruned and quantized one expert at a time (calibration.experts)
    "mixtral": Family("model.layers", "model.norm"),
    "qwen2_moe": Family("model.layers", "model.norm"),
    "qwen3_moe": Family("model.layers", "model.norm"),
    "olmoe": Family("model.layers", "model.norm"),
    # BERT-style encoders: post-LN, so no final norm (None here means unsupported); embeddings, pooler and MLM
    # head stay outside the blocks.
    "bert": Family("encoder.layer", None, kind="encoder"),
    "roberta": Family("encoder.layer", None, kind="encoder", positions_after_pad=True),
    "xlm-roberta": Family("encoder.layer", None, kind="encoder", positions_after_pad=True),
    "distilbert": Family("transformer.layer", None, kind="encoder"),
}
GENERIC_DECODER = Family(None, None)  # any other decoder-only causal LM: everything found by the search


def _is_causal_lm(config) -> bool:
    """True when transformers (or the repository's own code) has a causal-LM class for ``config``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    auto_map = getattr(config, "auto_map", None) or {}
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map


def family_of(config) -> Family:
    """The adapter for a model config: its FAMILIES row, or :data:`GENERIC_DECODER` for any other causal LM.

    Encoder–decoder models and configs with no causal-LM class get a UserError saying so.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    encoders = ", ".join(n for n, f in FAMILIES.items() if f.kind == "encoder")
    supported = (
        "lmcompress compresses decoder-only causal LMs (any that transformers loads with AutoModelForCausalLM: "
        f"llama, mistral, qwen2, gemma, gpt2, ...) and the BERT-style encoders {encoders}"
    )
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"unsupported architecture {model_type!r}: it is an encoder-decoder model; {supported}")
    if not _is_causal_lm(config):
        raise UserError(
            f"unsupported architecture {model_type!r}: transformers has no causal-LM class for it; {supported}"
        )
    return GENERIC_DECODER


def is_encoder(config) -> bool:
    """True for BERT-style encoders (bidirectional, evaluated by MLM perplexity and embedding similarity)."""
    return family_of(config).kind == "encoder"


def _num_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_blocks(model: nn.Module) -> str:
    """Dotted path of the decoder's block list, found from the module tree (see the module docstring).

    Candidates are ``nn.ModuleList`` s of one module class whose members hold linear layers, not nested in
    another candidate; with ``config.num_hidden_layers`` known only lists of that length count. The longest
    wins; a tie between different lists is refused rather than guessed.
    """
    config = getattr(model, "config", None)
    n_layers = _num_layers(config) if config is not None else None
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and len({type(b) for b in m}) == 1
        and any(is_prunable(x) for x in m[0].modules())
    ]
    if n_layers is not None:
        lists = [(n, m) for n, m in lists if len(m) == n_layers]
    # outermost only: a block's own lists (experts, per-head layers) are not the block list
    lists = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists if o != n)]
    what = type(model).__name__
    if not lists:
        need = f" of length num_hidden_layers={n_layers}" if n_layers is not None else ""
        raise UserError(
            f"cannot find the transformer blocks of {what}: lmcompress looks for an nn.ModuleList{need} of "
            "identical blocks built from nn.Linear (or GPT-2 Conv1D) layers, and this model has none. Models that "
            "keep their layers otherwise need a row in lmcompress/models/families.py (FAMILIES)."
        )
    longest = max(len(m) for _, m in lists)
    best = [n for n, m in lists if len(m) == longest]
    if len(best) > 1:
        raise UserError(
            f"cannot tell which of {', '.join(best)} holds the transformer blocks of {what}; add a row naming it "
            "to lmcompress/models/families.py (FAMILIES)"
        )
    return best[0]


_BLOCKS_CACHE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def blocks_path(model: nn.Module) -> str:
    """Full dotted path of the block list in ``model`` (e.g. ``model.layers``, ``bert.encoder.layer``)."""
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        if config is not None and getattr(config, "is_encoder_decoder", False):
            family_of(config)  # raises the encoder-decoder error
        if model not in _BLOCKS_CACHE:
            _BLOCKS_CACHE[model] = _find_blocks(model)
        return _BLOCKS_CACHE[model]
    if family.kind == "decoder":
        return family.blocks
    base = getattr(model, "base_model", model)
    prefix = "" if base is model else next(n for n, m in model.named_modules() if m is base)
    return f"{prefix}.{family.blocks}" if prefix else family.blocks


def get_blocks(model: nn.Module) -> nn.ModuleList:
    return operator.attrgetter(blocks_path(model))(model)


def get_head(model: nn.Module) -> nn.Module:
    """The output head (``model.get_output_embeddings()``), or a UserError when the model has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UserError(f"{type(model).__name__} has no output head (get_output_embeddings() is None)")
    return head


# Names of final norms in transformers' decoders, most specific first (matched against the blocks' siblings).
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f", "ln_final")


def _is_norm_like(module: nn.Module) -> bool:
    """Per-feature parameters at most (LayerNorm, RMSNorm, OLMo's parameter-free LayerNorm), no linear layers."""
    return all(p.dim() <= 1 for p in module.parameters()) and not any(is_prunable(m) for m in module.modules())


def _find_final_norm(model: nn.Module) -> str | None:
    """Dotted path of the norm applied to the last block's output, or None if there is none to find."""
    path = blocks_path(model)
    parent_path, _, list_name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    children = list(parent.named_children())
    names = [n for n, _ in children]
    after = children[names.index(list_name) + 1 :] if list_name in names else children
    for wanted in _FINAL_NORM_NAMES:
        for name, child in children:
            if name == wanted and _is_norm_like(child):
                return f"{parent_path}.{name}" if parent_path else name
    # a norm registered after the blocks, not an embedding norm (BLOOM's word_embeddings_layernorm)
    found = [n for n, c in after if _is_norm_like(c) and "emb" not in n.lower() and re.search(r"norm|ln", n.lower())]
    if len(found) == 1:
        return f"{parent_path}.{found[0]}" if parent_path else found[0]
    return _final_norm_by_hook(model)


@torch.no_grad()
def _final_norm_by_hook(model: nn.Module) -> str | None:
    """The norm-like module whose output the head reads, seen in one forward on two tokens with blocks skipped."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    blocks = get_blocks(model)
    inside = {id(m) for m in blocks.modules()}
    made: dict[int, str] = {}  # data_ptr of an output → the module that computed it (last writer wins)
    alive: list[torch.Tensor] = []  # held so that no address is reused within the forward
    read: list[int] = []

    def record(name: str):
        def hook(_m, args, out):
            if isinstance(out, torch.Tensor) and not (args and out is args[0]):  # not a pass-through (dropout)
                made[out.data_ptr()] = name
                alive.append(out)

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if name and id(module) not in inside and module is not head and _is_norm_like(module)
    ]
    handles.append(head.register_forward_pre_hook(lambda _m, args: read.append(args[0].data_ptr())))
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    try:
        for tuple_output in (False, True):  # blocks that return a tensor, or a tuple read as block(...)[0]
            made.clear(), read.clear()
            with suppress(Exception), skipped_blocks(blocks, tuple_output=tuple_output):
                model(ids, use_cache=False)
                break
        else:
            return None  # the forward cannot run with identity blocks: nothing found
    finally:
        for h in handles:
            h.remove()
    return made.get(read[0]) if read else None


@contextmanager
def skipped_blocks(
    blocks: nn.ModuleList, on_call: Callable[[int, tuple, dict], None] | None = None, *, tuple_output: bool = False
) -> Iterator[None]:
    """Within the ``with``, every block returns its input hidden states unchanged, computing nothing.

    ``on_call(i, args, kwargs)`` sees the arguments block ``i`` received and may raise to stop the forward.
    The model's own code around the blocks (embeddings, masks, rotary tables, final norm) still runs.
    ``tuple_output`` returns ``(hidden,)``, for forwards that read ``block(...)[0]`` and need the real shape.
    """

    def identity(i: int):
        def forward(*args, **kwargs):
            if on_call is not None:
                on_call(i, args, kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if tuple_output else hidden

        return forward

    saved = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's device-placement wrapper
    for i, block in enumerate(blocks):
        block.forward = identity(i)  # an instance attribute shadows the class's forward; hooks still run
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def get_final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the head, or a UserError where there is none lmcompress can find."""
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    if family is not None and family.final_norm is not None:
        return operator.attrgetter(family.final_norm)(model)
    path = None if family is not None else _find_final_norm(model)
    if path is None:
        raise UserError(
            f"include_head is not supported for {model.config.model_type} models: lmcompress finds no norm "
            "between the last block and the head; prune the blocks only",
            param="include_head",
        )
    return model.get_submodule(path)


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


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every block's linear layers, by full module name (``model.layers.3.mlp.up_proj``), in model order."""
    prefix = blocks_path(model)
    blocks = get_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, block in enumerate(blocks) for n, m in find_prunable(block).items()}


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
