"""Depth pruning benchmark: remove --count blocks of SmolLM2-135M-Instruct (or --model) by block influence.

    python -m bench.depth_bench                       # SmolLM2: remove 8 of 30 blocks (cosine), 2 threads
    python -m bench.depth_bench --search 10           # and the searched drop set (10 generations): perplexity
    python -m bench.depth_bench --search 4 --swap-scans 3 --no-speed   # swap descents first; perplexity only
    python -m bench.depth_bench --model qwen1.5b --count 7

``shrink blocks`` (ShortGPT's block influence, ``--nsamples`` windows of 512 WikiText-2 valid tokens) writes the
smaller folder to ``bench/cache/depth/`` (reused when its recipe matches). Then, for the dense and the depth-pruned
model: WikiText-2 test perplexity (the first ``--windows`` non-overlapping windows of ``--seqlen`` tokens), and speed
at batch 1 on ``--threads`` threads in transformers: prefill (a ``--prompt``-token forward, ms/token) and decode (one
token per step with the KV cache after that prompt, ms/token); the two models alternate ``--rounds`` times and the
minimum of each is kept, so both see the same machine load. With llama.cpp's tools built (``bench/llamacpp.py``),
both are exported to GGUF f16 and measured by ``llama-bench`` (prompt processing and generation tokens/s) and
``llama-perplexity`` (same windows). ``--search G`` also runs ``shrink blocks --criterion search`` (``--swap-scans``
single-swap descents, then G generations, from the cosine ranking's drop set) and reports its perplexity against
the cosine ranking's, its wall time and the load average around it; ``--no-speed`` skips the speed runs. The load
average is printed with the timings: on a shared machine they are contended.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, results_name, save_results, wikitext
from bench.reference import resolve_model

BIN = CACHE / "llama.cpp" / "build" / "bin"


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def prune(src: Path, out: Path, count: int, nsamples: int, generations: int = 0, swap_scans: int = 0) -> dict:
    """The depth-pruned folder's recipe (criterion search with ``swap_scans`` and ``generations``, else cosine),
    made here unless ``out`` already holds this very run."""
    from lmcompress.jobs import depth_prune_pretrained
    from lmcompress.transforms.depth import DepthConfig

    criterion = "search" if generations else "cosine"
    recipe_file = out / "lmcompress.json"
    if recipe_file.is_file():
        recipe = json.loads(recipe_file.read_text())
        same = recipe.get("count") == count and recipe.get("criterion") == criterion
        same = same and (not generations or recipe.get("generations") == generations)
        same = same and (not generations or recipe.get("swap_scans", 0) == swap_scans)
        if same and (recipe.get("calibration") or {}).get("nsamples") == nsamples:
            return recipe
    calib = dict(calib_data=str(wikitext("valid")), nsamples=nsamples, seqlen=512, seed=0)
    config = DepthConfig(
        "blocks", count=count, criterion=criterion, generations=max(generations, 1), swap_scans=swap_scans
    )
    depth_prune_pretrained(src, config, out, overwrite=True, progress=generations > 0, **calib)
    return json.loads(recipe_file.read_text())


@torch.no_grad()
def prefill_ms(model, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(ids, use_cache=False)
    return (time.perf_counter() - t) * 1e3 / ids.shape[1]


@torch.no_grad()
def decode_ms(model, ids: torch.Tensor, steps: int) -> float:
    """ms per generated token: greedy steps of one token each with the KV cache, after a prefill of ``ids``."""
    from transformers import DynamicCache

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    token = model(ids, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        token = model(token, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t) * 1e3 / steps


def torch_speed(models: dict, ids: torch.Tensor, steps: int, rounds: int) -> dict[str, dict]:
    """Min over ``rounds`` alternations of prefill / decode ms per token for each model (after one warm-up each)."""
    best = {name: {"prefill_ms_tok": float("inf"), "decode_ms_tok": float("inf")} for name in models}
    for model in models.values():  # warm-up
        prefill_ms(model, ids[:, :16])
        decode_ms(model, ids[:, :16], 2)
    for _ in range(rounds):
        for name, model in models.items():
            row = best[name]
            row["prefill_ms_tok"] = min(row["prefill_ms_tok"], prefill_ms(model, ids))
            row["decode_ms_tok"] = min(row["decode_ms_tok"], decode_ms(model, ids, steps))
    return best


def llama_bench(files: dict[str, Path], threads: int, prompt: int, steps: int, rounds: int) -> dict[str, dict]:
    """llama-bench prompt processing and generation tokens/s (best of ``rounds`` runs), models alternated."""
    best: dict[str, dict] = {name: {"pp_tok_s": 0.0, "tg_tok_s": 0.0} for name in files}
    for _ in range(rounds):  # one llama-bench run per model per round: both see the same load
        for name, path in files.items():
            cmd = [str(BIN / "llama-bench"), "-m", str(path), "-t", str(threads), "-p", str(prompt), "-n", str(steps)]
            out = subprocess.run([*cmd, "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
            for row in json.loads(out):
                key = "pp_tok_s" if row["n_prompt"] > 0 else "tg_tok_s"
                best[name][key] = max(best[name][key], float(row["avg_ts"]))
    return best


def llama_perplexity(path: Path, threads: int, seqlen: int, windows: int) -> float | None:
    cmd = [str(BIN / "llama-perplexity"), "-m", str(path), "-f", str(wikitext("test")), "-c", str(seqlen)]
    cmd += ["--chunks", str(windows), "-t", str(threads), "-b", str(seqlen)]
    text = subprocess.run(cmd, capture_output=True, text=True).stderr
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
    return float(found.group(1)) if found else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--count", type=int, default=8, help="blocks to remove")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (512 tokens) for the scores")
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows for perplexity")
    parser.add_argument("--seqlen", type=int, default=512, help="perplexity window length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256, help="prefill length (tokens) for the speed runs")
    parser.add_argument("--steps", type=int, default=32, help="decoded tokens per speed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two models per speed measurement")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the GGUF export and llama.cpp runs")
    parser.add_argument(
        "--search", type=int, default=0, metavar="G", help="also --criterion search with G generations (perplexity)"
    )
    parser.add_argument("--swap-scans", type=int, default=0, help="with --search: single-swap descents first")
    parser.add_argument("--no-speed", action="store_true", help="perplexity only: no speed runs, no llama.cpp")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmcompress import load
    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.gguf_export import export_gguf
    from lmcompress.measure.perplexity import perplexity

    src = resolve_model(args.model)
    name = results_name("depth", src)
    work = CACHE / "depth" / f"{src.name}-drop{args.count}"
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    recipe = prune(src, work / "model", args.count, args.nsamples)
    prune_s = time.perf_counter() - t
    removed = recipe["removed"]["blocks"]
    scores = recipe["scores"]["block"]
    print(f"removed blocks {removed} of {len(scores)} (shrink blocks: {recipe.get('depth_time_s', 0):.1f}s)")
    print("influence (1 − cos) per block:", " ".join(f"{i}:{s:.4f}" for i, s in enumerate(scores)))

    dense, tokenizer = load(src)
    models = {"dense": dense, "depth": load(work / "model")[0]}
    windows = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), args.seqlen)[: args.windows]
    ppl = {k: perplexity(m, windows, progress=False).perplexity for k, m in models.items()}
    searched = None
    if args.search:
        t = time.perf_counter()
        folder = work / (f"search{args.search}" + (f"-scan{args.swap_scans}" if args.swap_scans else ""))
        search_load = load_average()
        found = prune(src, folder, args.count, args.nsamples, args.search, args.swap_scans)
        search_load += " → " + load_average()
        net = load(folder)[0]
        info = found["search"]
        searched = {
            "removed": found["removed"]["blocks"],
            "ppl": perplexity(net, windows, progress=False).perplexity,
            "ppl_vs_cosine": None,
            "kl_cosine_set": found["search"]["start_kl"],
            "kl_searched": found["search"]["kl"],
            "search_s": found["search"]["search_time_s"],
            "job_s": time.perf_counter() - t,
            "load_average": search_load,
            "block_runs_vs_uncached": info["block_runs"] / max(info["full_block_runs"], 1),
        }
        searched["ppl_vs_cosine"] = searched["ppl"] / ppl["depth"]
        print(f"search steps: {info['history']}", flush=True)
        del net
    if args.no_speed:
        print(f"perplexity on {len(windows)} x {args.seqlen} test tokens: {ppl}")
        if searched:
            print_table([searched], f"criterion search, {args.swap_scans} swap scans + {args.search} generations")
        payload = {"args": vars(args), "removed": removed, "scores": scores, "ppl": ppl, "search": searched}
        print(f"results written to {save_results(name + '-quality', {**payload, 'machine': machine_info()})}")
        return
    ids = windows[:1, : args.prompt]
    load_before = load_average()
    speed = torch_speed(models, ids, args.steps, args.rounds)
    load_after = load_average()
    rows = []
    for k in models:
        rows.append({"model": k, "blocks": len(scores) - (k == "depth") * len(removed), "ppl": ppl[k], **speed[k]})
    for row in rows:
        row["prefill_x"] = rows[0]["prefill_ms_tok"] / row["prefill_ms_tok"]
        row["decode_x"] = rows[0]["decode_ms_tok"] / row["decode_ms_tok"]
    title = (
        f"{src.name}: remove {args.count} blocks by cosine influence; perplexity on {len(windows)} x {args.seqlen} "
        f"WikiText-2 test tokens; transformers batch 1, {args.threads} threads, prefill {args.prompt} tokens, "
        f"decode {args.steps} tokens (min of {args.rounds}); load average {load_before} → {load_after}"
    )
    print_table(rows, title)

    cpp_rows = []
    if not args.no_llama_cpp and (BIN / "llama-bench").is_file():
        files = {}
        for k, folder in (("dense", src), ("depth", work / "model")):
            files[k] = work / f"{k}-f16.gguf"
            if not files[k].is_file():
                export_gguf(folder, files[k], qtype="f16")
        cpp_load_before = load_average()
        cpp = llama_bench(files, args.threads, args.prompt, args.steps, args.rounds)
        cpp_load_after = load_average()
        print(f"llama-bench tokens/s: {cpp} (load average {cpp_load_before} → {cpp_load_after})", flush=True)
        for k, path in files.items():
            ppl_cpp = llama_perplexity(path, args.threads, args.seqlen, args.windows)
            cpp_rows.append({"model": k, "ppl_llama_cpp": ppl_cpp, **cpp[k], "MiB": path.stat().st_size / 2**20})
        for row in cpp_rows:
            row["pp_x"] = row["pp_tok_s"] / cpp_rows[0]["pp_tok_s"]
            row["tg_x"] = row["tg_tok_s"] / cpp_rows[0]["tg_tok_s"]
        print(f"llama.cpp load average before / after: {cpp_load_before} / {cpp_load_after}")

    if searched:
        title = f"criterion search, {args.swap_scans} swap scans + {args.search} generations (same count; fitness KL)"
        print_table([searched], title)
    if cpp_rows:
        print_table(cpp_rows, f"llama.cpp (GGUF f16, llama-bench -t {args.threads} -p {args.prompt} -n {args.steps})")
    print("machine:", machine_info())
    payload = {
        "args": vars(args),
        "removed": removed,
        "scores": scores,
        "prune_job_s": prune_s,
        "load_average": [load_before, load_after],
        "transformers": rows,
        "llama_cpp": cpp_rows,
        "search": searched,
        "machine": machine_info(),
    }
    print(f"results written to {save_results(name, payload)}")


if __name__ == "__main__":
    main()
