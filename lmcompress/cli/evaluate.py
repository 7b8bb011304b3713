"""``lmcompress eval``."""

from __future__ import annotations

import json

import typer

from lmcompress.api import evaluate_pretrained
from lmcompress.cli import app, options


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="Model folder (dense or written by lmcompress) or hub id."),
    ppl_data: str = typer.Option(
        "wikitext2",
        "--ppl-data",
        help="Text file, wikitext2, c4, ptb, hf:NAME[...] or bundled:wikitext2-test.",
    ),
    seqlen: int = options.SEQLEN,
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quiet: bool = options.QUIET,
) -> None:
    """Perplexity (non-overlapping windows, mean token NLL) and measured sparsity of a model.

    Example: lmcompress eval opt-sgpt50 --ppl-data wikitext2 --json
    """
    result = evaluate_pretrained(
        model,
        ppl_data,
        seqlen=seqlen,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        progress=not quiet,
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        typer.echo(
            f"{model}: perplexity {result['perplexity']:.3f} on {result['tokens']} tokens "
            f"({result['windows']} windows of {result['seqlen']}), sparsity {result['sparsity']:.2%}"
        )
