"""``lmcompress shrink ffn|heads``: structured removal of FFN channels or attention heads."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app
from lmcompress.errors import UserError

OWL = ("owl_m", "owl_lambda")


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


@app.command()
def shrink(
    ctx: typer.Context,
    structure: str = typer.Argument(..., help="What to remove: ffn (FFN channels), heads, or ffn,heads."),
    model: str = typer.Argument(..., help="Model folder or hub id (e.g. facebook/opt-125m)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the smaller model to (must not exist)."),
    ratio: float = typer.Option(0.3, "--ratio", help="Fraction of FFN channels / KV groups of heads removed, (0, 1)."),
    criterion: str = typer.Option(
        "wanda",
        "--criterion",
        help="How units are scored: wanda | magnitude | fluctuation (magnitude needs no calibration data).",
    ),
    correction: str = typer.Option(
        "none", "--correction", help="Refit the layer reading the kept units: none | bias | lstsq."
    ),
    allocation: str = typer.Option("uniform", "--allocation", help="uniform, or owl (ratio per block by outliers)."),
    owl_m: float = typer.Option(5.0, "--owl-m", help="With --allocation owl: outlier threshold M (× mean score)."),
    owl_lambda: float = typer.Option(0.08, "--owl-lambda", help="With --allocation owl: block ratios span 2λ."),
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
    """Remove whole FFN channels or attention heads, so the matrices really get smaller.

    Every block in turn: the channels (or KV groups of heads) are scored on calibration windows, the
    lowest-scoring --ratio of them are cut out of the layers that write and read them, and --correction
    optionally refits the reading layer to the kept units. With one ratio for every block the result loads
    with plain `from_pretrained`; with --allocation owl it loads with `lmcompress.load` (and `lmcompress eval`).

    Examples:

        lmcompress shrink ffn ./llama --ratio 0.3 --correction lstsq -o llama-ffn30

        lmcompress shrink heads ./qwen --ratio 0.25 --criterion fluctuation -o qwen-heads25

        lmcompress shrink ffn,heads ./llama --ratio 0.2 --allocation owl --calib-data wikitext2 -o llama-owl20
    """
    if "experts" in structure.lower():
        raise UserError(
            "shrink removes ffn channels or heads; experts are dropped by `lmcompress drop-experts --keep K`"
        )
    run_shrink(ctx, **{k: v for k, v in locals().items() if k != "ctx"})
