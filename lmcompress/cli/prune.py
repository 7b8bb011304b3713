"""``lmcompress prune``."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import app, options
from lmcompress.errors import UserError
from lmcompress.jobs import prune_pretrained
from lmcompress.transforms.prune import PruneConfig


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
    nsamples: int = options.NSAMPLES,
    seqlen: int = options.SEQLEN,
    seed: int = options.CALIB_SEED,
    percdamp: float = typer.Option(0.01, "--percdamp", help="SparseGPT dampening (fraction of mean diag H)."),
    blocksize: int = typer.Option(128, "--blocksize", help="SparseGPT column block size."),
    include_head: bool = typer.Option(False, "--include-head", help="Also prune the output head (lm_head)."),
    bits: int = typer.Option(None, "--bits", help="SparseGPT only: also quantize the kept weights (joint mode)."),
    group_size: int = typer.Option(128, "--group-size", help="With --bits: inputs per grid; -1: per channel."),
    sym: bool = typer.Option(True, "--sym/--asym", help="With --bits: symmetric or asymmetric grid."),
    structure: str = typer.Option(None, "--structure", help="Structured removal: ffn, heads, ffn,heads or experts."),
    ratio: float = typer.Option(
        None, "--ratio", help="--structure ffn/heads: fraction of channels/KV groups, (0,1) [default: 0.3]."
    ),
    criterion: str = typer.Option(
        None,
        "--criterion",
        help="--structure ffn/heads: wanda | magnitude | fluctuation; experts: frequency | router-weight | "
        "reconstruction.",
    ),
    correction: str = typer.Option("none", "--correction", help="--structure ffn/heads: none | bias | lstsq."),
    keep: int = typer.Option(None, "--keep", help="--structure experts: experts to keep in every MoE layer."),
    iterative: bool = typer.Option(False, "--iterative", help="--structure experts: drop one at a time, re-score."),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    overwrite: bool = options.OVERWRITE,
    save_format: str = typer.Option(
        "dense",
        "--save-format",
        help="dense: loads with plain from_pretrained, same size as the original. packed (recommended): zeros "
        "stored as a bitmask or N:M layout, ~0.56× the size at 50% sparsity; load with lmcompress.load or "
        "`lmcompress eval`, or convert with `lmcompress unpack`.",
    ),
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    as_json: bool = options.JSON,
    quiet: bool = options.QUIET,
) -> None:
    """Prune a model one-shot and save it so that `from_pretrained` loads it.

    Examples:

      lmcompress prune facebook/opt-125m --method sparsegpt --sparsity 0.5 -o opt-sgpt50

      lmcompress prune ./llama --method wanda --pattern 2:4 --calib-data c4 -o llama-24

      lmcompress prune ./llama --method wanda --sparsity 0.7 --allocation owl -o llama-owl70

      lmcompress prune ./llama --method sparsegpt --pattern 2:4 --bits 4 -o llama-24-w4   (joint, packed)

      lmcompress prune ./llama --structure ffn --ratio 0.3 --correction lstsq -o llama-ffn30   (smaller matrices)

      lmcompress prune ./mixtral --structure experts --keep 6 -o mixtral-6x
    """
    job = dict(
        calib_data=calib_data,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        progress=options.show_progress(quiet),
    )
    if structure is not None and structure.strip().lower() == "experts":
        from lmcompress.jobs import drop_experts_pretrained
        from lmcompress.transforms.experts import ExpertConfig

        if keep is None:
            raise UserError("--structure experts needs --keep N (experts to keep in every MoE layer)")
        ignored = [
            name
            for name, given in (
                ("--ratio", ratio is not None),
                ("--sparsity", sparsity is not None),
                ("--correction", correction != "none"),
                ("--allocation", allocation != "uniform"),
            )
            if given
        ]
        if ignored:
            raise UserError(
                f"not used by --structure experts: {', '.join(ignored)} (it takes --keep, --criterion, --iterative)"
            )
        econfig = ExpertConfig(keep=keep, criterion=criterion or "reconstruction", iterative=iterative)
        ereport = drop_experts_pretrained(model, econfig, output, **job)
        if as_json:
            typer.echo(json_text(ereport.to_dict()))
        else:
            typer.echo(
                f"kept {ereport.experts_after} of {ereport.experts_before} experts per layer of {model} "
                f"({econfig.criterion}{', iterative' if iterative else ''}): {ereport.params_before:,} → "
                f"{ereport.params_after:,} parameters in {ereport.wall_time_s:.1f}s → {output}"
            )
        return
    if structure is not None and structure.strip().lower() != "experts":
        from lmcompress.jobs import structured_prune_pretrained
        from lmcompress.transforms.shrink import StructureConfig

        if sparsity is not None or pattern.strip().lower() not in ("", "unstructured", "none"):
            raise UserError("--sparsity / --pattern are for weight pruning; with --structure give --ratio")
        if keep is not None or iterative:
            raise UserError("--keep / --iterative are for --structure experts; with --structure ffn/heads give --ratio")
        ratio = 0.3 if ratio is None else ratio
        sconfig = StructureConfig(structure, ratio, criterion or "wanda", correction, allocation, owl_m, owl_lambda)
        sreport = structured_prune_pretrained(model, sconfig, output, **job)
        if as_json:
            typer.echo(json_text(sreport.to_dict()))
        else:
            typer.echo(
                f"removed {sconfig.structure} of {model} ({sconfig.criterion}, correction {sconfig.correction}): "
                f"{sreport.params_before:,} → {sreport.params_after:,} parameters "
                f"in {sreport.wall_time_s:.1f}s → {output}"
            )
        return
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
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
    report = prune_pretrained(model, config, output, save_format=save_format, **job)
    if as_json:
        typer.echo(json_text(report.to_dict()))
    else:
        typer.echo(
            f"pruned {model} with {config.method} ({config.pattern}, {config.allocation}) to "
            f"{report.sparsity:.2%} sparsity in {report.wall_time_s:.1f}s → {output}"
        )
