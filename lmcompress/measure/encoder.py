"""Quality of BERT-style encoders: MLM perplexity and sentence-embedding similarity to the dense model.

- MLM perplexity: the text is cut into non-overlapping windows ``[CLS] t1 .. tk [SEP]``; in each window 15% of
  the ordinary tokens (rounded, at least one) are chosen with a seeded generator and replaced by ``[MASK]``
  (``mode="mask"``, the default; ``mode="bert"`` uses BERT's 80% [MASK] / 10% random / 10% unchanged). The
  perplexity is exp of the mean cross-entropy over the chosen positions. The same seed and text give the
  same masks for the dense and the compressed model, so their numbers are comparable.
- Sentence embeddings: mean of the last hidden states over the real tokens (attention mask), as
  sentence-transformers models are usually pooled; ``cls`` takes the first token's hidden state and
  ``pooler`` BERT's pooler output (only bare encoders have one). A sentence-transformers folder's
  ``1_Pooling/config.json`` chooses the mode when it is there. The score is the cosine similarity between the
  compressed and the dense model's embedding of each held-out sentence (mean and min over sentences).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmcompress.errors import UserError

POOLING = ("mean", "cls", "pooler")
MASK_MODES = ("mask", "bert")


@dataclass
class MLMResult:
    perplexity: float
    nll: float  # mean cross-entropy over the masked positions (nats)
    masked: int  # number of masked (predicted) positions
    windows: int
    seqlen: int
    mask_prob: float
    mask_mode: str
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def has_mlm_head(model: nn.Module) -> bool:
    """True when the model predicts tokens (``BertForMaskedLM``, ``BertForPreTraining``), not for bare encoders."""
    return model.get_output_embeddings() is not None


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def mlm_windows(tokenizer, text: str, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` of the text, framed ``[CLS] ... [SEP]`` if the tokenizer has both."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    framed = cls is not None and sep is not None
    body = seqlen - 2 if framed else seqlen
    if body <= 0:
        raise UserError(f"seqlen {seqlen} is too short for an encoder window; use at least 8", param="seqlen")
    ids = _tokenize(tokenizer, text)
    n = ids.numel() // body
    if n == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    rows = ids[: n * body].reshape(n, body)
    if framed:
        rows = torch.cat([torch.full((n, 1), cls), rows, torch.full((n, 1), sep)], dim=1)
    return rows


def mask_tokens(
    windows: torch.Tensor,
    mask_id: int,
    special_ids: set[int],
    *,
    prob: float = 0.15,
    seed: int = 0,
    mode: str = "mask",
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``: ``round(prob × ordinary tokens)`` positions per window masked; labels -100 elsewhere."""
    if mode not in MASK_MODES:
        raise UserError(f"unknown mask mode {mode!r}: choose one of {', '.join(MASK_MODES)}")
    if not 0.0 < prob < 1.0:
        raise UserError(f"mask probability must be in (0, 1), got {prob}")
    if mode == "bert" and not vocab_size:
        raise ValueError("mode='bert' draws random tokens: give vocab_size")
    gen = torch.Generator().manual_seed(seed)
    inputs, labels = windows.clone(), torch.full_like(windows, -100)
    special = torch.tensor(sorted(special_ids), dtype=windows.dtype)
    for i, row in enumerate(windows):
        candidates = torch.nonzero(~torch.isin(row, special)).flatten()
        if candidates.numel() == 0:
            continue
        k = max(1, round(prob * candidates.numel()))
        chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:k]]
        labels[i, chosen] = row[chosen]
        inputs[i, chosen] = mask_id
        if mode == "bert":  # 10% of the chosen get a random token, 10% keep theirs
            u = torch.rand(k, generator=gen)
            rand_pos = chosen[u >= 0.9]
            inputs[i, rand_pos] = torch.randint(0, vocab_size, (rand_pos.numel(),), generator=gen, dtype=row.dtype)
            keep_pos = chosen[(u >= 0.8) & (u < 0.9)]
            inputs[i, keep_pos] = row[keep_pos]
    return inputs, labels


def _logits(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.prediction_logits


@torch.no_grad()
def mlm_perplexity(
    model: nn.Module,
    tokenizer,
    windows: torch.Tensor,
    *,
    prob: float = 0.15,
    seed: int = 0,
    mode: str = "mask",
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> MLMResult:
    """exp(mean cross-entropy) over the masked positions of ``windows`` (see the module docstring).

    The model must already be on ``device`` (:func:`evaluate_encoder` moves it there and back).
    """
    if not has_mlm_head(model):
        raise UserError("this encoder has no MLM head (it loads as a bare encoder): MLM perplexity needs one")
    if tokenizer.mask_token_id is None:
        raise UserError("the tokenizer has no mask token: MLM perplexity needs one")
    special = set(tokenizer.all_special_ids)
    inputs, labels = mask_tokens(
        windows,
        tokenizer.mask_token_id,
        special,
        prob=prob,
        seed=seed,
        mode=mode,
        vocab_size=min(len(tokenizer), model.config.vocab_size),
    )
    model.eval()
    device = torch.device(device)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(inputs), batch_size), desc="MLM perplexity", disable=not progress, unit="batch"):
        x = inputs[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = _logits(model(input_ids=x, attention_mask=torch.ones_like(x))).float()
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += (y != -100).sum().item()
    if count == 0:
        raise UserError("no tokens could be masked in the evaluation text")
    mean = total / count
    return MLMResult(math.exp(mean), mean, count, windows.shape[0], windows.shape[1], prob, mode, seed)


def sentences(text: str, n: int = 256, min_words: int = 5) -> list[str]:
    """Up to ``n`` sentences of the text (WikiText headings skipped), spread evenly over it."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        found += [s for s in re.split(r"(?<=[.!?])\s+", line) if len(s.split()) >= min_words]
    if not found:
        raise UserError(f"the evaluation text has no sentences of at least {min_words} words")
    if len(found) > n:
        step = len(found) / n
        found = [found[int(i * step)] for i in range(n)]
    return found


def pooling_of(folder: str | Path | None) -> str | None:
    """The pooling a sentence-transformers folder declares (``1_Pooling/config.json``), or None."""
    if folder is None:
        return None
    path = Path(str(folder)) / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    return None


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    pooling: str = "mean",
    max_length: int = 128,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """One embedding per text ``[len(texts), hidden]`` from the encoder (any head is skipped).

    The model must already be on ``device`` (:func:`evaluate_encoder` moves it there and back).
    """
    if pooling not in POOLING:
        raise UserError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLING)}")
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no padding token: sentence embeddings are computed in padded batches")
    encoder = model.base_model
    if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
        raise UserError(
            "pooling pooler: this model has no pooler (MLM models usually drop it); use mean or cls", param="pooling"
        )
    encoder.eval()
    device = torch.device(device)
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embeddings", disable=not progress, unit="batch"):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        mask = batch["attention_mask"].to(device)
        res = encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask)
        if pooling == "pooler":
            emb = res.pooler_output
        elif pooling == "cls":
            emb = res.last_hidden_state[:, 0]
        else:
            m = mask.unsqueeze(-1).to(res.last_hidden_state.dtype)
            emb = (res.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)
        out.append(emb.float().cpu())
    return torch.cat(out)


def cosine_similarity(embeddings: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-sentence cosine similarity of two embedding sets: mean, min and count.

    ``centered_mean`` is the mean cosine after subtracting each set's mean embedding: raw encoder embeddings
    share a large common direction (anisotropy), which keeps the plain cosine high even when the
    sentence-specific part is lost; the centered score measures that part alone.
    """
    if embeddings.shape != reference.shape:
        raise UserError(
            f"embeddings of shape {tuple(embeddings.shape)} cannot be compared with the reference's "
            f"{tuple(reference.shape)}: is the reference the same architecture?"
        )
    a, b = embeddings.double(), reference.double()
    cos = F.cosine_similarity(a, b, dim=-1)
    centered = F.cosine_similarity(a - a.mean(0), b - b.mean(0), dim=-1)
    return {
        "mean": cos.mean().item(),
        "min": cos.min().item(),
        "centered_mean": centered.mean().item(),
        "sentences": cos.numel(),
    }


def evaluate_encoder(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    reference: nn.Module | None = None,
    seqlen: int = 512,
    pooling: str = "mean",
    nsentences: int = 256,
    mask_prob: float = 0.15,
    mask_mode: str = "mask",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """MLM perplexity (if the model has a head) and, with a ``reference`` model, embedding cosine similarity.

    Both models are fed the same token ids (from ``tokenizer``); held-out sentences come from ``text``.
    """
    home = next(model.parameters()).device
    model.to(device)
    result: dict = {"mlm": None, "embedding_similarity": None, "pooling": pooling}
    try:
        if has_mlm_head(model):
            windows = mlm_windows(tokenizer, text, seqlen)
            mlm = mlm_perplexity(
                model, tokenizer, windows, prob=mask_prob, seed=seed, mode=mask_mode, device=device, progress=progress
            )
            result["mlm"] = mlm.to_dict()
        if reference is not None:
            texts = sentences(text, nsentences)
            kw = dict(pooling=pooling, max_length=min(seqlen, 128), device=device, progress=progress)
            ref_home = next(reference.parameters()).device
            reference.to(device)
            try:
                ref = sentence_embeddings(reference, tokenizer, texts, **kw)
            finally:
                reference.to(ref_home)
            emb = sentence_embeddings(model, tokenizer, texts, **kw)
            result["embedding_similarity"] = cosine_similarity(emb, ref)
    finally:
        model.to(home)
    return result


def reference_for(model_path: str | Path, reference: str | None) -> str | None:
    """The dense model to compare with: ``reference`` if given, else the recipe's source model if it is local."""
    from lmcompress.checkpoint.folder import read_recipe

    if reference is not None:
        return reference
    folder = Path(str(model_path))
    recipe = read_recipe(folder) if folder.is_dir() else None
    source = (recipe or {}).get("source_model")
    if source and Path(source).is_dir() and Path(source).resolve() != folder.resolve():
        return source
    return None


def evaluate_encoder_folder(
    model: nn.Module,
    tokenizer,
    model_path: str | Path,
    text: str,
    *,
    reference: str | None = None,
    pooling: str | None = None,
    seqlen: int = 512,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict:
    """The ``lmcompress eval`` job for an encoder already loaded from ``model_path``.

    The reference (dense) model is ``reference`` or, when that is not given, the recipe's ``source_model``
    if it exists locally. Pooling: ``pooling``, else what a sentence-transformers folder declares, else mean.
    """
    from lmcompress.checkpoint.load import load_model

    if pooling is not None and pooling not in POOLING:
        raise UserError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLING)}")
    ref_path = reference_for(model_path, reference)
    ref_model = None
    if ref_path is not None:
        ref_model, _ = load_model(ref_path, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        if type(ref_model.base_model) is not type(model.base_model):
            raise UserError(
                f"reference {ref_path} is a {type(ref_model.base_model).__name__}, not a "
                f"{type(model.base_model).__name__} like {model_path}; give the dense model it was compressed from"
            )
    pooling = pooling or pooling_of(model_path) or pooling_of(ref_path) or "mean"
    result = evaluate_encoder(
        model, tokenizer, text, reference=ref_model, seqlen=seqlen, pooling=pooling, device=device, progress=progress
    )
    return {"model_kind": "encoder", "reference": ref_path, **result}


def format_encoder_result(result: dict) -> str:
    """The one-paragraph summary ``lmcompress eval`` prints for an encoder."""
    lines = [f"{result['model']}: encoder, sparsity {result['sparsity']:.2%}"]
    mlm = result.get("mlm")
    if mlm:
        lines.append(
            f"  MLM perplexity {mlm['perplexity']:.3f} on {mlm['masked']} masked tokens "
            f"({mlm['windows']} windows of {mlm['seqlen']}, {mlm['mask_prob']:.0%} masked, seed {mlm['seed']})"
        )
    else:
        lines.append("  no MLM head: MLM perplexity not measured")
    sim = result.get("embedding_similarity")
    if sim:
        lines.append(
            f"  embedding cosine similarity to {result['reference']}: mean {sim['mean']:.4f}, min {sim['min']:.4f}, "
            f"centered mean {sim['centered_mean']:.4f} over {sim['sentences']} sentences ({result['pooling']} pooling)"
        )
    else:
        lines.append("  no dense reference (give a dense reference model): embedding similarity not measured")
    return "\n".join(lines)
