"""KL cross-check: ``lmcompress eval --reference`` against llama.cpp's ``llama-perplexity --kl-divergence``.

    python -m bench.kl_bench                       # SmolLM2-135M-Instruct, 32 chunks of 512 WikiText-2 test tokens
    python -m bench.kl_bench --ctx 256 --chunks 16 --no-gptq

Files (``bench/cache/kl/<model>/``): the dense model exported as f16 GGUF (``lmcompress export --type f16``)
and unpacked again (the f16-equivalent dense reference for lmcompress); quantized models as Q4_0 GGUF, each
unpacked into a float32 folder: lmcompress GPTQ 4-bit g32 on the ``q4_0`` grid exported from its codes, and
llama.cpp's own ``llama-quantize`` Q4_0 of the f16 file. Each quantized GGUF is scored against the f16 GGUF by
``llama-perplexity`` (tools from :mod:`bench.llamacpp`) and its unpacked folder against the unpacked f16 by
lmcompress, on the same WikiText-2 test text:

- llama.cpp: ``--kl-divergence-base`` on the f16 file, then ``--kl-divergence``: it cuts the tokens into
  ``--chunks`` chunks of ``--ctx``, replaces each chunk's first token by BOS when the GGUF says to add one, and
  scores only the second half (the ``ctx/2 − 1`` predictions after position ``ctx/2``).
- ``lmcompress eval Q --reference F16 --seqlen CTX --limit CHUNKS --json``: its own windows of the same length
  (BOS first only where the tokenizer adds one), every prediction of every window.
- lmcompress matched: ``lmcompress.measure.agreement`` on llama.cpp's own chunks (the tokens stored in the base
  file, BOS applied the same way), second half only, so that only the arithmetic differs (llama.cpp runs f16
  weights with f16 activations and Q4_0 with Q8_0 activations, stores the base log-probabilities on 16 bits and
  skips base probabilities below e⁻¹⁶).
- reference floor: the KL from llama.cpp's stored f16 log-probabilities to lmcompress's float32 forward of the
  same f16 weights, computed from the base file with llama.cpp's formula (how far the two engines' references
  are apart).

Every step's result stays in the work folder (GGUFs, unpacked folders, the base file, each model's
``llama-perplexity`` log and lmcompress scores, named by ``--ctx`` and ``--chunks``): a rerun reuses those written
after their inputs, so a stopped run continues where it ended.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, results_name, save_results, wikitext
from bench.llamacpp import tool, version
from bench.reference import resolve_model

KLD_PATTERNS = {
    "kl_mean": r"Mean\s+KLD:\s+([-\d.eE+]+)",
    "kl_median": r"Median\s+KLD:\s+([-\d.eE+]+)",
    "kl_p99": r"99\.0%\s+KLD:\s+([-\d.eE+]+)",
    "top1_agreement": r"Same top p:\s+([-\d.eE+]+)",
    "delta_p_mean": r"Mean\s+Δp:\s+([-\d.eE+]+)",
    "ppl": r"Mean PPL\(Q\)\s+:\s+([-\d.eE+]+)",
    "ppl_base": r"Mean PPL\(base\)\s+:\s+([-\d.eE+]+)",
}
PERCENT = ("top1_agreement", "delta_p_mean")


def run(cmd: list, log: Path | None = None, merge: bool = True) -> str:
    """Run ``cmd`` (printed first) and return its stdout (with stderr when ``merge``, else stderr passes
    through), also kept in ``log``; exit on failure."""
    cmd = [str(c) for c in cmd]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else None, text=True)
    if log is not None:
        log.write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    return proc.stdout


def lmc(*args, merge: bool = True) -> str:
    """The lmcompress CLI, as a user runs it."""
    return run([sys.executable, "-m", "lmcompress", *args], merge=merge)


def parse_kld(text: str, strict: bool = True) -> dict | None:
    """The summary ``llama-perplexity --kl-divergence`` prints, as numbers (percentages as fractions); a summary
    with a number missing exits (``strict``) or gives None."""
    out = {}
    for key, pattern in KLD_PATTERNS.items():
        match = re.search(pattern, text)
        if match is None:
            if not strict:
                return None
            sys.exit(f"llama-perplexity printed no {key!r}; its output ends with:\n{text[-2000:]}")
        out[key] = float(match.group(1)) / (100 if key in PERCENT else 1)
    return out


def newer(path: Path, *sources: Path) -> bool:
    """Whether ``path`` exists and was written after every one of ``sources`` (a result still valid)."""
    return path.is_file() and all(path.stat().st_mtime >= src.stat().st_mtime for src in sources)


def read_base(path: Path) -> tuple[int, int, np.ndarray, np.memmap]:
    """``n_ctx``, ``n_vocab``, the chunks' tokens ``[n_chunk, n_ctx]`` and the stored log-probabilities
    ``[n_chunk, n_ctx − 1 − n_ctx/2, nv]`` (uint16; the first 4 hold float32 ``scale, min``) of a
    ``--kl-divergence-base`` file."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            sys.exit(f"{path} is not a llama.cpp --kl-divergence-base file")
        n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)
    n_ctx, n_vocab, n_chunk = int(n_ctx), int(n_vocab), int(n_chunk)
    tokens = np.fromfile(path, dtype=np.int32, count=n_chunk * n_ctx, offset=20).reshape(n_chunk, n_ctx)
    nv, scored = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    logp = np.memmap(path, dtype=np.uint16, mode="r", offset=20 + 4 * tokens.size, shape=(n_chunk, scored, nv))
    return n_ctx, n_vocab, tokens, logp


def base_log_probs(stored: np.ndarray, n_vocab: int) -> torch.Tensor:
    """Decode stored rows ``[positions, nv]`` into log-probabilities ``[positions, n_vocab]`` (float32)."""
    head = np.ascontiguousarray(stored[:, :4]).view(np.float32)  # [positions, 2]: scale, min log-prob
    codes = torch.from_numpy(stored[:, 4 : 4 + n_vocab].astype(np.float32))
    return codes * torch.from_numpy(head[:, :1].copy()) + torch.from_numpy(head[:, 1:2].copy())


def llama_kl(base_logp: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's KL from stored base log-probs to ``logits`` (terms with base log p ≤ −16 left out) and
    whether the top-1 tokens agree, per position."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    keep = base_logp > -16
    kl = torch.where(keep, base_logp.exp() * (base_logp - logq), torch.zeros(())).sum(-1)
    return kl, base_logp.argmax(-1) == logits.argmax(-1)


def add_bos_flag(gguf_path: Path) -> bool:
    """Whether llama.cpp puts BOS first in every chunk of this file (``tokenizer.ggml.add_bos_token``)."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.parts[field.data[0]][0])


@torch.no_grad()
def matched(model_dir: Path, ref_dir: Path, base: Path, bos_id: int | None) -> dict:
    """lmcompress's agreement code on llama.cpp's chunks: the second half (as llama.cpp scores) and all
    positions, plus the reference floor (llama.cpp's stored f16 log-probs against the float32 reference)."""
    from lmcompress import load
    from lmcompress.measure.agreement import summarize, window_agreement

    n_ctx, n_vocab, tokens, stored = read_base(base)
    first = n_ctx // 2
    model, _ = load(model_dir)
    ref, _ = load(ref_dir)
    half: dict[str, list] = {"kl": [], "agree": [], "delta_p": []}
    full: dict[str, list] = {"kl": [], "agree": [], "delta_p": []}
    floor_kl, floor_agree = [], []
    for c in range(tokens.shape[0]):
        ids = torch.from_numpy(tokens[c].astype(np.int64))[None]
        if bos_id is not None:
            ids[0, 0] = bos_id
        logits, ref_logits = model(ids, use_cache=False).logits, ref(ids, use_cache=False).logits
        per = window_agreement(logits, ref_logits, ids)
        for key, value in per.items():
            full[key].append(value)
            half[key].append(value[:, first:])  # predictions of tokens first+1 .. n_ctx−1, as llama.cpp
        kl, agree = llama_kl(base_log_probs(np.asarray(stored[c]), n_vocab), ref_logits[0, first : n_ctx - 1])
        floor_kl.append(kl)
        floor_agree.append(agree)
    floor = {"kl_mean": float(torch.cat(floor_kl).double().mean()),
             "top1_agreement": float(torch.cat(floor_agree).double().mean())}  # fmt: skip
    return {
        "second_half": summarize(*(torch.cat(half[k]) for k in ("kl", "agree", "delta_p"))),
        "all_positions": summarize(*(torch.cat(full[k]) for k in ("kl", "agree", "delta_p"))),
        "reference_floor": floor,
    }


def prepare(dense: Path, work: Path, args) -> tuple[Path, dict[str, Path]]:
    """The f16 GGUF and the quantized GGUFs (made once, kept in ``work``); returns f16 and ``{name: gguf}``."""
    f16 = work / "f16.gguf"
    if not f16.is_file():
        lmc("export", dense, "--format", "gguf", "--type", "f16", "-o", f16)
    quantized = {}
    if args.gptq:
        gptq_gguf = work / "gptq4-g32-q4_0.gguf"
        if not gptq_gguf.is_file():
            source = unpacked(f16, work)  # quantize the f16 weights: the same dense the reference is
            gptq_dir = work / "gptq4-g32-q4_0"
            if not gptq_dir.exists():
                lmc("quantize", source, "--method", "gptq", "--bits", 4, "--group-size", 32, "--grid", "q4_0",
                    "--calib-data", wikitext("valid"), "--nsamples", args.nsamples, "--seqlen", args.calib_seqlen,
                    "-o", gptq_dir, "--quiet")  # fmt: skip
            lmc("export", gptq_dir, "--format", "gguf", "-o", gptq_gguf)
        quantized["lmcompress GPTQ 4-bit g32 → Q4_0"] = gptq_gguf
    ours = work / "llama-quantize-q4_0.gguf"
    if not ours.is_file():
        run([tool("llama-quantize"), f16, ours, "Q4_0", args.threads])
    quantized["llama-quantize Q4_0"] = ours
    return f16, quantized


def unpacked(gguf_path: Path, work: Path) -> Path:
    """``gguf_path`` unpacked by lmcompress into a float32 folder beside it (once)."""
    folder = work / f"{gguf_path.stem}-unpacked"
    if not folder.exists():
        lmc("unpack", gguf_path, "-o", folder)
    return folder


def llama_cpp_kld(f16: Path, q: Path, text: Path, work: Path, args) -> tuple[dict, Path]:
    """llama-perplexity's KL statistics of ``q`` against ``f16`` (base file made once per setup)."""
    common = ["-f", text, "-c", args.ctx, "--chunks", args.chunks, "-t", args.threads]
    base = work / f"base-c{args.ctx}-n{args.chunks}.kld"
    if not base.is_file():
        partial = base.with_suffix(".partial")
        run([tool("llama-perplexity"), "-m", f16, *common, "--kl-divergence-base", partial], log=work / "base.log")
        partial.rename(base)
    log = work / f"{q.stem}-c{args.ctx}-n{args.chunks}-kld.log"  # kept: a rerun reads it instead of scoring again
    if newer(log, q, base) and (done := parse_kld(log.read_text(), strict=False)) is not None:
        print(f"llama.cpp's KL of {q.name}: read from {log}", flush=True)
        return done, base
    text_out = run([tool("llama-perplexity"), "-m", q, *common, "--kl-divergence-base", base, "--kl-divergence"],
                   log=log)  # fmt: skip
    return parse_kld(text_out), base


def lmcompress_eval(q_dir: Path, ref_dir: Path, text: Path, args) -> dict:
    """``lmcompress eval --reference`` on its own windows of the same length and count."""
    out = lmc("eval", q_dir, "--reference", ref_dir, "--ppl-data", text, "--seqlen", args.ctx, "--limit",
              args.chunks, "--json", "--quiet", merge=False)  # fmt: skip
    result = json.loads(out)
    return {**result["agreement"], "ppl": result["perplexity"], "bos": result.get("bos")}


def token_match(tokenizer, text: Path, tokens: np.ndarray, bos: bool) -> float:
    """Share of llama.cpp's chunk tokens that equal the Hugging Face tokenizer's tokens at the same place."""
    ids = tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ours = np.asarray(([tokenizer.bos_token_id] if bos else []) + ids[: tokens.size], dtype=np.int64)[: tokens.size]
    theirs = tokens.reshape(-1)[: ours.size]
    return float((ours == theirs).mean()) if ours.size == tokens.size else 0.0


COLUMNS = ("kl_mean", "kl_median", "kl_p99", "top1_agreement", "delta_p_mean")


def rows_for(name: str, llama: dict, match: dict, cli: dict) -> list[dict]:
    """Table rows of one quantized model: each way of scoring, with its ratio to llama.cpp's KL mean."""
    ways = [("llama.cpp --kl-divergence (2nd half)", llama), ("lmcompress, llama.cpp's chunks, 2nd half",
            match["second_half"]), ("lmcompress, llama.cpp's chunks, all", match["all_positions"]),
            ("lmcompress eval --reference (own windows, all)", cli)]  # fmt: skip
    return [{"model": name, "scored": way, **{k: res[k] for k in COLUMNS},
             "kl_ratio": res["kl_mean"] / llama["kl_mean"]} for way, res in ways]  # fmt: skip


def describe(args, base: Path, bos: bool, details: dict, token_share: float, text: Path) -> dict:
    """The windows and references both tools used, for the result file."""
    n_chunk = int(read_base(base)[2].shape[0])
    return {
        "text": str(text),
        "ctx": args.ctx,
        "chunks": n_chunk,
        "llama_cpp_scored_per_chunk": args.ctx - 1 - args.ctx // 2,
        "lmcompress_eval_scored_per_window": args.ctx - 1,
        "llama_cpp_bos_first": bos,
        "lmcompress_eval_bos_first": next(iter(details.values()))["lmcompress_eval"]["bos"],
        "token_match_hf_vs_llama_cpp": token_share,
        "reference": "f16 GGUF (llama.cpp); its unpacked float32 folder (lmcompress)",
        "llama_cpp_source": version(),
        "gptq_calibration": f"{args.nsamples} x {args.calib_seqlen} WikiText-2 valid" if args.gptq else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kl_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--ctx", type=int, default=512, help="tokens per chunk / window (llama-perplexity -c)")
    parser.add_argument("--chunks", type=int, default=32, help="chunks (llama.cpp) = windows (lmcompress --limit)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (torch uses the same)")
    parser.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True,
                        help="also lmcompress GPTQ 4-bit g32 on the q4_0 grid, exported as Q4_0")  # fmt: skip
    parser.add_argument("--nsamples", type=int, default=32, help="GPTQ calibration windows (WikiText-2 valid)")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="GPTQ calibration window length")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense = resolve_model(args.model)
    work = CACHE / "kl" / dense.name
    work.mkdir(parents=True, exist_ok=True)
    text = wikitext("test")
    f16, quantized = prepare(dense, work, args)
    ref_dir = unpacked(f16, work)
    bos = add_bos_flag(f16)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    rows, details, base = [], {}, None
    for name, q in quantized.items():
        llama, base = llama_cpp_kld(f16, q, text, work, args)
        done = work / f"{q.stem}-c{args.ctx}-n{args.chunks}.json"  # this model's scores, kept for a rerun
        if newer(done, q, base):
            print(f"lmcompress's scores of {q.name}: read from {done}", flush=True)
            match, cli = (json.loads(done.read_text())[k] for k in ("lmcompress_matched", "lmcompress_eval"))
        else:
            q_dir = unpacked(q, work)
            match = matched(q_dir, ref_dir, base, tokenizer.bos_token_id if bos else None)
            cli = lmcompress_eval(q_dir, ref_dir, text, args)
            done.write_text(json.dumps({"lmcompress_matched": match, "lmcompress_eval": cli}, indent=1))
        rows += rows_for(name, llama, match, cli)
        details[name] = {"gguf": q.name, "llama_cpp": llama, "lmcompress_matched": match, "lmcompress_eval": cli}
        save_results(results_name("kl_bench", dense), {"complete": False, "rows": rows, "details": details})
    setup = describe(args, base, bos, details, token_match(tokenizer, text, read_base(base)[2], bos), text)
    print("machine:", machine_info())
    print("setup:", setup)
    print_table(rows, f"KL cross-check on {dense.name}: quantized vs f16, WikiText-2 test")
    floor = next(iter(details.values()))["lmcompress_matched"]["reference_floor"]
    print(
        "reference floor: llama.cpp's stored f16 log-probs vs lmcompress's float32 forward of the same weights: KL "
        f"mean {floor['kl_mean']:.6f}, top-1 agreement {floor['top1_agreement']:.2%}"
    )
    payload = {"complete": True, "setup": setup, "rows": rows, "details": details}
    path = save_results(results_name("kl_bench", dense), payload)
    print("wrote", path)


if __name__ == "__main__":
    main()
