"""Pruning benchmark (issue 2): every method × {50%, 70%, 2:4} × {uniform, OWL} on SmolLM2-135M-Instruct.

    python -m bench.prune_bench                 # SmolLM2-135M-Instruct (converted into bench/cache once)
    python -m bench.prune_bench --model DIR     # any local HF causal-LM folder

Each run is a fresh subprocess so that its peak RSS is its own. Printed per run: perplexity on WikiText-2
``test.txt``, prune wall time, peak RSS; then the speed target (prune time vs one calibration forward pass)
and the ordering checks of the issue (SparseGPT ≤ Wanda, magnitude; OWL ≤ uniform at 70%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import MODEL_HELP, machine_info, peak_rss_mb, print_table, results_name, save_results, wikitext
from lmcompress.calibration.data import draw
from lmcompress.job_options import check_percdamp

GRID = [
    (method, target, pattern, allocation)
    for method in ("magnitude", "wanda", "sparsegpt")
    for target, pattern, allocations in (
        (0.5, "unstructured", ("uniform", "owl")),
        (0.7, "unstructured", ("uniform", "owl")),
        (None, "2:4", ("uniform",)),
    )
    for allocation in allocations
]
# --grid core: what a slow machine can afford (50% of each method, SparseGPT and Wanda 2:4, Wanda 70% ± OWL)
CORE = [(m, 0.5, "unstructured", "uniform") for m in ("magnitude", "wanda", "sparsegpt")] + [
    ("wanda", None, "2:4", "uniform"),
    ("sparsegpt", None, "2:4", "uniform"),
    ("wanda", 0.7, "unstructured", "uniform"),
    ("wanda", 0.7, "unstructured", "owl"),
]


def _setup(model_dir: str, nsamples: int, seqlen: int, threads: int, max_windows: int | None = None):
    from transformers.utils import logging as hf_logging

    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load_model

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    model, tokenizer = load_model(model_dir)
    calib, _ = draw(tokenizer, str(wikitext("valid")), nsamples=nsamples, seqlen=seqlen, seed=0)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), seqlen)[:max_windows]
    return model, calib, test


def run_one(args) -> dict:
    """One grid point in this process: prune, time it, evaluate; prints one JSON line."""
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.transforms.prune import PruneConfig, prune

    model, calib, test = _setup(args.model, args.nsamples, args.seqlen, args.threads, args.eval_windows)
    row_tokens = int(test.numel())
    baseline_rss = peak_rss_mb()
    row: dict = {"method": args.method, "pattern": args.pattern, "allocation": args.allocation}
    if args.method == "dense":
        row.update(target=0.0, sparsity=0.0, prune_s=0.0)
    else:
        sparsity = None if args.pattern != "unstructured" else args.sparsity
        config = PruneConfig(
            method=args.method,
            sparsity=sparsity,
            pattern=args.pattern,
            allocation=args.allocation,
            percdamp=args.percdamp,
        )
        start = time.perf_counter()
        report = prune(model, config, calib, progress=False)
        row.update(target=config.target, sparsity=report.sparsity, prune_s=time.perf_counter() - start)
        if args.method == "sparsegpt":
            row["percdamp"] = args.percdamp
            if report.damping:
                row["damping_raised"] = report.damping
        if report.outlier_ratios:
            row["block_targets"] = [round(t, 4) for t in report.block_targets]
            row["outlier_ratios"] = [round(r, 5) for r in report.outlier_ratios]
    row["peak_rss_mb"] = peak_rss_mb()
    row["rss_before_prune_mb"] = baseline_rss
    row["ppl"] = perplexity(model, test, progress=False).perplexity
    row["eval_tokens"] = row_tokens
    return row


def forward_cost(args) -> dict:
    """Time of one calibration forward pass and of the SparseGPT Hessian accumulation (the speed target)."""
    from lmcompress.calibration.engine import collect_input_stats, walk_blocks
    from lmcompress.models.families import find_prunable

    model, calib, _ = _setup(args.model, args.nsamples, args.seqlen, args.threads)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad():
            for row in calib:
                model(row.unsqueeze(0), use_cache=False)
        times.append(time.perf_counter() - start)

    def visit(_i, block, inputs):
        collect_input_stats(block, inputs, list(find_prunable(block)), hessian=True)

    start = time.perf_counter()
    walk_blocks(model, calib, torch.device("cpu"), visit, progress=False)
    walk_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {"forward_s": min(times), "walk_with_hessians_s": walk_s, "params": params}


def _child(args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.prune_bench", "--model", args.model, "--nsamples", str(args.nsamples)]
    cmd += ["--seqlen", str(args.seqlen), "--threads", str(args.threads), "--percdamp", str(args.percdamp), *extra]
    if args.eval_windows:
        cmd += ["--eval-windows", str(args.eval_windows)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluate on the first N test windows only")
    parser.add_argument("--only", default=None, help="comma-separated methods to run (default: all)")
    parser.add_argument("--grid", choices=("full", "core"), default="full", help="core: 7 runs instead of 13")
    parser.add_argument("--no-cost", action="store_true", help="skip timing the calibration forward pass")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row (measured elsewhere)")
    parser.add_argument("--runs", default=None, help="instead of the grid: METHOD:TARGET:PATTERN:ALLOCATION,... "
                        "(TARGET 0 for N:M), e.g. sparsegpt:0.5:unstructured:uniform,wanda:0:2:4:uniform")  # fmt: skip
    parser.add_argument("--percdamp", type=check_percdamp, default=0.01, help="SparseGPT dampening: fraction or auto")
    parser.add_argument("--tag", default="", help="suffix of the results file (keeps earlier runs' files)")
    # internal: one grid point
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cost", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="dense", help=argparse.SUPPRESS)
    parser.add_argument("--sparsity", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", default="unstructured", help=argparse.SUPPRESS)
    parser.add_argument("--allocation", default="uniform", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bench.reference import resolve_model

    args.model = str(resolve_model(args.model))
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.cost:
        print(json.dumps(forward_cost(args)))
        return

    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    print("machine:", json.dumps(machine_info()))
    start = time.perf_counter()
    cost = {"forward_s": float("nan"), "walk_with_hessians_s": float("nan"), "params": 0}
    if not args.no_cost:
        cost = _child(args, ["--cost"])
    grid = [g for g in (CORE if args.grid == "core" else GRID) if args.only is None or g[0] in args.only.split(",")]
    if args.runs:
        grid = [_parse_run(spec) for spec in args.runs.split(",")]
    rows = [] if args.no_dense else [_child(args, ["--one", "--method", "dense"])]
    for method, target, pattern, allocation in tqdm(grid, desc="prune runs"):
        extra = ["--one", "--method", method, "--pattern", pattern, "--allocation", allocation]
        rows.append(_child(args, [*extra, "--sparsity", str(target or 0.5)]))
        save_results(
            results_name("prune_bench", args.model) + args.tag, {"rows": rows, "cost": cost, "args": vars(args)}
        )
        tqdm.write(json.dumps({k: rows[-1][k] for k in ("method", "pattern", "allocation", "ppl", "prune_s")}))
    dense = rows[0]["ppl"] if rows[0]["method"] == "dense" else float("nan")
    table = [
        {
            "method": r["method"],
            "pattern": r["pattern"],
            "allocation": r["allocation"],
            "target": r["target"],
            "sparsity": r["sparsity"],
            "ppl": r["ppl"],
            "Δppl %": 100 * (r["ppl"] / dense - 1),
            "prune s": r["prune_s"],
            "prune / forward": r["prune_s"] / cost["forward_s"],
            "peak RSS MiB": r["peak_rss_mb"],
        }
        for r in rows
    ]
    title = f"Pruning {Path(args.model).name}: perplexity on WikiText-2 test ({rows[0]['eval_tokens']} tokens, "
    title += f"calibration {args.nsamples}×{args.seqlen}"
    print_table(table, f"{title}, seqlen {args.seqlen})")
    print(
        f"one calibration forward pass ({args.nsamples}×{args.seqlen} tokens): {cost['forward_s']:.2f}s; "
        f"block walk with all Hessians: {cost['walk_with_hessians_s']:.2f}s; params {cost['params'] / 1e6:.2f}M; "
        f"fp32 model {cost['params'] * 4 / 2**20:.0f} MiB"
    )
    checks = ordering_checks(rows)
    for line in checks:
        print(line)
    path = save_results(
        results_name("prune_bench", args.model) + args.tag,
        {"rows": rows, "cost": cost, "checks": checks, "args": vars(args)},
    )
    print(f"total wall time {time.perf_counter() - start:.0f}s; results in {path}")


def _parse_run(spec: str) -> tuple[str, float | None, str, str]:
    """``METHOD:TARGET:PATTERN:ALLOCATION`` (an N:M pattern has its own colon; TARGET 0 for N:M) as a grid point."""
    method, target, *pattern, allocation = spec.split(":")
    return method, float(target) or None, ":".join(pattern), allocation


def ordering_checks(rows: list[dict]) -> list[str]:
    """The issue's expected orderings, each stated as OK or VIOLATED with the numbers."""
    ppl = {(r["method"], r["pattern"], r["allocation"], r["target"]): r["ppl"] for r in rows}
    lines = []
    for target in (0.5, 0.7):
        key = ("unstructured", "uniform", target)
        for other in ("wanda", "magnitude"):
            a, b = ppl.get(("sparsegpt", *key)), ppl.get((other, *key))
            if a is not None and b is not None:
                lines.append(f"{'OK' if a <= b else 'VIOLATED'}: SparseGPT {a:.2f} ≤ {other} {b:.2f} at {target:.0%}")
    for method in ("magnitude", "wanda", "sparsegpt"):
        a, b = ppl.get((method, "unstructured", "owl", 0.7)), ppl.get((method, "unstructured", "uniform", 0.7))
        if a is not None and b is not None:
            lines.append(f"{'OK' if a <= b else 'VIOLATED'}: OWL {a:.2f} ≤ uniform {b:.2f} for {method} at 70%")
    return lines


if __name__ == "__main__":
    main()
