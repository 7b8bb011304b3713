"""Tiny models built from configs (random or briefly trained) and a small tokenizer, all offline.

Used by ``lmcompress demo``, the test suite and the benchmarks: nothing here downloads anything.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Small configs for every supported family; vocab_size and max positions are filled in by build_tiny_model.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "mistral": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "phi3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    ),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    # Mixture-of-experts: 8 routed experts, top-2 (Qwen2-MoE adds a shared expert)
    "mixtral": dict(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "olmoe": dict(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
    ),
}

# Decoder families that have no FAMILIES row: blocks, final norm and head are found by the generic search
# (models.families). Kept apart so that the suites parametrized over TINY_CONFIGS keep their running time;
# tests/test_families.py runs these. Gemma 2/3 and Cohere 2 alternate sliding-window and global layers
# (window 8, shorter than the test windows, so the two kinds of mask really differ).
_LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
_ALTERNATING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
TINY_GENERIC_CONFIGS: dict[str, dict] = {
    "gemma": dict(_LLAMA_LIKE, head_dim=16),
    "gemma2": dict(_LLAMA_LIKE, head_dim=16, **_ALTERNATING),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=16, **_ALTERNATING),  # Gemma3ForCausalLM (text only)
    "cohere2": dict(_LLAMA_LIKE, **_ALTERNATING),
    "cohere": dict(_LLAMA_LIKE),
    "granite": dict(_LLAMA_LIKE),
    "olmo": dict(_LLAMA_LIKE),
    "olmo2": dict(_LLAMA_LIKE),
    "stablelm": dict(_LLAMA_LIKE),
    "starcoder2": dict(_LLAMA_LIKE),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),  # ALiBi: no position embeddings
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
}
_POSITIONS_KEY = {"gpt2": "n_positions", "gptj": "n_positions", "bloom": None}

# BERT-style encoders, kept apart so that tests parametrized over TINY_CONFIGS (causal LMs) do not pick them up.
TINY_ENCODER_CONFIGS: dict[str, dict] = {
    "bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "roberta": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "xlm-roberta": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "distilbert": dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4),
}
ENCODER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 in build_encoder_tokenizer


def build_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``text`` (a second or two), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def build_encoder_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer for encoders: ``[CLS] text [SEP]`` framing, ``[PAD]``/``[MASK]`` specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ENCODER_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tiny_encoder(
    family: str, vocab_size: int = 512, *, mlm_head: bool = True, max_positions: int = 512, seed: int = 0, **overrides
) -> nn.Module:
    """A randomly initialized encoder of ``family`` (``TINY_ENCODER_CONFIGS``), with an MLM head or bare.

    Special token ids follow :func:`build_encoder_tokenizer` (``[PAD]`` = 0). ``max_positions`` is the
    longest input; RoBERTa-style models get the two extra position slots they need.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    from lmcompress.models.families import FAMILIES

    kwargs = dict(TINY_ENCODER_CONFIGS[family])
    extra = 1 if FAMILIES[family].positions_after_pad else 0  # positions start at pad_token_id + 1
    kwargs.update(max_position_embeddings=max_positions + extra, vocab_size=vocab_size, pad_token_id=0)
    if family != "distilbert":
        kwargs.update(bos_token_id=2, eos_token_id=3)
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = (AutoModelForMaskedLM if mlm_head else AutoModel).from_config(config)
    return model.eval()


def build_tiny_model(
    family: str, vocab_size: int = 512, *, max_positions: int = 512, seed: int = 0, **overrides
) -> nn.Module:
    """A randomly initialized causal LM of ``family`` with a tiny config above (plus ``overrides``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_CONFIGS[family] if family in TINY_CONFIGS else TINY_GENERIC_CONFIGS[family])
    positions_key = _POSITIONS_KEY.get(family, "max_position_embeddings")
    if positions_key is not None:
        kwargs[positions_key] = max_positions
    kwargs.update(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **overrides)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def train_tiny(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    steps: int,
    seqlen: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` on random windows of the token stream ``ids`` (AdamW, cosine decay). Returns losses."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, ids.numel() - seqlen - 1, (batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
        loss = model(batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses
