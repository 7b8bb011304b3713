"""The built-in demo: train a tiny LLaMA-style model on bundled text, prune it every way, compare."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lmcompress.calibration.data import load_text
from lmcompress.checkpoint.save import save_model
from lmcompress.jobs import prune_pretrained
from lmcompress.measure.evaluate import evaluate_pretrained
from lmcompress.models.tiny import build_tiny_model, build_tokenizer, train_tiny
from lmcompress.transforms.prune import PruneConfig

DEMO_RUNS = [
    ("magnitude", 0.5, "unstructured", "uniform"),
    ("wanda", 0.5, "unstructured", "uniform"),
    ("sparsegpt", 0.5, "unstructured", "uniform"),
    ("magnitude", None, "2:4", "uniform"),
    ("wanda", None, "2:4", "uniform"),
    ("sparsegpt", None, "2:4", "uniform"),
    ("wanda", 0.7, "unstructured", "uniform"),
    ("wanda", 0.7, "unstructured", "owl"),
]


def build_demo_model(folder: Path, *, steps: int = 300, seed: int = 0, progress: bool = True) -> Path:
    """Train a tiny LLaMA-style model on the bundled WikiText-2 sample and save it as a HF folder."""
    text = load_text("bundled:wikitext2-valid").text
    tokenizer = build_tokenizer(text, vocab_size=512)
    model = build_tiny_model(
        "llama", tokenizer.vocab_size, seed=seed, hidden_size=128, intermediate_size=384, num_hidden_layers=4
    )
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    train_tiny(model, ids, steps=steps, seqlen=128, batch_size=16, progress=progress)
    return save_model(model, tokenizer, folder, {"kind": "demo-model", "train_steps": steps}, overwrite=True)


def run_demo(*, steps: int = 300, keep: str | None = None, progress: bool = True) -> list[dict]:
    """Build the demo model, prune it with each method, evaluate each result; returns the table rows."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="lmcompress-demo-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        dense = build_demo_model(root / "dense", steps=steps, progress=progress)
        common = dict(seqlen=128, progress=False)
        rows = [{"method": "dense", "pattern": "-", "allocation": "-", "target": 0.0, **_eval(dense, common)}]
        for method, sparsity, pattern, allocation in tqdm(DEMO_RUNS, desc="prune + eval", disable=not progress):
            config = PruneConfig(method=method, sparsity=sparsity, pattern=pattern, allocation=allocation)
            out = root / f"{method}-{pattern.replace(':', 'of')}-{allocation}-{config.target:g}"
            report = prune_pretrained(
                dense,
                config,
                out,
                calib_data="bundled:wikitext2-valid",
                nsamples=32,
                overwrite=True,
                **common,
            )
            rows.append(
                {
                    "method": method,
                    "pattern": pattern,
                    "allocation": allocation,
                    "target": config.target,
                    "prune_s": report.wall_time_s,
                    **_eval(out, common),
                }
            )
        return rows


def _eval(folder: Path, common: dict) -> dict:
    res = evaluate_pretrained(folder, "bundled:wikitext2-test", **common)
    return {"perplexity": res["perplexity"], "sparsity": res["sparsity"]}


def format_table(rows: list[dict]) -> str:
    head = f"{'method':<10} {'pattern':<12} {'alloc':<8} {'sparsity':>8} {'ppl':>9} {'prune s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        t = f"{r['prune_s']:.1f}" if "prune_s" in r else "-"
        lines.append(
            f"{r['method']:<10} {r['pattern']:<12} {r['allocation']:<8} {r['sparsity']:>8.2%} "
            f"{r['perplexity']:>9.2f} {t:>8}"
        )
    return "\n".join(lines)
