"""GGUF export benchmark: lmcompress GPTQ codes as Q4_0 vs llama.cpp's own Q4_0, run by llama.cpp.

    python -m bench.gguf_bench                           # SmolLM2-135M-Instruct, 4 windows of 512 tokens
    python -m bench.gguf_bench --quantized DIR --windows 8

Files (in ``bench/cache/gguf``): the dense model exported as f16; lmcompress's GPTQ 4-bit g32 (symmetric)
folder exported from its codes as Q4_0 (``--quantized``, else quantized once here: 16 windows of 256
WikiText-2 valid tokens); and llama.cpp's ``llama_model_quantize`` Q4_0 of that f16 file (its round-to-nearest
blocks). The GPTQ export takes the embedding type llama.cpp chose for its own file, so that only the
block weights differ. Each is loaded with ``llama_cpp.Llama`` (``--threads``, default 1) and scored on the
first ``--windows`` non-overlapping windows of WikiText-2 ``test.txt``: perplexity from llama.cpp's logits,
prompt tokens/s, and generation tokens/s (64 greedy tokens). The source folders are scored the same way by
``lmcompress.load`` in PyTorch, and the largest logit difference on the first window is printed per file.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import CACHE, machine_info, print_table, save_results, wikitext
from bench.reference import default_model

OUT = CACHE / "gguf"


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="dense HF folder (default SmolLM2-135M-Instruct)")
    parser.add_argument("--quantized", default=None, help="GPTQ 4-bit g32 sym folder of --model (default: made here)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import gguf

    from lmcompress import load
    from lmcompress.checkpoint.gguf_export import export_gguf

    dense = Path(args.model) if args.model else default_model()
    OUT.mkdir(parents=True, exist_ok=True)
    quantized = Path(args.quantized) if args.quantized else OUT / "gptq4-g32"
    if not quantized.exists():
        from lmcompress.jobs import quantize_pretrained
        from lmcompress.transforms.quantize import QuantConfig

        quantize_pretrained(
            dense, QuantConfig(method="gptq", bits=4, group_size=32), quantized,
            calib_data="bundled:wikitext2-valid", nsamples=16, seqlen=256, progress=False,
        )  # fmt: skip
    f16, ours, theirs = OUT / "dense-f16.gguf", OUT / "gptq-q4_0.gguf", OUT / "llamacpp-q4_0.gguf"
    export_gguf(dense, f16, qtype="f16", overwrite=True)
    llama_cpp_quantize(f16, theirs, args.threads)
    embd = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(theirs)).tensors}["token_embd.weight"]
    summary = export_gguf(quantized, ours, embed_type=embd.lower(), overwrite=True)

    _, tokenizer = load(dense)
    wins = windows(tokenizer, args.windows, args.seqlen)
    ppl_dense, logits_dense = score_torch(dense, wins)
    ppl_gptq, logits_gptq = score_torch(quantized, wins)
    rows = []
    for label, path, ref_ppl, ref_logits in (
        ("dense → f16 (lmcompress export)", f16, ppl_dense, logits_dense),
        ("GPTQ 4-bit g32 → Q4_0 from codes (lmcompress)", ours, ppl_gptq, logits_gptq),
        ("llama.cpp Q4_0 of the f16 file (RTN)", theirs, None, logits_dense),
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
        f"{machine['cpu']}; token_embd {embd}"
    )
    print_table(rows, title)
    print(f"GPTQ export: {summary['from_codes']['tensors']} weights from their codes, relative error (fp16 scales) "
          f"max {summary['from_codes']['max_rel_error']:.2e}")  # fmt: skip
    print(f"results: {save_results('gguf_bench', {'rows': rows, 'windows': len(wins), 'seqlen': args.seqlen})}")


if __name__ == "__main__":
    main()
