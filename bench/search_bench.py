"""Search benchmark (issue 10): searched per-block sparsity vs uniform and OWL at the same budget, on SmolLM2.

    python -m bench.search_bench                       # SmolLM2: SparseGPT and Wanda at 70% and 50%
    python -m bench.search_bench --methods sparsegpt --targets 0.7 --generations 30 [--model DIR]
    python -m bench.search_bench --methods none --bits 3.0            # mixed-precision GPTQ g128 vs uniform 3-bit
    python -m bench.search_bench --methods none --max-loss 0.05       # largest SparseGPT sparsity within +5%

Per method and target, all on the same calibration windows and printed side by side:
- ``uniform`` and ``OWL``: ordinary sequential pruning (``lmcompress prune``), every block at the target or at
  OWL's block sparsities;
- ``db-uniform`` and ``db-OWL``: the search's own baselines, assembled from its level database (each layer
  pruned from the statistics ``--database-inputs`` names: the earlier blocks pruned uniformly, or dense), placed
  on the level grid;
- ``search``: the allocation the search chose, assembled from the same database;
- ``search-sequential``: that allocation applied by ordinary sequential pruning (``prune --allocation``).
Calibration and fitness windows are drawn as ``lmcompress search`` draws them: ``--fitness-windows`` held-out
windows from the end of the WikiText-2 validation text, ``--nsamples`` calibration windows from the rest (no token
in both). WikiText-2 test perplexity (``--eval-windows`` windows of ``--eval-seqlen`` tokens), the KL fitness on
the held-out windows, and the wall time of the search (database included) are reported. One level database per
method is shared by its targets (kept in bench/cache/search-db).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, save_results, wikitext
from lmcompress.calibration.data import draw, embedding_rows, eval_windows
from lmcompress.search.work import split_windows

BASELINES = CACHE / "search-baselines.json"  # perplexity of uniform / OWL sequential pruning, by settings


def _stages(args) -> dict:
    """The selection stages asked for (fitness windows and survivors per stage) and the held-out windows drawn."""
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    stages = {"stage_windows": ints(args.stage_windows), "survivors": ints(args.survivors)}
    return {**stages, "fitness_windows": args.fitness_windows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--targets", default="0.7,0.5")
    parser.add_argument("--levels", default="0.3:0.95:0.05")
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--offspring", type=int, default=16)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--fitness-windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256, help="calibration and fitness window length")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where blocks, candidates and perplexity run (cuda)")
    parser.add_argument("--bits", type=float, default=None, help="also: a bit-width search at this average")
    parser.add_argument("--bit-levels", default="2,3,4,8")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--granularity", default="block", choices=("block", "layer"), help="one level per block or layer"
    )
    parser.add_argument("--database-inputs", default="sequential", choices=("sequential", "dense"))
    parser.add_argument("--rounds", type=int, default=1, help="database rounds (sequential inputs)")
    parser.add_argument("--max-loss", type=float, default=None, help="also: --max-loss ppl=+X (0.05 = +5%%)")
    parser.add_argument("--max-loss-generations", type=int, default=10, help="generations of each bisection step")
    parser.add_argument("--max-loss-confidence", type=float, default=0.9, help="upper bound's confidence (0.5: none)")
    parser.add_argument("--time-limit", type=float, default=None, help="minutes per search (ends a generation)")
    parser.add_argument("--sensitivity-span", type=int, default=None, help="levels each way [3 block, 1 layer; 0 off]")
    parser.add_argument("--stage-windows", default="2,8", help="fitness windows per selection stage (ends at 1 kept)")
    parser.add_argument("--survivors", default="4,1", help="kept after each selection stage")
    parser.add_argument("--start", default=None, help="an earlier search.json to start from as well (--start)")
    parser.add_argument("--tag", default="", help="write bench/results/search-TAG.json (runs side by side)")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from lmcompress.checkpoint.load import load_model
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.search.run import SearchConfig, read_start, search
    from lmcompress.transforms.prune import PruneConfig, prune

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    from bench.reference import resolve_model

    args.model = str(resolve_model(args.model))
    base, tokenizer = load_model(args.model)
    # as `lmcompress search` draws them: the fitness windows from the end of the text, the calibration windows
    # from the rest, so that no token is in both (calibration.data.split_stream)
    windows, _ = draw(
        tokenizer,
        str(wikitext("valid")),
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=0,
        held_out=args.fitness_windows,
        vocab_size=embedding_rows(base),
    )
    calib, held_out = split_windows(windows, args.nsamples)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), args.eval_seqlen)
    test = test[: args.eval_windows]

    def ppl(model) -> float:
        return perplexity(model, test, device=args.device, progress=False).perplexity

    dense = ppl(base)
    print(f"dense: WikiText-2 test perplexity {dense:.3f} ({test.numel()} tokens)", flush=True)
    rows = []
    baselines = json.loads(BASELINES.read_text()) if BASELINES.is_file() else {}
    for method in [m for m in args.methods.split(",") if m and m != "none"]:
        for target in (float(t) for t in args.targets.split(",")):
            row = {"method": method, "sparsity": target}
            for allocation in ("uniform", "owl"):
                # prune's defaults are part of what was measured (the in-block order changed in session 8)
                data = f"n{args.nsamples}x{args.seqlen} test{args.eval_windows}x{args.eval_seqlen} in-block sequential"
                data += f" held-out{args.fitness_windows}"  # calibration windows cut from the rest of the text
                key = f"{method} {target:g} {allocation} {data}"
                if key not in baselines:  # sequential pruning is deterministic: a rerun reuses what it measured
                    model = copy.deepcopy(base)
                    config = PruneConfig(method=method, sparsity=target, allocation=allocation)
                    prune(model, config, calib, device=args.device, progress=False)
                    baselines[key] = ppl(model)
                    BASELINES.write_text(json.dumps(baselines, indent=1))
                row[allocation] = baselines[key]
                print(f"{method} {target:g} {allocation}: {row[allocation]:.3f}", flush=True)
            config = SearchConfig(
                target=target,
                method=method,
                levels=args.levels,
                generations=args.generations,
                offspring=args.offspring,
                database_inputs=args.database_inputs,
                rounds=args.rounds,
                granularity=args.granularity,
                time_limit_s=None if args.time_limit is None else args.time_limit * 60,
                sensitivity_span=args.sensitivity_span,
                start=None if args.start is None else read_start(args.start, "sparsity"),
                **_stages(args),
            )
            seq = "-seq" if args.database_inputs == "sequential" else ""
            work = CACHE / "search-db" / f"{method}-{target:g}{seq}"  # block and layer searches share the database
            model = copy.deepcopy(base)
            start = time.perf_counter()
            report = search(model, config, calib, held_out, work, device=args.device, progress=True)
            row["search_s"] = time.perf_counter() - start
            row["search"] = ppl(model)
            row["report"] = write_report(report, f"{method}-{target:g}-{args.database_inputs}")
            sequential = copy.deepcopy(base)  # the same allocation by ordinary sequential pruning (prune --allocation)
            config = PruneConfig(method=method, allocation="layers", layer_targets=report.layer_levels)
            prune(sequential, config, calib, device=args.device, progress=False)
            row["search-sequential"] = ppl(sequential)
            for name, alloc in report.baseline_allocations.items():
                from lmcompress.search.database import LevelDatabase

                db = LevelDatabase.open(report.database)
                candidate = copy.deepcopy(base)
                levels = {s: k for k, s in enumerate(report.levels)}
                db.apply(
                    candidate, {layer: levels[s] for unit, s in zip(report.units, alloc, strict=True) for layer in unit}
                )
                row[f"db-{name}"] = ppl(candidate)
            row["kl_search"] = report.fitness
            row["kl_db_uniform"], row["kl_db_owl"] = report.baselines["uniform"], report.baselines["owl"]
            row["kl_additive"], row["generations_run"] = report.baselines.get("additive"), len(report.history)
            row["kl_start"] = report.baselines.get("start")
            best = min(row["uniform"], row["owl"])
            row["search/best"] = row["search"] / best
            row["search/uniform"] = row["search"] / row["uniform"]
            row["sequential/best"] = row["search-sequential"] / best
            rows.append(row)
            print(row, flush=True)
    if args.bits is not None:
        rows.append(bits_row(args, base, calib, held_out, ppl))
        print(rows[-1], flush=True)
    if args.max_loss is not None:
        rows.append(max_loss_row(args, base, calib, held_out, ppl, dense))
        print(rows[-1], flush=True)
    info = machine_info()
    print(
        f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, torch {info['torch']}, "
        f"{args.threads} threads; device {args.device}{' (' + info['cuda'] + ')' if info['cuda'] else ''}; "
        f"dense perplexity {dense:.3f}"
    )
    print_table(rows, "search vs uniform and OWL (WikiText-2 test perplexity)")
    save_results(f"search-{args.tag}" if args.tag else "search", {"args": vars(args), "dense": dense, "rows": rows})


def write_report(report, name: str) -> str:
    """search.json and ``lmcompress report``'s plots of this search, in bench/results/search-NAME."""
    from lmcompress.checkpoint.folder import json_text
    from lmcompress.measure.search_report import SEARCH_FILE, write_search_report

    folder = Path(__file__).parent / "results" / f"search-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SEARCH_FILE).write_text(json_text(report.to_dict()) + "\n")
    return write_search_report(folder)["markdown"]


def bits_row(args, base, calib, held_out, ppl) -> dict:
    """Mixed precision (GPTQ on ``--group-size`` grids, levels ``--bit-levels``) at ``--bits`` average bits per
    weight *with grids*, against uniform GPTQ at the nearest lower whole width and at 3 bits."""
    from lmcompress.search.run import SearchConfig, search
    from lmcompress.transforms.quantize import QuantConfig, nominal_bits_per_weight, quantize

    row: dict = {"method": f"gptq g{args.group_size}", "bits": args.bits, "granularity": args.granularity}
    for bits in sorted({3, int(args.bits)}):
        model = copy.deepcopy(base)
        qconfig = QuantConfig(method="gptq", bits=bits, group_size=args.group_size)
        report = quantize(model, qconfig, calib, device=args.device, progress=False)
        row[f"uniform{bits}"] = ppl(model)
        row[f"uniform{bits}_bits_per_weight"] = nominal_bits_per_weight(report.quantized)
        print(f"gptq uniform {bits}-bit: {row[f'uniform{bits}']:.3f} "
              f"({row[f'uniform{bits}_bits_per_weight']:.3f} bits/weight with grids)", flush=True)  # fmt: skip
    config = SearchConfig(
        target=args.bits,
        kind="bits",
        method="gptq",
        levels=args.bit_levels,
        group_size=args.group_size,
        generations=args.generations,
        offspring=args.offspring,
        database_inputs=args.database_inputs,
        granularity=args.granularity,
        time_limit_s=None if args.time_limit is None else args.time_limit * 60,
        sensitivity_span=args.sensitivity_span,
        **_stages(args),
    )
    model = copy.deepcopy(base)
    start = time.perf_counter()
    suffix = "-seq" if args.database_inputs == "sequential" else ""
    work = CACHE / "search-db" / f"bits-g{args.group_size}{suffix}-{args.granularity}"
    report = search(model, config, calib, held_out, work, device=args.device, progress=True)
    row["search_s"] = time.perf_counter() - start
    row["search"] = ppl(model)
    row["achieved_bits"] = report.achieved
    row["allocation"] = report.allocation
    row["kl_search"], row["kl_db_uniform"] = report.fitness, report.baselines["uniform"]
    row["kl_additive"], row["generations_run"] = report.baselines.get("additive"), len(report.history)
    row["report"] = write_report(report, f"bits-{args.bits:g}-{args.granularity}")  # search.json and its plots
    if "additive" in report.baseline_allocations:  # the sensitivity pass's start, assembled from the database
        from lmcompress.search.database import LevelDatabase

        db, index = LevelDatabase.open(report.database), {b: k for k, b in enumerate(report.levels)}
        candidate = copy.deepcopy(base)
        alloc = report.baseline_allocations["additive"]
        db.apply(candidate, {layer: index[b] for unit, b in zip(report.units, alloc, strict=True) for layer in unit})
        row["db-additive"] = ppl(candidate)
    row["search/uniform3"] = row["search"] / row["uniform3"]
    return row


def max_loss_row(args, base, calib, held_out, ppl, dense: float) -> dict:
    """``--max-loss``: the largest SparseGPT sparsity on the level grid whose searched model stays within the
    loss on the held-out calibration windows, and the perplexity it really has on the test text."""
    from lmcompress.search.run import SearchConfig, search_max_loss

    levels = [float(x) for x in args.levels.split(":")] if ":" in args.levels else [0.5]
    config = SearchConfig(target=levels[0], method="sparsegpt", levels=args.levels,
                          generations=args.max_loss_generations, offspring=args.offspring,
                          database_inputs=args.database_inputs, granularity=args.granularity,
                          sensitivity_span=args.sensitivity_span, **_stages(args))  # fmt: skip
    model = copy.deepcopy(base)
    start = time.perf_counter()
    work = CACHE / "search-db" / f"sparsegpt-maxloss-{args.database_inputs}"
    report = search_max_loss(model, config, calib, held_out, work, max_loss=args.max_loss,
                             confidence=args.max_loss_confidence, device=args.device, progress=True)  # fmt: skip
    row = {"method": "sparsegpt max-loss", "max_loss": args.max_loss, "search_s": time.perf_counter() - start}
    row["confidence"] = args.max_loss_confidence
    row["sparsity"] = report.achieved
    row["search"] = ppl(model)
    row["test_increase"] = row["search"] / dense - 1
    row["bisection"] = report.bisection
    row["database_inputs"] = args.database_inputs
    return row


if __name__ == "__main__":
    main()
