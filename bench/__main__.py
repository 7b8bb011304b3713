"""Run the benchmarks: ``python -m bench`` (all of them) or ``python -m bench prune quant`` (some).

Each benchmark runs as its own process, one after the other (the numbers of one are not disturbed by
another); its output is shown as it comes and kept in ``bench/results/NAME.log`` next to the JSON it
writes. ``--quick`` passes each benchmark its smaller settings (fewer evaluation windows or points), for a
check that everything runs rather than numbers to quote.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import RESULTS, machine_info

# name -> (module, extra arguments with --quick); in the order they are run
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "reference": ("bench.reference", []),
    "prune": ("bench.prune_bench", ["--nsamples", "16"]),
    "sweep": ("bench.sweep_bench", ["--limit", "16", "--sparsities", "0.3:0.9:0.3"]),
    "quant": ("bench.quant_bench", ["--repeats", "1", "--eval-windows", "32", "--nsamples", "32"]),
    "size": ("bench.size_bench", ["--no-ppl"]),
    "structured": ("bench.structured_bench", ["--quick"]),
    "lowrank": ("bench.lowrank_bench", ["--policies", "energy:0.9", "--max-eval-windows", "32"]),
    "moe": ("bench.moe_bench", ["--keep", "4", "--max-eval-windows", "32"]),
    "encoder": ("bench.encoder_bench", ["--eval-windows", "64", "--sentences", "128"]),
    "search": ("bench.search_bench", ["--methods", "wanda", "--targets", "0.7", "--generations", "2"]),
    "kernels": ("bench.kernels_bench", ["--repeats", "1", "--eval-windows", "2"]),
    "distributed": ("bench.distributed_bench", ["--eval-windows", "4"]),
    "kl": ("bench.kl_bench", ["--chunks", "4", "--no-gptq"]),
    "schemes": ("bench.schemes_bench", ["--nsamples", "4", "--eval-windows", "2", "--awq-grid", "5"]),
    "w8a8": ("bench.w8a8_bench", ["--repeats", "1", "--new-tokens", "8"]),
    "kquant": ("bench.kquant_bench", ["--types", "q4_k_m", "--calib-chunks", "8", "--chunks", "2"]),
    "depth": ("bench.depth_bench", ["--nsamples", "4", "--windows", "2", "--rounds", "1", "--no-llama-cpp"]),
    "sparse_kernel": ("bench.sparse_kernel_bench", ["--repeats", "1", "--nsamples", "4", "--eval-windows", "1"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller settings: a smoke run, not numbers to quote")
    args = parser.parse_args()
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    print("machine:", machine_info(), flush=True)
    summary = []
    for name in names:
        module, quick = BENCHMARKS[name]
        cmd = [sys.executable, "-m", module, *(quick if args.quick else [])]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        with open(RESULTS / f"{name}.log", "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            code = proc.wait()
        summary.append((name, code, time.perf_counter() - start))
    print("\n| benchmark | exit | wall s | log |\n|---|---|---|---|")
    for name, code, seconds in summary:
        print(f"| {name} | {code} | {seconds:.0f} | bench/results/{name}.log |")
    sys.exit(max(code for _, code, _ in summary))


if __name__ == "__main__":
    main()
