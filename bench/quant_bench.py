"""Quantization benchmark (issue 4): RTN vs GPTQ at 8/4/3 bits, joint vs sequential sparse + 4-bit, timings.

    python -m bench.quant_bench                 # SmolLM2-135M-Instruct (converted into bench/cache once)
    python -m bench.quant_bench --model DIR     # any local HF causal-LM folder

Every configuration starts from a fresh copy of the model. Printed: perplexity on WikiText-2 ``test.txt``,
wall time of the quantization / pruning job (min of ``--repeats`` runs for the timed rows), the nominal
bits per weight (codes + grids), and the checks of the issue (GPTQ clearly better than RTN at 3 bits;
quantization time close to SparseGPT pruning time).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from bench.common import MODEL_HELP, machine_info, print_table, results_name, save_results, wikitext
from lmcompress.calibration.data import draw
from lmcompress.job_options import check_percdamp


def rows_to_run(group: int, grid: str = "full") -> list[dict]:
    """The benchmark grid: ``kind`` is quantize | prune | joint | sequential. ``core``: RTN vs GPTQ at 3 and 4 bits."""
    rows: list[dict] = [{"name": "dense", "kind": "dense"}]
    if grid == "core":
        return rows + [
            {"kind": "quantize", "method": method, "bits": bits, "group_size": group}
            for bits in (3, 4)
            for method in ("rtn", "gptq")
        ]
    sparse = lambda pattern: [  # noqa: E731
        {"kind": "prune", "pattern": pattern},
        {"kind": "joint", "pattern": pattern, "bits": 4, "group_size": group},
        {"kind": "sequential", "pattern": pattern, "bits": 4, "group_size": group},
    ]
    for bits in (3, 4, 8):  # most informative first, in case the run is cut short
        for g in (group, -1):
            for method in ("rtn", "gptq"):
                rows.append({"kind": "quantize", "method": method, "bits": bits, "group_size": g})
        if bits == 3:
            rows += sparse("unstructured")
    for g in (group, -1):
        rows.append({"kind": "quantize", "method": "gptq", "bits": 3, "group_size": g, "act_order": True})
    rows += sparse("2:4")
    return rows


def label(row: dict) -> str:
    if row["kind"] == "dense":
        return "dense fp32"
    grid = lambda r: "per-channel" if r["group_size"] == -1 else f"g{r['group_size']}"  # noqa: E731
    sparse = "SparseGPT 50%" if row.get("pattern") == "unstructured" else "SparseGPT 2:4"
    if row["kind"] == "quantize":
        extra = " act-order" if row.get("act_order") else ""
        extra += f" damp {row['percdamp']}" if row.get("percdamp", 0.01) != 0.01 else ""
        return f"{row['method'].upper()} {row['bits']}-bit {grid(row)}{extra}"
    if row["kind"] == "prune":
        return sparse
    if row["kind"] == "joint":
        return f"{sparse} + 4-bit {grid(row)} joint"
    return f"{sparse} then GPTQ 4-bit {grid(row)} (mask fixed)"


def run_row(row: dict, base, calib: torch.Tensor):
    """Apply one configuration to a fresh copy of ``base`` (a model, or a callable that loads one: a 1.5 B model
    and its copy would not both fit in memory): (model, job seconds, nominal bits/weight, layers whose dampening
    was raised above the standard 0.01, with the fraction used)."""
    from lmcompress.transforms.prune import PruneConfig, prune
    from lmcompress.transforms.quantize import QuantConfig, nominal_bits_per_weight, quantize

    model = copy.deepcopy(base) if isinstance(base, torch.nn.Module) else base()
    bits, damping = None, {}
    start = time.perf_counter()
    if row["kind"] == "quantize":
        config = QuantConfig(
            method=row["method"],
            bits=row["bits"],
            group_size=row["group_size"],
            act_order=row.get("act_order", False),
            percdamp=row.get("percdamp", 0.01),
        )
        report = quantize(model, config, calib, progress=False)
        bits, damping = report.nominal_bits_per_weight, report.damping
    elif row["kind"] in ("prune", "joint", "sequential"):
        sparsity = 0.5 if row["pattern"] == "unstructured" else None
        joint_bits = row.get("bits") if row["kind"] == "joint" else None
        config = PruneConfig(
            method="sparsegpt",
            sparsity=sparsity,
            pattern=row["pattern"],
            bits=joint_bits,
            group_size=row.get("group_size", 128),
        )
        report = prune(model, config, calib, progress=False)
        if row["kind"] == "sequential":  # GPTQ holds the zeros of the pruned model fixed (keep_zeros)
            q = QuantConfig(method="gptq", bits=row["bits"], group_size=row["group_size"], keep_zeros=True)
            bits = quantize(model, q, calib, progress=False).nominal_bits_per_weight
        elif report.quantized is not None:
            bits = nominal_bits_per_weight(report.quantized)
    return model, time.perf_counter() - start, bits, damping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64, help="64: 128 does not divide SmolLM2's 576")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (min) for the timed rows")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluate on the first N test windows only")
    parser.add_argument("--methods", default=None, help="comma-separated: only these quantizers' rows (rtn, gptq)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row (measured elsewhere)")
    parser.add_argument("--copy-limit", type=float, default=0.5, help="billions of parameters above which each "
                        "row reloads the model from disk instead of copying it in memory")  # fmt: skip
    parser.add_argument("--grid", choices=("full", "core"), default="full", help="core: RTN and GPTQ at 3/4 bits")
    parser.add_argument("--bits", default=None, help="comma-separated: only quantize rows of these widths (3, 4, 8)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ rows with act-order")
    parser.add_argument("--percdamp", type=check_percdamp, default=0.01, help="GPTQ dampening: fraction or auto")
    parser.add_argument("--tag", default="", help="suffix of the results file (keeps earlier runs' files)")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load_model
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.models.families import find_prunable, get_blocks, weight_matrix

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    from bench.reference import resolve_model

    args.model = str(resolve_model(args.model))
    base, tokenizer = load_model(args.model)
    widths = sorted({weight_matrix(m).shape[1] for b in get_blocks(base) for m in find_prunable(b).values()})
    if sum(p.numel() for p in base.parameters()) > args.copy_limit * 1e9:  # reload each row instead of a copy
        del base
        base = lambda: load_model(args.model)[0]  # noqa: E731
    calib, calib_info = draw(tokenizer, str(wikitext("valid")), nsamples=args.nsamples, seqlen=args.seqlen)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), args.seqlen)
    test = test[: args.eval_windows]
    print(f"evaluating on {test.shape[0]} windows × {args.seqlen} tokens of test.txt", flush=True)

    timed = {"RTN 4-bit g128", "GPTQ 4-bit g128", "SparseGPT 50%", "SparseGPT 50% + 4-bit g128 joint"}
    timed = {t.replace("g128", f"g{args.group_size}") for t in timed}
    table, results = [], []
    for row in rows_to_run(args.group_size, args.grid):
        if args.methods and row["kind"] == "quantize" and row["method"] not in args.methods.split(","):
            continue
        if args.no_dense and row["kind"] == "dense":
            continue
        if args.bits and row["kind"] == "quantize" and str(row["bits"]) not in args.bits.split(","):
            continue
        if row["kind"] == "quantize" and row["method"] == "gptq":
            row = {**row, "act_order": row.get("act_order") or args.act_order, "percdamp": args.percdamp}
        name = label(row)
        model, seconds, bits, damping = run_row(row, base, calib)
        ppl = perplexity(model, test, progress=False).perplexity
        del model
        times = [seconds]
        for _ in range(args.repeats - 1 if name in timed else 0):
            times.append(run_row(row, base, calib)[1])
        results.append({**row, "name": name, "ppl": ppl, "time_s": min(times), "times_s": times, "bits": bits})
        if damping:
            results[-1]["damping_raised"] = damping
        table.append(
            {
                "configuration": name,
                "test ppl": ppl,
                "job time s": min(times) if row["kind"] != "dense" else None,
                "timing": f"min of {len(times)}" if len(times) > 1 else "1 run",
                "nominal bits/weight": bits,
            }
        )
        print(f"{name}: ppl {ppl:.3f}, {min(times):.2f}s", flush=True)
        partial = {"args": vars(args), "calibration": calib_info, "rows": results}
        save_results(results_name("quant_bench", args.model) + args.tag, partial)  # kept if a long run is cut short

    by = {r["name"]: r for r in results}
    print_table(
        table,
        f"Quantizing {Path(args.model).name} (layer widths {widths}): perplexity on WikiText-2 test "
        f"({test.shape[0]} windows × {args.seqlen} tokens); "
        f"calibration {args.nsamples}×{args.seqlen} tokens of valid.txt",
    )
    g = f"g{args.group_size}"
    checks = {}
    if f"GPTQ 3-bit {g}" in by and f"RTN 3-bit {g}" in by:
        checks["gptq_vs_rtn_3bit_g"] = by[f"GPTQ 3-bit {g}"]["ppl"] / by[f"RTN 3-bit {g}"]["ppl"]
    if args.grid == "full" and not args.methods:
        checks |= {
            "gptq_vs_rtn_3bit_per_channel": by["GPTQ 3-bit per-channel"]["ppl"] / by["RTN 3-bit per-channel"]["ppl"],
            "gptq_time_over_sparsegpt_time": by[f"GPTQ 4-bit {g}"]["time_s"] / by["SparseGPT 50%"]["time_s"],
            "joint_minus_sequential_ppl_50": by[f"SparseGPT 50% + 4-bit {g} joint"]["ppl"]
            - by[f"SparseGPT 50% then GPTQ 4-bit {g} (mask fixed)"]["ppl"],
        }
    for k, v in checks.items():
        print(f"{k}: {v:.3f}")
    info = machine_info()
    print(info)
    path = save_results(
        results_name("quant_bench", args.model) + args.tag,
        {"args": vars(args), "calibration": calib_info, "rows": results, "checks": checks},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
