"""Generation speed at batch 1: prefill and decode tokens per second, and the peak memory of a fresh process.

Prefill is one forward of a ``prompt``-token window of random ids with the KV cache on, computing the logits
of the last position only (as ``generate`` does); decode is ``new_tokens`` greedy single-token steps after a
``context``-token prompt, each reusing the cache. Both are timed on the wall clock and on this process's CPU
time (steadier on a shared machine: with one thread it is the compute time), best of ``repeats``.

:func:`measure_folder` runs the measurement in a child process (``python -m lmcompress.measure.speed``), so its
peak resident memory (``ru_maxrss``) is that of loading and running that one model, nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lmcompress.errors import UserError


def _forward(model: nn.Module, ids: torch.Tensor, past=None):
    kwargs = {"use_cache": True, "past_key_values": past}
    try:
        return model(ids, logits_to_keep=1, **kwargs)
    except TypeError:  # models without logits_to_keep
        return model(ids, **kwargs)


@torch.inference_mode()
def generation_speed(
    model: nn.Module,
    *,
    prefill_tokens: int = 256,
    context: int = 32,
    new_tokens: int = 64,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> dict:
    """``prefill_tokens_per_s``, ``decode_tokens_per_s`` (wall) and their ``*_cpu`` twins (CPU time), best of
    ``repeats`` after one untimed warm-up of each, batch 1, greedy; see the module docstring."""
    if min(prefill_tokens, context, new_tokens, repeats) < 1:
        raise UserError("prefill_tokens, context, new_tokens and repeats must be positive")
    model.eval()
    device = torch.device(device)
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prefill_tokens), generator=gen).to(device)
    start = torch.randint(0, vocab, (1, context), generator=gen).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def prefill() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        _forward(model, prompt)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def decode() -> tuple[float, float]:
        out = _forward(model, start)
        token = out.logits[:, -1:].argmax(-1)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            out = _forward(model, token, out.past_key_values)
            token = out.logits[:, -1:].argmax(-1)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    prefill(), decode()  # warm-up: first calls allocate and pick kernels
    pre = [prefill() for _ in range(repeats)]
    dec = [decode() for _ in range(repeats)]
    return {
        "prefill_tokens": prefill_tokens,
        "decode_context": context,
        "decode_tokens": new_tokens,
        "prefill_tokens_per_s": prefill_tokens / min(t for t, _ in pre),
        "prefill_tokens_per_s_cpu": prefill_tokens / max(min(c for _, c in pre), 1e-9),
        "decode_tokens_per_s": new_tokens / min(t for t, _ in dec),
        "decode_tokens_per_s_cpu": new_tokens / max(min(c for _, c in dec), 1e-9),
        "torch_threads": torch.get_num_threads(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB): ``VmHWM`` of ``/proc/self/status`` where there is one
    (``ru_maxrss`` survives ``exec``, so a child started by a large parent would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mb() -> float | None:
    """Resident memory of this process now (MiB), from ``/proc/self/statm`` (None where there is none)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def measure_folder(
    folder: str | Path,
    *,
    kernels: str = "auto",
    dtype: str = "float32",
    threads: int | None = None,
    prefill_tokens: int = 256,
    context: int = 32,
    new_tokens: int = 64,
    repeats: int = 3,
    timeout: float = 3600,
) -> dict:
    """:func:`generation_speed` of ``folder`` loaded with ``kernels``, in a fresh process, plus its memory:
    ``peak_rss_mb`` (the whole run, loading included), ``rss_mb`` (resident after the run: what the loaded model
    keeps) and ``kernel_summary``."""
    root = Path(__file__).resolve().parents[2]  # the checkout holding this lmcompress
    cmd = [sys.executable, "-m", "lmcompress.measure.speed", str(folder), "--kernels", kernels, "--dtype", dtype]
    cmd += ["--threads", str(threads or torch.get_num_threads()), "--prefill-tokens", str(prefill_tokens)]
    cmd += ["--context", str(context), "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UserError(f"measuring the speed of {folder} failed: {' '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_threads(threads: int | None) -> int | None:
    """``threads`` if it is between 1 and this machine's CPU count (None stays None): more threads than cores
    only contend, and a huge number exhausts memory creating them."""
    if threads is None:
        return None
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise UserError(
            f"threads must be between 1 and this machine's {cores} CPU cores, got {threads}", param="threads"
        )
    return threads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmcompress.measure.speed", description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(check_threads(args.threads))
    from lmcompress.checkpoint.load import load
    from lmcompress.kernels.linear import kernel_report

    model, _ = load(args.folder, dtype=args.dtype, kernels=args.kernels)
    load_rss = peak_rss_mb()
    result = generation_speed(
        model, prefill_tokens=args.prefill_tokens, context=args.context, new_tokens=args.new_tokens,
        repeats=args.repeats,
    )  # fmt: skip
    report = kernel_report(model)
    result.update(
        kernels=args.kernels,
        kernel_summary=report.summary() if report else None,
        load_peak_rss_mb=load_rss,
        peak_rss_mb=peak_rss_mb(),
        rss_mb=rss_mb(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
