"""One process against ``torchrun --nproc-per-node 2``: SparseGPT 50% on SmolLM2-135M-Instruct (issue 12).

    python -m bench.distributed_bench                  # SmolLM2-135M-Instruct, 16 × 256 calibration tokens
    python -m bench.distributed_bench --method wanda   # masks must be identical: no float solve in between
    python -m bench.distributed_bench --model DIR --nsamples 32 --seqlen 512 --procs 4

Both runs are the CLI itself in a fresh process (``python -m lmcompress prune ...``, and the same under
``torchrun --standalone``), given the same total number of threads: one process with ``--procs`` threads
against ``--procs`` processes with one thread each (Gloo). Measured: whole-process wall time (loading,
calibration, pruning, saving) and CPU time, the prune time the recipe records, WikiText-2 test perplexity, and how
many pruning masks differ between outputs. A third run, one process with one thread, shows how far two
one-process runs differing only in their thread count (the order of float additions) already are.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import MODEL_HELP, machine_info, print_table, save_results, wikitext


def _run(argv: list[str], threads: int) -> tuple[float, float]:
    """Wall time and CPU time (all its processes) of one command with ``threads`` OpenMP threads per process.

    Threads wait passively (``OMP_WAIT_POLICY=PASSIVE``): spinning threads on shared cores would measure the
    contention, not the job. The command's output is shown on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _compare(label: str, a: Path, b: Path) -> dict:
    """Mask disagreements and the largest weight difference over the pruned (block linear) weights."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    recipe = json.loads((a / "lmcompress.json").read_text())
    names = [f"{n}.weight" for n in recipe["layer_sparsity"]]
    differ = total = 0
    max_diff = 0.0
    for n in names:
        ma, mb = wa[n] == 0, wb[n] == 0
        differ += int((ma != mb).sum())
        total += ma.numel()
        max_diff = max(max_diff, float((wa[n].float() - wb[n].float()).abs().max()))
    return {
        "outputs": label,
        "layers": len(names),
        "mask_disagreements": differ,
        "fraction": differ / max(total, 1),
        "max_weight_diff": max_diff,
    }


def _perplexity(folder: Path, seqlen: int, windows: int, threads: int) -> float:
    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load
    from lmcompress.measure.perplexity import perplexity

    torch.set_num_threads(threads)
    model, tokenizer = load(folder)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), seqlen)[:windows]
    return perplexity(model, test, progress=False).perplexity


def main() -> None:
    from bench.reference import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--procs", type=int, default=2, help="processes of the torchrun run (= threads of the other)")
    p.add_argument("--eval-windows", type=int, default=40, help="WikiText-2 test windows for perplexity")
    p.add_argument("--no-baseline", action="store_true", help="skip the third run (one process, one thread)")
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    args = p.parse_args()
    model = str(resolve_model(args.model))
    prune = [
        "prune",
        model,
        "--method",
        args.method,
        "--sparsity",
        "0.5",
        "--calib-data",
        str(wikitext("valid")),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--quiet",
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
        one, many, one_thread = Path(tmp) / "one", Path(tmp) / "many", Path(tmp) / "one-thread"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.procs}"]
        single = [sys.executable, "-m", "lmcompress", *prune, "-o"]
        runs = [
            (f"1 process × {args.procs} threads", one, [*single, str(one)], args.procs),
            (f"torchrun × {args.procs}, 1 thread each", many, [*launch, *single[1:], str(many)], 1),
            # the baseline of "summation-order tolerance": one process again, only its thread count changed
            ("1 process × 1 thread", one_thread, [*single, str(one_thread)], 1),
        ]
        for label, out, argv, threads in runs[: 2 if args.no_baseline else 3]:
            wall, cpu = _run(argv, threads)
            recipe = json.loads((out / "lmcompress.json").read_text())
            rows.append(
                {
                    "run": label,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "prune_s": recipe["prune_time_s"],
                    "sparsity": recipe["achieved_sparsity"],
                    "ppl": _perplexity(out, args.seqlen, args.eval_windows, args.procs),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        pairs = [("1 process vs torchrun", one, many)]
        if not args.no_baseline:
            pairs += [("1 thread vs torchrun", one_thread, many), ("1 process: 2 threads vs 1", one, one_thread)]
        agreement = [_compare(label, a, b) for label, a, b in pairs]
    info = machine_info()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; torch {info['torch']}")
    print_table(rows, f"{args.method} 50%, {args.nsamples}×{args.seqlen} calibration tokens: 1 process vs torchrun")
    print_table(agreement, "Pruning masks that differ between two outputs")
    name = "distributed" if args.method == "sparsegpt" else f"distributed-{args.method}"
    path = save_results(name, {"args": vars(args), "model": model, "runs": rows, "agreement": agreement})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
