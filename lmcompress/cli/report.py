"""``lmcompress report``."""

from __future__ import annotations

import typer

from lmcompress.cli.app import app


@app.command()
def report(
    results: str = typer.Argument(..., help="A folder written by `lmcompress sweep` or `lmcompress search`."),
    tolerance: float = typer.Option(
        0.01, "--tolerance", help="Degradation still counted as safe, relative to dense (0.01 = 1%)."
    ),
) -> None:
    """Write RESULTS/report.md, a self-contained RESULTS/report.html and PNG plots from a sweep or a search.

    Per method and metric: the essential sparsity (largest sparsity, or ratio removed, within --tolerance of
    dense; for quantization the lowest bit width) and the knee (where the curve bends down fastest), said in
    words. Every metric is plotted against the level and against the size on disk of every point, with 95%
    intervals where the sweep recorded them, and the report says which differences are within the noise
    (perplexity: paired over the shared windows). For a search: its fitness per generation against uniform
    and OWL, and the sparsity it chose for every block or layer.

    Examples:

        lmcompress report results/llama

        lmcompress report results/llama --tolerance 0.02
    """
    from lmcompress.measure.report import write_report

    out = write_report(results, tolerance=tolerance)
    for sentence in out["sentences"]:
        typer.echo(sentence)
    within = [s for s in out.get("noise", []) if "less than the noise" in s]
    if within:
        typer.echo(f"{len(within)} comparisons differ by less than the noise (see the report), e.g. {within[0]}")
    typer.echo(f"wrote {out['markdown']}, {out['html']} and {len(out['plots'])} plots")
