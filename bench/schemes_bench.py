"""Schemes benchmark (issue 32): W8A8 int8 with and without SmoothQuant, FP8, and AWQ before RTN / GPTQ.

    python -m bench.schemes_bench --model smollm2            # SmolLM2-135M-Instruct
    python -m bench.schemes_bench --model qwen1.5b   # under flock /tmp/team/qwen.lock, nice

Every row runs the job users run (``lmcompress.jobs.quantize_pretrained``, the API behind ``lmcompress quantize``)
from the model folder into a fresh output folder, loads that folder with ``lmcompress.load`` (W8A8 / FP8 layers
quantize their inputs as the scheme runs them) and measures it on WikiText-2 ``test.txt`` windows: perplexity
with its 95% interval, the ratio to dense with the paired 95% interval (``perplexity.ratio_interval``), mean KL
divergence and top-1 agreement against the dense model (``measure.agreement``'s per-position formulas, on the
dense logits kept from one forward: each row costs one forward of its model), and the job's wall time.
Calibration: the first windows drawn from WikiText-2 ``valid.txt`` (``--nsamples`` × ``--seqlen``).

Targets (issue 32): W8A8 perplexity ≤ 1.03× dense and mean KL ≤ 0.02, with and without SmoothQuant; FP8 the same;
AWQ + GPTQ 4-bit g128 ≤ GPTQ alone in perplexity.
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import time
from pathlib import Path

import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, results_name, save_results, wikitext

ROWS: list[tuple[str, dict]] = [  # name → QuantConfig fields (empty: the dense model itself); cheap rows first
    ("dense", {}),
    ("W8A8 RTN", {"method": "rtn", "scheme": "w8a8"}),
    ("W8A8 RTN + SmoothQuant 0.5", {"method": "rtn", "scheme": "w8a8", "smoothquant": 0.5}),
    ("FP8 dynamic", {"method": "rtn", "scheme": "fp8", "dynamic": True}),
    ("FP8 static", {"method": "rtn", "scheme": "fp8"}),
    ("W8A8 RTN + SmoothQuant auto", {"method": "rtn", "scheme": "w8a8", "smoothquant": "auto"}),
    ("FP8 dynamic + SmoothQuant 0.5", {"method": "rtn", "scheme": "fp8", "dynamic": True, "smoothquant": 0.5}),
    ("FP8 static + SmoothQuant 0.5", {"method": "rtn", "scheme": "fp8", "smoothquant": 0.5}),
    ("FP8 dynamic + SmoothQuant auto", {"method": "rtn", "scheme": "fp8", "dynamic": True, "smoothquant": "auto"}),
    ("FP8 static + SmoothQuant auto", {"method": "rtn", "scheme": "fp8", "smoothquant": "auto"}),
    ("GPTQ 4-bit g128", {"method": "gptq", "bits": 4, "group_size": 128}),
    ("AWQ + GPTQ 4-bit g128", {"method": "gptq", "bits": 4, "group_size": 128, "awq": True}),
    ("RTN 4-bit g128", {"method": "rtn", "bits": 4, "group_size": 128}),
    ("AWQ + RTN 4-bit g128", {"method": "rtn", "bits": 4, "group_size": 128, "awq": True}),
    ("W8A8 GPTQ", {"method": "gptq", "scheme": "w8a8"}),
    ("W8A8 RTN (asymmetric activations)", {"method": "rtn", "scheme": "w8a8", "asym_activations": True}),
    (
        "W8A8 RTN + SmoothQuant auto (asymmetric activations)",
        {"method": "rtn", "scheme": "w8a8", "asym_activations": True, "smoothquant": "auto"},
    ),
    ("FP8 dynamic GPTQ", {"method": "gptq", "scheme": "fp8", "dynamic": True}),
    ("FP8 static GPTQ", {"method": "gptq", "scheme": "fp8"}),
]

TARGET_PPL_RATIO = 1.03
TARGET_KL = 0.02


def checks(by: dict[str, dict]) -> dict[str, dict]:
    """The issue's targets on the rows measured: each with its numbers and ``met``."""
    out: dict[str, dict] = {}
    for name in ("W8A8 RTN", "W8A8 RTN + SmoothQuant 0.5", "W8A8 RTN + SmoothQuant auto", "W8A8 GPTQ",
                 "FP8 static", "FP8 dynamic", "FP8 dynamic + SmoothQuant 0.5",
                 "FP8 static + SmoothQuant 0.5", "FP8 dynamic + SmoothQuant auto",
                 "FP8 static + SmoothQuant auto", "FP8 dynamic GPTQ", "FP8 static GPTQ",
                 "W8A8 RTN (asymmetric activations)",
                 "W8A8 RTN + SmoothQuant auto (asymmetric activations)"):  # fmt: skip
        if name in by:
            r = by[name]
            out[name] = {
                "ppl_ratio": r["ppl_ratio"],
                "kl_mean": r["kl_mean"],
                "met": r["ppl_ratio"] <= TARGET_PPL_RATIO and r["kl_mean"] <= TARGET_KL,
            }
    for base in ("GPTQ", "RTN"):
        plain, awq = f"{base} 4-bit g128", f"AWQ + {base} 4-bit g128"
        if plain in by and awq in by:
            out[f"{awq} ≤ {plain}"] = {
                "ppl": by[awq]["ppl"],
                "ppl_plain": by[plain]["ppl"],
                "kl_mean": by[awq]["kl_mean"],
                "kl_mean_plain": by[plain]["kl_mean"],
                "met": by[awq]["ppl"] <= by[plain]["ppl"],
            }
    return out


@torch.no_grad()
def forward(model, test: torch.Tensor, batch: int = 2) -> list[torch.Tensor]:
    """The model's float32 logits on the test windows, ``batch`` windows per call."""
    return [model(test[i : i + batch], use_cache=False).logits.float() for i in range(0, test.shape[0], batch)]


def measure(logits: list[torch.Tensor], dense_logits: list[torch.Tensor], test: torch.Tensor) -> tuple[list, dict]:
    """Per-window mean NLL (as ``measure.perplexity`` computes it) and the agreement summary against the dense
    logits (``measure.agreement``), from one forward of each model on the same windows."""
    from torch.nn import functional as F

    from lmcompress.measure.agreement import summarize, window_agreement

    window_nll, parts = [], {"kl": [], "agree": [], "delta_p": []}
    start = 0
    for out, ref in zip(logits, dense_logits, strict=True):
        ids = test[start : start + out.shape[0]]
        start += out.shape[0]
        nll = F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        window_nll += nll.view(ids.shape[0], -1).mean(1).tolist()
        for key, value in window_agreement(out, ref, ids).items():
            parts[key].append(value)
    return window_nll, summarize(*(torch.cat(parts[k]) for k in ("kl", "agree", "delta_p")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows (of --seqlen tokens)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8, help="test windows of --seqlen tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default=None, help="comma-separated row names (or unique prefixes) to run only")
    parser.add_argument("--awq-grid", type=int, default=20, help="AWQ exponents tried per group (QuantConfig.awq_grid)")
    parser.add_argument(
        "--percdamp", default=None, help="GPTQ rows' dampening (QuantConfig.percdamp, a fraction or auto)"
    )
    parser.add_argument("--tag", default="", help="suffix of the results file (keeps earlier runs' files)")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from bench.reference import resolve_model
    from lmcompress import load
    from lmcompress.calibration.data import embedding_rows, eval_windows, wants_bos
    from lmcompress.job_options import check_percdamp
    from lmcompress.jobs import quantize_pretrained
    from lmcompress.measure.perplexity import perplexity_interval, ratio_interval
    from lmcompress.transforms.quantize import QuantConfig

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    args.model = str(resolve_model(args.model))
    dense, tokenizer = load(args.model)
    test = eval_windows(
        tokenizer,
        wikitext("test").read_text(encoding="utf-8"),
        args.seqlen,
        bos=wants_bos(tokenizer),
        vocab_size=embedding_rows(dense),
    )[: args.eval_windows]
    print(f"test: {test.shape[0]} windows × {args.seqlen} tokens; calibration: {args.nsamples} × {args.seqlen} "
          "tokens of valid.txt", flush=True)  # fmt: skip
    dense_logits = forward(dense, test)
    dense_nll, _ = measure(dense_logits, dense_logits, test)
    del dense  # only its logits are needed from here on; each row's job loads its own copy (memory: one model)
    gc.collect()
    work = CACHE / "schemes_bench" / Path(args.model).name
    work.mkdir(parents=True, exist_ok=True)
    wanted = None if args.rows is None else [w.strip() for w in args.rows.split(",")]
    names = [name for name, _ in ROWS]
    if wanted is not None:  # a name selects its row; otherwise it is a prefix of the rows it selects
        wanted = [n for w in wanted for n in ([w] if w in names else [n for n in names if n.startswith(w)])]
    job_options = {
        "calib_data": str(wikitext("valid")),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "overwrite": True,
        "progress": False,
    }
    results, table = [], []
    for name, fields in ROWS:
        if wanted is not None and name not in wanted:
            continue
        row: dict = {"name": name, "config": fields}
        if not fields:
            model, seconds, job, window_nll, agree = None, 0.0, None, dense_nll, None
        else:
            out = work / name.replace(" ", "_").replace("+", "").replace("__", "_")
            start = time.perf_counter()
            extra = {"awq_grid": args.awq_grid} if fields.get("awq") else {}
            if args.percdamp is not None and fields.get("method") == "gptq":
                extra["percdamp"] = check_percdamp(args.percdamp)
            config = QuantConfig(**fields, **extra)
            row["config"] = {**fields, **extra}
            report = quantize_pretrained(args.model, config, out, **job_options)
            job = time.perf_counter() - start
            seconds = report.wall_time_s
            row["smoothing"] = report.smoothing
            row["nominal_bits_per_weight"] = report.nominal_bits_per_weight
            model, _ = load(out)
            window_nll, agree = measure(forward(model, test), dense_logits, test)
        ppl = math.exp(sum(window_nll) / len(window_nll))
        ppl_ci = perplexity_interval(window_nll)
        ratio = ratio_interval(window_nll, dense_nll)
        row |= {
            "ppl": ppl,
            "ppl_ci": ppl_ci,
            "ppl_ratio": ratio[0] if ratio else None,
            "ppl_ratio_ci": list(ratio[1:]) if ratio else None,
            "kl_mean": agree["kl_mean"] if agree else 0.0,
            "kl_mean_ci": agree["kl_mean_ci"] if agree else None,
            "top1_agreement": agree["top1_agreement"] if agree else 1.0,
            "top1_agreement_ci": agree["top1_agreement_ci"] if agree else None,
            "transform_s": seconds,
            "job_s": job,
            "load_avg": Path("/proc/loadavg").read_text().split()[:3],
        }
        results.append(row)
        ci = row["ppl_ratio_ci"]
        table.append(
            {
                "configuration": name,
                "test ppl": row["ppl"],
                "ppl 95% CI": "-" if row["ppl_ci"] is None else f"{row['ppl_ci'][0]:.3f}–{row['ppl_ci'][1]:.3f}",
                "× dense": row["ppl_ratio"],
                "× dense 95% CI": "-" if not ci else f"{ci[0]:.4f}–{ci[1]:.4f}",
                "mean KL": row["kl_mean"],
                "top-1 agree": row["top1_agreement"],
                "quantize s": seconds if fields else None,
                "job s": job,
            }
        )
        print(
            f"{name}: ppl {row['ppl']:.3f} (×{row['ppl_ratio'] or 1:.4f}), KL {row['kl_mean']:.4f}, top-1 "
            f"{row['top1_agreement']:.3f}, quantize {seconds:.1f}s, job {job or 0:.1f}s",
            flush=True,
        )
        if fields:
            del model
            shutil.rmtree(out, ignore_errors=True)
            gc.collect()
        payload = {"args": vars(args), "rows": results, "checks": checks({r["name"]: r for r in results})}
        save_results(results_name("schemes_bench", args.model) + args.tag, payload)  # kept if cut short

    print_table(
        table,
        f"Schemes on {Path(args.model).name}: WikiText-2 test {test.shape[0]} × {args.seqlen} tokens, calibration "
        f"{args.nsamples} × {args.seqlen} tokens of valid.txt; KL / top-1 against the dense model",
    )
    for key, check in checks({r["name"]: r for r in results}).items():
        print(f"{key}: {'met' if check['met'] else 'NOT met'} {check}")
    print(machine_info())


if __name__ == "__main__":
    main()
