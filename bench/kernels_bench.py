"""CPU kernels: decode / prefill speed and memory of SmolLM2-135M dense vs RTN int8 and int4.

    python -m bench.kernels_bench [--threads 2] [--repeats 3] [--eval-windows 8] [--kernels auto,aten]

Rows: dense float32 (the source as it is), RTN 8-bit per channel, RTN 4-bit groups of 32 / 64 / 128, three of them
with the output head quantized too (``--include-head``: 8 bits per channel; SmolLM2's tied head is its largest
layer), and a model with 50% of every block's FFN channels removed (``shrink``, magnitude), dense and RTN int4 +
head. Each quantized model is made with ``lmcompress.transforms.quantize`` (method rtn, saved packed) and loaded
once per ``--kernels`` mode: ``auto`` (lmcompress's own AVX2 kernel, float32) and ``aten`` (PyTorch's
``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``, bfloat16 compute; rows marked ``[aten]``). Each row
is measured in a fresh process (:func:`lmcompress.measure.speed.measure_folder`): decode tokens/s at batch 1
(64 greedy new tokens after a 32-token prompt, best of ``--repeats``), prefill tokens/s (one 256-token window),
peak RSS of the whole run and RSS after it, wall and CPU time. Perplexity on the first ``--eval-windows``
WikiText-2 test windows (seqlen 256) checks that the kernels compute the model they should. Targets (issue):
int8 ≥ 1.5× and int4 ≥ 2× the dense decode speed. Run it without ``OMP_WAIT_POLICY=PASSIVE`` (see
docs/kernels.md).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, results_name, save_results, wikitext

ROWS = {
    "dense fp32": None,
    "RTN int8 per-channel": (8, -1),
    "RTN int4 g32": (4, 32),
    "RTN int4 g64": (4, 64),
    "RTN int4 g128": (4, 128),
    "RTN int8 per-channel + int8 head": (8, -1, True),
    "RTN int4 g32 + int8 head": (4, 32, True),
    "RTN int4 g128 + int8 head": (4, 128, True),
    "FFN 50% removed, fp32": "shrunk",
    "FFN 50% removed + RTN int4 g32 + int8 head": (4, 32, True, "shrunk"),
}
TARGETS = {8: 1.5, 4: 2.0}


def measure_row(args, name: str, folder, kernels: str, test_text: str) -> dict:
    """Speed (fresh process), perplexity on the first test windows and the kernel summary of one folder."""
    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load
    from lmcompress.kernels import kernel_report
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.measure.speed import measure_folder

    speed = measure_folder(
        folder, kernels=kernels, threads=args.threads, prefill_tokens=256, context=32, new_tokens=64,
        repeats=args.repeats,
    )  # fmt: skip
    model, tokenizer = load(folder, kernels=kernels)
    test = eval_windows(tokenizer, test_text, 256)[: args.eval_windows]
    ppl = perplexity(model, test, progress=False).perplexity
    report = kernel_report(model)
    return {
        "model": name if kernels in ("none", "auto") else f"{name} [{kernels}]",
        "decode tok/s": speed["decode_tokens_per_s"],
        "decode tok/s (CPU time)": speed["decode_tokens_per_s_cpu"],
        "prefill tok/s": speed["prefill_tokens_per_s"],
        "prefill tok/s (CPU time)": speed["prefill_tokens_per_s_cpu"],
        "peak RSS MiB": speed["peak_rss_mb"],
        "RSS after MiB": speed["rss_mb"],
        "ppl": ppl,
        "kernels": report.summary() if report else "dense",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=8)
    rows_help = f"of {', '.join(ROWS)}".replace("%", "%%")  # argparse formats help strings with %
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=rows_help)
    parser.add_argument(
        "--kernels", default="auto,aten", help="kernel modes to measure each quantized row with (auto: lmcompress's)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench.reference import resolve_model
    from lmcompress.jobs import quantize_pretrained, structured_prune_pretrained
    from lmcompress.transforms.quantize import QuantConfig
    from lmcompress.transforms.shrink import StructureConfig

    source = str(resolve_model(args.model))
    print("machine:", machine_info(), flush=True)
    rows, base = [], None
    test_text = wikitext("test").read_text(encoding="utf-8")
    work = CACHE / results_name("kernels", source)  # bench/cache/kernels for SmolLM2, kernels-qwen1.5b, ...
    shrunk = work / "ffn50"  # 50% of every block's FFN channels removed (magnitude, no data)
    if any("shrunk" in (v if isinstance(v, (tuple, str)) else ()) for v in map(ROWS.get, args.rows)):
        shutil.rmtree(shrunk, ignore_errors=True)
        shrunk.parent.mkdir(parents=True, exist_ok=True)
        structured_prune_pretrained(source, StructureConfig("ffn", 0.5, "magnitude"), shrunk, progress=False)
    for name in args.rows:
        grid = ROWS[name]
        folder = source
        if grid == "shrunk":
            folder, grid = shrunk, None
        elif grid is not None:
            folder = work / name.replace(" ", "-")
            shutil.rmtree(folder, ignore_errors=True)
            folder.parent.mkdir(parents=True, exist_ok=True)
            config = QuantConfig("rtn", grid[0], grid[1], include_head=len(grid) > 2)  # + head: 8 bits per channel
            quantize_pretrained(shrunk if "shrunk" in grid else source, config, folder, progress=False)
        for kernels in ["none"] if grid is None else args.kernels.split(","):
            row = measure_row(args, name, folder, kernels, test_text)
            if base is None and grid is None:
                base = row
            if base is not None:
                row["decode ×"] = row["decode tok/s"] / base["decode tok/s"]
                row["decode × (CPU)"] = row["decode tok/s (CPU time)"] / base["decode tok/s (CPU time)"]
                row["prefill ×"] = row["prefill tok/s"] / base["prefill tok/s"]
            if grid is not None and base is not None:
                target = TARGETS[grid[0]]
                row["target"] = f"≥{target}× decode: {'met' if row['decode ×'] >= target else 'NOT met'}"
            rows.append(row)
            print(row, flush=True)
    title = f"CPU kernels, {Path(source).name}, batch 1, {args.threads} threads (best of {args.repeats})"
    print_table([{k: v for k, v in r.items() if k != "kernels"} for r in rows], title)
    for r in rows:
        print(f"{r['model']}: {r['kernels']}")
    path = save_results(results_name("kernels", source), {"args": vars(args), "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
