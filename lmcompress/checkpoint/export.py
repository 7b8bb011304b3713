"""Export to the ``compressed-tensors`` format (what vLLM and transformers load), through that library.

Quantized layers become ``pack-quantized`` (int codes packed in int32, per-group or per-channel scales, zero
points when asymmetric): lmcompress's grids are attached with the library's ``apply_quantization_config`` and
compressed by its ``ModelCompressor``, so the layout is the library's own, not a copy.

What the installed library (0.20) cannot express is refused with a clear error: sparse-only models (its
``sparse-bitmask`` / ``sparse-24`` compressors were removed; the sparsity config is always empty), act-order
group indices, partial last groups (a group size that does not divide a layer's width: the library's group
strategy reshapes each row into whole groups and raises otherwise), GPT-2 ``Conv1D`` layers, resized layers (surgery),
and asymmetric grids (the library writes packed zero points that transformers then fails to load: checked
with compressed-tensors 0.20.0 and transformers 5.23).
A sparse + quantized model exports its codes; the zeros are kept as codes but not exploited by the layout.

Fused routed experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) are written as the per-expert
linears of the family's checkpoints, each packed like any layer, under one config group whose target is a
regular expression for expert linears (:mod:`lmcompress.checkpoint.ct_experts`); transformers' loader fuses
them again. Experts must all be quantized on one grid when the model is (what transformers can load back).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lmcompress.checkpoint.ct_experts import EXPERTS_TARGET, fused_parameters, unfuse_experts
from lmcompress.checkpoint.folder import RECIPE_FILE, check_output, json_text, read_recipe, save_atomic
from lmcompress.checkpoint.load import source_dtype
from lmcompress.checkpoint.schemes import plain_linears, recipe_scheme
from lmcompress.errors import UserError

log = logging.getLogger(__name__)
FORMATS = ("compressed-tensors",)


def _library():
    try:
        import compressed_tensors
    except ImportError:
        raise UserError(
            "export --format compressed-tensors needs the compressed-tensors library: "
            'pip install -e ".[export]" (or pip install compressed-tensors)'
        ) from None
    return compressed_tensors


def _check(name: str, q, module) -> None:
    if type(module) is not torch.nn.Linear:
        raise UserError(
            f"{name} is a {type(module).__name__}; compressed-tensors packs nn.Linear layers only "
            "(GPT-2 Conv1D and resized layers cannot be exported)"
        )
    cols = q.codes.shape[1]
    if q.g_idx is not None and not torch.equal(q.g_idx.long().cpu(), torch.arange(cols) // q.spec.width(cols)):
        raise UserError(
            f"{name} uses act-order groups (g_idx); export them quantized with static_groups or without act_order"
        )
    if not q.spec.sym:
        raise UserError(
            f"{name} is quantized asymmetrically: compressed-tensors 0.20 packs asymmetric zero points in a shape "
            "that transformers cannot load back (weight_zero_point size mismatch), so the export would not load; "
            "quantize symmetrically (sym) to export"
        )


def _check_fused(fused: dict, params: list[str]) -> None:
    """UserError unless every fused routed-expert parameter of the model (``params``) is quantized (``fused``),
    all on one grid. transformers (checked with 5.25) loads a compressed-tensors checkpoint's experts through one
    config group, dequantizing every expert's packed tensors while it fuses them: experts stored dense next to
    quantized layers fail to load (its fusing step receives no tensors)."""
    dense = [p for p in params if p not in fused]
    if dense:
        raise UserError(
            f"{len(dense)} of the {len(params)} fused routed-expert parameters are not quantized ({dense[0]}"
            f"{', ...' if len(dense) > 1 else ''}) while other layers are: transformers cannot load such a "
            "compressed-tensors checkpoint (it expects every routed expert packed). Quantize the experts too "
            "(quantize, or prune with --bits), or keep the packed folder / `lmcompress unpack` it"
        )
    specs = {(q.spec.bits, q.spec.group_size, q.spec.sym) for q in fused.values()}
    if len(specs) > 1:
        raise UserError(
            f"the fused routed experts are quantized on {len(specs)} different grids (bits, group size, "
            f"symmetry: {sorted(specs)}): transformers loads the experts of a compressed-tensors checkpoint "
            "through one quantization scheme, so quantize every expert alike to export"
        )


def _check_grid(quantized: dict) -> None:
    """UserError for layers on llama.cpp's grids: ``q4_0`` (compressed-tensors' symmetric int4 is ``s·(q − 8)``
    too, but ``q4_0`` scales are negative wherever a group's extreme is positive, which vLLM's kernels are not
    known to accept) and the K-quants ``q2_k`` .. ``q6_k`` (super-blocks with quantized sub-block scales and
    minimums, which compressed-tensors has no format for)."""
    names = [name for name, q in quantized.items() if q.spec.grid != "minmax"]
    if names:
        grids = sorted({quantized[name].spec.grid for name in names})
        what = "llama.cpp's Q4_0, with negative scales" if grids == ["q4_0"] else "llama.cpp's grids"
        raise UserError(
            f"{len(names)} layers ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) are on the "
            f"{', '.join(grids)} grid{'s' if len(grids) > 1 else ''} ({what}), which the compressed-tensors "
            "export does not write: export them with --format gguf, or quantize with --grid minmax for "
            "compressed-tensors / vLLM"
        )


def export_compressed_tensors(
    folder: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Write ``folder`` (a quantized lmcompress folder) as a compressed-tensors ``pack-quantized`` folder."""
    from lmcompress.checkpoint.packed import read_packed

    folder = Path(folder)
    out = check_output(output, overwrite, source=folder)
    recipe = read_recipe(folder) or {}
    if recipe.get("surgery"):
        raise UserError(f"{folder} has resized or factorized layers (surgery): compressed-tensors cannot describe them")
    scheme = recipe_scheme(recipe, folder)
    if scheme is not None:
        return _export_scheme(folder, out, recipe, scheme, overwrite, trust_remote_code, allow_pickle)
    stacked = {k for k, e in ((recipe.get("packed") or {}).get("tensors") or {}).items() if "stacked" in e}
    quantized = read_packed(folder, recipe)[1] if recipe.get("storage") == "packed" else {}
    fused = {param: q for param, q in quantized.items() if param in stacked}  # fused 3-D routed experts
    plain = {param.removesuffix(".weight"): q for param, q in quantized.items() if param not in stacked}
    _check_whole_groups({**plain, **fused})
    _check_grid({**plain, **fused})
    ct = _library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    from lmcompress.checkpoint.load import load
    from lmcompress.models.sparsity import measure_sparsity

    model, tokenizer = load(folder, dtype="float32", trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    dtype = source_dtype(model.config) or torch.float32
    sparsity, _ = measure_sparsity(model)
    if not quantized:
        if sparsity > 0.01:
            raise UserError(
                f"{folder} is sparse ({sparsity:.0%}) but not quantized: compressed-tensors {ct.__version__} has no "
                "sparse formats (its sparse-bitmask and 2:4 compressors were removed), so the export would be as "
                "large as the dense model. Keep the lmcompress packed folder, or `lmcompress unpack` it for a "
                "plain folder vLLM loads"
            )
        raise UserError(f"{folder} has no quantized layers: nothing for compressed-tensors to compress")
    _check_fused(fused, fused_parameters(model))
    experts = unfuse_experts(model, fused)  # the model is for saving only from here on
    modules = {}
    for name, q in plain.items():
        module = model.get_submodule(name)
        _check(name, q, module)
        modules[name] = (module, q)
    for name, (module, q) in experts.items():
        _check(name, q, module)
    model = model.to(dtype)
    groups: dict[tuple, list[str]] = {}
    for name, (_, q) in modules.items():
        groups.setdefault((q.spec.bits, q.spec.group_size, q.spec.sym), []).append(name)
    specs = sorted(groups.items())
    if experts:  # one group for every expert linear (all on one grid: _check_fused), as transformers expects
        q = next(iter(experts.values()))[1]
        specs.append(((q.spec.bits, q.spec.group_size, q.spec.sym), [EXPERTS_TARGET]))
    config_groups = {}
    for i, ((bits, group_size, sym), names) in enumerate(specs):
        grid = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, **grid)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=sorted(names), weights=args)
    modules.update(experts)
    config = QuantizationConfig(config_groups=config_groups, quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    for module, q in modules.values():
        module.weight_scale.data.copy_(q.scale.to(module.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    mismatched = _count_code_mismatches(modules)
    if mismatched:
        log.warning("%d codes changed when compressed-tensors re-quantized with %s scales", mismatched, dtype)
    if sparsity > 0.01:
        log.warning(
            "%s is %.0f%% sparse: compressed-tensors %s stores its zeros as codes (no sparse layout)",
            folder,
            100 * sparsity,
            ct.__version__,
        )
    summary = {
        "format": "compressed-tensors",
        "compressed_tensors_version": ct.__version__,
        "quantization_format": "pack-quantized",
        "quantized_layers": len(modules),
        **({"expert_layers": len(experts)} if experts else {}),
        "sparsity_not_stored": sparsity if sparsity > 0.01 else 0.0,
        "codes_changed": mismatched,
        "exported_from": str(folder),
    }

    return _write_export(out, model, compressor, tokenizer, recipe, summary, overwrite)


def _check_whole_groups(quantized: dict) -> None:
    """UserError naming the layers whose last group is shorter: compressed-tensors cannot hold them.

    Its group strategy reshapes each row into ``in / group_size`` groups of ``group_size`` and raises
    ``tensor column shape must be divisible by the given group_size`` otherwise (and the vLLM kernels that
    read the format need whole groups too), so a partial last group has no representation.
    """
    from lmcompress.checkpoint.inspect import group_split

    partial = {
        name: group_split(q.codes.shape[1], q.spec.group_size)
        for name, q in quantized.items()
        if q.spec.has_partial_group(q.codes.shape[1])
    }
    if not partial:
        return
    widths = sorted({q.codes.shape[1] for q in quantized.values()})
    group_size = next(iter(quantized[n] for n in partial)).spec.group_size
    fits = [g for g in (256, 128, 64, 32, 16, 8) if g <= group_size and all(w % g == 0 for w in widths)]
    hint = f"group_size {fits[0]}" if fits else "a group_size that divides every width"
    by_split: dict[str, list[str]] = {}
    for name, split in partial.items():
        by_split.setdefault(split, []).append(name)
    shown = "; ".join(
        f"{split}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        for split, names in by_split.items()
    )
    raise UserError(
        f"{len(partial)} {'layer has' if len(partial) == 1 else 'layers have'} a partial last quantization group, "
        "which compressed-tensors' pack-quantized format cannot hold (it needs the group size to divide every "
        f"layer width): {shown}. Re-quantize with {hint} or group_size -1 (one grid per output channel) "
        "to export; the lmcompress folder itself loads with lmcompress.load, and `lmcompress unpack` makes a "
        "plain folder of it"
    )


def _count_code_mismatches(modules: dict) -> int:
    """How many packed codes differ from lmcompress's (the library re-quantizes the weight with its scale)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bad = 0
    for module, q in modules.values():
        codes = unpack_from_int32(module.weight_packed.data, q.spec.bits, torch.Size(q.codes.shape))
        bad += int((codes.to(torch.int32) + 2 ** (q.spec.bits - 1) != q.codes.to(torch.int32)).sum())
    return bad


def _scheme_args(scheme: dict) -> tuple[str, dict, dict]:
    """compressed-tensors' format and the weight / input-activation arguments of a W8A8 or FP8 scheme: weights
    per output channel; int8 inputs per token, dynamic (symmetric, or with a zero point per token); FP8 inputs per
    tensor, static, or per token, dynamic."""
    kind = "int" if scheme["name"] == "w8a8" else "float"
    weights = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "channel", "dynamic": False}
    static = "static" in scheme["activations"]
    symmetric = scheme.get("activations_symmetric", True) is not False
    inputs = {"num_bits": 8, "type": kind, "symmetric": symmetric, "strategy": "tensor" if static else "token"}
    inputs["dynamic"] = not static
    return f"{kind}-quantized", weights, inputs


def _export_scheme(
    folder: Path, out: Path, recipe: dict, scheme: dict, overwrite: bool, trust_remote_code: bool, allow_pickle: bool
) -> dict:
    """A W8A8 / FP8 folder as compressed-tensors ``int-quantized`` / ``float-quantized``: each layer's stored
    codes and float32 per-channel scales (and its static input scale) attached through the library's
    ``apply_quantization_config``, the codes written by its ``ModelCompressor`` (which re-quantizes the
    dequantized weight with lmcompress's scale, and so gives back lmcompress's codes: counted in
    ``codes_changed``). Embeddings, norms and the head are stored in the source's dtype; the scales stay
    float32 (what vLLM's W8A8 / FP8 layers hold them in)."""
    from torch import nn

    from lmcompress.checkpoint.load import load

    ct = _library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    model, tokenizer = load(folder, dtype="float32", trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    dtype = source_dtype(model.config) or torch.float32
    model = model.to(dtype)  # the ActQuantLinear codes and scales keep their dtype
    layers = plain_linears(model)  # nn.Linear again, float32: the library's scales take the weight's dtype
    fmt, weights, inputs = _scheme_args(scheme)
    group = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**weights), input_activations=QuantizationArgs(**inputs)
    )
    others = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers)
    config = QuantizationConfig(config_groups={"group_0": group}, ignore=others, quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    for name, m in layers.items():
        linear = model.get_submodule(name)
        linear.weight_scale.data.copy_(m.weight_scale.to(linear.weight_scale.dtype))
        if m.act.static_scale is not None:
            linear.input_scale.data.fill_(m.act.static_scale)
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    changed = 0
    for name, m in layers.items():
        codes = model.get_submodule(name).weight.data
        if codes.dtype != m.codes.dtype:
            raise RuntimeError(f"compressed-tensors stored {name} as {codes.dtype}, not {m.codes.dtype}")
        changed += int((codes.view(torch.uint8) != m.codes.view(torch.uint8)).sum())
    if changed:
        log.warning("%d codes changed when compressed-tensors re-quantized the weights with their scales", changed)
    summary = {
        "format": "compressed-tensors",
        "compressed_tensors_version": ct.__version__,
        "quantization_format": fmt,
        "scheme": scheme["name"],
        "weights": scheme["weights"],
        "activations": scheme["activations"],
        "quantized_layers": len(layers),
        "codes_changed": changed,
        "exported_from": str(folder),
    }

    return _write_export(out, model, compressor, tokenizer, recipe, summary, overwrite)


def _write_export(out: Path, model, compressor, tokenizer, recipe: dict, summary: dict, overwrite: bool) -> dict:
    """Save ``model`` compressed as ``compressor`` says, with the tokenizer and the recipe (its ``export`` entry:
    ``summary``), to ``out`` atomically; returns the summary with the output path."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plain = {k: v for k, v in recipe.items() if k not in ("storage", "packed")}
        (tmp / RECIPE_FILE).write_text(json_text({**plain, "export": summary}) + "\n")

    save_atomic(out, write, overwrite=overwrite)
    return {**summary, "output": str(out)}
