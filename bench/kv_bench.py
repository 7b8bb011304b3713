"""Compressed KV cache: H2O eviction and int8 / int4 storage against the full cache (docs/kv_cache.md).

    python -m bench.kv_bench                              # SmolLM2-135M, 4 windows of 2048 WikiText-2 test tokens
    python -m bench.kv_bench --windows 2 --budgets 0.2    # quicker
    flock /tmp/team/qwen.lock python -m bench.kv_bench --model qwen1.5b --windows 2

Perplexity over the first ``--windows`` non-overlapping windows of ``--seqlen`` tokens of WikiText-2 test (float32):

- full: one forward per window (the plain cache; ``lmcompress eval``'s perplexity);
- int8 / int4 KV (``--kv-bits``, grid of ``lmcompress.algorithms.kv``; int4 at ``--int4-groups``): one forward per
  window through the quantized cache, every key and value the attention reads quantized (per-token grid, so this
  equals feeding the tokens one by one); int4 once per ``--int4-key-grids`` entry: ``token`` (rows ``int4 gG``:
  keys on the values' per-token grid) and ``channel`` (rows ``int4 gG keys-chT``: keys per channel over ``T`` tokens,
  ``T`` from ``--key-tokens``; one forward per token group, the newest keys of an unfilled group exact, which
  equals feeding the tokens one by one);
- H2O at each budget (a fraction of the window; half of it recent tokens) and recent-only at the same budget
  (``--kv-recent 1``): the first ``budget`` tokens in one forward, then ``--chunk`` tokens per forward (1: each
  token's logits see the compressed cache of all tokens before it, the H2O paper's protocol);
- H2O variants (``--h2o-variants``, each at every budget): ``+``-joined options of the cache, ``sinksN`` (the
  first N tokens never evicted, ``--kv-sinks``), ``mean`` / ``sum`` / ``decayG`` (the ranking score,
  ``--kv-score``; ``decay0.99``: ``--kv-score decay --kv-decay 0.99``), ``poolK`` (``--kv-pool K``), ``vnorm``
  (``--kv-value-norm``), ``rX`` (recent fraction X, ``--kv-recent``); e.g. ``--h2o-variants
  sinks4,mean,mean+sinks4`` adds the rows ``H2O 20% sinks4`` ... The plain ``H2O`` rows are the H2O paper's (sum,
  no sinks, half recent) whatever the defaults. ``--split valid`` measures on WikiText-2 valid.txt (where
  variants are chosen) instead of test.

Retrieval (``lmcompress.measure.tasks.retrieval``: key–value lists and planted facts at 5 depths, ``--retrieval-
lengths`` tokens): greedy answers with the full cache and with each compressed cache (the prompt in one forward,
evicted to the budget, a fraction of the prompt; then decoded token by token with eviction); accuracy = the
first word of the answer is the planted value. Passage QA (``lmcompress.measure.tasks.planted_qa``, ``eval --tasks
qa``: questions about one of four people whose facts are planted in WikiText-2 prose, ``--qa-n`` prompts of
``--qa-lengths`` tokens) the same way: exact match and F1 of the greedy one-line answer, with 95% intervals. Cache
bytes per token from ``lmcompress.kv_cache.memory_report``. Wall times are measured on whatever else runs on the
machine (``machine`` in the results: load average).

Cost of ``--chunk 1``: one forward per token after the prefill (batch = the windows), so about ``seqlen · (1 −
budget)`` small forwards per configuration. On a shared machine give ``--threads 1``: two threads on single-token
forwards wait on each other whenever the cores are busy (measured 7.3 s vs 0.5 s per step at load average 14).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from bench.common import machine_info, print_table, results_name, save_results, wikitext
from bench.reference import resolve_model


def _ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def _variant(spec: str, budget: float, chunk: int):
    """The H2O settings of a ``--h2o-variants`` entry such as ``mean+sinks4+r0.25`` (the paper's otherwise)."""
    from lmcompress.kv_cache import KVSettings

    fields = {"budget": budget, "chunk": chunk, "recent": 0.5, "sinks": 0, "score": "sum"}
    for part in spec.strip().split("+"):
        if part in ("sum", "mean"):
            fields["score"] = part
        elif part == "vnorm":
            fields["value_norm"] = True
        elif part.startswith("pool"):
            fields["pool"] = int(part[4:])
        elif part.startswith("decay"):
            fields["score"], fields["decay"] = "decay", float(part[5:])
        elif part.startswith("sinks"):
            fields["sinks"] = int(part[5:])
        elif part.startswith("r"):
            fields["recent"] = float(part[1:])
        else:
            raise SystemExit(
                f"--h2o-variants: unknown part {part!r} of {spec!r} (sinksN, mean, sum, decayG, poolK, vnorm, rX)"
            )
    return KVSettings(**fields)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="smollm2 (default), qwen1.5b or a folder")
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows (the first N of the test text)")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--budgets", default="0.1,0.2,0.5", help="H2O / recent-only budgets, fractions of the window")
    parser.add_argument("--chunk", type=int, default=1, help="tokens per forward after the prefill (1: H2O's protocol)")
    parser.add_argument("--h2o-variants", default="", help="extra H2O rows, e.g. 'sinks4,mean,mean+sinks4+r0.25'")
    parser.add_argument("--split", default="test", choices=("test", "valid"), help="WikiText-2 file for perplexity")
    parser.add_argument("--window-offset", type=int, default=0, help="skip this many windows of the text first")
    parser.add_argument("--int4-groups", default="64,32", help="channel groups tried for int4 (64: the whole head)")
    parser.add_argument("--int4-key-grids", default="token,channel", help="int4 key grids: token and/or channel")
    parser.add_argument("--key-tokens", default="32", help="tokens per key scale tried with the channel key grid")
    parser.add_argument("--int8-group", type=int, default=None, help="channel group for int8 [default: whole head]")
    parser.add_argument("--retrieval-lengths", default="1024", help="retrieval prompt lengths in tokens")
    parser.add_argument("--retrieval-reps", type=int, default=1, help="examples per kind x length x depth cell")
    parser.add_argument("--no-retrieval", action="store_true")
    parser.add_argument("--qa-lengths", default="512,1024", help="passage QA prompt lengths in tokens")
    parser.add_argument("--qa-n", type=int, default=40, help="passage QA prompts (spread over lengths and depths)")
    parser.add_argument("--no-qa", action="store_true")
    parser.add_argument("--no-ppl", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated config labels to run, e.g. 'H2O 10%%,int8'")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args(argv)

    from lmcompress.calibration.data import eval_windows, load_text, wants_bos
    from lmcompress.checkpoint.load import load_model
    from lmcompress.kv_cache import KVSettings, attach, memory_report
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.measure.tasks import planted_qa, retrieval
    from lmcompress.measure.tasks.lm import LM

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    model, tokenizer = load_model(folder, dtype="float32")
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    name = results_name("kv_bench", folder) + args.tag
    out: dict = {"model": str(folder), "args": vars(args), "ppl": [], "retrieval": [], "qa": [], "memory": []}

    def save() -> None:
        save_results(name, out)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)

    configs: list[tuple[str, KVSettings | None]] = [("full", None), ("int8", KVSettings(bits=8, group=args.int8_group))]
    for g in [int(g) for g in args.int4_groups.split(",") if g.strip()]:
        for grid in [k.strip() for k in args.int4_key_grids.split(",") if k.strip()]:
            if grid == "token":
                configs.append((f"int4 g{g}", KVSettings(bits=4, group=g, key_grid="token")))
            elif grid == "channel":
                configs += [
                    (f"int4 g{g} keys-ch{t}", KVSettings(bits=4, group=g, key_grid="channel", key_tokens=int(t)))
                    for t in args.key_tokens.split(",")
                    if t.strip()
                ]
            else:
                raise SystemExit(f"--int4-key-grids: unknown grid {grid!r} (token, channel)")
    for b in budgets:
        configs += [
            (f"H2O {b:.0%}", KVSettings(budget=b, recent=0.5, chunk=args.chunk, sinks=0, score="sum")),
            (f"recent-only {b:.0%}", KVSettings(budget=b, recent=1.0, chunk=args.chunk, sinks=0)),
        ]
        configs += [(f"H2O {b:.0%} {v}", _variant(v, b, args.chunk)) for v in args.h2o_variants.split(",") if v]
    if args.only:  # the full cache always runs: every ratio is to it
        wanted = {w.strip() for w in args.only.split(",")}
        configs = [c for c in configs if c[0] == "full" or c[0] in wanted]
    for label, settings in configs:
        out["memory"].append({"config": label, **memory_report(model.config, settings, torch.float32)})

    if not args.no_ppl:
        text = load_text(str(wikitext(args.split)), role="eval").text
        bos = wants_bos(tokenizer)
        windows = eval_windows(tokenizer, text, args.seqlen, bos=bos)[args.window_offset :][: args.windows]
        out["windows"] = {
            "count": int(windows.shape[0]),
            "seqlen": args.seqlen,
            "bos": bos,
            "data": f"wikitext2 {args.split}",
            "offset": args.window_offset,
        }
        full_nll = None
        for label, settings in configs:
            start = time.perf_counter()
            with attach(model, settings):
                res = perplexity(model, windows, progress=False, batch_size=args.windows)
            wall = time.perf_counter() - start
            full_nll = full_nll or res.window_nll
            mem = memory_report(model.config, settings, torch.float32)
            row = {
                "config": label,
                "ppl": res.perplexity,
                "ratio": _ppl(res.window_nll) / _ppl(full_nll),
                "window_nll": res.window_nll,
                "bytes_per_token": mem["bytes_per_token"],
                "held_tokens": None if not settings or not settings.evicts else round(settings.budget * args.seqlen),
                "chunk": settings.chunk if settings and settings.evicts else None,
                "threads": torch.get_num_threads(),
                "wall_s_contended": wall,
            }
            out["ppl"].append(row)
            save()
            log(f"ppl {label}: {row['ppl']:.4f} ({row['ratio']:.4f}x full) in {wall:.0f} s")
            if label == "full" and not args.only:  # what eager attention (needed by H2O) costs on the same forward
                previous = model.config._attn_implementation
                model.set_attn_implementation("eager")
                start = time.perf_counter()
                eager = perplexity(model, windows, progress=False, batch_size=args.windows)
                model.set_attn_implementation(previous)
                out["eager"] = {
                    "attn_implementation_default": previous,
                    "ppl_eager": eager.perplexity,
                    "wall_s_default_contended": wall,
                    "wall_s_eager_contended": time.perf_counter() - start,
                }
                save()
                log(f"eager attention: {out['eager']}")

    if not args.no_retrieval:
        lengths = [int(n) for n in args.retrieval_lengths.split(",") if n.strip()]
        lm = LM(model, tokenizer, batch_size=1, progress=False)

        def encode(s: str) -> list[int]:
            return tokenizer(s, verbose=False)["input_ids"]

        examples = retrieval.make_examples(encode, lengths=lengths, per_cell=args.retrieval_reps, seed=0)
        out["retrieval_examples"] = {"n": len(examples), "lengths": lengths, "depths": list(retrieval.DEFAULT_DEPTHS)}
        for label, settings in [c for c in configs if not c[0].startswith("int4 g") or c[0].split()[1] == "g32"]:
            start = time.perf_counter()
            with attach(model, settings):
                answers = lm.generate([ex.prompt for ex in examples], max_new_tokens=8, desc="retrieval")
            hits = [retrieval.first_word(a) == ex.answer for a, ex in zip(answers, examples, strict=True)]
            by_kind = {
                k: sum(h for h, ex in zip(hits, examples, strict=True) if ex.kind == k)
                / max(1, sum(ex.kind == k for ex in examples))
                for k in retrieval.KINDS
            }
            by_depth = {
                str(d): sum(h for h, ex in zip(hits, examples, strict=True) if ex.depth == d)
                / max(1, sum(ex.depth == d for ex in examples))
                for d in retrieval.DEFAULT_DEPTHS
            }
            row = {
                "config": label,
                "acc": sum(hits) / len(hits),
                "n": len(hits),
                "by_kind": by_kind,
                "by_depth": by_depth,
                "wall_s_contended": time.perf_counter() - start,
            }
            out["retrieval"].append(row)
            save()
            log(f"retrieval {label}: {row['acc']:.3f} {by_kind}")

    if not args.no_qa:
        lm = LM(model, tokenizer, batch_size=1, progress=False)
        qa_lengths = [int(n) for n in args.qa_lengths.split(",") if n.strip()]
        examples = planted_qa.make_examples(lambda s: tokenizer(s, verbose=False)["input_ids"], lengths=qa_lengths,
                                            n=args.qa_n, seed=0)  # fmt: skip
        out["qa_examples"] = {"n": len(examples), "lengths": qa_lengths, "tokens": [ex.tokens for ex in examples]}
        for label, settings in [c for c in configs if not c[0].startswith("int4 g") or c[0].split()[1] == "g32"]:
            start = time.perf_counter()
            with attach(model, settings):
                res = planted_qa.evaluate_planted_qa(lm, examples)
            row = {"config": label, **{k: v for k, v in res.items() if k != "samples"}}
            row["wall_s_contended"] = time.perf_counter() - start
            out["qa"].append(row)
            save()
            log(f"qa {label}: em {res['em']:.3f} {res['em_ci']} f1 {res['f1']:.3f} by depth {res['by_depth']}")

    out["machine_end"] = machine_info()
    path = save_results(name, out)
    if out["ppl"]:
        print_table(
            [{k: r[k] for k in ("config", "ppl", "ratio", "bytes_per_token", "held_tokens")} for r in out["ppl"]],
            f"perplexity, {out['windows']['count']} windows of {args.seqlen} (WikiText-2 {args.split})",
        )
    if out["retrieval"]:
        print_table(
            [{"config": r["config"], "acc": r["acc"], "n": r["n"], **r["by_kind"]} for r in out["retrieval"]],
            "retrieval accuracy",
        )
    if out["qa"]:
        print_table(
            [{k: r[k] for k in ("config", "em", "em_ci", "f1", "n")} for r in out["qa"]], "passage QA (exact match, F1)"
        )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
