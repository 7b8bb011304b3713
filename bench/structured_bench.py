"""Structured pruning of SmolLM2-135M-Instruct (or --model): perplexity, params, FLOPs, CPU speed-up vs ratio.

For FFN channels and attention heads (KV groups) at ratios 0.1–0.5, each with no correction, FLAP's bias
compensation and the least-squares refit: WikiText-2 test perplexity (seqlen 256), parameters, matmul FLOPs per
token, and forward latency per token of the pruned and the dense model (batch 1, 256 tokens; the two alternated
5 times, 3 timed runs each after a warm-up, minimum of all), both as wall time and as this process's CPU time
(far less disturbed by other processes on a shared machine). ``python -m bench.structured_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench.common import MODEL_HELP, machine_info, print_table, save_results, wikitext
from bench.reference import resolve_model
from lmcompress.calibration.data import draw, eval_windows
from lmcompress.checkpoint.load import load
from lmcompress.measure.perplexity import perplexity
from lmcompress.measure.profile import flops_per_token, latency_per_token
from lmcompress.models.params import count_params
from lmcompress.transforms.shrink import StructureConfig, structured_prune

SEQLEN = 256


def paired_latency(dense, model, clock: str, rounds: int) -> tuple[float, float]:
    """ms/token of ``dense`` and ``model``, alternated ``rounds`` times (3 timed runs each), min over all runs.

    Alternating keeps both under the same machine load; the minimum discards runs slowed by other processes.
    """
    d, m = [], []
    for _ in range(rounds):
        d.append(latency_per_token(dense, SEQLEN, "cpu", 3, warmup=1, reduce="min", clock=clock))
        m.append(latency_per_token(model, SEQLEN, "cpu", 3, warmup=1, reduce="min", clock=clock))
    return min(d), min(m)


def speed_only(dense, rounds: int) -> None:
    """Only the speed of each distinct uniform shape (magnitude criterion: same shapes, no calibration)."""
    rows = []
    for structure, ratio in [("ffn", r) for r in (0.1, 0.2, 0.3, 0.4, 0.5)] + [
        ("heads", 0.25),
        ("heads", 0.5),
        ("heads", 0.75),
        ("ffn,heads", 0.5),
    ]:
        model = copy.deepcopy(dense)
        report = structured_prune(model, StructureConfig(structure, ratio, "magnitude"), progress=False)
        dense_ms, pruned_ms = paired_latency(dense, model, "wall", rounds)
        dense_cpu, pruned_cpu = paired_latency(dense, model, "cpu", rounds)
        rows.append(
            {
                "structure": structure,
                "ratio": ratio,
                "ffn_width": report.ffn_widths[0] if report.ffn_widths else None,
                "heads": report.heads[0] if report.heads else None,
                "params_x": count_params(model) / count_params(dense),
                "flops_x": flops_per_token(model, SEQLEN) / flops_per_token(dense, SEQLEN),
                "ms_tok": pruned_ms,
                "dense_ms_tok": dense_ms,
                "speedup": dense_ms / pruned_ms,
                "cpu_ms_tok": pruned_cpu,
                "dense_cpu_ms_tok": dense_cpu,
                "cpu_speedup": dense_cpu / pruned_cpu,
            }
        )
        print(rows[-1], flush=True)
    print_table(rows, f"Forward speed of the pruned model (batch 1, {SEQLEN} tokens, {rounds} rounds)")
    print("machine:", machine_info())
    print(f"results written to {save_results('structured_speed', {'rounds': rounds, 'rows': rows})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--quick", action="store_true", help="ratio 0.3 only, 32 eval windows")
    parser.add_argument("--windows", type=int, default=128, help="first N test windows for perplexity; 0: all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings are taken with these)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (dense and pruned alternated)")
    parser.add_argument("--speed-only", action="store_true", help="only time the uniform shapes (no perplexity)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = resolve_model(args.model)
    dense, tokenizer = load(folder)
    if args.speed_only:
        speed_only(dense, args.rounds)
        return
    windows = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), SEQLEN)
    if args.quick or args.windows:
        windows = windows[: 32 if args.quick else args.windows]
    calib, calib_info = draw(
        tokenizer, str(wikitext("valid")), nsamples=args.nsamples, seqlen=SEQLEN, seed=0
    )  # WikiText-2 valid: text like the test set, as LLM papers calibrate
    dense_ppl = perplexity(dense, windows, progress=False).perplexity
    dense_params, dense_flops = count_params(dense), flops_per_token(dense, SEQLEN)
    print(f"dense: perplexity {dense_ppl:.3f}, {dense_params:,} params, {dense_flops:.4g} FLOPs/token")

    ratios = [0.3] if args.quick else [0.1, 0.2, 0.3, 0.4, 0.5]
    runs = [(s, r, "wanda", c, "uniform") for s in ("ffn", "heads") for r in ratios for c in ("none", "bias", "lstsq")]
    if not args.quick:
        runs += [("ffn", 0.3, crit, c, "uniform") for crit in ("magnitude", "fluctuation") for c in ("none", "lstsq")]
        runs += [("ffn", 0.3, "wanda", c, "owl") for c in ("none", "lstsq")]
        runs += [("ffn,heads", 0.3, "wanda", c, "uniform") for c in ("none", "lstsq")]
    rows, shapes = [], {}
    for structure, ratio, criterion, correction, allocation in runs:
        model = copy.deepcopy(dense)
        config = StructureConfig(structure, ratio, criterion, correction, allocation)
        t0 = time.perf_counter()
        report = structured_prune(model, config, calib, progress=False)
        prune_s = time.perf_counter() - t0
        ppl = perplexity(model, windows, progress=False).perplexity
        removed = {}
        if report.ffn_widths:
            width = dense.config.intermediate_size
            removed["ffn_removed"] = 1 - sum(report.ffn_widths) / (len(report.ffn_widths) * width)
        if report.heads:
            removed["heads_removed"] = 1 - sum(report.heads) / (len(report.heads) * dense.config.num_attention_heads)
        params, flops = count_params(model), flops_per_token(model, SEQLEN)
        row = {
            "structure": structure,
            "ratio": ratio,
            "criterion": criterion,
            "correction": correction,
            "allocation": allocation,
            "removed": "/".join(f"{v:.2f}" for v in removed.values()),
            "ppl": ppl,
            "ppl_dense": dense_ppl,
            "params": params,
            "params_x": params / dense_params,
            "flops_x": flops / dense_flops,
            "prune_s": prune_s,
        }
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        key = (structure, ratio, allocation)  # the shapes (hence the speed) depend only on these
        if correction == "none" and key not in shapes:
            shapes[key] = model
        del model

    # Speed: once per distinct shape, pruned and dense alternated (the bias correction's extra bias is ignored).
    speed = {}
    for key, model in shapes.items():
        dense_ms, pruned_ms = paired_latency(dense, model, "wall", args.rounds)
        dense_cpu, pruned_cpu = paired_latency(dense, model, "cpu", args.rounds)
        speed[key] = {
            "ms_tok": pruned_ms,
            "dense_ms_tok": dense_ms,
            "speedup": dense_ms / pruned_ms,
            "cpu_ms_tok": pruned_cpu,
            "dense_cpu_ms_tok": dense_cpu,
            "cpu_speedup": dense_cpu / pruned_cpu,
        }
        print(key, {k: round(v, 4) for k, v in speed[key].items()}, flush=True)
    for row in rows:
        row.update(speed[(row["structure"], row["ratio"], row["allocation"])])

    print_table(rows, f"Structured pruning (test ppl, seqlen {SEQLEN})")
    info = machine_info()
    print("machine:", info)
    path = save_results(
        "structured_bench",
        {
            "dense": {"perplexity": dense_ppl, "params": dense_params, "flops_per_token": dense_flops},
            "calibration": calib_info,
            "eval_windows": int(windows.shape[0]),
            "rows": rows,
        },
    )
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
