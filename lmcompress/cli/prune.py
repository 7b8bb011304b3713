"""``lmcompress prune``."""

from __future__ import annotations

import json

import typer

from lmcompress.api import prune_pretrained
from lmcompress.cli import app, options
from lmcompress.config import PruneConfig


@app.command()
def prune(
    model: str = typer.Argument(..., help="Model folder or hub id (e.g. facebook/opt-125m)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the pruned model to (must not exist)."),
    method: str = typer.Option("wanda", "--method", help="magnitude | wanda | sparsegpt."),
    sparsity: float = typer.Option(None, "--sparsity", help="Fraction of weights to remove, in [0, 1)."),
    pattern: str = typer.Option("unstructured", "--pattern", help="unstructured, or N:M such as 2:4 or 4:8."),
    allocation: str = typer.Option("uniform", "--allocation", help="uniform, or owl (outlier-weighted per block)."),
    owl_m: float = typer.Option(5.0, "--owl-m", help="OWL outlier threshold M (× the block's mean score)."),
    owl_lambda: float = typer.Option(0.08, "--owl-lambda", help="OWL spread λ: block sparsities span 2λ."),
    calib_data: str = typer.Option(
        "c4",
        "--calib-data",
        help="Text file, wikitext2, c4, ptb, hf:NAME[:CONFIG][@SPLIT] or bundled:wikitext2-valid.",
    ),
    nsamples: int = typer.Option(128, "--nsamples", help="Number of calibration windows."),
    seqlen: int = options.SEQLEN,
    seed: int = typer.Option(0, "--seed", help="Seed for drawing calibration windows."),
    percdamp: float = typer.Option(0.01, "--percdamp", help="SparseGPT dampening (fraction of mean diag H)."),
    blocksize: int = typer.Option(128, "--blocksize", help="SparseGPT column block size."),
    include_head: bool = typer.Option(False, "--include-head", help="Also prune the output head (lm_head)."),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = options.QUIET,
) -> None:
    """Prune a model one-shot and save it so that `from_pretrained` loads it.

    Examples:

      lmcompress prune facebook/opt-125m --method sparsegpt --sparsity 0.5 -o opt-sgpt50

      lmcompress prune ./llama --method wanda --pattern 2:4 --calib-data c4 -o llama-24

      lmcompress prune ./llama --method wanda --sparsity 0.7 --allocation owl -o llama-owl70
    """
    if sparsity is None and pattern.strip().lower() in ("", "unstructured", "none"):
        sparsity = 0.5
    config = PruneConfig(
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        allocation=allocation,
        owl_m=owl_m,
        owl_lambda=owl_lambda,
        percdamp=percdamp,
        blocksize=blocksize,
        include_head=include_head,
    )
    report = prune_pretrained(
        model,
        config,
        output,
        calib_data=calib_data,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        progress=not quiet,
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(
            f"pruned {model} with {config.method} ({config.pattern}, {config.allocation}) to "
            f"{report.sparsity:.2%} sparsity in {report.wall_time_s:.1f}s → {output}"
        )
