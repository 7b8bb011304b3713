"""Expert dropping on a tiny Mixtral-config model: test perplexity vs experts kept, for each criterion.

The model (8 experts, top-2, ~3 M parameters) is trained briefly on WikiText-2 ``valid.txt`` with the
load-balancing loss so that routing is learned, not random; it is cached in ``bench/cache/moe``.
Experts are then dropped with each criterion (calibration: windows of ``valid.txt``) and perplexity is
measured on ``test.txt`` (seqlen 256).

    python -m bench.moe_bench [--keep 6 4 3 2] [--max-eval-windows N]
    python -m bench.moe_bench --compress    # every routed expert pruned / quantized (bench/moe_experts_bench.py)
    python -m bench.moe_bench --merge --keep 4    # merge-experts (MC-SMoE) vs drop-experts (merge_main)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.common import CACHE, machine_info, print_table, save_results, wikitext
from lmcompress.calibration.data import draw

MOE = dict(
    family="mixtral",
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
    max_positions=512,
    train_steps=250,
    train_seqlen=128,
    batch_size=16,
    lr=3e-3,
    seed=0,
)


def ensure_moe_model(progress: bool = True) -> Path:
    """The trained tiny Mixtral folder (trains and caches it on first use)."""
    folder = CACHE / "moe"
    if (folder / "DONE").exists():
        return folder
    from lmcompress.checkpoint.save import save_model
    from lmcompress.models.tiny import build_tiny_model, build_tokenizer, train_tiny

    cfg = MOE
    torch.set_num_threads(int(os.environ.get("LMCOMPRESS_BENCH_TRAIN_THREADS", "1")))
    start = time.perf_counter()
    text = wikitext("valid").read_text(encoding="utf-8")
    tokenizer = build_tokenizer(text, vocab_size=cfg["vocab_size"])
    model = build_tiny_model(
        "mixtral",
        tokenizer.vocab_size,
        max_positions=cfg["max_positions"],
        seed=cfg["seed"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        num_local_experts=cfg["num_local_experts"],
        num_experts_per_tok=cfg["num_experts_per_tok"],
        router_aux_loss_coef=cfg["router_aux_loss_coef"],
        output_router_logits=True,  # adds the load-balancing loss to the training loss
    )
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    losses = train_tiny(
        model,
        ids,
        steps=cfg["train_steps"],
        seqlen=cfg["train_seqlen"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        seed=cfg["seed"],
        progress=progress,
    )
    model.config.output_router_logits = False
    recipe = {
        "kind": "bench-moe-model",
        "trained_on": "wikitext-2 valid.txt",
        "train_tokens": int(ids.numel()),
        "final_loss_with_aux": sum(losses[-20:]) / 20,
        "train_time_s": time.perf_counter() - start,
        **cfg,
    }
    tmp = folder.parent / "moe.building"
    save_model(model, tokenizer, tmp, recipe, overwrite=True)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    (folder / "DONE").write_text(json.dumps(recipe, indent=2) + "\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=int, nargs="+", default=[6, 4, 3, 2])
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (seqlen 256) from valid.txt")
    parser.add_argument("--max-eval-windows", type=int, default=None, help="evaluate on the first N test windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--merge", action="store_true", help="merge-experts rows instead (see merge_main)")
    parser.add_argument("--merge-methods", nargs="+", choices=MERGE_METHODS, default=list(MERGE_METHODS))
    parser.add_argument(
        "--compress", action="store_true", help="every routed expert pruned / quantized instead (moe_experts_bench)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.merge:
        merge_main(args)
        return
    if args.compress:
        from bench.moe_experts_bench import main as compress_main

        window_args = ["--max-eval-windows", str(args.max_eval_windows)] if args.max_eval_windows else []
        compress_main(["--nsamples", str(args.nsamples), "--threads", str(args.threads), *window_args])
        return

    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load_model
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.transforms.experts import ExpertConfig, drop_experts

    folder = ensure_moe_model()
    _, tokenizer = load_model(folder)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), 256)
    if args.max_eval_windows:
        test = test[: args.max_eval_windows]
    calib, _ = draw(tokenizer, str(wikitext("valid")), nsamples=args.nsamples, seqlen=256, seed=0)

    def ppl(model) -> float:
        return perplexity(model, test, progress=False).perplexity

    dense, _ = load_model(folder)
    n_params = sum(p.numel() for p in dense.parameters())
    rows = [dict(criterion="dense", mode="-", keep=8, params=n_params, ppl=ppl(dense), calib_rel_err=0.0, time_s=0.0)]
    print_table(rows, "dense")
    runs = [(c, False) for c in ("frequency", "router-weight", "reconstruction")] + [
        ("frequency", True),
        ("reconstruction", True),
    ]
    for keep in args.keep:
        for criterion, iterative in runs:
            model, _ = load_model(folder)
            report = drop_experts(model, ExpertConfig(keep=keep, criterion=criterion, iterative=iterative), calib)
            err = sum(report.relative_error.values()) / len(report.relative_error)
            rows.append(
                dict(
                    criterion=criterion,
                    mode="iterative" if iterative else "one-shot",
                    keep=keep,
                    params=report.params_after,
                    ppl=ppl(model),
                    calib_rel_err=err,
                    time_s=report.wall_time_s,
                )
            )
            print_table(rows[-1:], f"keep {keep}: {criterion}")
    print_table(
        rows,
        f"tiny Mixtral ({MOE['num_local_experts']} experts, top-{MOE['num_experts_per_tok']}): "
        f"WikiText-2 test perplexity (seqlen 256, {test.shape[0]} windows) vs experts kept",
    )
    info = machine_info()
    print(info)
    recipe = json.loads((folder / "DONE").read_text())
    path = save_results("moe_bench", {"model": recipe, "eval_windows": int(test.shape[0]), "rows": rows})
    print(f"results → {path}")


# ---- merge-experts (MC-SMoE) vs drop-experts ----------------------------------------------------------------


MERGE_METHODS = ("dense", "drop-frequency", "drop-reconstruction", "merge", "merge-align", "merge-align-refit")


def merge_main(args: argparse.Namespace) -> None:
    """``--merge``: merge-experts (plain, ``--align``, ``--align --refit``) vs drop-experts, to each ``--keep``.

    Same model, calibration and test windows as :func:`main`. Drop rows use the frequency criterion (the same
    K experts that merging keeps as dominant, so the two differ only by merging the rest in) and the
    reconstruction criterion (drop-experts' default). Results → ``bench/results/moe_merge_bench.json`` (with
    every method; a subset given by ``--merge-methods`` goes to ``moe_merge_bench-<methods>.json``).

        python -m bench.moe_bench --merge --keep 4
    """
    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load_model
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.transforms.experts import ExpertConfig, drop_experts
    from lmcompress.transforms.merge import MergeConfig, merge_experts

    folder = ensure_moe_model()
    _, tokenizer = load_model(folder)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), 256)
    if args.max_eval_windows:
        test = test[: args.max_eval_windows]
    calib, _ = draw(tokenizer, str(wikitext("valid")), nsamples=args.nsamples, seqlen=256, seed=0)

    def ppl(model) -> float:
        return perplexity(model, test, progress=False).perplexity

    def mean(d: dict) -> float:
        return sum(d.values()) / len(d)

    rows = []
    if "dense" in args.merge_methods:
        dense, _ = load_model(folder)
        n_params = sum(p.numel() for p in dense.parameters())
        rows.append(dict(method="dense", keep=8, params=n_params, ppl=ppl(dense), calib_rel_err=0.0, time_s=0.0))
        print_table(rows, "dense")
    for keep in args.keep:
        for criterion in ("frequency", "reconstruction"):
            if f"drop-{criterion}" not in args.merge_methods:
                continue
            model, _ = load_model(folder)
            report = drop_experts(model, ExpertConfig(keep=keep, criterion=criterion), calib)
            rows.append(
                dict(
                    method=f"drop ({criterion})",
                    keep=keep,
                    params=report.params_after,
                    ppl=ppl(model),
                    calib_rel_err=mean(report.relative_error),
                    time_s=report.wall_time_s,
                )
            )
            print_table(rows[-1:], f"keep {keep}: drop {criterion}")
        for method, align, refit in (
            ("merge", False, False),
            ("merge-align", True, False),
            ("merge-align-refit", True, True),
        ):
            if method not in args.merge_methods:
                continue
            model, _ = load_model(folder)
            report = merge_experts(model, MergeConfig(keep=keep, align=align, refit=refit), calib)
            rows.append(
                dict(
                    method="merge" + " --align" * align + " --refit" * refit,
                    keep=keep,
                    params=report.params_after,
                    ppl=ppl(model),
                    calib_rel_err=mean(report.relative_error),
                    time_s=report.wall_time_s,
                )
            )
            print_table(rows[-1:], f"keep {keep}: {rows[-1]['method']}")
    print_table(
        rows,
        f"tiny Mixtral ({MOE['num_local_experts']} experts, top-{MOE['num_experts_per_tok']}): merge-experts vs "
        f"drop-experts, WikiText-2 test perplexity (seqlen 256, {test.shape[0]} windows)",
    )
    print(machine_info())
    recipe = json.loads((folder / "DONE").read_text())
    name = "moe_merge_bench"
    if set(args.merge_methods) != set(MERGE_METHODS):
        name += "-" + "+".join(args.merge_methods)
    path = save_results(name, {"model": recipe, "eval_windows": int(test.shape[0]), "rows": rows})
    print(f"results → {path}")


if __name__ == "__main__":
    main()
