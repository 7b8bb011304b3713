"""``lmcompress quantize``."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import options
from lmcompress.cli.app import app


@app.command()
def quantize(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder or hub id (e.g. facebook/opt-125m), dense or pruned."),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write the quantized model to (must not exist)."),
    method: str = typer.Option("gptq", "--method", help="rtn (round to nearest, no data) | gptq (calibrated)."),
    bits: int = typer.Option(4, "--bits", help="Bits per weight: 2, 3, 4 or 8 (any of 2..8 works)."),
    group_size: int = typer.Option(128, "--group-size", help="Inputs sharing one scale/zero point; -1: per channel."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric grid (zero point in the middle) or asymmetric."),
    grid: str = typer.Option(
        "minmax",
        "--grid",
        help="How a group's scale is chosen. minmax: from its range (sym: 2·max|w|/(2^bits−1)). q4_0: llama.cpp's "
        "Q4_0 (4-bit sym only): d = the group's signed extreme / −8, fp16 scales; with --group-size 32 RTN gives "
        "llama.cpp's own codes, and `export --format gguf` writes them as Q4_0 unchanged. q4_1 (4-bit asym), q5_0 "
        "(5-bit sym), q5_1 (5-bit asym), q8_0 (8-bit sym): llama.cpp's Q4_1 / Q5_0 / Q5_1 / Q8_0 likewise. q2_k, "
        "q3_k, q4_k, q5_k, q6_k: llama.cpp's K-quant blocks (Q4_K: --bits 4 --group-size 32 --asym; see "
        "docs/gguf.md), grid fixed before GPTQ; layers must read a multiple of 256 inputs.",
    ),
    gguf_mix: str = typer.Option(
        None,
        "--gguf-mix",
        help="llama.cpp's quantization mix: q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, or q4_0_mix / q5_0_mix "
        "(llama-quantize --imatrix's Q4_0 / Q5_0: the first eighth of ffn_down on Q4_1 / Q5_1; the plain Q4_0 "
        "grid is --grid q4_0). Every layer and the output head get the GGUF type llama-quantize's mix gives "
        "them (more bits for some attn_v / ffn_down layers, Q6_K or "
        "Q8_0 for the head, Q5_0 / Q5_1 / Q8_0 / Q4_0 where a row is not whole 256-weight super-blocks) and are "
        "solved on that grid; `export --format gguf --type MIX` writes them from their codes. Replaces --bits, "
        "--group-size, --grid and the --head-* options (docs/gguf.md).",
    ),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: quantize inputs by decreasing Hessian diagonal."),
    static_groups: bool = typer.Option(
        False, "--static-groups", help="GPTQ: fix group grids up front (with --act-order: no column→group index)."
    ),
    keep_zeros: bool = typer.Option(
        True, "--keep-zeros/--no-keep-zeros", help="Weights that are exactly 0 (a pruned model) stay exactly 0."
    ),
    include_head: bool = typer.Option(
        False,
        "--include-head",
        help="Also quantize the output head (lm_head), on its own grid (--head-bits, --head-group-size; giving "
        "--head-bits alone implies this option); with tied embeddings they take its values too. The head is the "
        "largest layer of a small model: at 8 bits per channel it runs by the int8 CPU kernel and costs next to "
        "nothing (see docs/kernels.md).",
    ),
    head_bits: int = typer.Option(
        8, "--head-bits", help="Quantize the output head too (implies --include-head), to this many bits per weight."
    ),
    head_group_size: int = typer.Option(
        -1, "--head-group-size", help="With --include-head / --head-bits: the head's group size (-1: per channel)."
    ),
    calib_data: str = typer.Option(
        "c4",
        "--calib-data",
        help="GPTQ calibration text: file, wikitext2, c4, ptb, hf:NAME[:CONFIG][@SPLIT] or bundled:wikitext2-valid.",
    ),
    nsamples: int = options.NSAMPLES,
    seqlen: int = options.SEQLEN,
    seed: int = options.CALIB_SEED,
    percdamp: str = options.percdamp("GPTQ"),
    blocksize: int = typer.Option(128, "--blocksize", help="GPTQ column block size (lazy updates)."),
    in_block: str = options.IN_BLOCK,
    smoothquant: str = typer.Option(
        None,
        "--smoothquant",
        help="SmoothQuant before quantizing: α in [0, 1] (0.5 is usual) moves activation outliers into the weights, "
        "or 'auto' searches α per block on the calibration windows (block output error under int8 × int8). Meant "
        "for a weight-and-activation scheme (--scheme w8a8); without one it runs but warns (weight-only grids gain "
        "nothing from it). Needs calibration data; the model's function is unchanged until it is quantized.",
    ),
    awq: bool = typer.Option(
        False,
        "--awq",
        help="AWQ before RTN or GPTQ: per-channel scales mean|x|^a, the exponent a searched per layer group on the "
        "block's output error with this run's weight grid, folded into the previous layer. Needs calibration data.",
    ),
    scheme: str = typer.Option(
        None,
        "--scheme",
        help="Weights and activations: w8a8 (int8 weights per channel by --method rtn or gptq, int8 activations per "
        "token, dynamic) or fp8 (E4M3 weights per channel, rounded to nearest unless --method gptq is given; "
        "activations per tensor with static "
        "scales calibrated on the calibration windows, or per token with --dynamic). Sets --bits 8 --group-size -1; "
        "`eval` / `generate` simulate the activation quantization, `export --format compressed-tensors` writes "
        "it for vLLM (docs/quantization.md).",
    ),
    dynamic: bool = typer.Option(
        False, "--dynamic", help="With --scheme fp8: per-token activation scales computed at run time (no calibration)."
    ),
    asym_activations: bool = typer.Option(
        False,
        "--asym-activations",
        help="With --scheme w8a8: int8 activations with a zero point per token (asymmetric; vLLM's azp kernels). "
        "Up to twice the resolution for tokens whose values lean to one sign.",
    ),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    overwrite: bool = options.OVERWRITE,
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    offload: str = options.OFFLOAD,
    resume: bool = options.RESUME,
    as_json: bool = options.JSON,
    quiet: bool = options.QUIET,
) -> None:
    """Quantize the linear layers of a model's blocks to a few bits per weight and save them packed.

    Each group of --group-size inputs of a weight row shares one scale (and zero point with --asym). RTN rounds
    every weight to the nearest grid point and needs no data; GPTQ quantizes one column at a time and updates
    the remaining columns to make up for the rounding error, measured on calibration windows. A pruned model
    stays pruned: its zeros are kept exactly (--keep-zeros). The result loads with `lmcompress.load` (and
    `lmcompress eval`); `lmcompress export` writes it for vLLM.

    Examples:

        lmcompress quantize facebook/opt-125m --method gptq --bits 4 --group-size 128 -o opt-gptq4

        lmcompress quantize ./llama --method gptq --gguf-mix q4_k_m -o llama-q4km   # export --type q4_k_m

        lmcompress quantize ./llama --scheme w8a8 --smoothquant auto --method gptq -o llama-w8a8   # for vLLM
    """
    from lmcompress.jobs import quantize_pretrained
    from lmcompress.transforms.quantize import QuantConfig

    if scheme is not None:
        from lmcompress.transforms.schemes import check_scheme_grid

        given = options.given(ctx, "bits", "group_size")
        check_scheme_grid(scheme, bits if "bits" in given else 8, group_size if "group_size" in given else -1)
        bits, group_size = 8, -1
        if scheme == "fp8" and not options.given(ctx, "method"):
            method = "rtn"  # FP8 weights are rounded to nearest unless --method gptq asks for GPTQ on the FP8 grid
    if method == "rtn":
        options.refuse(
            ctx,
            ("act_order", "static_groups", "percdamp", "blocksize", "in_block"),
            "to --method rtn: they are GPTQ options",
        )
        if smoothquant is None and not awq and not (scheme == "fp8" and not dynamic):
            options.refuse(ctx, options.CALIBRATION, "to --method rtn: it reads no calibration data")
    if gguf_mix is not None:
        options.refuse(
            ctx,
            ("bits", "group_size", "sym", "grid", "include_head", "head_bits", "head_group_size"),
            "with --gguf-mix: the mix gives every layer and the head its GGUF type",
        )
    elif options.given(ctx, "head_bits"):
        include_head = True  # --head-bits N: quantize the head (--include-head is its 8-bit spelling)
    elif not include_head:
        options.refuse(ctx, ("head_group_size",), "without --include-head or --head-bits")
    config = QuantConfig(
        method=method,
        bits=bits,
        group_size=group_size,
        sym=sym,
        grid=grid,
        act_order=act_order,
        static_groups=static_groups,
        percdamp=percdamp,
        blocksize=blocksize,
        keep_zeros=keep_zeros,
        include_head=include_head,
        head_bits=head_bits,
        head_group_size=head_group_size,
        in_block=in_block,
        gguf_mix=gguf_mix,
        smoothquant=smoothquant,
        awq=awq,
        scheme=scheme,
        asym_activations=asym_activations,
        dynamic=dynamic,
    )
    report = quantize_pretrained(
        model,
        config,
        output,
        **options.job_options(ctx.params),
    )
    if as_json:
        typer.echo(json_text(report.to_dict()))
    elif config.gguf_mix is not None:
        typer.echo(
            f"quantized {model} with {config.method} on llama.cpp's {config.gguf_mix.upper()} mix, "
            f"{len(report.quantized)} layers, ~{report.nominal_bits_per_weight:.2f} bits/weight, in "
            f"{report.wall_time_s:.1f}s → {output}"
        )
    else:
        layout = "per channel" if config.group_size == -1 else f"group {config.group_size}"
        layout += f", {config.grid} grid" if config.grid != "minmax" else ""
        if config.smoothquant is not None:
            layout += f", SmoothQuant α={config.smoothquant}"
        layout += ", AWQ" if config.awq else ""
        if config.scheme is not None:
            acts = "int8 per token" if config.scheme == "w8a8" else "fp8 per token" if config.dynamic else "fp8 static"
            acts += " with a zero point" if config.asym_activations else ""
            layout = f"{config.scheme} scheme: weights {layout}, activations {acts}"
        if config.include_head:
            head = "per channel" if config.head_group_size == -1 else f"group {config.head_group_size}"
            layout += f"; head {config.head_bits} bits {head}"
        typer.echo(
            f"quantized {model} with {config.method} to {config.bits} bits ({layout}"
            f"{'' if config.scheme else ', sym' if config.sym else ', asym'}), "
            f"{len(report.quantized) + len(report.fp8)} layers, "
            f"~{report.nominal_bits_per_weight:.2f} bits/weight with grids, in {report.wall_time_s:.1f}s → {output}"
        )
