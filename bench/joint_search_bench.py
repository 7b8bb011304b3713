"""Joint search benchmark (issue 33): sparsity × bits per layer, head included, at the packed size of uniform
3-bit GPTQ g128, against that uniform model, on SmolLM2.

    python -m bench.joint_search_bench                         # SmolLM2, --levels auto, the search's CPU defaults
    python -m bench.joint_search_bench --generations 30 --levels 0/16,0/8,0/4,0/3,2:4/4,0/2 [--model DIR]

Both models go through the CLI, as a user runs them, on the same calibration text (WikiText-2 validation, 32 windows of
256 tokens): ``lmcompress quantize --method gptq --bits 3 --group-size 128`` (the head and the tied embedding stay
16-bit floats, as quantize leaves them), then ``lmcompress search --budget size=B`` with ``B`` the bytes of that
model's ``model.packed.safetensors``. The model is first stored in bfloat16 (``bench/cache/joint/model-bf16``),
so both save their floats in 16 bits. Reported: WikiText-2 test perplexity (``--eval-windows`` windows of
``--eval-seqlen`` tokens), the bytes of both weights files (and the search's prediction), the search's wall
time (contended when other work runs: the load average is recorded), and the chosen level per unit.
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

WORK = CACHE / "joint"


def _run(argv: list[str], threads: int) -> float:
    """Run ``lmcompress ARGV`` niced, in its own process; its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(["nice", "-n", "5", sys.executable, "-m", "lmcompress", *argv], check=True, env=env)
    return time.perf_counter() - start


def _bf16_copy(source: str) -> Path:
    """The model with its weights stored in bfloat16 (what ``size=`` counts floats in)."""
    from lmcompress.checkpoint.load import load_model
    from lmcompress.checkpoint.save import save_model

    folder = WORK / "model-bf16"
    if not (folder / "config.json").is_file():
        model, tokenizer = load_model(source)
        model.config.torch_dtype = torch.bfloat16
        save_model(model.to(torch.bfloat16), tokenizer, folder, {"kind": "bench-bf16-copy", "source": source},
                   overwrite=True)  # fmt: skip
    return folder


def _floats_in_bf16(folder: Path, out: Path) -> Path:
    """``folder`` (packed) saved again with its float tensors in bfloat16 and the same codes: the CLI computes in
    float32 and saves floats so; the size search saves them in 16 bits, so the baseline's bytes must too. The
    source is bfloat16, so no value changes."""
    if not (out / "lmcompress.json").is_file():
        import lmcompress
        from lmcompress.checkpoint.folder import read_recipe
        from lmcompress.checkpoint.packed import read_packed, save_packed

        net, tokenizer = lmcompress.load(folder)
        _, quantized = read_packed(folder)
        recipe = {k: v for k, v in read_recipe(folder).items() if k not in ("storage", "packed")}
        save_packed(net, tokenizer, out, recipe, quantized=quantized, dtype=torch.bfloat16, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--levels", default="auto")
    parser.add_argument("--generations", type=int, default=None, help="[the search's CPU default, 15]")
    parser.add_argument("--granularity", default="block", choices=("block", "layer"))
    parser.add_argument("--time-limit", default=None, help="the search's --time-limit (e.g. 40m)")
    parser.add_argument("--sensitivity-span", type=int, default=None, help="the search's [3 per block]")
    parser.add_argument("--head-bits", type=int, default=None, help="uniform baseline: also the head (tied: the "
                        "embedding) at these bits on g128 grids (quantize --head-bits) [16-bit floats]")  # fmt: skip
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    import lmcompress
    from bench.reference import resolve_model
    from lmcompress.calibration.data import eval_windows
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.search.joint import packed_size

    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    model = _bf16_copy(str(resolve_model(args.model)))
    calib = ["--calib-data", str(wikitext("valid")), "--nsamples", "32", "--seqlen", "256", "-q"]
    name = "uniform3" + (f"-head{args.head_bits}" if args.head_bits else "")
    fp32 = WORK / f"{name}-fp32"
    if not (fp32 / "lmcompress.json").is_file():
        head = ["--head-bits", str(args.head_bits), "--head-group-size", "128"] if args.head_bits else []
        _run(["quantize", str(model), "--method", "gptq", "--bits", "3", "--group-size", "128", *head, *calib,
              "-o", str(fp32), "--overwrite"], args.threads)  # fmt: skip
    uniform = _floats_in_bf16(fp32, WORK / name)
    budget = packed_size(uniform)
    out = WORK / f"search{('-' + args.tag) if args.tag else ''}"
    shutil.rmtree(out, ignore_errors=True)
    search = ["search", str(model), "--budget", f"size={budget}", "--levels", args.levels,
              "--granularity", args.granularity, *calib, "-o", str(out), "--overwrite"]  # fmt: skip
    if args.generations is not None:
        search += ["--generations", str(args.generations)]
    if args.time_limit:
        search += ["--time-limit", args.time_limit]
    if args.sensitivity_span is not None:
        search += ["--sensitivity-span", str(args.sensitivity_span)]
    load_before = os.getloadavg()
    search_s = _run(search, args.threads)
    load_after = os.getloadavg()
    report = json.loads((out / "search.json").read_text())

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), args.eval_seqlen)
    test = test[: args.eval_windows]

    def ppl(folder: Path) -> float:
        net, _ = lmcompress.load(folder)
        return perplexity(net.float(), test, progress=False).perplexity

    dense, uniform_ppl, searched = ppl(model), ppl(uniform), ppl(out)
    sixteen = report["size"]["sixteen_bit"]
    row = {
        "model": str(model),
        "dense": dense,
        "uniform3 gptq g128": uniform_ppl,
        "uniform_head_bits": args.head_bits or 16,
        "joint search": searched,
        "search/uniform3": searched / uniform_ppl,
        "budget_bytes": budget,
        "predicted_bytes": report["size"]["predicted"],
        "written_bytes": packed_size(out),
        "x_of_16bit": packed_size(out) / sixteen,
        "uniform3_x_of_16bit": budget / sixteen,
        "search_s": search_s,
        "generations": len(report["history"]),
        "kl": report["fitness"],
        "kl_baselines": report["baselines"],
        "allocation": report["allocation"],
        "head": report["layer_levels"].get("lm_head"),
        "load_average": {"before": load_before, "after": load_after},
    }
    title = "joint search vs uniform 3-bit GPTQ g128 at the same packed size (WikiText-2 test perplexity)"
    print_table([{k: v for k, v in row.items() if not isinstance(v, (list, dict))}], title)
    print("allocation:", " ".join(row["allocation"]), "| head:", row["head"])
    name = f"joint-search{('-' + args.tag) if args.tag else ''}"
    save_results(name, {"machine": machine_info(), "args": vars(args), "row": row})


if __name__ == "__main__":
    main()
