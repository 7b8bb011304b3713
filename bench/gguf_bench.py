"""GGUF export benchmark: lmcompress GPTQ codes as Q4_0 vs llama.cpp's own Q4_0, run by llama.cpp.

    python -m bench.gguf_bench                           # SmolLM2-135M-Instruct, 4 windows of 512 tokens
    python -m bench.gguf_bench --nsamples 128 --calib-seqlen 512 --act-order --windows 8

Files (in ``bench/cache/gguf``; ``bench/cache/gguf-qwen1.5b`` for ``--model qwen1.5b``): the dense model exported as
f16; llama.cpp's ``llama_model_quantize`` Q4_0 of that f16 file (its round-to-nearest blocks); lmcompress RTN 4-bit
g32 on the ``q4_0`` grid of the same fp16 weights (the model loaded as fp16), exported from its codes, which must be
llama.cpp's file block for block (the bench compares the bytes of every Q4_0 tensor); and lmcompress GPTQ 4-bit g32
on ``--grid`` (default q4_0; ``--nsamples`` windows of ``--calib-seqlen`` WikiText-2 valid tokens, optional
``--act-order``) exported from its codes as Q4_0 (``--quantized DIR`` takes an existing GPTQ folder instead). The
exports take the embedding type llama.cpp chose for its own file, so that only the block weights differ. Each is loaded
with ``llama_cpp.Llama`` (``--threads``, default 1) and scored on the first ``--windows`` non-overlapping windows of
WikiText-2 ``test.txt``: perplexity from llama.cpp's logits, prompt tokens/s, and generation tokens/s (64 greedy
tokens). The source folders are scored the same way by ``lmcompress.load`` in PyTorch, and the largest logit
difference on the first window is printed per file.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, results_name, save_results, wikitext
from bench.reference import resolve_model


def windows(tokenizer, n: int, seqlen: int) -> list[list[int]]:
    ids = tokenizer(wikitext("test").read_text(), add_special_tokens=False)["input_ids"]
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(min(n, len(ids) // seqlen))]


def nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits[:-1]`` (float64 log-softmax)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def score_llama_cpp(path: Path, wins: list[list[int]], threads: int, seqlen: int) -> tuple[dict, np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, logits_all=True, verbose=False, n_ctx=seqlen)
    total, count, seconds, first = 0.0, 0, 0.0, None
    for ids in wins:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        seconds += time.perf_counter() - t
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        first = logits if first is None else first
        total, count = total + nll(logits, ids), count + len(ids) - 1
    t = time.perf_counter()
    out = llm("The capital of France is", max_tokens=64, temperature=0.0)
    gen = out["usage"]["completion_tokens"] / (time.perf_counter() - t)
    row = {
        "ppl": math.exp(total / count),
        "prompt_tok_s": sum(map(len, wins)) / seconds,
        "gen_tok_s": gen,
        "MiB": path.stat().st_size / 2**20,
        "sample": out["choices"][0]["text"].strip().replace("\n", " ")[:60],
    }
    return row, first


def score_torch(folder: Path, wins: list[list[int]]) -> tuple[float, np.ndarray]:
    from lmcompress import load

    model, _ = load(folder)
    total, count, first = 0.0, 0, None
    for ids in wins:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        first = logits if first is None else first
        total, count = total + nll(logits, ids), count + len(ids) - 1
    return math.exp(total / count), first


def llama_cpp_quantize(src: Path, dst: Path, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed on {src}")


def same_blocks(ours: Path, theirs: Path) -> dict:
    """How many of llama.cpp's Q4_0 tensors in ``theirs`` are byte-identical in ``ours`` (and blocks that differ)."""
    import gguf

    mine = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    tensors = identical = blocks = differ = 0
    for t in gguf.GGUFReader(str(theirs)).tensors:
        if t.tensor_type.name != "Q4_0":
            continue
        tensors += 1
        a = np.asarray(t.data).reshape(-1, 18)
        b = np.asarray(mine[t.name].data).reshape(-1, 18) if mine[t.name].tensor_type.name == "Q4_0" else None
        if b is None or a.shape != b.shape:
            continue
        bad = int((a != b).any(1).sum())
        identical, blocks, differ = identical + (bad == 0), blocks + len(a), differ + bad
    return {"q4_0_tensors": tensors, "identical_tensors": identical, "blocks": blocks, "differing_blocks": differ}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--quantized", default=None, help="GPTQ 4-bit g32 sym folder of --model (default: made here)")
    parser.add_argument("--grid", default="q4_0", choices=("q4_0", "minmax"), help="GPTQ's grid (quantize --grid)")
    parser.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="GPTQ calibration window length")
    parser.add_argument("--act-order", action="store_true", help="GPTQ with act-order (static groups: Q4_0 runs)")
    parser.add_argument("--percdamp", type=float, default=0.01)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import gguf

    from lmcompress import load
    from lmcompress.checkpoint.gguf_export import export_gguf
    from lmcompress.jobs import quantize_pretrained
    from lmcompress.transforms.quantize import QuantConfig

    dense = resolve_model(args.model)
    out = CACHE / results_name("gguf", dense)  # bench/cache/gguf for SmolLM2, gguf-qwen1.5b, ...: files per model
    out.mkdir(parents=True, exist_ok=True)
    act = "-act-static" if args.act_order else ""
    tag = f"{args.grid}-{args.nsamples}x{args.calib_seqlen}{act}-d{args.percdamp:g}"
    quantized = Path(args.quantized) if args.quantized else out / f"gptq4-g32-{tag}"
    gptq_s = None
    if not quantized.exists():
        t = time.perf_counter()
        config = QuantConfig(
            method="gptq", bits=4, group_size=32, grid=args.grid, act_order=args.act_order,
            static_groups=args.act_order, percdamp=args.percdamp,
        )  # fmt: skip
        quantize_pretrained(
            dense, config, quantized, calib_data="bundled:wikitext2-valid", nsamples=args.nsamples,
            seqlen=args.calib_seqlen, progress=False,
        )  # fmt: skip
        gptq_s = time.perf_counter() - t
    rtn = out / "rtn4-g32-q4_0-fp16"
    if not rtn.exists():  # the fp16 weights llama.cpp reads from the f16 file
        config = QuantConfig(method="rtn", bits=4, group_size=32, grid="q4_0")
        quantize_pretrained(dense, config, rtn, dtype="float16", progress=False)
    f16, theirs = out / "dense-f16.gguf", out / "llamacpp-q4_0.gguf"
    ours, ours_rtn = out / f"gptq-{tag}.gguf", out / "rtn-q4_0.gguf"
    export_gguf(dense, f16, qtype="f16", overwrite=True)
    llama_cpp_quantize(f16, theirs, args.threads)
    embd = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(theirs)).tensors}["token_embd.weight"]
    summary = export_gguf(quantized, ours, embed_type=embd.lower(), overwrite=True)
    export_gguf(rtn, ours_rtn, embed_type=embd.lower(), overwrite=True)
    identity = same_blocks(ours_rtn, theirs)

    _, tokenizer = load(dense)
    wins = windows(tokenizer, args.windows, args.seqlen)
    ppl_dense, logits_dense = score_torch(dense, wins)
    ppl_gptq, logits_gptq = score_torch(quantized, wins)
    ppl_rtn, logits_rtn = score_torch(rtn, wins)
    gptq_label = f"GPTQ 4-bit g32 {args.grid} grid{' act-order' if args.act_order else ''} → Q4_0 from codes"
    rows = []
    for label, path, ref_ppl, ref_logits in (
        ("dense → f16 (lmcompress export)", f16, ppl_dense, logits_dense),
        ("llama.cpp Q4_0 of the f16 file (RTN)", theirs, None, logits_dense),
        ("lmcompress RTN 4-bit g32 q4_0 grid → Q4_0 from codes", ours_rtn, ppl_rtn, logits_rtn),
        (gptq_label, ours, ppl_gptq, logits_gptq),
    ):
        row, first = score_llama_cpp(path, wins, args.threads, args.seqlen)
        rows.append(
            {
                "file": label,
                "MiB": row["MiB"],
                "ppl (llama.cpp)": row["ppl"],
                "ppl (torch, source)": ref_ppl,
                "max |Δlogit| vs source": float(np.abs(first - ref_logits).max()),
                "prompt tok/s": row["prompt_tok_s"],
                "gen tok/s": row["gen_tok_s"],
                "sample": row["sample"],
            }
        )
    machine = machine_info()
    title = (
        f"WikiText-2 test, {len(wins)} windows × {args.seqlen} tokens, llama.cpp {args.threads} thread(s), "
        f"{machine['cpu']}; token_embd {embd}; GPTQ {args.nsamples} × {args.calib_seqlen} calibration tokens, "
        f"percdamp {args.percdamp}"
    )
    print_table(rows, title)
    took = f"; GPTQ took {gptq_s:.0f} s" if gptq_s else ""
    print(f"GPTQ export: {summary['from_codes']['tensors']} weights from their codes, relative error (fp16 scales) "
          f"max {summary['from_codes']['max_rel_error']:.2e}{took}")  # fmt: skip
    print(f"RTN q4_0 grid vs llama.cpp's Q4_0, byte for byte: {identity}")
    results = {"rows": rows, "windows": len(wins), "seqlen": args.seqlen, "identity": identity, "gptq": vars(args)}
    print(f"results: {save_results(results_name('gguf_bench', dense), results | {'gptq_seconds': gptq_s})}")


if __name__ == "__main__":
    main()
