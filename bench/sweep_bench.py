"""Sweep of the reference model: magnitude, Wanda and SparseGPT at 10%…90% (and, when asked, RTN / GPTQ bit
widths and FFN / head ratios), perplexity, retrieval and agreement with dense, then the report. Prints a table
(with each point's size on disk), the report's summary and noise sentences, the wall time and the machine.

    python -m bench.sweep_bench [--limit 100] [--nsamples 32] [--resume]
    python -m bench.sweep_bench --methods sparsegpt,gptq,ffn --sparsities 0.5,0.7 --bits 4,3 --ratios 0.25,0.5
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from bench.common import (
    MODEL_HELP,
    RESULTS,
    machine_info,
    peak_rss_mb,
    print_table,
    save_results,
    wikitext,
)
from bench.reference import ensure_reference_model, resolve_model
from lmcompress.measure.report import kind_of, level, write_report
from lmcompress.measure.sweep import SweepConfig, load_points, parse_bits, parse_levels, parse_sparsities, run_sweep


def row(p: dict, ppl_key: str) -> dict:
    """One table row: the point, its size on disk, perplexity with its 95% interval, agreement, retrieval."""
    m, task = p["metrics"], ppl_key.rpartition("/")[0]
    ci = p.get("tasks", {}).get(task, {}).get("perplexity_ci")
    info = p.get("prune") or p.get("quantize") or p.get("shrink") or {}
    return {
        "method": p["method"],
        "level": None if p["id"] == "dense" else f"{level(p):g}" + (" bits" if kind_of(p) == "quant" else ""),
        "MiB": p["size"]["weights_bytes"] / 2**20 if p.get("size") else None,
        "ppl": m[ppl_key],
        "ppl 95%": f"{ci[0]:.4g}-{ci[1]:.4g}" if ci else None,
        "KL": m.get("agreement/kl_mean"),
        "top-1": m.get("agreement/top1_agreement"),
        "retrieval acc": m.get("retrieval/acc"),
        "value prob": m.get("retrieval/value_prob"),
        "compress s": info.get("time_s"),
        "eval s": p["eval_time_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference", help="reference (the tiny trained LM, default), " + MODEL_HELP)
    parser.add_argument("--limit", type=int, default=60, help="ppl windows and retrieval prompts per point")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--sparsities", default="0.1:0.9:0.1")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="any mix of prune, quant, shrink")
    parser.add_argument("--bits", default="4,3", help="bit widths of rtn / gptq points")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--ratios", default="0.25,0.5", help="fractions removed by ffn / heads points")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--resume", action="store_true", help="keep finished points of an earlier run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = ensure_reference_model() if args.model == "reference" else resolve_model(args.model)
    # the reference model keeps the old results name; SmolLM2 gets its own (results_name gives it the bare one)
    name = "sweep_bench" if args.model == "reference" else f"sweep_bench-{Path(model).name}"
    out = RESULTS / name
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = SweepConfig(
        methods=args.methods.split(","),
        sparsities=parse_sparsities(args.sparsities),
        bits=parse_bits(args.bits),
        group_size=args.group_size,
        ratios=parse_levels(args.ratios, "ratios"),
        tasks=f"ppl:{wikitext('test')},retrieval",
        limit=args.limit,
        retrieval_lengths=[64, 128, 256],  # the reference model was trained on 128-token windows
        calib_data=str(wikitext("valid")),
        nsamples=args.nsamples,
        seqlen=256,
    )
    start = time.perf_counter()
    ran = run_sweep(model, config, out, progress=True)
    sweep_s = time.perf_counter() - start
    report = write_report(out)
    wall_s = time.perf_counter() - start

    points = load_points(out)
    dense = points.pop("dense")
    ppl_key = next(k for k in dense["metrics"] if k.endswith("/perplexity"))
    rows = [row(dense, ppl_key)]
    rows += [row(p, ppl_key) for p in sorted(points.values(), key=lambda p: (p["method"], level(p)))]
    print_table(rows, f"Sweep of {Path(model).name} (limit {args.limit}, nsamples {args.nsamples}, seqlen 256)")
    print("Report summary:")
    for sentence in report["sentences"]:
        print(f"- {sentence}")
    print("Within the noise?")
    for sentence in report["noise"]:
        print(f"- {sentence}")
    print(f"\npoints run: {len(ran['ran'])}, reused: {len(ran['skipped'])}")
    print(f"wall time: sweep {sweep_s:.0f} s, sweep + report {wall_s:.0f} s; peak RSS {peak_rss_mb():.0f} MiB")
    print(f"report: {report['html']}")
    info = machine_info()
    print(info)
    path = save_results(
        name,
        {
            "args": vars(args),
            "rows": rows,
            "sentences": report["sentences"],
            "sweep_s": sweep_s,
            "wall_s": wall_s,
            "points_run": len(ran["ran"]),
            "peak_rss_mb": peak_rss_mb(),
            "report": report["html"],
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
