"""``lmcompress sweep``."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app
from lmcompress.cli.evaluate import parse_lengths

PRUNE_HELP = "pruning (magnitude, wanda, sparsegpt)"
QUANT_HELP = "quantization (rtn, gptq)"
SHRINK_HELP = "structured shrinking (ffn, heads)"


@app.command()
def sweep(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Dense model folder or hub id."),
    output: str = typer.Option(..., "--output", "-o", help="Results folder (created; a rerun resumes it)."),
    methods: str = typer.Option(
        "magnitude,wanda,sparsegpt",
        "--methods",
        help=f"Comma-separated, any mix of {PRUNE_HELP}, {QUANT_HELP} and {SHRINK_HELP}; each kind sweeps its "
        "own axes.",
    ),
    allocation: str = typer.Option(
        "uniform", "--allocation", help="Pruning and structured: comma-separated uniform, owl."
    ),
    sparsities: str = typer.Option(
        "0.1:0.9:0.1", "--sparsities", help="Pruning: START:STOP:STEP (stop included) or a list."
    ),
    pattern: str = typer.Option(
        "unstructured",
        "--pattern",
        help="Pruning: comma-separated unstructured, 2:4, 4:8 ... (an N:M pattern fixes its own sparsity).",
    ),
    bits: str = typer.Option("8,4,3", "--bits", help="Quantization (rtn, gptq): comma-separated bit widths, 2-8."),
    group_size: int = typer.Option(
        128, "--group-size", help="Quantization: inputs sharing one scale (-1: one per output channel)."
    ),
    scheme: str = typer.Option(
        "none",
        "--scheme",
        help="Quantization: comma-separated none (weight-only, the --bits axis), w8a8, fp8: a scheme point is 8 bits "
        "per channel with its activations quantized as the exported scheme runs them.",
    ),
    dynamic: bool = typer.Option(
        False, "--dynamic", help="--scheme fp8: per-token activation scales (default: per tensor, calibrated)."
    ),
    smoothquant: str = typer.Option(
        "none", "--smoothquant", help="Scheme points: comma-separated SmoothQuant α in [0, 1], auto, none."
    ),
    ratios: str = typer.Option(
        "0.1:0.5:0.1",
        "--ratios",
        help="Structured (ffn, heads): fraction of FFN channels / KV head groups removed, START:STOP:STEP or a list.",
    ),
    tasks: str = typer.Option("ppl:wikitext2", "--tasks", help="What to measure at each point (as in `eval --tasks`)."),
    harness: str = typer.Option(None, "--harness", help="lm-evaluation-harness tasks at each point (needs lm-eval)."),
    limit: int = typer.Option(None, "--limit", help="At most N examples per task (N windows for ppl)."),
    shots: int = typer.Option(0, "--shots", help="Solved examples in qa prompts."),
    retrieval_lengths: str = typer.Option(None, "--retrieval-lengths", help="Retrieval prompt lengths, e.g. 128,256."),
    calib_data: str = typer.Option("c4", "--calib-data", help="Calibration text (as in `prune --calib-data`)."),
    nsamples: int = options.NSAMPLES,
    seqlen: int = options.SEQLEN,
    seed: int = options.CALIB_SEED,
    owl_m: float = typer.Option(5.0, "--owl-m", help="OWL outlier threshold M."),
    owl_lambda: float = typer.Option(0.08, "--owl-lambda", help="OWL spread λ."),
    percdamp: str = options.percdamp("SparseGPT / GPTQ"),
    blocksize: int = typer.Option(128, "--blocksize", help="SparseGPT / GPTQ column block size."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass when scoring choices."),
    agreement: bool = typer.Option(
        True,
        "--agreement/--no-agreement",
        help="KL divergence and top-1 agreement against the dense model on the first ppl task's windows (one more "
        "dense forward per window and point).",
    ),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard points made with other settings."),
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    as_json: bool = typer.Option(False, "--json", help="Print what ran as JSON."),
    quiet: bool = options.QUIET,
) -> None:
    """Compress and evaluate a grid of points (pruning, quantization, structured); each is saved as it finishes.

    The dense model is loaded and evaluated once; every point compresses a copy of it in memory, is saved
    once (as `prune`, `quantize` or `shrink` would save it) to record its size on disk, and is evaluated on
    --tasks. Each kind of method has its own axes: pruning sweeps --allocation × --pattern × --sparsities,
    quantization --bits (at --group-size), structured --allocation × --ratios. An option that none of the
    chosen methods uses is an error. A killed sweep resumes where it stopped when run again with the same
    settings; a second sweep into a folder that a sweep is writing is refused. Then `lmcompress report DIR`
    finds how far each method can go and plots quality against bytes on disk. --scheme w8a8 / fp8 adds
    weight-and-activation points (× --smoothquant), evaluated exactly as `quantize --scheme` then `eval` would.

    Examples:

        lmcompress sweep ./llama --sparsities 0.1:0.9:0.1 --tasks ppl:test.txt,retrieval --nsamples 32 -o res/llama

        lmcompress sweep ./llama --methods ffn,heads --ratios 0.1:0.5:0.1 -o res/shrink

        lmcompress sweep ./llama --methods sparsegpt,gptq --sparsities 0.5,0.75 --bits 4,2 -o res/equal-size
    """
    from lmcompress.measure.sweep import (
        WEIGHT_ONLY,
        SweepConfig,
        parse_bits,
        parse_levels,
        parse_smoothquant,
        parse_sparsities,
        run_sweep,
    )

    kinds = _check_axes(ctx, methods, allocation, pattern, scheme)
    schemes = [s.strip() for s in scheme.split(",") if s.strip()]
    config = SweepConfig(
        methods=methods.split(","),
        allocations=allocation.split(","),
        sparsities=parse_sparsities(sparsities) if "prune" in kinds else [],
        patterns=pattern.split(","),
        bits=parse_bits(bits) if "quant" in kinds and WEIGHT_ONLY in schemes else [],
        group_size=group_size,
        ratios=parse_levels(ratios, "ratios") if "shrink" in kinds else [],
        schemes=schemes,
        dynamic=dynamic,
        smoothquant=parse_smoothquant(smoothquant),
        tasks=tasks,
        harness=harness,
        limit=limit,
        shots=shots,
        retrieval_lengths=parse_lengths(retrieval_lengths),
        calib_data=calib_data,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        owl_m=owl_m,
        owl_lambda=owl_lambda,
        percdamp=percdamp,
        blocksize=blocksize,
        dtype=dtype,
        batch_size=batch_size,
        agreement=agreement,
    )
    result = run_sweep(
        model,
        config,
        output,
        device=device,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        progress=options.show_progress(quiet),
    )
    if as_json:
        typer.echo(json_text(result))
    else:
        typer.echo(
            f"sweep: ran {len(result['ran'])} points, {len(result['skipped'])} already done → {result['output']}\n"
            f"next: lmcompress report {result['output']}"
        )


def _check_axes(ctx: typer.Context, methods: str, allocation: str, pattern: str, scheme: str = "none") -> set[str]:
    """The kinds of the chosen methods; a UserError for every option given that none of them would use."""
    from lmcompress.measure.sweep import QUANT_METHODS, SHRINK_METHODS, WEIGHT_ONLY

    chosen = {m.strip() for m in methods.split(",") if m.strip()}
    kinds = {"quant" if m in QUANT_METHODS else "shrink" if m in SHRINK_METHODS else "prune" for m in chosen}
    if "prune" not in kinds:
        options.refuse(ctx, ("sparsities", "pattern"), f"without a {PRUNE_HELP} method in --methods")
    if "quant" not in kinds:
        options.refuse(
            ctx,
            ("bits", "group_size", "scheme", "dynamic", "smoothquant"),
            f"without a {QUANT_HELP} method in --methods",
        )
    elif WEIGHT_ONLY not in {s.strip() for s in scheme.split(",")}:
        options.refuse(
            ctx,
            ("bits", "group_size"),
            f"with --scheme {scheme} alone: a scheme quantizes weights to 8 bits per output channel; add none to "
            "--scheme to sweep weight-only --bits as well",
        )
    if "shrink" not in kinds:
        options.refuse(ctx, ("ratios",), f"without a {SHRINK_HELP} method in --methods")
    if kinds == {"quant"}:
        options.refuse(ctx, ("allocation",), "to quantization: it uses --bits and --group-size")
    patterns = {p.strip() for p in pattern.split(",") if p.strip()}
    if "unstructured" not in patterns:
        options.refuse(
            ctx,
            ("sparsities",),
            f"with --pattern {pattern} alone: an N:M pattern fixes its own sparsity (2:4 is 50%); "
            "add unstructured to --pattern to sweep --sparsities as well",
        )
    if "owl" not in {a.strip() for a in allocation.split(",")}:
        options.refuse(ctx, ("owl_m", "owl_lambda"), "without owl in --allocation")
    if not chosen & {"sparsegpt", "gptq"}:
        options.refuse(
            ctx, ("percdamp", "blocksize"), "without sparsegpt or gptq in --methods: they are their solver's options"
        )
    return kinds
