"""``lmcompress drop-experts``: keep K experts in every mixture-of-experts layer."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app


def run_drop_experts(ctx: typer.Context, model: str, output: str, **kw) -> None:
    """Check the options ``ctx`` was given, run the job and print what it did.

    Shared by ``drop-experts`` and the deprecated ``prune --structure experts``; ``kw`` holds the values of
    ``drop-experts``'s options by name.
    """
    from lmcompress.jobs import drop_experts_pretrained
    from lmcompress.transforms.experts import ExpertConfig

    if not kw["iterative"]:
        options.refuse(ctx, ("step",), "without --iterative")
    config = ExpertConfig(keep=kw["keep"], criterion=kw["criterion"], iterative=kw["iterative"], step=kw["step"])
    report = drop_experts_pretrained(
        model,
        config,
        output,
        **options.job_options(kw),
    )
    if kw["as_json"]:
        typer.echo(json_text(report.to_dict()))
    else:
        typer.echo(
            f"kept {report.experts_after} of {report.experts_before} experts per layer of {model} "
            f"({config.criterion}{', iterative' if config.iterative else ''}): {report.params_before:,} → "
            f"{report.params_after:,} parameters in {report.wall_time_s:.1f}s → {output}"
        )


@app.command("drop-experts")
def drop_experts(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Mixture-of-experts model folder or hub id (Mixtral, Qwen-MoE, ...)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the smaller model to (must not exist)."),
    keep: int = typer.Option(..., "--keep", help="Experts to keep in every MoE layer (at least the router's top-k)."),
    criterion: str = typer.Option(
        "reconstruction",
        "--criterion",
        help="How experts are scored: frequency | router-weight | reconstruction (reconstruction: least change of "
        "the layer output).",
    ),
    iterative: bool = typer.Option(False, "--iterative", help="Drop --step experts at a time, re-scoring the rest."),
    step: int = typer.Option(1, "--step", help="With --iterative: experts dropped per round."),
    calib_data: str = options.calib_data("Calibration text (routing is measured on it)"),
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
    """Keep the K most useful experts in every mixture-of-experts layer and drop the rest.

    Every MoE layer in turn: its experts are scored on the calibration windows (how often the router picks
    them, how much routing weight they get, or how little the layer's output changes without them), the
    lowest-scoring ones are removed together with their router rows, and the config's expert count is
    updated, so the result loads with plain `from_pretrained`.

    Examples:

        lmcompress drop-experts ./mixtral --keep 6 -o mixtral-6x

        lmcompress drop-experts ./qwen-moe --keep 40 --criterion frequency --calib-data wikitext2 -o qwen-moe-40

        lmcompress drop-experts ./mixtral --keep 4 --iterative --step 2 -o mixtral-4x
    """
    run_drop_experts(ctx, **{k: v for k, v in locals().items() if k != "ctx"})


# ---- merge-experts (MC-SMoE) ---------------------------------------------------------------------------------


@app.command("merge-experts")
def merge_experts(
    model: str = typer.Argument(..., help="Mixture-of-experts model folder or hub id (Mixtral, Qwen-MoE, OLMoE)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the merged model to (must not exist)."),
    keep: int = typer.Option(..., "--keep", help="Experts left in every MoE layer (fewer than it has, ≥ top-k)."),
    align: bool = typer.Option(
        False, "--align", help="Permute each expert's neurons to match its dominant expert's before averaging."
    ),
    refit: bool = typer.Option(
        False,
        "--refit",
        help="Then refit the merged experts' down_proj by least squares on the calibration tokens (beyond MC-SMoE).",
    ),
    calib_data: str = options.calib_data("Calibration text (routing is measured on it)"),
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
    """Merge the experts of every mixture-of-experts layer down to K (MC-SMoE: merge, do not drop).

    Every MoE layer in turn, on the calibration windows: the K experts the router picks most often are the
    dominant ones; every other expert joins the dominant expert whose router logits over the calibration
    tokens are most similar (cosine); each group becomes one expert, the average of its members' weights
    weighted by how often each is routed to (with --align, after permuting each member's neurons to match the
    dominant expert's). The router keeps the dominant experts' rows; the result loads with `from_pretrained`.
    --refit (not part of MC-SMoE) then fits each merged expert's down projection so that the layer's output on
    the calibration tokens matches the unmerged layer's (damped least squares).

    Examples:

        lmcompress merge-experts ./mixtral --keep 4 -o mixtral-merged-4x

        lmcompress merge-experts ./olmoe --keep 32 --align --refit --calib-data wikitext2 -o olmoe-32
    """
    from lmcompress.jobs import run_job
    from lmcompress.transforms.merge import MergeConfig
    from lmcompress.transforms.merge import merge_experts as merge

    config = MergeConfig(keep=keep, align=align, refit=refit)
    report = run_job(
        "merge-experts",
        model,
        config,
        output,
        merge,
        check_source=lambda cfg, _recipe: config.check_model(cfg),
        **options.job_options(locals()),
    )
    if as_json:
        typer.echo(json_text(report.to_dict()))
    else:
        typer.echo(
            f"merged {report.experts_before} experts into {report.experts_after} per layer of {model}"
            f"{' (aligned)' if align else ''}{' (refit)' if refit else ''}: {report.params_before:,} → "
            f"{report.params_after:,} parameters "
            f"in {report.wall_time_s:.1f}s → {output}"
        )
