"""Whole-process speed vs llm-compressor (issue 12): SparseGPT 50% on the same model, windows and threads.

    python -m bench.llmcompressor_bench                    # SmolLM2-135M and a random ~110M LLaMA
    python -m bench.llmcompressor_bench --models smollm2 --nsamples 16 --seqlen 256 --threads 2
    python -m bench.llmcompressor_bench --model qwen1.5b   # Qwen2.5-Coder-1.5B-Instruct (bench/reference.py)

Each tool runs in its own process, timed from the launch to the end of saving (imports, loading, calibration,
pruning and writing all count; lmcompress to its process's exit, llm-compressor to the line it prints once saved,
before its interpreter's teardown). Both write a new folder (the outputs of the previous run are deleted first):

- lmcompress: ``python -m lmcompress prune MODEL --method sparsegpt --sparsity 0.5`` on ``--nsamples`` windows
  of ``--seqlen`` WikiText-2 valid tokens;
- llm-compressor 0.14: ``oneshot`` with ``SparseGPTModifier(sparsity=0.5)`` (its sequential pipeline, lm_head
  ignored, block size 128, the same dampening 0.01) on exactly the same token ids, then ``save_pretrained``
  with ``save_compressed=False`` so that both outputs are plain folders. It runs in its own virtual environment
  (``--venv``, default bench/cache/llmc-venv, made with ``python -m venv --system-site-packages`` and
  ``pip install llmcompressor==0.14.0 torch==2.13.0``: it is not a dependency of lmcompress and pins
  transformers ≤ 5.17).

Both outputs are then scored by the same code (``lmcompress.measure.perplexity``) on WikiText-2 test windows.
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

from bench.common import CACHE, machine_info, print_table, save_results, wikitext

OUT = CACHE / "llmc"
VENV = CACHE / "llmc-venv"

# What the llm-compressor process runs: load, oneshot SparseGPT on the given ids, save uncompressed.
LLMC_SCRIPT = r"""
import sys, time, torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier

model_dir, ids_file, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
ids = load_file(ids_file)["ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
recipe = SparseGPTModifier(sparsity=0.5, block_size=128, dampening_frac=0.01, targets=["Linear"],
                           ignore=["re:.*lm_head"])
oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1])
model.save_pretrained(out, save_compressed=False)
tokenizer.save_pretrained(out)
print("SAVED_AT", time.time(), flush=True)
"""


def llama_110m(tokenizer_dir: Path) -> Path:
    """A LLaMA-shaped model with random weights, ~110M parameters with SmolLM2's tokenizer (written once)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = CACHE / "llama-110m"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_timed(cmd: list[str], env: dict, marker: str | None = None) -> tuple[float, str]:
    """Wall seconds from launch to exit (or to the time the process printed after ``marker``)."""
    start_wall, start = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if marker:
        saved = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
        seconds = float(saved[-1].split()[1]) - start_wall
    return seconds, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", "--model", default="smollm2,llama110m", help="comma-separated: smollm2, llama110m, qwen1.5b"
    )
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--venv", default=str(VENV))
    parser.add_argument(
        "--seeds", default="0", help="calibration draws, e.g. 0,1,2: one row each and their mean perplexity per tool"
    )
    args = parser.parse_args(argv)

    from bench.reference import resolve_model

    llmc_python = Path(args.venv) / "bin" / "python"
    if not llmc_python.is_file():
        sys.exit(f"no llm-compressor venv at {args.venv}: create it as the docstring says (python -m {__name__} -h)")
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    unknown = set(args.models.split(",")) - {"smollm2", "llama110m", "qwen1.5b"}
    if unknown:
        sys.exit(f"unknown --models {', '.join(sorted(unknown))}: choose from smollm2, llama110m, qwen1.5b")
    folders = {
        name: llama_110m(resolve_model("smollm2")) if name == "llama110m" else resolve_model(name)
        for name in args.models.split(",")
    }
    valid = str(wikitext("valid"))
    rows = []
    for name in args.models.split(","):
        for seed in (int(x) for x in args.seeds.split(",")):
            rows.append(one_run(args, name, folders[name], seed, valid, llmc_python, env))
            print(json.dumps(rows[-1]), flush=True)
    seeds = args.seeds.split(",")
    if len(seeds) > 1:  # the mean over calibration draws: one draw's difference is within run-to-run noise
        for name in args.models.split(","):
            mine = [r for r in rows if r["model"] == name and "seed" in r]
            mean = {"model": name, "seed": "mean"}
            for k in ("lmcompress_s", "llmcompressor_s", "lmcompress_ppl", "llmcompressor_ppl", "dense"):
                mean[k] = sum(r[k] for r in mine) / len(mine)
            mean["time_ratio"] = mean["lmcompress_s"] / mean["llmcompressor_s"]
            mean["ppl_ratio"] = mean["lmcompress_ppl"] / mean["llmcompressor_ppl"]
            mean["lmcompress_better_draws"] = sum(r["lmcompress_ppl"] <= r["llmcompressor_ppl"] for r in mine)
            rows.append(mean)
    info = machine_info()
    print(
        f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, torch {info['torch']}, "
        f"{args.threads} threads; {args.nsamples}×{args.seqlen} calibration tokens; perplexity on "
        f"{args.eval_windows}×{args.eval_seqlen} WikiText-2 test tokens"
    )
    print_table(
        [{k: v for k, v in r.items() if k != "lmcompress_phases"} for r in rows],
        "SparseGPT 50%: whole-process wall time (launch → saved) and perplexity",
    )
    phased = [r for r in rows if r.get("lmcompress_phases")]
    print_table(
        [{"model": r["model"], "seed": r["seed"], **r["lmcompress_phases"]} for r in phased],
        "lmcompress: where the seconds went (recipe timings_s; the remainder is Python imports and the save)",
    )
    name = "llmcompressor" if args.models == "smollm2,llama110m" else f"llmcompressor-{args.models.replace(',', '-')}"
    save_results(name, {"args": vars(args), "rows": rows, "machine": info})


def one_run(args, name: str, folder: Path, seed: int, valid: str, llmc_python: Path, env: dict) -> dict:
    """Both tools on calibration draw ``seed`` of ``name``: wall times, perplexity and sparsity of both outputs."""
    from safetensors.torch import save_file

    from lmcompress.calibration.data import draw, eval_windows, windows_hash
    from lmcompress.checkpoint.load import load_model
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.transforms.prune import measure_sparsity

    base, tokenizer = load_model(str(folder))
    ids, _ = draw(tokenizer, valid, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
    ids_file = OUT / f"{name}-ids.safetensors"
    save_file({"ids": ids.contiguous()}, str(ids_file))
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), args.eval_seqlen)
    test = test[: args.eval_windows]
    row: dict = {"model": name, "seed": seed, "dense": perplexity(base, test, progress=False).perplexity}
    del base

    ours = OUT / f"{name}-lmcompress"
    theirs = OUT / f"{name}-llmcompressor"
    for output in (ours, theirs):  # each tool writes a new folder, as on a first run (neither overwrites in place)
        shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "lmcompress", "prune", str(folder), "--method", "sparsegpt", "--sparsity", "0.5",
           "--calib-data", valid, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(seed),
           "-o", str(ours), "--quiet"]  # fmt: skip
    row["lmcompress_s"], _ = run_timed(cmd, env)
    recipe = json.loads((ours / "lmcompress.json").read_text())
    if recipe["calibration"]["sha256"] != windows_hash(ids):  # both tools must see the very same tokens
        sys.exit(f"lmcompress drew other windows than {ids_file}: {recipe['calibration']}")
    phases = recipe.get("timings_s") or {}  # where lmcompress's time went; the rest of the process: imports, save
    row["lmcompress_phases"] = {**phases, "imports and save": row["lmcompress_s"] - sum(phases.values())}
    cmd = [str(llmc_python), "-c", LLMC_SCRIPT, str(folder), str(ids_file), str(theirs), str(args.threads)]
    row["llmcompressor_s"], _ = run_timed(cmd, env, marker="SAVED_AT")
    row["time_ratio"] = row["lmcompress_s"] / row["llmcompressor_s"]
    for tool, out in (("lmcompress", ours), ("llmcompressor", theirs)):
        model, _ = load_model(str(out))
        row[f"{tool}_ppl"] = perplexity(model, test, progress=False).perplexity
        row[f"{tool}_sparsity"] = measure_sparsity(model)[0]
    return row


if __name__ == "__main__":
    main()
