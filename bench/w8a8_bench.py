"""W8A8 int8 on CPU: prefill and decode speed of int8 × int8 → int32 layers against dense and weight-only int8.

    python -m bench.w8a8_bench [--model smollm2|qwen1.5b] [--threads 2] [--repeats 3]

Rows, all in one process on the same dense model (each a copy of it), batch 1, ``--threads`` threads:

* **dense fp32**: the source as it is;
* **int8 weight-only**: every block linear layer RTN 8-bit per channel (symmetric), run by ``kernels="auto"``'s
  kernel (:func:`lmcompress.kernels.swap_quantized_linears`: lmcompress's AVX2 float32 kernel where it builds);
* **W8A8 simulated**: every block linear layer W8A8 int8 (RTN weights per channel, activations per token,
  dynamic; :func:`lmcompress.algorithms.actquant.simulate_linears`), computed in float32 as the simulation does;
* **W8A8 int8 kernel**: the same layers swapped for :class:`lmcompress.kernels.int8act.Int8ActLinear`
  (int8 × int8 → int32, :func:`~lmcompress.kernels.int8act.swap_act_quant_linears`); with ``--decode-rows N``
  also a row whose decode (up to N tokens) runs lmcompress's own fused AVX2 int8 kernel instead of ``_int_mm``.

Speed: :func:`lmcompress.measure.speed.generation_speed` (prefill: one ``--prefill``-token window, logits of the
last position; decode: ``--new-tokens`` greedy tokens after a 32-token prompt; best of ``--repeats``, wall and
CPU time). Check of the computation, on one WikiText-2 test window of ``--prefill`` tokens: mean KL divergence of
each row's next-token distribution from the dense one, and for the kernel rows the mean KL divergence from the
simulated model and the share of positions with the same top token. Targets (issue 32): prefill ≥ 1.5× dense
fp32, decode ≥ int8 weight-only's. The output head and embeddings stay float32 in every row. Timings taken while
other jobs run are labelled contended, with the load average; Qwen2.5-Coder-1.5B runs under
``flock /tmp/team/qwen.lock`` where that folder exists.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from bench.common import MODEL_HELP, machine_info, print_table, results_name, save_results, wikitext

QWEN_LOCK = Path("/tmp/team/qwen.lock")


@contextmanager
def model_lock(source: Path):
    """Hold ``/tmp/team/qwen.lock`` while a large model is loaded (one such process at a time on a shared box)."""
    if "qwen" not in source.name or not QWEN_LOCK.parent.is_dir():
        yield
        return
    with open(QWEN_LOCK, "a") as handle:
        print(f"waiting for {QWEN_LOCK} ...", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f} (1 / 5 min) on {os.cpu_count()} cores"


def block_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers inside the transformer blocks (not the head)."""
    from lmcompress.models.families import get_blocks

    inside = {id(m) for block in get_blocks(model) for m in block.modules()}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]


def weight_only_int8(dense: nn.Module) -> tuple[nn.Module, str]:
    from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
    from lmcompress.kernels import swap_quantized_linears

    model = copy.deepcopy(dense)
    spec = QuantSpec(8, -1, sym=True)
    names = block_linears(model)
    quantized = {f"{n}.weight": rtn_quantize(model.get_submodule(n).weight.detach(), spec) for n in names}
    report = swap_quantized_linears(model, quantized, "auto")
    return model, report.summary()


def w8a8_simulated(dense: nn.Module) -> tuple[nn.Module, str]:
    from lmcompress.algorithms.actquant import ActScheme, simulate_linears
    from lmcompress.models.families import get_blocks

    model = copy.deepcopy(dense)
    count = sum(len(simulate_linears(block, ActScheme("int8"))) for block in get_blocks(model))
    return model, f"{count} layers ActQuantLinear (float32 simulation)"


def w8a8_kernel(dense: nn.Module) -> tuple[nn.Module, str]:
    from lmcompress.kernels.int8act import swap_act_quant_linears

    model, _ = w8a8_simulated(dense)
    report = swap_act_quant_linears(model)
    kinds: dict[str, int] = {}
    for what in report.values():
        kinds[what] = kinds.get(what, 0) + 1
    return model, "; ".join(f"{n} layers {k}" for k, n in kinds.items())


@torch.inference_mode()
def next_token_logprobs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(window).logits[0].float(), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512, help="prefill tokens (and the check window)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--decode-rows", type=int, default=0, help="also measure the fused AVX2 int8 decode kernel up to N tokens"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench.reference import resolve_model
    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load_model
    from lmcompress.kernels import int8act
    from lmcompress.measure.speed import generation_speed

    source = resolve_model(args.model)
    print("machine:", machine_info(), flush=True)
    started = time.time()
    rows = []
    with model_lock(source):
        dense, tokenizer = load_model(str(source))
        test = wikitext("test").read_text(encoding="utf-8")[:200_000]
        window = eval_windows(tokenizer, test, args.prefill)[:1]
        reference = next_token_logprobs(dense, window)
        simulated = None
        builds = [("dense fp32", None), ("int8 weight-only", weight_only_int8), ("W8A8 simulated", w8a8_simulated)]
        builds.append(("W8A8 int8 kernel", w8a8_kernel))
        if args.decode_rows > 0:
            builds.append((f"W8A8 int8 kernel, own AVX2 decode (≤{args.decode_rows} tokens)", w8a8_kernel))
        for name, build in builds:
            int8act.DECODE_ROWS = args.decode_rows if "own AVX2" in name else 0
            model, what = (dense, "dense") if build is None else build(dense)
            speed = generation_speed(
                model, prefill_tokens=args.prefill, new_tokens=args.new_tokens, repeats=args.repeats
            )
            logprobs = next_token_logprobs(model, window)
            kl = float((reference.exp() * (reference - logprobs)).sum(-1).mean())
            row = {
                "model": name,
                "prefill tok/s": speed["prefill_tokens_per_s"],
                "prefill tok/s (CPU)": speed["prefill_tokens_per_s_cpu"],
                "decode tok/s": speed["decode_tokens_per_s"],
                "decode tok/s (CPU)": speed["decode_tokens_per_s_cpu"],
                "KL vs dense": kl,
                "KL vs simulated": None,
                "top-1 = simulated": None,
                "load": load_average(),
                "kernels": what,
            }
            if name == "W8A8 simulated":
                simulated = logprobs
            elif "kernel" in name and simulated is not None:
                row["KL vs simulated"] = float((simulated.exp() * (simulated - logprobs)).sum(-1).mean())
                row["top-1 = simulated"] = float((logprobs.argmax(-1) == simulated.argmax(-1)).float().mean())
            if build is not None:
                del model
            rows.append(row)
            print({k: v for k, v in row.items()}, flush=True)
    int8act.DECODE_ROWS = 0
    dense_row = rows[0]
    weight_only = next(r for r in rows if r["model"] == "int8 weight-only")
    for row in rows:
        row["prefill ×"] = row["prefill tok/s"] / dense_row["prefill tok/s"]
        row["prefill × (CPU)"] = row["prefill tok/s (CPU)"] / dense_row["prefill tok/s (CPU)"]
        row["decode × weight-only"] = row["decode tok/s"] / weight_only["decode tok/s"]
        row["decode × weight-only (CPU)"] = row["decode tok/s (CPU)"] / weight_only["decode tok/s (CPU)"]
    kernel = next(r for r in rows if r["model"] == "W8A8 int8 kernel")
    targets = {
        "prefill ≥ 1.5× dense fp32": kernel["prefill ×"] >= 1.5,
        "decode ≥ int8 weight-only": kernel["decode × weight-only"] >= 1.0,
    }
    load = load_average()
    quiet = max(os.getloadavg()[:2]) <= args.threads + 1  # this run's own threads, and little else
    label = "quiet" if quiet else "CONTENDED"
    title = (
        f"W8A8 int8 on CPU, {source.name}, batch 1, {args.threads} threads, prefill {args.prefill} tokens, "
        f"best of {args.repeats} ({label}: load {load})"
    )
    print_table([{k: v for k, v in r.items() if k not in ("kernels", "load")} for r in rows], title)
    for r in rows:
        print(f"{r['model']}: {r['kernels']}")
    for target, met in targets.items():
        print(f"target {target}: {'met' if met else 'NOT met'} (wall clock)")
    print(f"took {time.time() - started:.0f} s")
    payload = {"args": vars(args), "timing": label, "load_average": load, "rows": rows, "targets": targets}
    path = save_results(results_name("w8a8", source), payload)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
