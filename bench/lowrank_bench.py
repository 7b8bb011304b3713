"""Low-rank factorization of the reference model: parameters saved vs WikiText-2 test perplexity.

Rank policies energy 0.8 / 0.9 / 0.95 and auto (0.1 / 0.2 / 0.3 of the block linear parameters), each plain and
activation-aware (Cholesky whitening, calibration: windows of ``valid.txt``). Perplexity on ``test.txt``,
seqlen 256. "saved" counts block linear parameters (the only ones factorized) and the whole model.

    python -m bench.lowrank_bench [--nsamples 32] [--max-eval-windows N]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import machine_info, print_table, save_results, wikitext
from bench.reference import ensure_reference_model
from lmcompress.calibration.data import draw

POLICIES = ["energy:0.8", "energy:0.9", "energy:0.95", "auto:0.1", "auto:0.2", "auto:0.3"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (seqlen 256) from valid.txt")
    parser.add_argument("--max-eval-windows", type=int, default=None, help="evaluate on the first N test windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="lowrank_bench", help="results file bench/results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load_model
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.transforms.factorize import FactorizeConfig, factorize

    folder = ensure_reference_model()
    dense, tokenizer = load_model(folder)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), 256)
    if args.max_eval_windows:
        test = test[: args.max_eval_windows]
    calib, _ = draw(tokenizer, str(wikitext("valid")), nsamples=args.nsamples, seqlen=256, seed=0)

    def ppl(model) -> float:
        return perplexity(model, test, progress=False).perplexity

    total = sum(p.numel() for p in dense.parameters())
    rows = [
        dict(
            policy="dense",
            whitening="-",
            layers_factorized="0",
            linear_saved=0.0,
            model_saved=0.0,
            params=total,
            ppl=ppl(dense),
            time_s=0.0,
        )
    ]
    print_table(rows, "dense")
    for policy in args.policies:
        for aware in (False, True):
            model, _ = load_model(folder)
            report = factorize(model, FactorizeConfig(rank_policy=policy, activation_aware=aware), calib)
            done = sum(r.factorized for r in report.layers.values())
            rows.append(
                dict(
                    policy=policy,
                    whitening="cholesky" if aware else "none",
                    layers_factorized=f"{done}/{len(report.layers)}",
                    linear_saved=1 - report.linear_params_after / report.linear_params_before,
                    model_saved=1 - report.params_after / report.params_before,
                    params=report.params_after,
                    ppl=ppl(model),
                    time_s=report.wall_time_s,
                )
            )
            print_table(rows[-1:], policy)
            if policy.startswith("auto"):
                ranks = {k.split("layers.")[-1]: (v.rank, v.full_rank, v.factorized) for k, v in report.layers.items()}
                print(f"threshold {report.threshold:.4g}; (rank, full, factorized) per layer: {ranks}")
    print_table(rows, f"reference model: WikiText-2 test perplexity (seqlen 256, {test.shape[0]} windows) vs low rank")
    print(machine_info())
    path = save_results(args.name, {"model": str(folder), "eval_windows": int(test.shape[0]), "rows": rows})
    print(f"results → {path}")


if __name__ == "__main__":
    main()
