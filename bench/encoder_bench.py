"""Pruning a BERT-style encoder: MLM perplexity and sentence-embedding similarity to the dense model.

A tiny BERT with an MLM head is trained briefly on WikiText-2 ``valid.txt`` (cached in bench/cache/encoder),
pruned with every method at 50% unstructured and 2:4 (plus Wanda at 70% uniform vs OWL) or quantized to 4 bits
(RTN, GPTQ), and evaluated on
``test.txt``: MLM perplexity (15% of tokens → [MASK], seed 0, 400 windows of 64 spread over the file) and the
cosine similarity of mean-pooled sentence embeddings to the dense model's (512 sentences).

    python -m bench.encoder_bench [--steps 800] [--eval-windows 400] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

import lmcompress
from bench.common import CACHE, machine_info, print_table, save_results, wikitext
from lmcompress import PruneConfig
from lmcompress.calibration.data import calibration_windows
from lmcompress.checkpoint.load import load_model
from lmcompress.checkpoint.save import save_model
from lmcompress.measure.encoder import (
    cosine_similarity,
    mask_tokens,
    mlm_perplexity,
    mlm_windows,
    sentence_embeddings,
    sentences,
)
from lmcompress.models.tiny import build_encoder_tokenizer, build_tiny_encoder
from lmcompress.transforms.quantize import QuantConfig, quantize

FOLDER = CACHE / "encoder"
MODEL = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
)
VOCAB, SEQLEN, BATCH, LR = 1024, 64, 16, 1e-3


def train_mlm(model, tokenizer, ids: torch.Tensor, steps: int, seed: int = 0) -> list[float]:
    """Masked-LM training on random windows of ``ids`` (BERT 80/10/10 masking, AdamW, warmup + cosine)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    special = set(tokenizer.all_special_ids)
    body = SEQLEN - 2
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - body, (BATCH,), generator=gen).tolist()
        rows = torch.stack([ids[s : s + body] for s in starts])
        rows = torch.cat(
            [torch.full((BATCH, 1), tokenizer.cls_token_id), rows, torch.full((BATCH, 1), tokenizer.sep_token_id)], 1
        )
        x, y = mask_tokens(
            rows, tokenizer.mask_token_id, special, seed=seed * 100003 + step, mode="bert", vocab_size=VOCAB
        )
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: MLM loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return losses


def unigram_perplexity(tokenizer, train_text: str, windows: torch.Tensor) -> float:
    """MLM perplexity of predicting every masked token by its training-text frequency: the no-context baseline."""
    ids = torch.tensor(tokenizer(train_text, add_special_tokens=False, verbose=False)["input_ids"])
    counts = torch.bincount(ids, minlength=len(tokenizer)).double() + 0.5  # add-½ smoothing
    _, labels = mask_tokens(windows, tokenizer.mask_token_id, set(tokenizer.all_special_ids), seed=0)
    return math.exp(-(counts / counts.sum()).log()[labels[labels != -100]].mean().item())


def ensure_encoder(steps: int):
    """The trained tiny BERT folder (built once, then reused)."""
    if (FOLDER / "DONE").is_file():
        return FOLDER
    valid = wikitext("valid").read_text()
    tokenizer = build_encoder_tokenizer(valid, VOCAB)
    model = build_tiny_encoder("bert", len(tokenizer), mlm_head=True, max_positions=SEQLEN, **MODEL)
    ids = torch.tensor(tokenizer(valid, add_special_tokens=False, verbose=False)["input_ids"])
    start = time.perf_counter()
    losses = train_mlm(model, tokenizer, ids, steps)
    recipe = {"kind": "bench-encoder", "model": MODEL, "steps": steps, "final_loss": sum(losses[-20:]) / 20}
    recipe["train_time_s"] = time.perf_counter() - start
    save_model(model, tokenizer, FOLDER, recipe, overwrite=True)
    (FOLDER / "DONE").write_text(json.dumps(recipe) + "\n")
    return FOLDER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="MLM training steps (first run only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=400, help="MLM windows of test.txt (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = ensure_encoder(args.steps)
    dense, tokenizer = load_model(folder)
    valid, test = wikitext("valid").read_text(), wikitext("test").read_text()
    calib = calibration_windows(tokenizer, valid, args.nsamples, SEQLEN, seed=0)
    windows = mlm_windows(tokenizer, test, SEQLEN)
    if args.eval_windows:  # evenly spread over the test set, to bound the time on a shared CPU
        windows = windows[torch.linspace(0, len(windows) - 1, args.eval_windows).long().unique()]
    texts = sentences(test, args.sentences)
    ref = sentence_embeddings(dense, tokenizer, texts, max_length=SEQLEN, progress=False)

    def measure(model, name: str, sparsity: float, seconds: float) -> dict:
        mlm = mlm_perplexity(model, tokenizer, windows, progress=False)
        sim = cosine_similarity(sentence_embeddings(model, tokenizer, texts, max_length=SEQLEN, progress=False), ref)
        row = {"method": name, "sparsity": sparsity, "MLM ppl": mlm.perplexity}
        row.update({"cos mean": sim["mean"], "cos min": sim["min"], "centered cos": sim["centered_mean"]})
        row["prune s"] = seconds
        print(row, flush=True)
        return row

    rows = [measure(dense, "dense", 0.0, 0.0)]
    rows.insert(0, dict.fromkeys(rows[0]) | {"method": "unigram (no context)"})
    rows[0]["MLM ppl"] = unigram_perplexity(tokenizer, valid, windows)
    runs = [(m, PruneConfig(method=m, sparsity=0.5)) for m in ("magnitude", "wanda", "sparsegpt")]
    runs += [
        (f"{m} 2:4", PruneConfig(method=m, sparsity=None, pattern="2:4")) for m in ("magnitude", "wanda", "sparsegpt")
    ]
    runs += [("wanda 70%", PruneConfig(method="wanda", sparsity=0.7))]
    runs += [("wanda 70% OWL", PruneConfig(method="wanda", sparsity=0.7, allocation="owl"))]
    for name, config in runs:
        model = copy.deepcopy(dense)
        _, report = lmcompress.prune(model, config, calib, progress=False)
        rows.append(measure(model, name, report.sparsity, report.wall_time_s))
    for method in ("rtn", "gptq"):  # 4-bit weights, groups of 64 inputs (no sparsity)
        model = copy.deepcopy(dense)
        report = quantize(model, QuantConfig(method=method, bits=4, group_size=64), calib, progress=False)
        rows.append(measure(model, f"{method} 4-bit g64", 0.0, report.wall_time_s))

    info = machine_info()
    title = (
        f"Tiny BERT (4 layers, d=128, MLM head, {folder}) on WikiText-2 test: {windows.shape[0]} windows of "
        f"{SEQLEN}, {len(texts)} sentences; calibration {args.nsamples}×{SEQLEN} from valid"
    )
    print_table(rows, title)
    print("machine:", json.dumps(info))
    path = save_results("encoder_bench", {"rows": rows, "model": MODEL, "nsamples": args.nsamples})
    print(f"results → {path}")


if __name__ == "__main__":
    main()
