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

    nice -n 5 python -m bench.sparse_kernel_bench --bitmask [--threads 1 2] [--repeats 5]

``--bitmask`` measures instead where the unstructured (bitmask) kernel stops paying: per-layer decode (one input row)
over the seven linear layers of one decoder block of SmolLM2-135M and Qwen2.5-Coder-1.5B (their shapes, random
weights, copies of the block cycled so that the weights do not stay in cache, as in a whole model), at sparsity
50–90 %, against the dense kernel of the same values: float32 against ``F.linear``, 8- and 4-bit codes (g128)
against lmcompress's packed kernel. The crossover it prints (the lowest sparsity from which the bitmask kernel is
faster in every row) is what ``sparse_cpu.BITMASK_MIN_SPARSITY`` encodes. No model files are read.
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


BLOCK_SHAPES = {  # (out, in) of q, k, v, o, gate, up, down
    "SmolLM2-135M": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
    "Qwen2.5-Coder-1.5B": [(1536, 1536), (256, 1536), (256, 1536), (1536, 1536), (8960, 1536), (8960, 1536),
                           (1536, 8960)],
}  # fmt: skip
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
VALUES = ("float32", "int8 g128", "int4 g128")
WORKING_SET = 384 * 2**20  # bytes of float32 weights cycled through: even at 4 bits more than a 32 MiB L3


def _random_quantized(w: torch.Tensor, bits: int, group: int):
    """Random codes, scales and zero points with the codes of ``w``'s zeros at their zero point."""
    from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec

    rows, cols = w.shape
    spec = QuantSpec(bits=bits, group_size=group, sym=False)
    groups = spec.groups(cols)
    scale = torch.rand(rows, groups) * 0.01 + 0.001
    zero = torch.randint(0, 2**bits, (rows, groups)).float()
    codes = torch.randint(0, 2**bits, (rows, cols))
    codes = torch.where(w != 0, codes, zero[:, torch.arange(cols) // spec.width(cols)].long())
    return QuantizedTensor(codes.to(torch.uint8), scale, zero, spec)


def _best_time(layers: list, x_of: dict, repeats: int, cpu: bool = False) -> float:
    """Best of ``repeats`` passes over ``layers`` (one input row each), seconds per pass: wall-clock, or the
    process's CPU time (``cpu``: less disturbed by other processes on a loaded machine)."""
    import time

    clock = time.process_time if cpu else time.perf_counter

    best = float("inf")
    with torch.no_grad():
        for layer in layers[: max(1, len(layers) // 4)]:  # warm up
            layer(x_of[layer.in_features])
        for _ in range(repeats):
            start = clock()
            for layer in layers:
                layer(x_of[layer.in_features])
            best = min(best, clock() - start)
    return best


def _copies(layers: list, copies: int) -> list:
    """``copies`` passes of ``layers``, each pass its own copy in memory (so that a pass over them streams
    from memory, as a whole model's layers do)."""
    return [layer if k == 0 else _copy(layer) for k in range(copies) for layer in layers]


def _copy(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer`` with its own copy of every tensor it holds (the kernel modules it holds shared)."""
    import copy

    new = copy.copy(layer)
    new._buffers = {k: None if v is None else v.clone() for k, v in layer._buffers.items()}
    new._parameters = {k: None if v is None else torch.nn.Parameter(v.detach().clone(), requires_grad=False)
                       for k, v in layer._parameters.items()}  # fmt: skip
    for k, v in vars(layer).items():
        if isinstance(v, torch.Tensor):
            setattr(new, k, v.clone())
    return new


class _Dense(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight, self.in_features = w, w.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


def bitmask_crossover(args) -> None:
    """Decode time of the bitmask kernel against the dense kernel of the same values, per block shape, sparsity,
    value type and thread count; prints the table and the crossover, saves bench/results/sparse_bitmask.json."""
    from lmcompress.kernels.linear import PackedLinear
    from lmcompress.kernels.sparse_cpu import BitmaskLinear, bitmask_unavailable_reason, bitmask_use_avx512

    if bitmask_unavailable_reason():
        raise SystemExit(f"bitmask kernel unavailable: {bitmask_unavailable_reason()}")
    machine = machine_info()
    machine["load average"] = os.getloadavg()
    machine["bitmask kernel"] = "AVX-512" if bitmask_use_avx512() else "AVX2"
    print("machine:", machine, flush=True)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for model, shapes in BLOCK_SHAPES.items():
        if args.models and model not in args.models:
            continue
        block_bytes = 4 * sum(o * i for o, i in shapes)
        copies = max(1, -(-WORKING_SET // block_bytes))
        x_of = {i: torch.randn(1, i, generator=gen) for _, i in shapes}
        dense_w = [torch.randn(o, i, generator=gen) for o, i in shapes]
        baselines: dict[str, list] = {"float32": _copies([_Dense(w) for w in dense_w], copies)}
        for values in VALUES[1:]:
            layers = [PackedLinear(_random_quantized(w, int(values[3]), 128)) for w in dense_w]
            baselines[values] = _copies(layers, copies)
        for sparsity in args.sparsities:
            pruned = [w * (torch.rand(w.shape, generator=gen) >= sparsity) for w in dense_w]
            sparse: dict[str, list] = {"float32": _copies([BitmaskLinear(w) for w in pruned], copies)}
            for values in VALUES[1:]:
                layers = [BitmaskLinear(_random_quantized(w, int(values[3]), 128)) for w in pruned]
                sparse[values] = _copies(layers, copies)
            del pruned
            for threads in args.threads_list:
                torch.set_num_threads(threads)
                for values in VALUES:
                    dense_s = _best_time(baselines[values], x_of, args.repeats)
                    sparse_s = _best_time(sparse[values], x_of, args.repeats)
                    dense_cpu = _best_time(baselines[values], x_of, args.repeats, cpu=True)
                    sparse_cpu = _best_time(sparse[values], x_of, args.repeats, cpu=True)
                    row = {
                        "block": model, "threads": threads, "values": values, "sparsity": sparsity,
                        "dense ms/block": 1e3 * dense_s / copies, "bitmask ms/block": 1e3 * sparse_s / copies,
                        "speedup": dense_s / sparse_s, "speedup (CPU time)": dense_cpu / sparse_cpu,
                    }  # fmt: skip
                    rows.append(row)
                    print(row, flush=True)
            del sparse
    crossover: dict[str, dict] = {}  # per clock and thread count, then over all thread counts
    for key in ("speedup", "speedup (CPU time)"):
        for threads in [*args.threads_list, None]:
            table = crossover[f"{key}, {'all thread counts' if threads is None else f'{threads} threads'}"] = {}
            for values in VALUES:
                mine = [r for r in rows if r["values"] == values and threads in (None, r["threads"])]
                pays = [s for s in args.sparsities if all(r[key] >= 1 for r in mine if r["sparsity"] >= s)]
                table[values] = min(pays) if pays else None
    machine["load average after"] = os.getloadavg()
    title = (
        f"bitmask kernel vs dense, decode (1 row), one block's linear layers, {copies} copies cycled "
        f"(best of {args.repeats}; speedup: wall-clock, CPU time: less disturbed by a loaded machine)"
    )
    print_table(rows, title)
    for key, table in crossover.items():
        for values, at in table.items():
            start = "never (at no level measured)" if at is None else f"{100 * at:.0f}% sparsity"
            print(f"{key}, {values}: the bitmask kernel decodes faster than the dense one from {start}")
    print("load average before / after:", machine["load average"], machine["load average after"])
    path = save_results("sparse_bitmask", {"args": vars(args), "machine": machine, "rows": rows,
                                           "crossover": crossover})  # fmt: skip
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--bitmask", action="store_true", help="per-layer crossover of the bitmask kernel instead")
    parser.add_argument("--threads-list", type=int, nargs="+", default=[1, 2], help="--bitmask: thread counts")
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES), help="--bitmask: levels")
    parser.add_argument("--models", nargs="+", default=None, help="--bitmask: block shapes (default: both)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=32, help="SparseGPT calibration windows (512 tokens)")
    parser.add_argument("--rebuild", action="store_true", help="make the compressed folders again")
    args = parser.parse_args()
    if args.bitmask:
        bitmask_crossover(args)
        return
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
