"""Sparsity sweep of the reference model: magnitude, Wanda and SparseGPT at 10%…90%, perplexity and retrieval,
then the report. Prints a table, the report's summary sentences, the wall time and the machine.

    python -m bench.sweep_bench [--limit 100] [--nsamples 32] [--resume]
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch

from bench.common import RESULTS, machine_info, peak_rss_mb, print_table, save_results, wikitext
from bench.reference import ensure_reference_model
from lmcompress.measure.report import write_report
from lmcompress.measure.sweep import SweepConfig, load_points, parse_sparsities, run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=60, help="ppl windows and retrieval prompts per point")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--sparsities", default="0.1:0.9:0.1")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--resume", action="store_true", help="keep finished points of an earlier run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = ensure_reference_model()
    out = RESULTS / "sweep_bench"
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = SweepConfig(
        methods=args.methods.split(","),
        sparsities=parse_sparsities(args.sparsities),
        tasks=f"ppl:{wikitext('test')},retrieval",
        limit=args.limit,
        retrieval_lengths=[64, 128, 256],  # the model was trained on 128-token windows
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
    rows = [
        {
            "method": "dense",
            "sparsity": 0.0,
            "ppl": dense["metrics"][ppl_key],
            "retrieval acc": dense["metrics"]["retrieval/acc"],
            "value prob": dense["metrics"]["retrieval/value_prob"],
            "prune s": None,
            "eval s": dense["eval_time_s"],
        }
    ]
    for p in sorted(points.values(), key=lambda p: (p["method"], p["sparsity"])):
        rows.append(
            {
                "method": p["method"],
                "sparsity": p["sparsity"],
                "ppl": p["metrics"][ppl_key],
                "retrieval acc": p["metrics"]["retrieval/acc"],
                "value prob": p["metrics"]["retrieval/value_prob"],
                "prune s": p["prune"]["time_s"],
                "eval s": p["eval_time_s"],
            }
        )
    print_table(rows, f"Sweep of the reference model (limit {args.limit}, nsamples {args.nsamples}, seqlen 256)")
    print("Report summary:")
    for sentence in report["sentences"]:
        print(f"- {sentence}")
    print(f"\npoints run: {len(ran['ran'])}, reused: {len(ran['skipped'])}")
    print(f"wall time: sweep {sweep_s:.0f} s, sweep + report {wall_s:.0f} s; peak RSS {peak_rss_mb():.0f} MiB")
    print(f"report: {report['html']}")
    info = machine_info()
    print(info)
    path = save_results(
        "sweep_bench",
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
