"""``lmcompress factorize``."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app


@app.command()
def factorize(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder or hub id (e.g. facebook/opt-125m)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the factorized model to (must not exist)."),
    rank_policy: str = typer.Option(
        "energy:0.9",
        "--rank-policy",
        help="energy:F (keep fraction F of Σσ² per layer), auto[:P] (one threshold on σ/σ₁ for all layers, "
        "saving a fraction P of the block linear parameters; default 0.3), or rank:N.",
    ),
    activation_aware: bool = typer.Option(
        False, "--activation-aware", help="Whiten each layer by its calibration inputs before the SVD."
    ),
    whitening: str = typer.Option(
        "cholesky", "--whitening", help="With --activation-aware: cholesky (full XᵀX) or diag (per-input RMS)."
    ),
    damp: float = typer.Option(0.01, "--damp", help="Cholesky dampening (fraction of the mean diagonal of XᵀX)."),
    calib_data: str = typer.Option(
        "c4",
        "--calib-data",
        help="With --activation-aware: text file, wikitext2, c4, ptb, hf:NAME[:CONFIG][@SPLIT], bundled:NAME.",
    ),
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
    """Replace block linear layers by low-rank factors where that saves parameters.

    Each weight W (out × in) is replaced by two layers B·A of rank r, the truncated SVD, where r·(out + in) is
    smaller than out·in; --rank-policy picks r from each layer's singular values. --activation-aware first
    whitens W by the calibration inputs X, so the SVD minimises the error of the outputs ‖(W − BA)X‖ instead
    of ‖W − BA‖. The output loads with `lmcompress.load` (and `lmcompress eval`), not plain `from_pretrained`.

    Examples:

        lmcompress factorize ./llama --rank-policy energy:0.9 -o llama-lr90

        lmcompress factorize ./llama --rank-policy auto:0.3 --activation-aware --calib-data wikitext2 -o llama-lr-auto

        lmcompress factorize ./opt --rank-policy rank:64 -o opt-r64
    """
    from lmcompress.jobs import factorize_pretrained
    from lmcompress.transforms.factorize import FactorizeConfig

    if not activation_aware:
        options.refuse(ctx, ("whitening", "damp", *options.CALIBRATION), "without --activation-aware")
    elif whitening != "cholesky":
        options.refuse(ctx, ("damp",), f"to --whitening {whitening}: it dampens the Cholesky factorization")
    config = FactorizeConfig(rank_policy=rank_policy, activation_aware=activation_aware, whitening=whitening, damp=damp)
    report = factorize_pretrained(
        model,
        config,
        output,
        **options.job_options(ctx.params),
    )
    if as_json:
        typer.echo(json_text(report.to_dict()))
    else:
        done = sum(r.factorized for r in report.layers.values())
        typer.echo(
            f"factorized {done} of {len(report.layers)} block linear layers of {model} ({config.rank_policy}"
            f"{', activation-aware' if activation_aware else ''}): {report.params_before:,} → "
            f"{report.params_after:,} parameters in {report.wall_time_s:.1f}s → {output}"
        )
        for note in report.notes:
            typer.echo(f"note: {note}")
