"""N:M sparse CPU kernel: decode tokens/s at batch 1 of dense fp32, int4, SparseGPT 2:4 + int4 and 2:4 float.

    python -m bench.sparse_kernel_bench [--model qwen1.5b] [--threads 2] [--repeats 3] [--nsamples 32]

Rows (each folder made once under bench/cache/sparse-kernel[-MODEL], then loaded with ``kernels="auto"``):
dense fp32 (the source); RTN int4 g128 with the head at int8 per channel (lmcompress's AVX2 kernel); SparseGPT 2:4
+ int4 g128 with ``--head-bits 8`` (the head quantized, not pruned; the blocks on lmcompress's sparse kernel);
2:4 float32 (magnitude: which weights are kept does not change the speed; head dense). Each row is measured in a
fresh process (:func:`lmcompress.measure.speed.measure_folder`: 64 greedy new tokens after a 32-token prompt, best
of ``--repeats``; prefill one 256-token window) and its perplexity on the first ``--eval-windows`` WikiText-2 test
windows (seqlen 256) checks that the kernels compute the model they should. Targets (issue 33): 2:4 + int4 decodes
≥ 1.25× int4 alone and ≥ 2.8× dense fp32. Timings are only comparable on a quiet machine: the machine line says
its load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, results_name, save_results, wikitext

ROWS = {  # row name → folder under the work folder (None: the source)
    "dense fp32": None,
    "int4 g128 + int8 head": "int4-g128-head8",
    "SparseGPT 2:4 + int4 g128 + int8 head": "sparsegpt-24-int4-g128-head8",
    "2:4 float32 (magnitude)": "magnitude-24-float",
}
TARGETS = {"vs int4": 1.25, "vs dense": 2.8}


def make_folder(name: str, source: str, folder: Path, args) -> None:
    """The compressed folder of row ``name`` (kept when it exists, unless ``--rebuild``)."""
    from lmcompress.jobs import prune_pretrained, quantize_pretrained
    from lmcompress.transforms.prune import PruneConfig
    from lmcompress.transforms.quantize import QuantConfig

    if folder.exists() and not args.rebuild:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    calib = {"calib_data": str(wikitext("valid")), "nsamples": args.nsamples, "seqlen": 512}
    if name.startswith("int4"):
        quantize_pretrained(source, QuantConfig("rtn", 4, 128, include_head=True), folder, progress=False)
    elif name.startswith("SparseGPT"):
        config = PruneConfig(method="sparsegpt", sparsity=None, pattern="2:4", bits=4, group_size=128, head_bits=8)
        prune_pretrained(source, config, folder, progress=False, **calib)
    else:
        config = PruneConfig(method="magnitude", sparsity=None, pattern="2:4")
        prune_pretrained(source, config, folder, progress=False, save_format="packed")


def measure_row(args, name: str, folder, test_text: str) -> dict:
    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load
    from lmcompress.kernels import kernel_report
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.measure.speed import measure_folder

    speed = measure_folder(
        folder, kernels="auto", threads=args.threads, prefill_tokens=256, context=32, new_tokens=64,
        repeats=args.repeats,
    )  # fmt: skip
    model, tokenizer = load(folder, kernels="auto")
    test = eval_windows(tokenizer, test_text, 256)[: args.eval_windows]
    ppl = perplexity(model, test, progress=False).perplexity if args.eval_windows else float("nan")
    report = kernel_report(model)
    size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return {
        "model": name,
        "decode tok/s": speed["decode_tokens_per_s"],
        "decode tok/s (CPU time)": speed["decode_tokens_per_s_cpu"],
        "prefill tok/s": speed["prefill_tokens_per_s"],
        "weights MiB": size / 2**20,
        "peak RSS MiB": speed["peak_rss_mb"],
        "ppl": ppl,
        "kernels": report.summary() if report else "dense",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=32, help="SparseGPT calibration windows (512 tokens)")
    parser.add_argument("--rebuild", action="store_true", help="make the compressed folders again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench.reference import resolve_model
    from lmcompress.kernels import sparse_cpu

    source = str(resolve_model(args.model))
    machine = machine_info()
    machine["load average"] = os.getloadavg()
    machine["sparse kernel"] = sparse_cpu.unavailable_reason() or ("AVX-512" if sparse_cpu.use_avx512() else "AVX2")
    print("machine:", machine, flush=True)
    work = CACHE / results_name("sparse-kernel", source)
    test_text = wikitext("test").read_text(encoding="utf-8")
    rows: list[dict] = []
    for name in ROWS:
        folder = Path(source) if ROWS[name] is None else work / ROWS[name]
        if ROWS[name] is not None:
            make_folder(name, source, folder, args)
        row = measure_row(args, name, folder, test_text)
        rows.append(row)
        print(row, flush=True)
    dense, int4 = rows[0]["decode tok/s"], rows[1]["decode tok/s"]
    for row in rows:
        row["× dense"] = row["decode tok/s"] / dense
        row["× int4"] = row["decode tok/s"] / int4
    verdict = {}
    for key, goal in TARGETS.items():
        ratio = rows[2]["× " + key.split()[-1]]
        verdict[key] = f"{ratio:.2f}× (≥ {goal}×: {'met' if ratio >= goal else 'NOT met'})"
    machine["load average after"] = os.getloadavg()
    title = f"N:M sparse kernel, {Path(source).name}, decode batch 1, {args.threads} threads (best of {args.repeats})"
    print_table([{k: v for k, v in r.items() if k != "kernels"} for r in rows], title)
    for r in rows:
        print(f"{r['model']}: {r['kernels']}")
    print("2:4 + int4 decode:", ", ".join(f"{k} {v}" for k, v in verdict.items()))
    print("load average before / after:", machine["load average"], machine["load average after"])
    path = save_results(results_name("sparse_kernel", source), {"args": vars(args), "machine": machine, "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
