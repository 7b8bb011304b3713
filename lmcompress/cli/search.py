"""``lmcompress search``: find per-layer compression levels under a budget (EvoPress-style evolutionary search)."""

from __future__ import annotations

import re

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app
from lmcompress.errors import UserError


def parse_budget(text: str) -> tuple[str, float]:
    """``sparsity=0.7`` → ("sparsity", 0.7); ``size=60MB`` → ("size", 60e6); ``size=0.3x`` → ("size", 0.3)
    (relative: see :func:`budget_is_relative`); ``decode=2.5x`` or ``decode=40ms`` → ("decode", speed-up or seconds per
    token; the text itself goes to the search, see :func:`decode_budget`)."""
    decode = decode_budget(text)
    if decode is not None:
        from lmcompress.search.latency import parse_decode

        return "decode", parse_decode(decode)[0]
    size = re.fullmatch(r"\s*size\s*=\s*(.+?)\s*", text or "")
    if size:
        from lmcompress.search.joint import parse_size

        return "size", parse_size(size.group(1))[0]
    m = re.fullmatch(r"\s*(sparsity|bits)\s*=\s*([0-9.]+)\s*", text or "")
    if not m:
        raise UserError(
            f"--budget {text!r} must look like sparsity=0.7, bits=3.0, size=60MB, size=0.3x, decode=2.5x or decode=40ms"
        )
    try:
        return m.group(1), float(m.group(2))
    except ValueError:
        raise UserError(f"--budget {text!r}: {m.group(2)!r} is not a number") from None


def decode_budget(text: str | None) -> str | None:
    """The decode budget's value (``2.5x``, ``40ms``) of ``--budget decode=…``, or None for other budgets."""
    m = re.fullmatch(r"\s*decode\s*=\s*(.*?)\s*", text or "")
    return m.group(1) if m else None


def budget_is_relative(text: str) -> bool:
    """Whether a size budget is a fraction of the model's 16-bit size (``size=0.3x``)."""
    return text.strip().lower().endswith("x")


def parse_max_loss(text: str | None) -> float | None:
    """``ppl=+5%`` → 0.05."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*ppl\s*=\s*\+?\s*([0-9.]+)\s*(%?)\s*", text)
    if not m:
        raise UserError(f"--max-loss {text!r} must look like ppl=+5%")
    value = float(m.group(1)) / (100 if m.group(2) else 1)
    if not 0 < value < 10:
        raise UserError(f"--max-loss {text!r}: the allowed increase must be positive, e.g. ppl=+5%")
    return value


def parse_duration(text: str | None) -> float | None:
    """``90``, ``90s``, ``30m``, ``1.5h`` → seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", text)
    if not m:
        raise UserError(f"--time-limit {text!r} must be a duration like 90s, 30m or 1h")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if value <= 0:
        raise UserError(f"--time-limit must be positive, got {text!r}")
    return value


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{option} {text!r} must be comma-separated integers, e.g. 4,1") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{option} {text!r} must be positive integers")
    return values


# options that only one mode of the search reads: given in another mode they would do nothing
EVOLUTION = ("generations", "offspring", "survivors", "rounds", "sensitivity_span", "start", "time_limit")


def _refuse_ignored(ctx: typer.Context, *, tune: str | None, max_loss: str | None, budget: str) -> None:
    """Refuse options the chosen mode would ignore (the rule of every verb)."""
    if tune is None:
        options.refuse(ctx, ("trials",), "without --tune owl")
    else:
        options.refuse(ctx, EVOLUTION, "with --tune owl: it tunes OWL's M and λ, it does not evolve per-unit levels")
    if max_loss is None:
        options.refuse(ctx, ("max_loss_confidence",), "without --max-loss")
    else:
        options.refuse(
            ctx, ("budget",), "with --max-loss: it finds the largest sparsity itself (bound it with --levels)"
        )
    if parse_budget(budget)[0] == "sparsity":
        options.refuse(ctx, ("group_size",), "to a sparsity budget: only bit-width levels have quantization grids")


@app.command()
def search(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder, hub id or .gguf file."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for the compressed model, recipe and search.json."),
    budget: str = typer.Option(
        "sparsity=0.7",
        "--budget",
        help="sparsity=F: average sparsity over the prunable weights; bits=F: average bits per weight, grids included; "
        "size=60MB (or 0.3x of the 16-bit model): bytes of the packed weights file, head, embedding and grids "
        "included, with joint SPARSITY/BITS levels; decode=2.5x (of the dense float32 model's speed) or decode=40ms "
        "(or 25tok/s): time per token at batch 1 from a latency table measured once per layer shape and level on this "
        "CPU with the kernels load(kernels=auto) uses, cached in ~/.cache/lmcompress/latency; a level no kernel runs "
        "faster (e.g. unstructured sparsity without a kernel) costs what its dense or quantized layer costs.",
    ),
    method: str = typer.Option(
        None, "--method", help="How each level is made: sparsegpt | wanda | magnitude (sparsity); gptq | rtn (bits)."
    ),
    levels: str = typer.Option(
        None,
        "--levels",
        help="Levels: sparsities start:stop:step or a,b,c [0.3:0.95:0.05]; bit widths [2,3,4,8]; for a size budget "
        "joint SPARSITY/BITS levels, SPARSITY 0, a fraction or N:M, BITS 2-6, 8 or 16 (floats), e.g. "
        "0/16,0/8,0/4,2:4/4,0.5/3,0/2 [auto: 0/16,0/8,0/4,0/3,2:4/4,2:4/3,0/2]; add drop (per block) to let "
        "the search remove whole blocks, e.g. auto,drop.",
    ),
    group_size: int = typer.Option(128, "--group-size", help="bits, size: inputs sharing one scale; -1: per channel."),
    granularity: str = typer.Option("block", "--granularity", help="One level per block, or per layer."),
    generations: int = typer.Option(
        None, "--generations", help="Evolution generations [default: 15 on a CPU, 50 on a GPU]."
    ),
    offspring: int = typer.Option(16, "--offspring", help="Mutants scored per generation."),
    survivors: str = typer.Option("4,1", "--survivors", help="Kept after each selection stage (ends in 1)."),
    stage_windows: str = typer.Option("2,8", "--stage-windows", help="Fitness windows scored at each stage."),
    fitness_windows: int = typer.Option(16, "--fitness-windows", help="Held-out windows drawn for the fitness."),
    time_limit: str = typer.Option(None, "--time-limit", help="Stop after the generation that passes it: 30m, 1h."),
    fitness: str = typer.Option("kl", "--fitness", help="kl: divergence to the dense model; ppl: own perplexity."),
    scheme: str = typer.Option(
        None,
        "--scheme",
        help="w8a8 | fp8 (with --dynamic): score each pruned candidate as `quantize --scheme` with RTN would run it "
        "(8-bit weights per channel, activations quantized); then quantize the output with the same scheme.",
    ),
    dynamic: bool = typer.Option(False, "--dynamic", help="--scheme fp8: per-token activation scales."),
    database_inputs: str = typer.Option(
        "sequential",
        "--database-inputs",
        help="Statistics of the level database: sequential (each block sees the earlier blocks compressed "
        "uniformly, as sequential SparseGPT/GPTQ does) or dense (the dense model's inputs, as in EvoPress).",
    ),
    rounds: int = typer.Option(
        1,
        "--rounds",
        help="Sequential inputs: split the generations into this many rounds, each after the first rebuilding the "
        "database along the best allocation so far (one database build each).",
    ),
    sensitivity_span: int = typer.Option(
        None,
        "--sensitivity-span",
        help="Before the evolution, score every unit moved alone up to this many levels each way and start from "
        "greedy switches under the additive model this gives, if it scores better [3 per block, 1 per layer; 0: off].",
    ),
    start: str = typer.Option(
        None,
        "--start",
        help="Also start from this allocation: an earlier search's search.json (or output folder) of the same "
        "budget kind, e.g. a per-block search to refine with --granularity layer; placed on this budget.",
    ),
    max_loss: str = typer.Option(
        None, "--max-loss", help="ppl=+5%: the largest sparsity (on the level grid) within that perplexity loss."
    ),
    max_loss_confidence: float = typer.Option(
        0.9,
        "--max-loss-confidence",
        help="--max-loss: a sparsity passes when the loss's one-sided upper bound at this confidence, over the "
        "held-out windows, is within it (0.5: the point estimate; more --fitness-windows tighten the bound).",
    ),
    tune: str = typer.Option(None, "--tune", help="owl: tune OWL's M and λ with Optuna instead of per-unit levels."),
    trials: int = typer.Option(40, "--trials", help="--tune: number of Optuna trials."),
    keep_database: bool = typer.Option(False, "--keep-database", help="Keep the level database and search state."),
    calib_data: str = typer.Option("c4", "--calib-data", help="Calibration text (as for prune)."),
    nsamples: int = typer.Option(
        None, "--nsamples", help="Calibration windows for the level database [default: 32 on a CPU, 128 on a GPU]."
    ),
    seqlen: int = typer.Option(
        None, "--seqlen", help="Tokens per window [default: 256 on a CPU, min(2048, model context) on a GPU]."
    ),
    seed: int = options.CALIB_SEED,
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    overwrite: bool = options.OVERWRITE,
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    offload: str = options.OFFLOAD_NONE,
    as_json: bool = options.JSON,
    quiet: bool = options.QUIET,
) -> None:
    """Search how much to compress each block (or layer) so that the average meets the budget with the least damage.

    Every layer is pruned once at every level (a database on disk); candidates are assembled from it and scored
    by the KL divergence of their next-token distribution to the dense model's on held-out calibration windows.
    The search starts from the best of uniform, OWL (and --start) and a sensitivity pass's additive allocation at
    the same budget and never ends worse than it. A killed search, run again with the same settings, continues from its
    last finished generation.

    Examples:

      lmcompress search ./smollm2 --budget sparsity=0.7 --method sparsegpt --calib-data wikitext2 -o smol-evo70

      lmcompress search ./llama --budget sparsity=0.5 --granularity layer --time-limit 30m -o llama-evo50

      lmcompress search ./smollm2 --granularity layer --start smol-evo70 --calib-data wikitext2 -o smol-evo70-layers

      lmcompress search ./llama --budget bits=3.0 --levels 2,3,4,8 --group-size 128 -o llama-mixed3

      lmcompress search ./smollm2 --budget size=60MB --levels auto --calib-data wikitext2 -o smol-60mb

      lmcompress search ./llama --max-loss ppl=+5% --method sparsegpt -o llama-within5

      lmcompress search ./llama --tune owl --budget sparsity=0.7 --trials 40 -o llama-owl-tuned
    """
    from lmcompress.jobs import search_pretrained
    from lmcompress.search.run import SearchConfig, read_start

    _refuse_ignored(ctx, tune=tune, max_loss=max_loss, budget=budget)
    cpu = not str(device).startswith("cuda")  # sized so that a 135M model takes about half an hour on 2 cores
    generations = generations if generations is not None else (15 if cpu else 50)
    ctx.params["nsamples"] = nsamples if nsamples is not None else (32 if cpu else 128)
    ctx.params["seqlen"] = seqlen if seqlen is not None or not cpu else 256
    kind, value = parse_budget(budget)
    decode = decode_budget(budget) if kind == "decode" else None
    kind, value = ("size", 1.0) if decode is not None else (kind, value)  # joint levels; the target unused
    loss = parse_max_loss(max_loss)
    config = SearchConfig(
        target=value,
        kind=kind,
        decode=decode,
        size_relative=kind == "size" and decode is None and budget_is_relative(budget),
        method=method or ("gptq" if kind == "bits" else "sparsegpt"),
        group_size=group_size,
        levels=levels,
        granularity=granularity,
        generations=generations,
        offspring=offspring,
        survivors=_ints(survivors, "--survivors"),
        stage_windows=_ints(stage_windows, "--stage-windows"),
        time_limit_s=parse_duration(time_limit),
        fitness=fitness,
        scheme=scheme,
        dynamic=dynamic,
        database_inputs=database_inputs,
        rounds=rounds,
        sensitivity_span=sensitivity_span,
        seed=seed,
        start=read_start(start, kind) if start is not None else None,
        fitness_windows=fitness_windows,
        max_loss=loss,
        max_loss_confidence=max_loss_confidence,
        tune=tune,
        trials=trials,
        keep_database=keep_database,
    )
    report = search_pretrained(model, config, output, **options.job_options(ctx.params))
    if report.size is not None:  # what the save really wrote, beside what the search predicted (bytes)
        from lmcompress.search.joint import packed_size

        report.size["written"] = packed_size(output)
    if as_json:
        typer.echo(json_text(report.to_dict()))
        return
    base = ", ".join(f"{k} {v:.4f}" for k, v in report.baselines.items())
    what = {"sparsity": "average sparsity", "bits": "bits per weight with grids", "size": "predicted bytes"}[kind]
    what, digits = ("predicted seconds per token", 4) if decode is not None else (what, 0 if kind == "size" else 4)
    typer.echo(
        f"searched {len(report.history)} generations in {report.wall_time_s:.0f}s: KL {report.fitness:.4f} "
        f"(at the same budget: {base}); {what} {report.achieved:.{digits}f} → {output}"
    )
    if report.decode is not None:
        d = report.decode
        typer.echo(
            f"decode: budget {d['budget_s'] * 1e3:.3g} ms per token, predicted {d['predicted_s'] * 1e3:.3g} ms "
            f"({d['predicted_speedup']:.2f}x dense float32's {d['dense_s'] * 1e3:.3g} ms; threads {d['threads']}); "
            f"{report.size['written']} bytes written"
        )
    elif report.size is not None:
        size = report.size
        typer.echo(
            f"size: budget {size['budget']} bytes, predicted {size['predicted']}, written {size['written']} "
            f"({size['written'] / size['sixteen_bit']:.4f}x of 16-bit)"
        )
    if report.tuned:
        typer.echo(f"best OWL: M {report.tuned['owl_m']:.3g}, λ {report.tuned['owl_lambda']:.3g}")
    for step in report.bisection or []:
        verdict = "within" if step["within"] else "over"
        typer.echo(
            f"  sparsity {step['sparsity']:g}: perplexity {step['perplexity']:.4g} "
            f"(dense {step['dense_perplexity']:.4g}: {step['increase']:+.1%}, up to {step['upper_bound']:+.1%} at "
            f"confidence {step['confidence']:g}) {verdict} the allowed loss"
        )
    typer.echo("per unit: " + " ".join(s if isinstance(s, str) else f"{s:g}" for s in report.allocation))
    if scheme is not None:  # the fitness ran the candidates as the scheme: deploy the output the same way
        flags = f"--scheme {scheme}{' --dynamic' if dynamic else ''} --method rtn"
        typer.echo(f"next: lmcompress quantize {output} {flags} -o OUT  (what the fitness simulated)")
