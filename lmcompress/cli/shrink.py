"""``lmcompress shrink ffn|heads|blocks|sublayers``: structured removal of FFN channels, attention heads, whole
blocks or sublayers."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app
from lmcompress.errors import UserError

OWL = ("owl_m", "owl_lambda")
WIDTH = ("ratio", "correction", "allocation", "owl_m", "owl_lambda")  # FFN channels / heads only
DEPTH = ("count", "attention", "ffn", "generations", "swap_scans")  # blocks / sublayers only


def run_shrink(ctx: typer.Context, structure: str, model: str, output: str, **kw) -> None:
    """Check the options ``ctx`` was given against the chosen mode, then run the job and print what it did.

    Shared by ``shrink`` and the deprecated ``prune --structure ffn|heads``; ``kw`` holds the values of
    ``shrink``'s options by name.
    """
    from lmcompress.jobs import structured_prune_pretrained
    from lmcompress.transforms.shrink import StructureConfig

    if kw["allocation"] != "owl":
        options.refuse(ctx, OWL, "without --allocation owl")
    config = StructureConfig(
        structure,
        kw["ratio"],
        kw["criterion"],
        kw["correction"],
        kw["allocation"],
        kw["owl_m"],
        kw["owl_lambda"],
    )
    if not config.needs_calibration:
        options.refuse(
            ctx,
            options.CALIBRATION,
            "to --criterion magnitude without --correction or OWL: it reads no calibration data",
        )
    report = structured_prune_pretrained(
        model,
        config,
        output,
        **options.job_options(kw),
    )
    if kw["as_json"]:
        typer.echo(json_text(report.to_dict()))
    else:
        typer.echo(
            f"removed {config.structure} of {model} ({config.criterion}, correction {config.correction}): "
            f"{report.params_before:,} → {report.params_after:,} parameters in {report.wall_time_s:.1f}s → {output}"
        )
        for note in report.notes:
            typer.echo(f"note: {note}")


def run_depth(ctx: typer.Context, structure: str, model: str, output: str, **kw) -> None:
    """``shrink blocks`` / ``shrink sublayers``: check the options, run the job, print what it removed."""
    from lmcompress.jobs import depth_prune_pretrained
    from lmcompress.transforms.depth import DepthConfig

    target = structure.strip().lower()
    options.refuse(ctx, WIDTH, f"to shrink {target} (they are for ffn / heads)")
    if target == "blocks":
        options.refuse(ctx, ("attention", "ffn"), "to shrink blocks (use --count)")
        if kw["count"] is None:
            raise UserError("shrink blocks needs --count N (how many decoder blocks to remove)")
    else:
        options.refuse(ctx, ("count",), "to shrink sublayers (use --attention K and/or --ffn K)")
    criterion = kw["criterion"] or "cosine"
    if criterion != "search":
        options.refuse(ctx, ("generations", "swap_scans"), "without --criterion search")
    config = DepthConfig(
        target, kw["count"] or 0, kw["attention"], kw["ffn"], criterion, kw["generations"], swap_scans=kw["swap_scans"]
    )
    report = depth_prune_pretrained(model, config, output, **options.job_options(kw))
    if kw["as_json"]:
        typer.echo(json_text(report.to_dict()))
        return
    typer.echo(
        f"{model}: {report.blocks_before} → {report.blocks_after} blocks, {report.params_before:,} → "
        f"{report.params_after:,} parameters in {report.wall_time_s:.1f}s → {output}"
    )
    for part, indices in report.removed.items():
        if part == "ranking":
            continue
        key = "block" if part == "blocks" else part
        scored = ", ".join(f"{i} ({report.scores[key][i]:.4f})" for i in indices)
        typer.echo(f"removed {part}: {scored}")
    if report.search:
        s = report.search
        typer.echo(
            f"search: KL {s['start_kl']:.4f} (cosine ranking's drop set {s['start_drop']}) → {s['kl']:.4f} in "
            f"{s.get('swap_scans', 0)} swap scans + {s['generations']} generations, {s['search_time_s']:.1f}s"
        )
    for part, values in report.scores.items():
        typer.echo(f"influence ({part}, 1 − cos): " + " ".join(f"{i}:{v:.4f}" for i, v in enumerate(values)))
    for note in report.notes:
        typer.echo(f"note: {note}")


@app.command()
def shrink(
    ctx: typer.Context,
    structure: str = typer.Argument(
        ...,
        help="What to remove: ffn (FFN channels), heads, ffn,heads, blocks (whole decoder blocks) or sublayers "
        "(the attention / FFN of some blocks).",
    ),
    model: str = typer.Argument(..., help="Model folder or hub id (e.g. facebook/opt-125m)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the smaller model to (must not exist)."),
    ratio: float = typer.Option(0.3, "--ratio", help="Fraction of FFN channels / KV groups of heads removed, (0, 1)."),
    criterion: str | None = typer.Option(
        None,
        "--criterion",
        help="How units are scored: wanda | magnitude | fluctuation (default wanda; magnitude needs no calibration "
        "data). Blocks and sublayers: cosine (1 − cos of the residual stream before and after; the default).",
    ),
    correction: str = typer.Option(
        "none", "--correction", help="Refit the layer reading the kept units: none | bias | lstsq."
    ),
    allocation: str = typer.Option("uniform", "--allocation", help="uniform, or owl (ratio per block by outliers)."),
    owl_m: float = typer.Option(5.0, "--owl-m", help="With --allocation owl: outlier threshold M (× mean score)."),
    owl_lambda: float = typer.Option(0.08, "--owl-lambda", help="With --allocation owl: block ratios span 2λ."),
    count: int | None = typer.Option(None, "--count", help="blocks: how many whole decoder blocks to remove."),
    attention: int = typer.Option(0, "--attention", help="sublayers: how many blocks lose their attention."),
    ffn: int = typer.Option(0, "--ffn", help="sublayers: how many blocks lose their FFN."),
    generations: int = typer.Option(
        20, "--generations", help="blocks with --criterion search: generations of the evolutionary search."
    ),
    swap_scans: int = typer.Option(
        0,
        "--swap-scans",
        help="blocks with --criterion search: before the generations, up to this many descents by the best single "
        "swap (one dropped block kept, one kept block dropped; every swap scored).",
    ),
    calib_data: str = options.calib_data(),
    nsamples: int = options.NSAMPLES,
    seqlen: int = options.SEQLEN,
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
    """Remove whole FFN channels, attention heads, decoder blocks or sublayers, so the model really gets smaller.

    ffn / heads: every block in turn, the channels (or KV groups of heads) are scored on calibration windows,
    the lowest-scoring --ratio of them are cut out of the layers that write and read them, and --correction
    optionally refits the reading layer to the kept units. With one ratio for every block the result loads
    with plain `from_pretrained`; with --allocation owl it loads with `lmcompress.load` (and `lmcompress eval`).

    blocks: removes the --count decoder blocks whose output is most like their input (1 − cosine similarity,
    averaged over the calibration tokens: ShortGPT's block influence), or with --criterion search the drop set
    of lowest KL to the dense model found by an evolutionary search from that ranking (EvoPress); the result
    loads with plain `from_pretrained` and exports to GGUF. sublayers: skips the attention of --attention blocks
    and the FFN of --ffn blocks, chosen by cosine per sublayer (e.g. `shrink sublayers ./smollm2 --attention 4
    --ffn 2`); the result loads with `lmcompress.load`.

    Examples:

        lmcompress shrink ffn ./llama --ratio 0.3 --correction lstsq -o llama-ffn30

        lmcompress shrink ffn,heads ./llama --ratio 0.2 --allocation owl --calib-data wikitext2 -o llama-owl20

        lmcompress shrink blocks ./smollm2 --count 8 -o smollm2-22blocks
    """
    if "experts" in structure.lower():
        raise UserError(
            "shrink removes ffn channels or heads; experts are dropped by `lmcompress drop-experts --keep K`"
        )
    values = {k: v for k, v in locals().items() if k != "ctx"}
    if structure.strip().lower() in ("blocks", "sublayers"):
        run_depth(ctx, **values)
        return
    options.refuse(ctx, DEPTH, "to shrink ffn / heads (they are for shrink blocks and shrink sublayers)")
    values["criterion"] = criterion or "wanda"
    run_shrink(ctx, **{k: v for k, v in values.items() if k not in DEPTH})
