"""K-quants against llama.cpp itself: lmcompress GPTQ GGUF files vs ``llama-quantize --imatrix``, scored by llama.cpp.

    python -m bench.kquant_bench                                  # SmolLM2-135M-Instruct, Q4_0 Q3_K_M Q2_K Q4_K_M
    python -m bench.kquant_bench --model qwen1.5b --lock /tmp/team/qwen.lock
    python -m bench.kquant_bench --types q4_0 --no-act-order
    python -m bench.kquant_bench --types q4_0_mix --tag=-q4_0_mix   # llama.cpp's imatrix Q4_0, byte for byte

Protocol (issue 32), every file kept in ``bench/cache/kquant/<model>/``:

- base: the dense model exported by lmcompress as f16 GGUF (``lmcompress export --format gguf --type f16``).
- calibration text: the first lines of WikiText-2 ``valid.txt`` written once to ``calib.txt``. llama.cpp's
  tokenizer (``llama-tokenize`` on the f16 file) cuts it as ``llama-imatrix`` does: ``--calib-chunks``
  consecutive chunks of ``--calib-ctx`` tokens from the start, the first token of a chunk replaced by BOS when
  the file says to add one. Those exact token windows are lmcompress's GPTQ calibration windows (its CLI runs
  with only the window draw replaced by them; the recipe records their SHA-256), so both sides see the same tokens.
- llama.cpp: ``llama-imatrix -f calib.txt -c CTX --chunks N`` on the f16 file, then ``llama-quantize --imatrix``.
- lmcompress: ``lmcompress quantize F16.gguf --method gptq`` on the same type (``--grid q4_0 --group-size 32``
  for Q4_0; ``--gguf-mix`` for the K mixes and ``q4_0_mix``, the mix llama.cpp's ``Q4_0`` with an imatrix writes:
  the first eighth of ``ffn_down`` on Q4_1) with ``--act-order --static-groups`` unless ``--no-act-order``, then
  ``lmcompress export --format gguf`` (Q4_0: the embedding / head type llama.cpp's own file has).
- score: ``llama-perplexity -f test.txt -c 512 --chunks 8`` saves the f16 logits (``--kl-divergence-base``), then
  ``--kl-divergence`` for every file: perplexity, mean KLD, same top token, file bytes, and the prompt tokens/s
  of llama-perplexity's first pass; ``--llama-bench`` adds ``llama-bench -p 512 -n 0`` (built on demand).
- speed (``--speed``, one command to rerun on a quiet machine): the cached llama.cpp and lmcompress files of each
  type side by side in ``llama-bench``: prompt processing (``-p 512 -n 0``) and decode (``-p 0 -n 64``), the two
  files alternated for ``--speed-rounds`` rounds of ``-r --speed-reps`` each, so a load change hits both; tokens/s mean
  and standard deviation over all samples, the ratio lmcompress / llama.cpp and the load averages around it.
  Nothing is quantized or scored: the files must exist (a run without ``--speed`` makes them).

Results go to ``bench/results/kquant_bench[-<model>].json`` after every file, so a partial run is kept.
``--lock PATH`` holds an flock on PATH around each step that loads the model (other Qwen jobs interleave).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, results_name, save_results, wikitext
from bench.kl_bench import add_bos_flag, parse_kld, run
from bench.llamacpp import BUILD, JOBS, tool, version
from bench.reference import resolve_model

TYPES = ("q4_0", "q3_k_m", "q2_k", "q4_k_m")
LLAMA_FTYPE = {"q4_0": "Q4_0", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K", "q4_k_m": "Q4_K_M", "q3_k_s": "Q3_K_S",
               "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q4_0_mix": "Q4_0"}  # fmt: skip
LLAMA_FILE = {"q4_0_mix": "q4_0"}  # the same llama-quantize command: its file is shared
# the issue's llama.cpp numbers on Qwen2.5-Coder-1.5B (f16 13.54), for the table's last column
ISSUE_QWEN = {"q3_k_m": "14.43 / 0.0637 / 85.9% / 882 MB", "q2_k": "16.53 / 0.238 / 76.2% / 719 MB",
              "q4_0": "13.99 / 0.0445", "q4_0_mix": "13.99 / 0.0445", "q4_k_m": "KLD 0.0044, +0.3%"}  # fmt: skip
WINDOWS_ENTRY = "_lmcompress_with_windows"


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def locked(path: str | None):
    """An exclusive flock on ``path`` while the block runs (nothing when ``path`` is None)."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        t = time.perf_counter()
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.perf_counter() - t
        if waited > 1:
            print(f"(waited {waited:.0f} s for {path})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lmc(*args, windows: Path | None = None) -> str:
    """The lmcompress CLI as a user runs it; with ``windows``, its calibration draw replaced by those tokens."""
    head = [sys.executable, "-m", "bench.kquant_bench", WINDOWS_ENTRY, windows] if windows else [sys.executable,
            "-m", "lmcompress"]  # fmt: skip
    return run([*head, *args])


def build_tool(name: str) -> Path:
    """A llama.cpp tool beyond :data:`bench.llamacpp.TOOLS` (``llama-tokenize``, ``llama-bench``), built
    incrementally in the same build folder on first use."""
    tool("llama-perplexity")  # the library and the build folder exist
    path = BUILD / "bin" / name
    if not path.is_file():
        subprocess.run(["cmake", "--build", str(BUILD), "-j", str(JOBS), "--target", name], check=True)
    return path


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other jobs on the machine make the timings contended)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def with_windows(argv: list[str]) -> None:
    """``python -m bench.kquant_bench _lmcompress_with_windows WINDOWS.pt <lmcompress args>``: the lmcompress CLI
    with :func:`lmcompress.calibration.data.draw` replaced by the saved windows (same count and length asked)."""
    import lmcompress.jobs as jobs
    from lmcompress.calibration.data import windows_hash
    from lmcompress.cli import run as cli_run

    saved = torch.load(argv[0])
    windows, source = saved["windows"], saved["source"]

    def draw(tokenizer, calib_data, *, nsamples, seqlen, seed=0, **_):
        if (nsamples, seqlen) != tuple(windows.shape):
            sys.exit(f"asked for {nsamples} x {seqlen} calibration windows; {argv[0]} holds {tuple(windows.shape)}")
        info = {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": None, "bos": saved["bos"],
                "sha256": windows_hash(windows)}  # fmt: skip
        return windows.clone(), info

    jobs.draw = draw
    sys.argv = ["lmcompress", *argv[1:]]
    cli_run()


# ---------------------------------------------------------------- the files


def calibration(f16: Path, dense: Path, work: Path, args) -> tuple[Path, Path, dict]:
    """``calib.txt`` (a WikiText-2 valid prefix), and llama.cpp's token windows of it saved for lmcompress."""
    text_path = work / "calib.txt"
    need = args.calib_chunks * args.calib_ctx
    lines, size = [], 0
    for line in wikitext("valid").read_text(encoding="utf-8").splitlines(keepends=True):
        lines.append(line)
        size += len(line)
        if size > 8 * need:  # WikiText-2 has about 4.5 characters a token: room to spare
            break
    text = "".join(lines)
    if not text_path.is_file() or text_path.read_text(encoding="utf-8") != text:
        text_path.write_text(text, encoding="utf-8")
    windows_path = work / f"calib-{args.calib_chunks}x{args.calib_ctx}.pt"
    bos = add_bos_flag(f16)
    if not windows_path.is_file():
        out = run([build_tool("llama-tokenize"), "-m", f16, "-f", text_path, "--ids", "--no-parse-special",
                   "--log-disable"], merge=False)  # fmt: skip
        tokens = json.loads(out.strip().splitlines()[-1])
        if len(tokens) < need or len(tokens) < 2 * args.calib_ctx:
            sys.exit(f"{text_path} has {len(tokens)} llama.cpp tokens, fewer than {need}")
        windows = torch.tensor(tokens[:need], dtype=torch.int64).reshape(args.calib_chunks, args.calib_ctx)
        if bos:  # llama-imatrix puts BOS in place of each chunk's first token
            windows[:, 0] = int(tokens[0])  # llama-tokenize's first token is BOS when the vocabulary adds it
        torch.save({"windows": windows, "bos": bos, "source": f"llama.cpp chunks of file:{text_path}"}, windows_path)
    saved = torch.load(windows_path)
    info = {"text": str(text_path), "chunks": args.calib_chunks, "ctx": args.calib_ctx, "bos_first": bos,
            "windows_sha256": _sha(saved["windows"]),
            "hf_tokenizer_match": hf_match(dense, text, saved["windows"], bos)}  # fmt: skip
    return text_path, windows_path, info


def _sha(windows: torch.Tensor) -> str:
    from lmcompress.calibration.data import windows_hash

    return windows_hash(windows)


def hf_match(dense: Path, text: str, windows: torch.Tensor, bos: bool) -> float | None:
    """Share of the window tokens (BOS slots left out) equal to the Hugging Face tokenizer's at the same place."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(dense))
    except Exception as exc:
        print(f"(HF tokenizer comparison skipped: {exc})")
        return None
    ids = ([tok.bos_token_id] if bos else []) + tok(text, add_special_tokens=False)["input_ids"]
    flat = windows.reshape(-1)
    ours = torch.tensor(ids[: flat.numel()])
    if ours.numel() != flat.numel():
        return 0.0
    keep = torch.ones(windows.shape, dtype=torch.bool)
    if bos:
        keep[:, 0] = False
    return float((ours == flat)[keep.reshape(-1)].double().mean())


def llama_side(qtype: str, f16: Path, imatrix: Path, work: Path, args) -> Path:
    out = work / f"llama-{LLAMA_FILE.get(qtype, qtype)}.gguf"
    if not out.is_file():
        partial = out.with_suffix(".partial")
        with locked(args.lock):
            run([tool("llama-quantize"), "--imatrix", imatrix, f16, partial, LLAMA_FTYPE[qtype], args.threads],
                log=work / f"llama-{qtype}-quantize.log")  # fmt: skip
        partial.rename(out)
    return out


def has_mixes() -> bool:
    """Whether this lmcompress has ``quantize --gguf-mix`` (llama.cpp's per-tensor mixes)."""
    help_text = subprocess.run([sys.executable, "-m", "lmcompress", "quantize", "--help"], capture_output=True,
                               text=True, env={**__import__("os").environ, "COLUMNS": "200"}).stdout  # fmt: skip
    return "--gguf-mix" in help_text


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def lmc_tag(qtype: str, args) -> str:
    """The name stem of lmcompress's file of ``qtype`` under these calibration and GPTQ settings."""
    return f"{qtype}-{args.calib_chunks}x{args.calib_ctx}{'-act' if args.act_order else ''}-d{args.percdamp:g}"


def lmc_side(qtype: str, f16: Path, windows: Path, text: Path, theirs: Path, work: Path, args) -> Path | None:
    """lmcompress GPTQ of the f16 file on ``qtype``'s grid or mix, exported as GGUF (``None``: not available)."""
    act = ["--act-order", "--static-groups"] if args.act_order else []
    tag = lmc_tag(qtype, args)
    folder, out = work / f"lmc-{tag}", work / f"lmc-{tag}.gguf"
    if qtype == "q4_0":
        grid = ["--bits", 4, "--group-size", 32, "--grid", "q4_0"]
        embd = tensor_types(theirs)["token_embd.weight"].lower()  # the type llama.cpp gave its embeddings
        export = ["--embed-type", embd]
    else:
        if not has_mixes():
            print(f"lmcompress has no `quantize --gguf-mix` yet: {qtype} skipped on the lmcompress side")
            return None
        grid, export = ["--gguf-mix", qtype], ["--type", qtype]
    if not out.is_file():
        calib = ["--calib-data", text, "--nsamples", args.calib_chunks, "--seqlen", args.calib_ctx]
        with locked(args.lock):
            if not folder.exists():
                t = time.perf_counter()
                lmc("quantize", f16, "--method", "gptq", *grid, *act, "--percdamp", args.percdamp, *calib, "-o",
                    folder, "--quiet", windows=windows)  # fmt: skip
                print(f"GPTQ {qtype}: {time.perf_counter() - t:.0f} s (load {load_average()})", flush=True)
            partial = work / f"lmc-{tag}.partial.gguf"
            lmc("export", folder, "--format", "gguf", *export, "-o", partial, "--overwrite")
        partial.rename(out)
    return out


def base_logits(f16: Path, work: Path, args) -> tuple[Path, dict]:
    base = work / f"base-c{args.ctx}-n{args.chunks}.kld"
    log = work / f"base-c{args.ctx}-n{args.chunks}.log"
    if not base.is_file():
        partial = base.with_suffix(".partial")
        with locked(args.lock):
            run([tool("llama-perplexity"), "-m", f16, *score_args(args), "--kl-divergence-base", partial], log=log)
        partial.rename(base)
    text = log.read_text()
    match = re.search(r"Final estimate: PPL = ([\d.]+)", text)
    return base, {"ppl": float(match.group(1)) if match else None, "prompt_tok_s": prompt_speed(text)}


def score_args(args) -> list:
    return ["-f", wikitext("test"), "-c", args.ctx, "--chunks", args.chunks, "-t", args.threads]


def prompt_speed(text: str) -> float | None:
    """Prompt tokens per second of llama-perplexity's first pass (``n_seq`` chunks of ``n_ctx`` tokens evaluated
    in one batch, timed by its ``seconds per pass`` line)."""
    shape = re.search(r"n_ctx=(\d+), batch_size=\d+, n_seq=(\d+)", text)
    seconds = re.search(r"([\d.]+) seconds per pass", text)
    if shape is None or seconds is None:
        return None
    return int(shape.group(1)) * int(shape.group(2)) / float(seconds.group(1))


def score(path: Path, base: Path, work: Path, args) -> dict:
    """llama-perplexity's statistics of ``path`` against the f16 logits (kept in a log beside it)."""
    log = work / f"{path.stem}-c{args.ctx}-n{args.chunks}.kld.log"
    if not (log.is_file() and "Same top p" in log.read_text()):
        with locked(args.lock):
            run([tool("llama-perplexity"), "-m", path, *score_args(args), "--kl-divergence-base", base,
                 "--kl-divergence"], log=log)  # fmt: skip
    text = log.read_text()
    out = {**parse_kld(text), "prompt_tok_s": prompt_speed(text), "bytes": path.stat().st_size}
    if args.llama_bench:
        out["pp512_tok_s"] = llama_bench(path, args)
    return out


def llama_bench(path: Path, args) -> float | None:
    with locked(args.lock):
        out = run([build_tool("llama-bench"), "-m", path, "-p", 512, "-n", 0, "-t", args.threads, "-r", 2, "-o",
                   "json"], merge=False)  # fmt: skip
    rows = json.loads(out[out.index("[") :])
    return float(rows[0]["avg_ts"]) if rows else None


def speed_samples(path: Path, args, prompt: int, gen: int, reps: int = 3) -> list[float]:
    """``llama-bench``'s tokens/s samples of ``path``: prompt processing (``prompt`` tokens) or decode (``gen``)."""
    out = run([build_tool("llama-bench"), "-m", path, "-p", prompt, "-n", gen, "-t", args.threads, "-r", reps,
               "-o", "json"], merge=False)  # fmt: skip
    rows = json.loads(out[out.index("[") :])
    return [float(v) for row in rows for v in row["samples_ts"]]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, var**0.5


def speed(types: list[str], work: Path, args) -> dict:
    """Tokens/s of each type's llama.cpp and lmcompress files in ``llama-bench`` (see the module docstring)."""
    tests = {"pp512": (512, 0), "tg64": (0, 64)}
    out: dict = {"load_average_start": load_average(), "threads": args.threads, "rounds": args.speed_rounds,
                 "reps": args.speed_reps, "types": {}}  # fmt: skip
    for qtype in types:
        tag = lmc_tag(qtype, args)
        files = {
            "llama.cpp": work / f"llama-{LLAMA_FILE.get(qtype, qtype)}.gguf",
            "lmcompress": work / f"lmc-{tag}.gguf",
        }
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            print(
                f"{qtype}: {', '.join(missing)} missing; make them with: python -m bench.kquant_bench --types {qtype}"
            )
            continue
        samples = {side: {test: [] for test in tests} for side in files}
        with locked(args.lock):
            for _ in range(args.speed_rounds):
                for test, (p, n) in tests.items():
                    for side, path in files.items():
                        samples[side][test] += speed_samples(path, args, p, n, args.speed_reps)
        entry: dict = {side: {"file": path.name, "bytes": path.stat().st_size} for side, path in files.items()}
        for test in tests:
            for side in files:
                mean, std = _mean_std(samples[side][test])
                entry[side][test] = {"tok_s": mean, "std": std, "samples": samples[side][test]}
            entry[f"{test}_ratio"] = entry["lmcompress"][test]["tok_s"] / entry["llama.cpp"][test]["tok_s"]
        out["types"][qtype] = entry
        print(f"{qtype}: " + ", ".join(
            f"{test} llama.cpp {entry['llama.cpp'][test]['tok_s']:.1f} ± {entry['llama.cpp'][test]['std']:.1f}, "
            f"lmcompress {entry['lmcompress'][test]['tok_s']:.1f} ± {entry['lmcompress'][test]['std']:.1f} tok/s "
            f"(×{entry[f'{test}_ratio']:.3f})" for test in tests) + f"; load {load_average()}", flush=True)  # fmt: skip
    out["load_average_end"] = load_average()
    return out


def speed_rows(result: dict) -> list[dict]:
    rows = []
    for qtype, entry in result["types"].items():
        row = {"type": LLAMA_FTYPE[qtype]}
        for test in ("pp512", "tg64"):
            for side in ("llama.cpp", "lmcompress"):
                r = entry[side][test]
                row[f"{test} {side} tok/s"] = f"{r['tok_s']:.1f} ± {r['std']:.1f}"
            row[f"{test} ratio"] = entry[f"{test}_ratio"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- table


def verdict(qtype: str, ours: dict, theirs: dict, q4_k_m_source: bool) -> str:
    """The issue's target for ``qtype``: lower ppl, ≤ 0.8× mean KLD, size within 1%; for Q4_K_M of a model whose
    source file was Q4_K_M (``q4_k_m_source``: llama.cpp lands back on the source grid) equal within noise."""
    size = ours["bytes"] / theirs["bytes"]
    if abs(size - 1) > 0.01:
        return f"size off by {100 * (size - 1):+.1f}%"
    if qtype == "q4_k_m" and q4_k_m_source:
        return "equal within noise" if abs(ours["ppl"] / theirs["ppl"] - 1) < 0.005 else "not equal"
    kl = ours["kl_mean"] / theirs["kl_mean"]
    return "met" if ours["ppl"] < theirs["ppl"] and kl <= 0.8 else "not met"


def table_rows(results: dict, qwen: bool) -> list[dict]:
    rows = []
    for qtype, res in results["types"].items():
        t, m = res.get("llama.cpp"), res.get("lmcompress")
        if t is None:
            continue
        row = {
            "type": LLAMA_FTYPE[qtype] + (f" ({qtype})" if qtype in LLAMA_FILE else ""),
            "ppl llama.cpp": t["ppl"],
            "ppl lmcompress": m and m["ppl"],
            "KLD llama.cpp": t["kl_mean"],
            "KLD lmcompress": m and m["kl_mean"],
            "KLD ratio": m and m["kl_mean"] / t["kl_mean"],
            "top-1 llama.cpp %": 100 * t["top1_agreement"],
            "top-1 lmcompress %": m and 100 * m["top1_agreement"],
            "MB llama.cpp": t["bytes"] / 1e6,
            "MB lmcompress": m and m["bytes"] / 1e6,
            "tok/s llama.cpp": t["prompt_tok_s"],
            "tok/s lmcompress": m and m["prompt_tok_s"],
            "target": verdict(qtype, m, t, qwen) if m else "lmcompress file not made",
        }
        if qwen:
            row["issue's llama.cpp"] = ISSUE_QWEN.get(qtype)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == WINDOWS_ENTRY:
        with_windows(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.kquant_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(LLAMA_FTYPE)}")
    parser.add_argument("--calib-chunks", type=int, default=32, help="calibration windows (imatrix --chunks)")
    parser.add_argument("--calib-ctx", type=int, default=256, help="calibration window tokens (imatrix -c)")
    parser.add_argument("--ctx", type=int, default=512, help="scoring chunk tokens (llama-perplexity -c)")
    parser.add_argument("--chunks", type=int, default=8, help="scoring chunks of WikiText-2 test")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                        help="GPTQ --act-order --static-groups (grid fixed first)")  # fmt: skip
    parser.add_argument("--percdamp", type=float, default=0.01, help="GPTQ dampening")
    parser.add_argument("--llama-bench", action="store_true", help="also llama-bench -p 512 -n 0 tokens/s")
    parser.add_argument(
        "--speed",
        action="store_true",
        help="only llama-bench tokens/s (pp512, tg64) of the cached files of --types, side by side",
    )
    parser.add_argument("--speed-rounds", type=int, default=3, help="--speed: rounds alternating the two files")
    parser.add_argument("--speed-reps", type=int, default=3, help="--speed: llama-bench -r per file and round")
    parser.add_argument("--tag", default="", help="suffix of the results file (keeps earlier runs' files)")
    parser.add_argument("--lock", default=None, help="flock this file around each step that loads the model")
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in LLAMA_FTYPE]
    if unknown:
        parser.error(f"unknown type(s) {unknown}; choose from {', '.join(LLAMA_FTYPE)}")
    dense = resolve_model(args.model)
    work = CACHE / "kquant" / dense.name
    work.mkdir(parents=True, exist_ok=True)
    name = results_name("kquant_bench", dense) + args.tag
    qwen = "qwen" in dense.name
    if args.speed:
        result = {"model": str(dense), "llama_cpp_source": version(), **speed(types, work, args)}
        print("machine:", machine_info())
        print_table(speed_rows(result), f"llama-bench tokens/s on {dense.name}, {args.threads} threads "
                    f"(load {result['load_average_start']} → {result['load_average_end']})")  # fmt: skip
        print("wrote", save_results(results_name("kquant_speed", dense) + args.tag, result))
        return

    f16 = work / "f16.gguf"
    if not f16.is_file():
        with locked(args.lock):
            if not f16.is_file():  # another run may have written it while this one waited
                lmc("export", dense, "--format", "gguf", "--type", "f16", "-o", f16)
    text, windows, calib = calibration(f16, dense, work, args)
    imatrix = work / f"imatrix-{args.calib_chunks}x{args.calib_ctx}.gguf"
    if not imatrix.is_file():
        partial = imatrix.with_suffix(".partial.gguf")  # llama-imatrix saves every 10 chunks: rename when done
        with locked(args.lock):
            run([tool("llama-imatrix"), "-m", f16, "-f", text, "-c", args.calib_ctx, "--chunks", args.calib_chunks,
                 "-t", args.threads, "-o", partial], log=work / "imatrix.log")  # fmt: skip
        partial.rename(imatrix)
    base, f16_score = base_logits(f16, work, args)
    f16_score["bytes"] = f16.stat().st_size
    results = {
        "complete": False,
        "model": str(dense),
        "setup": {
            "calibration": calib,
            "scoring": f"WikiText-2 test, llama-perplexity -c {args.ctx} --chunks {args.chunks} -t {args.threads}",
            "gptq": {"act_order_static_groups": args.act_order, "percdamp": args.percdamp},
            "llama_cpp_source": version(),
            "load_average_start": load_average(),
        },
        "f16": f16_score,
        "types": {},
    }
    for qtype in types:
        entry = results["types"].setdefault(qtype, {})
        theirs = llama_side(qtype, f16, imatrix, work, args)
        entry["llama.cpp"] = {"file": theirs.name, **score(theirs, base, work, args)}
        save_results(name, results)
        ours = lmc_side(qtype, f16, windows, text, theirs, work, args)
        if ours is not None:
            entry["lmcompress"] = {"file": ours.name, **score(ours, base, work, args)}
            mine, other = tensor_types(ours), tensor_types(theirs)
            entry["tensor_types_differ"] = {k: [mine.get(k), v] for k, v in other.items() if mine.get(k) != v}
        save_results(name, results)
    results["complete"] = True
    results["setup"]["load_average_end"] = load_average()
    machine = machine_info()
    print("machine:", machine)
    print("setup:", json.dumps(results["setup"], indent=1))
    print(f"f16: ppl {f16_score['ppl']}, {f16_score['bytes'] / 1e6:.0f} MB, {f16_score['prompt_tok_s']} tok/s")
    print_table(table_rows(results, qwen), f"K-quants vs llama.cpp on {dense.name} (llama-perplexity vs f16)")
    for qtype, entry in results["types"].items():
        if entry.get("tensor_types_differ"):
            print(f"{qtype}: tensor types that differ (lmcompress, llama.cpp): {entry['tensor_types_differ']}")
    print("wrote", save_results(name, results))


if __name__ == "__main__":
    main()
