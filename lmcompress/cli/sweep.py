"""``lmcompress sweep``."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import app, options
from lmcompress.cli.evaluate import parse_lengths


@app.command()
def sweep(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Dense model folder or hub id."),
    output: str = typer.Option(..., "--output", "-o", help="Results folder (created; a rerun resumes it)."),
    methods: str = typer.Option("magnitude,wanda,sparsegpt", "--methods", help="Comma-separated pruning methods."),
    allocation: str = typer.Option("uniform", "--allocation", help="Comma-separated: uniform, owl."),
    sparsities: str = typer.Option("0.1:0.9:0.1", "--sparsities", help="START:STOP:STEP (stop included) or a list."),
    pattern: str = typer.Option("unstructured", "--pattern", help="Comma-separated: unstructured, 2:4, 4:8 ..."),
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
    percdamp: float = typer.Option(0.01, "--percdamp", help="SparseGPT dampening."),
    blocksize: int = typer.Option(128, "--blocksize", help="SparseGPT column block size."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass when scoring choices."),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard points made with other settings."),
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    as_json: bool = typer.Option(False, "--json", help="Print what ran as JSON."),
    quiet: bool = options.QUIET,
) -> None:
    """Prune and evaluate a grid of methods × allocations × patterns × sparsities; each point is saved as it finishes.

    The dense model is loaded and evaluated once; every point prunes a copy of it in memory and is
    evaluated on --tasks. A killed sweep resumes where it stopped when run again with the same settings.
    Then `lmcompress report DIR` finds how far each method can go before quality drops.

    Examples:

        lmcompress sweep ./llama --sparsities 0.1:0.9:0.1 --tasks ppl:test.txt,retrieval --nsamples 32 -o res/llama

        lmcompress sweep ./llama --methods wanda,sparsegpt --allocation uniform,owl --sparsities 0.5,0.6,0.7 -o res/owl

        lmcompress sweep ./llama --methods magnitude,wanda --pattern 2:4,4:8 --tasks mc:arc_easy --limit 200 -o res/nm
    """
    from lmcompress.measure.sweep import SweepConfig, parse_sparsities, run_sweep

    method_list = {m.strip() for m in methods.split(",")}
    if "owl" not in {a.strip() for a in allocation.split(",")}:
        options.refuse(ctx, ("owl_m", "owl_lambda"), "without owl in --allocation")
    if "sparsegpt" not in method_list:
        options.refuse(ctx, ("percdamp", "blocksize"), "without sparsegpt in --methods: they are SparseGPT options")
    config = SweepConfig(
        methods=methods.split(","),
        allocations=allocation.split(","),
        sparsities=parse_sparsities(sparsities),
        patterns=pattern.split(","),
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
