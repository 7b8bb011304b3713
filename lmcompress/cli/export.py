"""``lmcompress export``."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app
from lmcompress.errors import UserError

FORMATS = ("compressed-tensors", "gguf")


@app.command()
def export(
    folder: str = typer.Argument(..., help="A folder written by lmcompress (or, for gguf, any supported model)."),
    fmt: str = typer.Option("compressed-tensors", "--format", help="Export format: compressed-tensors or gguf."),
    output: str = typer.Option(..., "--output", "-o", help="Folder (compressed-tensors) or .gguf file to write."),
    qtype: str = typer.Option(
        "auto",
        "--type",
        help="gguf: type of the linear weights: auto (quantized codes as they are, dense as f16); a block type "
        "q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k (what is not already that type is "
        "re-quantized by round-to-nearest); a llama.cpp mix q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, q4_0_mix, "
        "q5_0_mix (each tensor, head and embedding included, on the type llama-quantize's mix gives it; "
        "written from the codes of `quantize --gguf-mix` of that mix); f16, bf16, f32.",
    ),
    embed_type: str = typer.Option(
        "auto",
        "--embed-type",
        help="gguf: type of the token embeddings and output head (auto: the mix's types with a mix, --type if "
        "q8_0 or a float, else f16).",
    ),
    overwrite: bool = options.OVERWRITE,
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    as_json: bool = typer.Option(False, "--json", help="Print the export summary as JSON."),
) -> None:
    """Export a compressed model: compressed-tensors (vLLM, transformers) or GGUF (llama.cpp).

    compressed-tensors needs pip install -e ".[export]"; sparse-only models cannot be exported (see
    docs/storage.md). GGUF (docs/gguf.md) covers llama, mistral, qwen2 and qwen3 models with byte-level BPE
    tokenizers: 4/5-bit symmetric / asymmetric and 8-bit symmetric quantization with groups of 32 (or a
    multiple) are written from their own codes as Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0, the K-quant grids as
    Q2_K … Q6_K, anything else is re-quantized or cast as --type says and the added error is reported.

    Examples:

        lmcompress export llama-gptq4 --format compressed-tensors -o llama-gptq4-ct

        lmcompress export llama-w8a8 --format compressed-tensors -o llama-w8a8-ct   # int-quantized, for vLLM

        lmcompress quantize ./smollm2 --method gptq --bits 4 --group-size 32 -o smol-q4

        lmcompress export smol-q4 --format gguf -o smol-q4_0.gguf

        lmcompress export ./smollm2 --format gguf --type f16 -o smollm2-f16.gguf

        lmcompress export smol-3bit --format gguf --type q4_0 --embed-type q8_0 -o smol-q4_0.gguf

        lmcompress quantize ./smollm2 --method gptq --gguf-mix q4_k_m -o smol-q4km

        lmcompress export smol-q4km --format gguf --type q4_k_m -o smol-Q4_K_M.gguf
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: choose {', '.join(FORMATS)}")
    if fmt == "gguf":
        from lmcompress.checkpoint.gguf_export import export_gguf

        summary = export_gguf(
            folder, output, qtype=qtype, embed_type=embed_type, overwrite=overwrite,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        )  # fmt: skip
        if as_json:
            typer.echo(json_text(summary))
            return
        types = ", ".join(f"{n} {k}" for k, n in sorted(summary["tensor_types"].items(), key=lambda kv: -kv[1]))
        lines = [f"exported {folder} as GGUF ({summary['architecture']}, {types}) → {summary['output']}"]
        lines.append(f"  {summary['bytes'] / 2**20:.1f} MiB, file type {summary['file_type']}")
        for key, what in (
            ("from_codes", "written from their own codes"),
            ("requantized", "re-quantized (round-to-nearest)"),
            ("cast_to_float", "cast to float"),
        ):
            s = summary[key]
            if s["tensors"]:
                lines.append(
                    f"  {s['tensors']} weights {what}: relative error max {s['max_rel_error']:.2e}, "
                    f"mean {s['mean_rel_error']:.2e}"
                )
        if summary["zeros_in_blocks"]:
            lines.append(f"  zeros kept: {summary['zeros_kept']} of {summary['zeros_in_blocks']}")
        lines += [f"  warning: {w}" for w in summary["warnings"]]
        typer.echo("\n".join(lines))
        return
    from lmcompress.checkpoint.export import export_compressed_tensors

    if qtype != "auto" or embed_type != "auto":
        raise UserError("--type and --embed-type apply to --format gguf only")
    summary = export_compressed_tensors(
        folder, output, overwrite=overwrite, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    if as_json:
        typer.echo(json_text(summary))
    else:
        scheme = f" ({summary['scheme']}: activations {summary['activations']})" if "scheme" in summary else ""
        typer.echo(
            f"exported {summary['quantized_layers']} quantized layers of {folder} as compressed-tensors "
            f"{summary['quantization_format']}{scheme} → {summary['output']}"
        )
