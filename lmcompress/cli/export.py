"""``lmcompress export``."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import app, options
from lmcompress.errors import UserError


@app.command()
def export(
    folder: str = typer.Argument(..., help="A quantized folder written by lmcompress."),
    fmt: str = typer.Option("compressed-tensors", "--format", help="Export format: compressed-tensors."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write (must not exist)."),
    overwrite: bool = options.OVERWRITE,
    as_json: bool = typer.Option(False, "--json", help="Print the export summary as JSON."),
) -> None:
    """Export a quantized model in the compressed-tensors format that vLLM and transformers load.

    Needs the optional dependency: pip install 'lmcompress[export]'. Sparse-only models cannot be exported
    (compressed-tensors 0.20 has no sparse formats); see docs/storage.md.

    Examples:

        lmcompress export llama-gptq4 --format compressed-tensors -o llama-gptq4-ct

        lmcompress quantize ./llama --method gptq --bits 4 -o llama-gptq4 && lmcompress export llama-gptq4 -o ct
    """
    from lmcompress.checkpoint.export import FORMATS, export_compressed_tensors

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: choose {', '.join(FORMATS)}")
    summary = export_compressed_tensors(folder, output, overwrite=overwrite)
    if as_json:
        typer.echo(json_text(summary))
    else:
        typer.echo(
            f"exported {summary['quantized_layers']} quantized layers of {folder} as compressed-tensors "
            f"pack-quantized → {summary['output']}"
        )
