"""Inspecting a folder: bytes on disk by tensor kind, bits per weight, sparsity, health (lmcompress info)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from lmcompress.checkpoint.checks import expand, path_exists, regular_file, safetensors_header
from lmcompress.checkpoint.folder import RECIPE_FILE, read_recipe
from lmcompress.checkpoint.packed import _index_of, _read_parts, packed_path, strip_marker
from lmcompress.errors import UserError


def packed_file_layout(path: str | Path) -> tuple[int, dict[str, int]]:
    """``(header_bytes, {key: data_bytes})`` of a safetensors file, read from its header only.

    Raises :class:`UserError` when the header is unreadable or the file is not exactly as long as the header
    says (truncated, or bytes appended): sizes are then never reported for a damaged file.
    """
    path = Path(path)
    file_size = regular_file(path, "weight file").st_size
    header, data_start = safetensors_header(path)
    n = data_start - 8
    sizes, data_end = {}, 0
    for key, info in header.items():
        if key != "__metadata__":
            start, end = (int(x) for x in info["data_offsets"])
            sizes[key] = end - start
            data_end = max(data_end, end)
    if 8 + n + data_end != file_size:
        raise UserError(
            f"{path} is {file_size} bytes but its header describes {8 + n + data_end}; "
            "the file is truncated or corrupted"
        )
    return 8 + n, sizes


def logical_numel(entry: dict) -> int:
    shape = entry.get("shape", [])
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise UserError(f"a tensor of the packed index has the shape {shape!r}; the folder is damaged")
    return math.prod(shape)


def check_index_shapes(folder: Path, index: dict, sizes_of: dict[str, int]) -> None:
    """Every tensor of a packed index must be one the config's model has, with its number of elements: a damaged
    shape would otherwise be reported as a model of 10¹⁸ parameters (loading refuses it the same way)."""
    for name, entry in index["tensors"].items():
        if not isinstance(entry, dict):
            raise UserError(f"{folder} is damaged: the {RECIPE_FILE} index entry of {name} is not an object")
        if entry.get("layout") == "alias":
            continue
        if name not in sizes_of:
            raise UserError(f"{folder} is damaged: its {RECIPE_FILE} lists {name}, which its config's model lacks")
        if logical_numel(entry) != sizes_of[name]:
            raise UserError(
                f"{folder} is damaged: its {RECIPE_FILE} gives {name} the shape {entry.get('shape')}, which does "
                f"not fit the model its config describes ({sizes_of[name]} elements)"
            )


KINDS = ("values", "masks", "indices", "codes", "scales", "embeddings", "other", "header")


_PART_KIND = {
    "values": "values",
    "mask": "masks",
    "index": "indices",
    "g_idx": "indices",
    "codes": "codes",
    "scale": "scales",
    "zero": "scales",
}


_CT_SUFFIX = {  # parts of a compressed-tensors pack-quantized layer
    "weight_packed": "codes",
    "weight_scale": "scales",
    "weight_zero_point": "scales",
    "weight_g_idx": "indices",
    "weight_shape": "other",
}


_ST_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


_RECIPE_SUMMARY = (
    "kind",
    "source_model",
    "method",
    "sparsity",
    "pattern",
    "allocation",
    "achieved_sparsity",
    "quantization",
    "bits",
    "group_size",
    "sym",
    "storage",
    "wall_time_s",
)


# a routed expert's matrix as transformers saves fused experts (one 2-D tensor per expert: experts.3.up_proj.weight)
_EXPERT_KEY = re.compile(r"\.experts\.\d+\.[A-Za-z0-9_]+\.weight$")


def _roles(
    folder: Path, recipe: dict | None, trust_remote_code: bool = False
) -> tuple[set[str], set[str], dict[str, int]]:
    """``(embeddings, linear weights, sizes)``: parameter names of embedding tables / output head, and of the
    other ``nn.Linear`` / ``Conv1D`` layers, and the element count of every tensor, from a weightless (meta)
    model built from the config."""
    from lmcompress.checkpoint.load import auto_model_class, load_config
    from lmcompress.models.families import is_prunable
    from lmcompress.models.layouts import FUSED_EXPERTS, is_fused_experts
    from lmcompress.models.surgery import apply_surgery

    config = load_config(str(folder), trust_remote_code)
    strip_marker(config)
    try:
        cls = auto_model_class(config)
    except UserError:  # an architecture lmcompress does not compress can still be described
        import transformers

        cls = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    apply_surgery(model, (recipe or {}).get("surgery") or [])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings, linear = set(), set()
    for name, module in model.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.Embedding) or (head is not None and module is head):
            embeddings.add(weight)
        elif is_prunable(module):
            linear.add(weight)
        elif is_fused_experts(module):  # routed experts, one layer per expert and matrix: counted as linear
            linear |= {f"{name}.{p}" if name else p for p in FUSED_EXPERTS}
    return embeddings, linear, {k: v.numel() for k, v in model.state_dict().items()}


def group_split(cols: int, group_size: int) -> str:
    """How ``cols`` inputs split into groups: ``"576 = 4×128 + 64"``, ``"512 = 4×128"``, ``"64 < 128"`` (one group)."""
    full, rest = divmod(cols, group_size)
    if not full:
        return f"{cols} < {group_size}"
    return f"{cols} = {full}×{group_size}" + (f" + {rest}" if rest else "")


def partial_groups_summary(layers: dict[str, str]) -> dict:
    """``layers`` (name → :func:`group_split` of a layer whose last group is shorter) summed up for ``info``."""
    splits: dict[str, int] = {}
    for split in layers.values():
        splits[split] = splits.get(split, 0) + 1
    parts = [s if len(splits) == 1 else f"{s}: {n}" for s, n in sorted(splits.items(), key=lambda kv: -kv[1])]
    noun = "layer" if len(layers) == 1 else "layers"
    return {
        "layers": len(layers),
        "splits": splits,
        "names": layers,
        "text": f"partial last group: {len(layers)} {noun} ({'; '.join(parts)})",
    }


def check_health(folder: Path, index: dict) -> None:
    """Read every tensor of a packed folder and check it against the index (dtype, shape, sha256), as loading
    does: a flipped byte makes ``info`` fail with "damaged" instead of describing the folder as healthy."""
    try:
        _read_parts(folder, index)
    except UserError as exc:
        raise UserError(f"{folder} is damaged: {exc}") from None


def folder_info(folder: str | Path, *, trust_remote_code: bool = False) -> dict:
    """Size on disk by tensor kind, bits per weight and sparsity of a packed or plain safetensors folder.

    ``by_kind`` sums exactly to ``weights_bytes``, the size of the weight files (``header`` is the
    safetensors headers); ``linear`` covers the ``nn.Linear`` / ``Conv1D`` weights outside the embeddings
    and output head (the layers lmcompress compresses), with everything they take: values, masks, N:M
    indices, codes, scales and zero points. ``linear.partial_groups`` (None when there are none) lists the
    quantized layers whose group size does not divide their width, so that their last group is shorter. A packed
    folder whose tensors fail their checksums is an error
    (``... is damaged``), as is a weight file whose length does not match its header.
    """
    from lmcompress.checkpoint.gguf import gguf_info, is_gguf

    if is_gguf(folder):  # a llama.cpp file: its own tensor types and sizes
        return gguf_info(folder)
    folder = expand(folder)
    if not path_exists(folder):
        raise UserError(f"{folder} does not exist; give a model folder or a .gguf file")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a model folder (no config.json)")
    recipe = read_recipe(folder)
    embeddings, linear, sizes_of = _roles(folder, recipe, trust_remote_code)
    by_kind = dict.fromkeys(KINDS, 0)
    layouts: dict[str, int] = {}
    params = lin_params = lin_bytes = lin_nonzero = dense_equiv = 0
    unknown_sparsity = False  # compressed-tensors packed codes are not decoded here
    partial: dict[str, str] = {}  # quantized layers whose last group is shorter: name -> "576 = 4×128 + 64"
    if recipe and recipe.get("storage") == "packed":
        index = _index_of(folder, recipe)
        weights = packed_path(folder, index)
        header, sizes = packed_file_layout(weights)
        check_index_shapes(folder, index, sizes_of)
        check_health(folder, index)
        weight_files = [weights]
        by_kind["header"] = header
        for name, entry in index["tensors"].items():
            if entry.get("layout") == "alias":
                continue
            numel = logical_numel(entry)
            params += numel
            dense_equiv += numel * getattr(torch, entry["dtype"]).itemsize
            nbytes = 0
            for part, desc in entry["parts"].items():
                size = sizes.get(desc["key"])
                if size is None:
                    raise UserError(
                        f"{desc['key']!r} is in the index but not in the weights file; the folder is damaged"
                    )
                nbytes += size
                kind = "embeddings" if name in embeddings else _PART_KIND[part] if name in linear else "other"
                by_kind[kind] += size
            if name in linear:
                lin_params += numel
                lin_bytes += nbytes
                lin_nonzero += entry.get("nnz", numel)
                label = entry["layout"] + (f" {entry['n']}:{entry['m']}" if entry["layout"] == "nm" else "")
                if entry["kind"] == "quantized":
                    group_size = entry["group_size"]
                    group = "channel" if group_size == -1 else f"g{group_size}"
                    label += f" int{entry['bits']} {group}"
                    cols = entry["shape"][-1]
                    if group_size != -1 and cols % group_size:
                        partial[name] = group_split(cols, group_size)
                elif entry["kind"] == "fp8":
                    label = "fp8 e4m3 channel"
                else:
                    label += f" {entry['dtype']}"
                layouts[label] = layouts.get(label, 0) + 1
    else:
        from safetensors import safe_open

        weight_files = sorted(folder.glob("*.safetensors"))
        if not weight_files:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
            kind = (
                f" (only pickle checkpoints: {', '.join(pickles[:3])}; info reads safetensors only)" if pickles else ""
            )
            raise UserError(f"{folder} holds no *.safetensors weight files{kind}")
        for path in weight_files:
            header, sizes = packed_file_layout(path)
            by_kind["header"] += header
            with safe_open(str(path), framework="pt") as f:
                for key, size in sizes.items():
                    base, _, suffix = key.rpartition(".")
                    if f"{base}.weight" in linear and suffix in _CT_SUFFIX:  # a compressed-tensors export
                        by_kind[_CT_SUFFIX[suffix]] += size
                        lin_bytes += size
                        if suffix == "weight_packed":
                            numel = math.prod(f.get_tensor(f"{base}.weight_shape").tolist())
                            itemsize = _ST_ITEMSIZE.get(f.get_slice(f"{base}.weight_scale").get_dtype(), 2)
                            params += numel
                            lin_params += numel
                            dense_equiv += numel * itemsize
                            unknown_sparsity = True
                            layouts["compressed-tensors pack-quantized"] = (
                                layouts.get("compressed-tensors pack-quantized", 0) + 1
                            )
                        continue
                    is_linear = key in linear or _EXPERT_KEY.search(key) is not None
                    kind = "embeddings" if key in embeddings else "values" if is_linear else "other"
                    by_kind[kind] += size
                    shape = f.get_slice(key).get_shape()
                    numel = math.prod(shape)
                    params += numel
                    dense_equiv += size
                    if is_linear:
                        lin_params += numel
                        lin_bytes += size
                        lin_nonzero += int((f.get_tensor(key) != 0).sum())
                        label = f"dense {f.get_slice(key).get_dtype()}"
                        layouts[label] = layouts.get(label, 0) + 1
    weights_bytes = sum(p.stat().st_size for p in weight_files)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    summary = {k: recipe[k] for k in _RECIPE_SUMMARY if recipe and k in recipe}
    scheme = (recipe or {}).get("scheme")
    if isinstance(scheme, dict):  # W8A8 / FP8: one line, the static scales counted
        scales = len(scheme.get("input_scales") or {})
        summary["scheme"] = (
            f"{scheme.get('name')}: weights {scheme.get('weights')}, activations {scheme.get('activations')}"
            + (f" ({scales} calibrated input scales)" if scales else "")
        )
    return {
        "folder": str(folder),
        "storage": "packed" if recipe and recipe.get("storage") == "packed" else "dense",
        "files": files,
        "total_bytes": sum(files.values()),
        "weights_bytes": weights_bytes,
        "by_kind": by_kind,
        "params": params,
        "dense_equivalent_bytes": dense_equiv,
        "ratio_to_dense": weights_bytes / dense_equiv if dense_equiv else None,
        "bits_per_param": 8 * weights_bytes / params if params else None,
        "linear": {
            "params": lin_params,
            "bytes": lin_bytes,
            "bits_per_weight": 8 * lin_bytes / lin_params if lin_params else None,
            "sparsity": 1 - lin_nonzero / lin_params if lin_params and not unknown_sparsity else None,
            "layouts": layouts,
            "partial_groups": partial_groups_summary(partial) if partial else None,
        },
        "recipe": summary,
    }
