"""Peak memory and time of SparseGPT on a ~1.1B-parameter model, streamed from disk (``--offload disk``) or loaded.

``python -m bench.stream_bench`` writes, once, a LLaMA-shaped model with random weights in TinyLlama-1.1B's shape
(hidden 2048, 22 blocks, FFN 5632, 32 heads / 4 KV heads, vocabulary 32000: 1.1 B parameters, ~2.2 GB of bf16
shards) into ``bench/cache/stream-llama-1.1b``, then runs ``lmcompress prune --method sparsegpt --sparsity 0.5``
on it with each ``--offload`` setting, each in its own process, and reports that process's peak resident memory
(``ru_maxrss``) and wall time. Calibration is kept small (8 windows of 128 tokens by default): the point is the
memory of the weights, not the quality of a random model. The outputs are deleted afterwards (``--keep`` keeps
them). ``--model qwen1.5b`` (or any folder, see :func:`bench.reference.resolve_model`) runs the same on that
model instead of the random one.
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

from bench.common import CACHE, MODEL_HELP, RESULTS, machine_info, print_table, save_results

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def write_model(folder: Path, layers: int) -> Path:
    """Random bf16 weights (normal, std 0.02; norms 1) written tensor by tensor as one shard per block."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lmcompress.calibration.data import load_text
    from lmcompress.models.tiny import build_tokenizer
    from lmcompress.streaming import build_meta_model

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, bos_token_id=0, eos_token_id=0)
    config.dtype = torch.bfloat16
    meta = build_meta_model(config, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, tuple]] = {}
    for name, t in meta.state_dict().items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(part, {})[name] = tuple(t.shape)
    names = list(groups)
    weight_map, total = {}, 0
    for j, part in enumerate(names):
        file = f"model-{j + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {}
        for name, shape in groups[part].items():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(tmp)
    build_tokenizer(load_text("bundled:wikitext2-valid").text, vocab_size=512).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def _child(argv: list[str]) -> None:
    """Run the CLI with ``argv`` in this process and print its peak RSS as the last line.

    The peak is ``VmHWM`` of ``/proc/self/status``, which starts afresh with the new program; ``ru_maxrss``
    would carry over the parent's peak from before the exec.
    """
    from lmcompress.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code or 0
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"rc": code, "peak_rss_kib": int(hwm.split()[1])}))


def run_one(source: Path, out: Path, offload: str, args) -> dict:
    argv = ["prune", str(source), "--method", "sparsegpt", "--sparsity", "0.5", "--offload", offload]
    argv += ["--calib-data", "bundled:wikitext2-valid", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    argv += ["-q", "--overwrite", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.stream_bench", "--child", json.dumps(argv)],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    wall = time.perf_counter() - start
    last = (proc.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        info = json.loads(last)
    except json.JSONDecodeError:
        info = {"rc": proc.returncode}
    if info.get("rc", proc.returncode):
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
    recipe = json.loads((out / "lmcompress.json").read_text()) if (out / "lmcompress.json").is_file() else {}
    size = sum(p.stat().st_size for p in out.glob("*.safetensors")) if out.is_dir() else 0
    return {
        "offload": offload,
        "peak_rss_gib": info.get("peak_rss_kib", 0) / 2**20,
        "wall_s": wall,
        "prune_s": recipe.get("prune_time_s"),
        "sparsity": recipe.get("achieved_sparsity"),
        "output_gb": size / 1e9,
        "rc": info.get("rc", proc.returncode),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--offloads", default="disk,none", help="comma-separated --offload settings to run")
    parser.add_argument("--keep", action="store_true", help="keep the pruned outputs")
    parser.add_argument("--model", default=None, help=f"a real model instead of the random 1.1B one: {MODEL_HELP}")
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    print("machine:", machine_info(), flush=True)
    usage = shutil.disk_usage(CACHE.parent)
    print(f"free disk: {usage.free / 1e9:.1f} GB", flush=True)
    name = "stream-llama-1.1b" if args.layers == SHAPE["num_hidden_layers"] else f"stream-llama-{args.layers}l"
    start = time.perf_counter()
    if args.model:
        from bench.reference import resolve_model

        source = resolve_model(args.model)
    else:
        source = write_model(CACHE / name, args.layers)
    print(
        f"source: {source} ({sum(p.stat().st_size for p in source.glob('*.safetensors')) / 1e9:.2f} GB, "
        f"ready in {time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for offload in args.offloads.split(","):
        out = RESULTS / (f"stream-{offload}" if not args.model else f"stream-{source.name}-{offload}")
        rows.append(run_one(source, out, offload, args))
        print(rows[-1], flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    what = source.name if args.model else f"{args.layers} blocks"
    print_table(rows, f"SparseGPT 50%, {what}, {args.nsamples}x{args.seqlen} calibration tokens")
    save_results("stream" if not args.model else f"stream-{source.name}", {"rows": rows, "settings": vars(args)})


if __name__ == "__main__":
    main()
