"""``lmcompress unpack``."""

from __future__ import annotations

import typer

from lmcompress.cli import options
from lmcompress.cli.app import app


@app.command()
def unpack(
    folder: str = typer.Argument(..., help="A packed folder written by lmcompress, or a .gguf file."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for the plain (dense) copy; must not exist."),
    overwrite: bool = options.OVERWRITE,
    trust_remote_code: bool = options.TRUST,
) -> None:
    """Write a packed model out as a plain folder that `AutoModelForCausalLM.from_pretrained` loads.

    The copy is as large as the uncompressed model (quantized weights are stored dequantized). A GGUF file
    (llama.cpp) becomes a float32 folder with its tokenizer and a recipe naming the file.

    Examples: lmcompress unpack llama-sgpt50-packed -o llama-sgpt50-dense;
    lmcompress unpack SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2
    """
    from lmcompress.checkpoint.save import unpack_folder

    out = unpack_folder(folder, output, overwrite=overwrite, trust_remote_code=trust_remote_code)
    typer.echo(f"unpacked {folder} → {out}")
