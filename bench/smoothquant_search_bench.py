"""SmoothQuant ``auto``: the golden (Fibonacci) search along the α grid against trying every point (issue 32).

    nice -n 10 python -m bench.smoothquant_search_bench --model smollm2 --threads 1

Runs ``transforms.smooth.smooth_model`` with ``alpha="auto"`` and ``alpha_search="grid"`` (all 11 α per block)
on the calibration windows ``lmcompress quantize`` draws (WikiText-2 ``valid.txt``, ``--nsamples`` × ``--seqlen``,
seed 0), then replays the golden search on each block's 11 recorded output errors (``search_golden`` with the
recorded values as its loss: the search is deterministic, so this is what it would try and pick on these blocks)
and, with ``--golden``, runs the golden search for real too (its wall time and picks). Reports per block: the
grid's α, whether its error is unimodal along the grid, the golden search's α and trials, and the ratio of the
error at the golden α to the grid's minimum.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from bench.common import MODEL_HELP, machine_info, results_name, save_results, wikitext


def unimodal(values: list[float]) -> bool:
    """Strictly falling to the minimum, strictly rising after it."""
    low = values.index(min(values))
    steps = [b - a for a, b in itertools.pairwise(values)]
    return all(d < 0 for d in steps[:low]) and all(d > 0 for d in steps[low:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--golden", action="store_true", help="also run the golden search (time it)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    from bench.reference import resolve_model
    from lmcompress import load
    from lmcompress.algorithms.smoothquant import search_golden
    from lmcompress.calibration.data import draw, embedding_rows
    from lmcompress.transforms.smooth import SmoothConfig, smooth_model

    torch.set_num_threads(args.threads)
    args.model = str(resolve_model(args.model))
    runs = {}
    for how in ("grid", "golden") if args.golden else ("grid",):
        model, tokenizer = load(args.model)
        calib, _ = draw(tokenizer, str(wikitext("valid")), nsamples=args.nsamples, seqlen=args.seqlen,
                        vocab_size=embedding_rows(model))  # fmt: skip
        start = time.perf_counter()
        report = smooth_model(model, SmoothConfig(alpha="auto", alpha_search=how), calib, progress=False)
        load_avg = Path("/proc/loadavg").read_text().split()[:3]
        runs[how] = {"report": report.to_dict(), "wall_s": time.perf_counter() - start, "load_avg": load_avg}
        print(f"{how}: {runs[how]['wall_s']:.0f} s, load {runs[how]['load_avg']}", flush=True)
        del model
    grid = runs["grid"]["report"]
    blocks = []
    for i, losses in grid["alpha_losses"].items():
        replay = search_golden(lambda a, losses=losses: losses[a], list(losses))
        row = {
            "block": i,
            "grid_alpha": grid["alpha"][i],
            "unimodal": unimodal(list(losses.values())),
            "golden_alpha": replay[0],
            "golden_trials": len(replay[1]),
            "error_ratio": losses[replay[0]] / losses[grid["alpha"][i]],
            "losses": losses,
        }
        if "golden" in runs:
            row["golden_run_alpha"] = runs["golden"]["report"]["alpha"][i]
        blocks.append(row)
        ran = f", run: {row['golden_run_alpha']:.1f}" if "golden" in runs else ""
        print(
            f"block {i}: grid α {row['grid_alpha']:.1f}, unimodal {row['unimodal']}, golden α {row['golden_alpha']:.1f}"
            f" ({row['golden_trials']} trials{ran}), error ×{row['error_ratio']:.4f}",
            flush=True,
        )
    same = sum(b["grid_alpha"] == b["golden_alpha"] for b in blocks)
    summary = {
        "blocks": len(blocks),
        "unimodal": sum(b["unimodal"] for b in blocks),
        "same_alpha": same,
        "trials_grid": 11 * len(blocks),
        "trials_golden": sum(b["golden_trials"] for b in blocks),
        "max_error_ratio": max(b["error_ratio"] for b in blocks),
    }
    print(summary)
    payload = {"args": vars(args), "summary": summary, "blocks": blocks, "runs": runs, "machine": machine_info()}
    save_results(results_name("smoothquant_search_bench", args.model) + args.tag, payload)


if __name__ == "__main__":
    main()
