"""``lmcompress prune``: weight pruning (unstructured, N:M, OWL; joint with quantization via ``--bits``)."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app
from lmcompress.errors import UserError

# The options of weight pruning itself, and those only kept for the deprecated `prune --structure ...`.
WEIGHT = (
    "method", "sparsity", "pattern", "percdamp", "blocksize", "include_head", "bits", "group_size", "sym", "in_block",
    "head_bits", "head_group_size",
)  # fmt: skip
SHRINK = ("ratio", "criterion", "correction")
EXPERTS = ("keep", "criterion", "iterative")
DEPRECATED_HELP = "ffn, heads or experts: deprecated spellings of `lmcompress shrink` and `lmcompress drop-experts`."


@app.command()
def prune(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder or hub id (e.g. facebook/opt-125m)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the pruned model to (must not exist)."),
    method: str = typer.Option("wanda", "--method", help="magnitude (no data) | wanda | sparsegpt."),
    sparsity: float = typer.Option(None, "--sparsity", help="Fraction of weights to remove, in [0, 1) [default: 0.5]."),
    pattern: str = typer.Option("unstructured", "--pattern", help="unstructured, or N:M such as 2:4 or 4:8."),
    allocation: str = typer.Option(
        "uniform",
        "--allocation",
        help="uniform; owl (outlier-weighted per block); or FILE.json: per-layer sparsities, e.g. the search.json "
        "(or output folder) of `lmcompress search`.",
    ),
    owl_m: float = typer.Option(5.0, "--owl-m", help="With --allocation owl: outlier threshold M (× mean score)."),
    owl_lambda: float = typer.Option(0.08, "--owl-lambda", help="With --allocation owl: block sparsities span 2λ."),
    calib_data: str = options.calib_data(),
    nsamples: int = options.NSAMPLES,
    seqlen: int = options.SEQLEN,
    seed: int = options.CALIB_SEED,
    percdamp: str = options.percdamp("SparseGPT"),
    blocksize: int = typer.Option(128, "--blocksize", help="SparseGPT: column block size."),
    include_head: bool = typer.Option(False, "--include-head", help="Also prune the output head (lm_head)."),
    head_bits: int = typer.Option(
        None,
        "--head-bits",
        help="Quantize the output head (lm_head) to this many bits without pruning it (8: the int8 CPU kernel runs "
        "it): by GPTQ on the calibration windows (by RTN with --method magnitude); saved packed.",
    ),
    head_group_size: int = typer.Option(
        -1, "--head-group-size", help="With --head-bits: the head's inputs per grid (-1: per channel)."
    ),
    in_block: str = options.IN_BLOCK,
    bits: int = typer.Option(None, "--bits", help="SparseGPT: also quantize the kept weights (joint, saved packed)."),
    group_size: int = typer.Option(128, "--group-size", help="With --bits: inputs per grid; -1: per channel."),
    sym: bool = typer.Option(True, "--sym/--asym", help="With --bits: symmetric or asymmetric grid."),
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
    offload: str = options.OFFLOAD,
    resume: bool = options.RESUME,
    as_json: bool = options.JSON,
    quiet: bool = options.QUIET,
    structure: str = typer.Option(None, "--structure", help=DEPRECATED_HELP, rich_help_panel="Deprecated"),
    ratio: float = typer.Option(None, "--ratio", hidden=True),
    criterion: str = typer.Option(None, "--criterion", hidden=True),
    correction: str = typer.Option("none", "--correction", hidden=True),
    keep: int = typer.Option(None, "--keep", hidden=True),
    iterative: bool = typer.Option(False, "--iterative", hidden=True),
) -> None:
    """Set the least important weights of every block's linear layers to zero (the shapes stay the same).

    Magnitude needs no data; Wanda scores |weight| × input norm on calibration windows; SparseGPT also
    updates the kept weights to make up for the removed ones, and with --bits quantizes them in the same
    pass. --pattern 2:4 gives the N:M layout sparse GPU kernels use; --allocation owl gives blocks with
    more outlier features less sparsity. --head-bits 8 quantizes the output head without pruning it (the
    model is then saved packed). To remove whole channels or heads use `lmcompress shrink`, for
    mixture-of-experts models `lmcompress drop-experts`.

    Examples:

        lmcompress prune facebook/opt-125m --method sparsegpt --sparsity 0.5 --save-format packed -o opt-sgpt50

        lmcompress prune ./llama --method sparsegpt --sparsity 0.7 --allocation owl --bits 4 --head-bits 8 -o llama-w4

        lmcompress prune ./llama --method sparsegpt --allocation llama-evo70/search.json -o llama-evo70-again
    """
    from lmcompress.jobs import prune_pretrained
    from lmcompress.transforms.prune import PruneConfig, read_allocation

    if structure is not None:
        _deprecated_structure(ctx, structure, locals())
        return
    options.refuse(
        ctx,
        ("ratio", "criterion", "correction", "keep", "iterative"),
        "to weight pruning: channels and heads are removed by `lmcompress shrink ffn|heads` (--ratio, "
        "--criterion, --correction), experts by `lmcompress drop-experts` (--keep, --criterion, --iterative)",
    )
    if allocation != "owl":
        options.refuse(ctx, ("owl_m", "owl_lambda"), "without --allocation owl")
    if method != "sparsegpt":
        options.refuse(ctx, ("percdamp", "blocksize"), f"to --method {method}: they are SparseGPT options")
    if bits is None:
        options.refuse(ctx, ("group_size", "sym"), "without --bits (joint pruning + quantization)")
    elif save_format != "packed":
        options.refuse(ctx, ("save_format",), "with --bits: joint pruning + quantization always saves packed")
    if head_bits is None:
        options.refuse(ctx, ("head_group_size",), "without --head-bits (quantizing the output head)")
    elif save_format != "packed":
        options.refuse(ctx, ("save_format",), "with --head-bits: the quantized head is always saved packed")
    layer_targets = None
    if allocation not in ("uniform", "owl"):
        if sparsity is not None:
            raise UserError("--sparsity does not apply with an allocation file: its per-layer sparsities set it")
        layer_targets, allocation = read_allocation(allocation), "layers"
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
        head_bits=head_bits,
        head_group_size=head_group_size,
        bits=bits,
        group_size=group_size,
        sym=sym,
        layer_targets=layer_targets,
        in_block=in_block,
    )
    if not config.needs_calibration:
        options.refuse(ctx, (*options.CALIBRATION, "in_block"), f"to --method {method}: it reads no calibration data")
    report = prune_pretrained(
        model,
        config,
        output,
        save_format=save_format,
        **options.job_options(ctx.params),
    )
    if as_json:
        typer.echo(json_text(report.to_dict()))
    else:
        head = report.head_quantization
        head = "" if head is None else f"; head quantized to {head['bits']} bits by {head['method']}"
        typer.echo(
            f"pruned {model} with {config.method} ({config.pattern}, {config.allocation}) to "
            f"{report.sparsity:.2%} sparsity{head} in {report.wall_time_s:.1f}s → {output}"
        )


def _deprecated_structure(ctx: typer.Context, structure: str, values: dict) -> None:
    """``prune --structure ffn|heads|experts``: warn, refuse the options of weight pruning, run the new verb."""
    from lmcompress.cli.experts import run_drop_experts
    from lmcompress.cli.shrink import run_shrink

    kind = structure.strip().lower()
    verb = "drop-experts" if kind == "experts" else f"shrink {kind}"
    typer.secho(
        f"warning: `prune --structure {structure}` is deprecated and will be removed; use `lmcompress {verb}` "
        "(same options)",
        err=True,
        fg=typer.colors.YELLOW,
    )
    common = ("model", "output", "calib_data", "nsamples", "seqlen", "seed", "device", "dtype", "overwrite")
    common += ("trust_remote_code", "allow_pickle", "as_json", "quiet")
    kw = {k: values[k] for k in common}
    if kind == "experts":
        options.refuse(
            ctx,
            (*WEIGHT, "save_format", "allocation", "owl_m", "owl_lambda", "ratio", "correction", "offload", "resume"),
            "to dropping experts (`lmcompress drop-experts` takes --keep, --criterion, --iterative)",
        )
        if values["keep"] is None:
            raise UserError("dropping experts needs --keep N (experts to keep in every MoE layer)")
        criterion = values["criterion"] or "reconstruction"
        run_drop_experts(ctx, **kw, keep=values["keep"], criterion=criterion, iterative=values["iterative"], step=1)
        return
    options.refuse(
        ctx,
        (*WEIGHT, "save_format", "keep", "iterative", "offload", "resume"),
        f"to removing {kind} (`lmcompress shrink {kind}` takes --ratio, --criterion, --correction, --allocation)",
    )
    shrink = {k: values[k] for k in ("allocation", "owl_m", "owl_lambda", "correction")}
    ratio = 0.3 if values["ratio"] is None else values["ratio"]
    run_shrink(ctx, structure, **kw, **shrink, ratio=ratio, criterion=values["criterion"] or "wanda")
