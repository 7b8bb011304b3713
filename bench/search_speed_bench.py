"""Search speed (issue 33): the default SparseGPT 70 % search with and without surrogate screening, on SmolLM2.

    python -m bench.search_speed_bench                      # pools 0 (no screening) and 128, 15 generations
    python -m bench.search_speed_bench --pools 0,64,128 --generations 30

The level database, the baselines (uniform, OWL), the sensitivity pass and the additive start are computed once
(a search of 0 generations, saved in its work folder: a rerun reuses it) and every compared search resumes from
that same seed, so the rows
differ only in how their generations choose candidates. Windows as ``bench.search_bench`` draws them (32 × 256
calibration, 16 held-out fitness windows, WikiText-2 test perplexity on the first ``--eval-windows`` × 512).
The database is shared with ``bench.search_bench`` (bench/cache/search-db). Reported per row: test perplexity,
its ratio to uniform's (the uniform model assembled from the sequential database, which is sequential SparseGPT),
the KL fitness, the window forwards the fitness ran (a window = one held-out window of 256 tokens through the
blocks from the first changed one), and wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, save_results, wikitext
from lmcompress.calibration.data import draw, embedding_rows, eval_windows
from lmcompress.search.work import split_windows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--pools", default="0,128", help="mutants screened per generation (≤ 16: no screening)")
    parser.add_argument("--generations", type=int, default=15, help="the CLI's CPU default")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--starts", default="all", help="starts whose perplexity is measured (uniform always)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from bench.reference import resolve_model
    from lmcompress.calibration.data import windows_hash
    from lmcompress.checkpoint.load import load_model
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.search import fitness as fitness_module
    from lmcompress.search.database import LevelDatabase
    from lmcompress.search.keys import trajectory_key
    from lmcompress.search.run import SearchConfig, search
    from lmcompress.search.state import state_name
    from lmcompress.search.surrogate import surrogate_path

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    base, tokenizer = load_model(str(resolve_model(args.model)))
    windows, _ = draw(tokenizer, str(wikitext("valid")), nsamples=32, seqlen=256, seed=0, held_out=16,
                      vocab_size=embedding_rows(base))  # fmt: skip
    calib, held_out = split_windows(windows, 32)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), 512)[: args.eval_windows]

    def ppl(model) -> float:
        return perplexity(model, test, progress=False).perplexity

    forwards = {"windows": 0}
    real_call = fitness_module._WindowFitness.__call__

    def counted(self, model, n=None, **kwargs):
        forwards["windows"] += self.windows.shape[0] if n is None else min(n, self.windows.shape[0])
        return real_call(self, model, n, **kwargs)

    fitness_module._WindowFitness.__call__ = counted
    pools = [int(p) for p in args.pools.split(",")]
    work = CACHE / "search-db" / "sparsegpt-0.7-seq"
    config_of = lambda pool, gens: SearchConfig(target=0.7, method="sparsegpt", levels="0.3:0.95:0.05",  # noqa: E731
                                                generations=gens, pool=pool)  # fmt: skip
    seed_config = config_of(1, 0)  # 0 generations, a key of its own (pool 1 = no screening) that reruns reuse
    t0 = time.perf_counter()
    seeded = search(copy.deepcopy(base), seed_config, calib, held_out, work, progress=True)
    seed_s, seed_forwards = time.perf_counter() - t0, forwards["windows"]
    data_hash = {"calib": windows_hash(calib), "fitness": windows_hash(held_out)}
    seed_key = trajectory_key(seed_config, data_hash)
    db = LevelDatabase.open(seeded.database)
    index = {s: k for k, s in enumerate(seeded.levels)}
    rows, reference = [], {}
    for name, alloc in seeded.baseline_allocations.items():
        if args.starts != "all" and name != "uniform" and name not in args.starts.split(","):
            continue
        model = copy.deepcopy(base)
        db.apply(model, {layer: index[s] for unit, s in zip(seeded.units, alloc, strict=True) for layer in unit})
        reference[name] = ppl(model)
        rows.append({"row": f"start: {name}", "ppl": reference[name], "kl": seeded.baselines[name]})
    print(f"seed (database, OWL, baselines, sensitivity pass) {seed_s:.0f}s; {reference}", flush=True)
    for pool in pools:
        config = config_of(pool, args.generations)
        key = trajectory_key(config, data_hash)
        for name in (state_name, lambda k: surrogate_path(work, state_name(k)).name):  # start from the same seed
            data = json.loads((work / name(seed_key)).read_text())
            data["key"] = key
            (work / name(key)).write_text(json.dumps(data))
        forwards["windows"] = 0
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = search(model, config, calib, held_out, work, progress=True)
        row = {"row": f"pool {pool}" + (" (no screening)" if pool <= config.offspring else ""),
               "ppl": ppl(model), "kl": report.fitness, "generations": len(report.history),
               "improved": sum(h["improved"] for h in report.history), "evolution_s": time.perf_counter() - t0,
               "window_forwards": forwards["windows"]}  # fmt: skip
        row["ppl/uniform"] = row["ppl"] / reference["uniform"]
        row["default_time_s"] = seed_s + row["evolution_s"]  # seed_s: its real cost unless found saved
        row["history"] = [h["fitness"] for h in report.history]
        rows.append(row)
        print({k: v for k, v in row.items() if k != "history"}, flush=True)
    info = machine_info()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads")
    print_table([{k: v for k, v in r.items() if k != "history"} for r in rows], "search speed (SparseGPT 70 %)")
    save_results(f"search_speed{'-' + args.tag if args.tag else ''}",
                 {"args": vars(args), "seed_s": seed_s, "seed_window_forwards":
                  seed_forwards, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
