"""``lmcompress info``."""

from __future__ import annotations

import json

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


@app.command()
def info(
    ctx: typer.Context,
    folder: str = typer.Argument(..., help="Model folder (packed by lmcompress, or any safetensors HF folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    profile: bool = typer.Option(
        False,
        "--profile",
        help="Also load the model and report params, FLOPs/token and measured CPU latency/token, next to the "
        "recipe's dense source when that is a local folder.",
    ),
    seqlen: int = typer.Option(256, "--seqlen", help="With --profile: tokens in the timed forward window."),
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="With --profile: allow loading pickle (.bin) checkpoints you trust."
    ),
) -> None:
    """Size on disk by tensor kind, bits per weight, measured sparsity and the recipe of a model folder.

    Reads the folder's files only (no model is loaded) unless --profile is given: then the model is loaded
    and its parameters, FLOPs per token and measured latency are compared with its dense source's.

    Examples:

        lmcompress info llama-24-int4

        lmcompress info llama-ffn30 --profile --json
    """
    from lmcompress.checkpoint.inspect import KINDS, folder_info

    if not profile:
        options.refuse(ctx, ("seqlen", "allow_pickle"), "without --profile")
    result = folder_info(folder, trust_remote_code=trust_remote_code)
    if profile:
        from lmcompress.measure.profile import profile_pretrained

        result["profile"] = profile_pretrained(
            folder, seqlen=seqlen, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
    if as_json:
        typer.echo(json_text(result))
        return
    lin = result["linear"]
    typer.echo(f"{result['folder']} ({result['storage']} storage)")
    typer.echo(f"  weight files {_mib(result['weights_bytes'])}, folder {_mib(result['total_bytes'])}")
    for kind in KINDS:
        if result["by_kind"][kind]:
            typer.echo(f"    {kind:<11} {_mib(result['by_kind'][kind]):>14}")
    ratio = result["ratio_to_dense"]
    typer.echo(
        f"  {result['params']:,} parameters, {result['bits_per_param']:.3f} bits each "
        f"({ratio:.3f}× the same tensors stored dense)"
    )
    if lin["params"]:
        sparsity = "not measured" if lin["sparsity"] is None else f"{lin['sparsity']:.2%}"
        typer.echo(
            f"  linear layers: {lin['params']:,} weights, {lin['bits_per_weight']:.3f} bits per weight "
            f"(scales, masks and indices included), sparsity {sparsity}"
        )
        typer.echo("  layouts: " + ", ".join(f"{k} ×{v}" for k, v in sorted(lin["layouts"].items())))
        if lin.get("partial_groups"):
            typer.echo("  " + lin["partial_groups"]["text"])
    if result["recipe"]:
        typer.echo("  recipe: " + json.dumps(result["recipe"], default=str))
    if profile:
        from lmcompress.measure.profile import format_profile

        typer.echo(format_profile(result["profile"]))
