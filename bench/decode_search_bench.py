"""Joint search under a decode-time budget (issue 33): at the decode speed of uniform int4 g32, lower perplexity
than it? On SmolLM2, one command:

    python -m bench.decode_search_bench                              # --levels 0/16,0/8,0/4, 1 generation
    python -m bench.decode_search_bench --levels 0/16,0/8,0/4,2:4/4,0/3 --generations 15 --fresh-table

1. The latency table (``lmcompress.search.latency``) for the model's shapes at ``--levels`` and the head's levels:
   its build time (``--fresh-table`` removes this machine's table first, so that it is measured), and the
   predicted decode time per token of uniform int4 g32 with an int8 head (every block layer at ``0/4``, the head
   at 8 bits: ``lmcompress quantize --method gptq --bits 4 --group-size 32 --head-bits 8``).
2. That model, made by the CLI; then ``lmcompress search --budget decode=T`` with ``T`` that predicted time, on
   the same calibration text (WikiText-2 validation, ``--nsamples`` windows of 256 tokens).
3. For dense fp32, uniform and searched: decode tokens per second measured with
   :func:`lmcompress.measure.speed.generation_speed` on ``lmcompress.load(folder, kernels="auto")`` (batch 1,
   32-token prompt, 64 new tokens, best of 3), beside the table's prediction; WikiText-2 test perplexity
   (``--eval-windows`` windows of ``--eval-seqlen`` tokens).

Speeds depend on the load of the machine: the load average is recorded before and after. ``--clock cpu`` times
the table and the models on this process's CPU time (all threads summed) instead of the wall clock: steadier
where other work shares the machine (then tokens per CPU-second are compared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, save_results, wikitext

WORK = CACHE / "decode-search"


def _run(argv: list[str], threads: int) -> float:
    """Run ``lmcompress ARGV`` niced, in its own process; its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(["nice", "-n", "5", sys.executable, "-m", "lmcompress", *argv], check=True, env=env)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--levels", default="0/16,0/8,0/4", help="the search's joint levels (0/4 must be one)")
    parser.add_argument("--generations", type=int, default=1)
    parser.add_argument("--sensitivity-span", type=int, default=0, help="the search's [0: no sensitivity pass]")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows of 256 tokens")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh-table", action="store_true", help="remove this machine's latency table first")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="the table's clock and the speed "
                        "compared with it: cpu (this process's CPU time) on a machine others share")  # fmt: skip
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    import lmcompress
    from bench.reference import resolve_model
    from lmcompress.calibration.data import eval_windows
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.measure.speed import generation_speed
    from lmcompress.search import latency
    from lmcompress.search.levels import JointLevel, parse_joint_levels

    torch.set_num_threads(args.threads)
    os.environ[latency.CLOCK_VARIABLE] = args.clock  # the search's subprocess reads the same table
    WORK.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model)
    levels = parse_joint_levels(args.levels, 32)
    labels = [lv.label for lv in levels]
    if "0/4" not in labels:
        raise SystemExit(f"--levels {args.levels}: the uniform int4 baseline needs the level 0/4")
    if args.fresh_table:
        latency.table_path().unlink(missing_ok=True)

    # 1. the table, and uniform int4 g32 (int8 head)'s predicted time per token
    dense_net, tokenizer = lmcompress.load(model)
    load_before = os.getloadavg()
    costs = latency.decode_costs(dense_net, levels, "1x", 32)
    head = costs.layers[-1]
    eight = latency.decode_costs(dense_net, [JointLevel(0.0, 8)] * 2, "1x", 32)  # the head at 8 bits
    int8_head = eight.cost[head][0]
    uniform_s = costs.rest + int8_head + sum(costs.cost[layer][labels.index("0/4")] for layer in costs.layers[:-1])
    table = {"build_s": costs.build_s + eight.build_s, "entries_measured": costs.measured + eight.measured,
             "rest_ms": 1e3 * costs.rest, "dense_ms": 1e3 * costs.dense, "uniform_int4_int8head_ms": 1e3 * uniform_s,
             "path": costs.table}  # fmt: skip
    print("latency table:", json.dumps(table))
    del dense_net

    # 2. uniform int4 g32 + int8 head, and the search at its predicted decode time
    calib = ["--calib-data", str(wikitext("valid")), "--nsamples", str(args.nsamples), "--seqlen", "256", "-q"]
    uniform = WORK / "uniform4-g32-head8"
    times = {}
    if not (uniform / "lmcompress.json").is_file():
        times["uniform_s"] = _run(["quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size", "32",
                                   "--head-bits", "8", "--head-group-size", "32", *calib, "-o", str(uniform),
                                   "--overwrite"], args.threads)  # fmt: skip
    out = WORK / f"search{('-' + args.tag) if args.tag else ''}"
    shutil.rmtree(out, ignore_errors=True)
    budget = f"{1e3 * uniform_s:.6f}ms"
    search = ["search", str(model), "--budget", f"decode={budget}", "--levels", args.levels, "--group-size", "32",
              "--generations", str(args.generations), "--sensitivity-span", str(args.sensitivity_span), *calib,
              "-o", str(out), "--overwrite"]  # fmt: skip
    times["search_s"] = _run(search, args.threads)
    report = json.loads((out / "search.json").read_text())

    # 3. measured speed and perplexity
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), args.eval_seqlen)
    test = test[: args.eval_windows]
    rows = []
    measured = "decode_tokens_per_s_cpu" if args.clock == "cpu" else "decode_tokens_per_s"
    for name, folder, predicted in (
        ("dense fp32", model, costs.dense),
        ("uniform int4 g32 + int8 head (GPTQ)", uniform, uniform_s),
        ("decode search", out, report["decode"]["predicted_s"]),
    ):
        net, _ = lmcompress.load(folder, kernels="auto")
        speed = generation_speed(net, context=32, new_tokens=args.new_tokens, repeats=3)
        ppl = perplexity(net, test, progress=False).perplexity
        rows.append({"model": name, "ppl": ppl, "predicted tok/s": 1 / predicted,
                     "measured tok/s": speed[measured], "measured/predicted": speed[measured] * predicted,
                     "wall tok/s": speed["decode_tokens_per_s"], "weights MB": _bytes(folder) / 1e6})  # fmt: skip
        del net
    load_after = os.getloadavg()
    print_table(rows, f"decode budget {budget} per token (uniform int4 g32's prediction), WikiText-2 test ppl")
    print("allocation:", " ".join(report["allocation"]), "| head:", report["layer_levels"].get("lm_head"))
    result = {"args": vars(args), "table": table, "rows": rows, "decode": report["decode"], "times": times,
              "allocation": report["allocation"], "generations": len(report["history"]),
              "load_average": {"before": load_before, "after": load_after}}  # fmt: skip
    print(json.dumps({k: result[k] for k in ("times", "load_average", "generations")}))
    save_results(f"decode-search{('-' + args.tag) if args.tag else ''}", {"machine": machine_info(), **result})


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


if __name__ == "__main__":
    main()
