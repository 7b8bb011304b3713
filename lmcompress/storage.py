"""Packed model folders: weights stored in the layouts of :mod:`lmcompress.packing`, so file size follows
the compression, with a checksummed per-tensor index in ``lmcompress.json``.

A packed folder holds ``config.json``, the tokenizer, ``lmcompress.json`` (the recipe plus
``"storage": "packed"`` and ``"packed"``: the index) and ``model.packed.safetensors``. Each tensor of the
model is either stored untouched under its own name (layout ``dense``) or as parts named
``<param>.packed_<part>`` (``values``, ``mask``, ``index``, ``codes``, ``scale``, ``zero``). The index
records for each tensor its layout, shape, dtype, quantization spec, N:M pattern and, for each part, its
safetensors key, dtype, shape and sha256; loading checks all of it and raises :class:`UserError` on any
mismatch, so a damaged folder never loads as a silently wrong model.

The weights file is deliberately *not* called ``model.safetensors`` and ``config.json`` carries a
``quantization_config`` that transformers does not know: plain ``AutoModelForCausalLM.from_pretrained`` then
stops with an error instead of filling the packed weights with random values. Load packed folders with
``lmcompress.load(folder)``, or turn them into a plain folder with ``lmcompress unpack``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.errors import UserError
from lmcompress.io import RECIPE_FILE, RESIZED_MARKER, read_recipe, save_atomic
from lmcompress.packing import Packed, pack_quantized, pack_tensor, unpack_quantized, unpack_tensor

PACKED_FILE = "model.packed.safetensors"
FORMAT_VERSION = 1
MARKER = "lmcompress-packed (load with lmcompress.load, or run lmcompress unpack)"
_PART_PREFIX = ".packed_"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def _transposed_params(model: nn.Module) -> set[str]:
    """Parameters stored ``[in, out]`` (GPT-2 ``Conv1D``): packed as their ``[out, in]`` transpose."""
    from transformers.pytorch_utils import Conv1D

    return {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


def _check_quantized(name: str, q: QuantizedTensor, weight: torch.Tensor) -> None:
    """The in-memory weight must be what the codes stand for (up to float rounding)."""
    if tuple(q.codes.shape) != tuple(weight.shape):
        raise ValueError(
            f"quantized[{name!r}] has codes {tuple(q.codes.shape)} but the weight is {tuple(weight.shape)}"
        )
    deq = q.dequantize().to(weight.device)
    step = q.scale.abs()[:, q.group_index()]
    eps = torch.finfo(weight.dtype).eps if weight.is_floating_point() else 0.0
    tol = 4 * eps * (weight.float().abs() + step.to(weight.device)) + 1e-12  # float rounding, not a step
    if bool(((deq - weight.float()).abs() > tol).any()):
        raise ValueError(
            f"quantized[{name!r}] does not match the model's weight: pass the QuantizedTensor the weight was set from"
        )


def pack_state(
    model: nn.Module,
    *,
    quantized: dict[str, QuantizedTensor] | None = None,
    dtype: torch.dtype | None = None,
    layout: str = "auto",
) -> tuple[dict[str, torch.Tensor], dict]:
    """The safetensors tensors and the per-tensor index of ``model`` in packed form."""
    quantized = dict(quantized or {})
    state = model.state_dict()
    unknown = sorted(set(quantized) - set(state))
    if unknown:
        raise ValueError(f"quantized names parameters the model does not have: {unknown[:5]}")
    transposed = _transposed_params(model)
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    canonical: dict[tuple, str] = {}  # tied weights are stored once, preferably under their quantized name
    for name, value in state.items():
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if value.numel() and (key not in canonical or (name in quantized and canonical[key] not in quantized)):
            canonical[key] = name
    for name, value in state.items():
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if value.numel() and canonical[key] != name:
            if name in quantized:
                raise ValueError(f"{name} and {canonical[key]} are tied but quantized differently")
            index[name] = {"layout": "alias", "of": canonical[key]}
            continue
        flip = name in transposed and value.dim() == 2
        matrix = value.detach().cpu()
        matrix = matrix.t() if flip else matrix
        if name in quantized:
            _check_quantized(name, quantized[name], matrix)
            packed = pack_quantized(quantized[name], layout)
            kind = "quantized"
            store_dtype = dtype if dtype is not None and value.is_floating_point() else value.dtype
        else:
            if dtype is not None and value.is_floating_point():
                matrix = matrix.to(dtype)
            packed = pack_tensor(matrix, layout if value.is_floating_point() else "dense")
            kind = "tensor"
            store_dtype = matrix.dtype
            if packed.layout == "dense":  # untouched: stored under its own name, in its own orientation
                original = matrix.t() if flip else matrix
                packed = Packed("dense", {"values": original}, {**packed.meta, "shape": list(original.shape)})
                flip = False
        entry = {"kind": kind, "layout": packed.layout, **packed.meta, "dtype": _dtype_name(store_dtype)}
        entry["transposed"] = flip
        entry["parts"] = {}
        for part, t in packed.parts.items():
            skey = name if (kind == "tensor" and packed.layout == "dense") else f"{name}{_PART_PREFIX}{part}"
            t = t.contiguous()
            tensors[skey] = t
            entry["parts"][part] = {
                "key": skey,
                "dtype": _dtype_name(t.dtype),
                "shape": list(t.shape),
                "sha256": _digest(t),
            }
        index[name] = entry
    return tensors, {"format": FORMAT_VERSION, "file": PACKED_FILE, "tensors": index}


def save_packed(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    recipe: dict,
    *,
    quantized: dict[str, QuantizedTensor] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    layout: str = "auto",
) -> Path:
    """Save ``model`` packed (smallest layout per tensor), its tokenizer, config and recipe, atomically.

    ``quantized`` maps parameter names to the :class:`QuantizedTensor` the (dequantized) weight came from;
    ``dtype`` is the storage dtype of float tensors (default: as in memory). ``layout``: ``auto`` (smallest),
    or force ``dense`` / ``bitmask`` / ``N:M`` for every tensor it applies to (tests and benchmarks).
    """
    from safetensors.torch import save_file

    tensors, index = pack_state(model, quantized=quantized, dtype=dtype, layout=layout)
    storage_dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = _dtype_name(storage_dtype)
        config["quantization_config"] = {"quant_method": MARKER}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if getattr(model, "generation_config", None) is not None:
            with contextlib.suppress(Exception):  # an invalid generation config is not worth failing the save
                model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / PACKED_FILE), metadata={"format": "pt", "lmcompress_storage": "packed"})
        full = {**recipe, "storage": "packed", "packed": index}
        (tmp / RECIPE_FILE).write_text(json.dumps(full, indent=2, default=str) + "\n")

    return save_atomic(out_dir, write, overwrite=overwrite)


def strip_marker(config) -> None:
    """Remove the ``quantization_config`` that keeps plain transformers away from a packed or resized folder."""
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict) and qc.get("quant_method") in (MARKER, RESIZED_MARKER):
        del config.quantization_config


# ----------------------------------------------------------------------------------------------------------
# loading


def _index_of(folder: Path, recipe: dict | None) -> dict:
    recipe = recipe if recipe is not None else read_recipe(folder)
    if not recipe or recipe.get("storage") != "packed":
        raise UserError(f'{folder} is not a packed lmcompress folder (its {RECIPE_FILE} has no "storage": "packed")')
    index = recipe.get("packed")
    if not isinstance(index, dict) or not isinstance(index.get("tensors"), dict):
        raise UserError(f"{folder / RECIPE_FILE} has no packed tensor index; the folder is damaged")
    if index.get("format") != FORMAT_VERSION:
        raise UserError(
            f"{folder} uses packed format {index.get('format')!r}; this lmcompress reads format {FORMAT_VERSION}: "
            "upgrade lmcompress"
        )
    return index


def _read_parts(folder: Path, index: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the packed file, checked against the index (keys, dtypes, shapes, sha256)."""
    from safetensors import safe_open

    path = folder / index.get("file", PACKED_FILE)
    if not path.is_file():
        raise UserError(f"{path} is missing; the packed folder is incomplete")
    expected = {
        part["key"]: part
        for entry in index["tensors"].values()
        if entry.get("layout") != "alias"
        for part in entry.get("parts", {}).values()
    }
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:
        raise UserError(f"cannot read {path}: {exc}; the file is truncated or corrupted") from None
    with handle as f:
        keys = set(f.keys())
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        if missing or extra:
            raise UserError(
                f"{path} does not match the index in {RECIPE_FILE}: missing tensors {missing[:5]}, "
                f"unexpected {extra[:5]}; the folder is damaged"
            )
        out = {}
        for key, part in expected.items():
            try:
                t = f.get_tensor(key)
            except Exception as exc:
                raise UserError(f"cannot read tensor {key!r} from {path}: {exc}; the file is corrupted") from None
            if _dtype_name(t.dtype) != part["dtype"] or list(t.shape) != part["shape"]:
                raise UserError(
                    f"tensor {key!r} in {path} is {list(t.shape)} {_dtype_name(t.dtype)} but the index says "
                    f"{part['shape']} {part['dtype']}; the folder is damaged"
                )
            if _digest(t) != part["sha256"]:
                raise UserError(f"checksum mismatch for tensor {key!r} in {path}: the file is corrupted")
            out[key] = t
    return out


def read_packed(
    folder: str | Path, recipe: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """``(state_dict, quantized)`` of a packed folder: every tensor rebuilt (quantized weights dequantized
    to float32) and the exact :class:`QuantizedTensor` of each quantized weight (``[out, in]``)."""
    folder = Path(folder)
    index = _index_of(folder, recipe)
    blobs = _read_parts(folder, index)
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    aliases = {}
    for name, entry in index["tensors"].items():
        if entry.get("layout") == "alias":
            aliases[name] = entry.get("of")
            continue
        try:
            parts = {p: blobs[d["key"]] for p, d in entry["parts"].items()}
            meta = {k: v for k, v in entry.items() if k not in ("kind", "layout", "parts", "transposed")}
            packed = Packed(entry["layout"], parts, meta)
            if entry["kind"] == "quantized":
                q = unpack_quantized(packed)
                quantized[name] = q
                value = q.dequantize()
            else:
                value = unpack_tensor(packed)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"tensor {name!r} in {folder} cannot be rebuilt ({exc}); the folder is damaged") from None
        state[name] = value.t().contiguous() if entry.get("transposed") else value
    for name, target in aliases.items():
        if target not in state:
            raise UserError(
                f"tensor {name!r} in {folder} is tied to {target!r}, which is not stored; the folder is damaged"
            )
        state[name] = state[target]
    return state, quantized


def load_packed_state(folder: str | Path, recipe: dict | None = None) -> dict[str, torch.Tensor]:
    """The full state dict of a packed folder (used by :func:`lmcompress.load`)."""
    return read_packed(folder, recipe)[0]


def load_packed(folder: str | Path, **kwargs):
    """``(model, tokenizer)`` of a packed folder; same as :func:`lmcompress.loader.load`."""
    from lmcompress.loader import load

    return load(folder, **kwargs)


def packed_file_layout(path: str | Path) -> tuple[int, dict[str, int]]:
    """``(header_bytes, {key: data_bytes})`` of a safetensors file, read from its header only.

    Raises :class:`UserError` when the header is unreadable or the file is not exactly as long as the header
    says (truncated, or bytes appended): sizes are then never reported for a damaged file.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is not a safetensors file (too short); the file is truncated or corrupted")
        n = int.from_bytes(head, "little")
        if 8 + n > file_size:
            raise UserError(f"{path} has a corrupted safetensors header; the file is truncated or corrupted")
        try:
            header = json.loads(f.read(n))
            sizes, data_end = {}, 0
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = (int(x) for x in info["data_offsets"])
                if not 0 <= start <= end:
                    raise ValueError(key)
                sizes[key] = end - start
                data_end = max(data_end, end)
        except Exception:
            raise UserError(f"{path} has a corrupted safetensors header; the file is truncated or corrupted") from None
    if 8 + n + data_end != file_size:
        raise UserError(
            f"{path} is {file_size} bytes but its header describes {8 + n + data_end}; "
            "the file is truncated or corrupted"
        )
    return 8 + n, sizes


def logical_numel(entry: dict) -> int:
    return math.prod(entry.get("shape", []))


# ----------------------------------------------------------------------------------------------------------
# what a folder holds: bytes by tensor kind, bits per weight, sparsity (``lmcompress info``)

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


def _roles(folder: Path, recipe: dict | None) -> tuple[set[str], set[str]]:
    """``(embeddings, linear weights)``: parameter names of embedding tables / output head, and of the
    other ``nn.Linear`` / ``Conv1D`` layers, from a weightless (meta) model built from the config."""
    from lmcompress.families import is_prunable
    from lmcompress.io import auto_model_class, load_config
    from lmcompress.surgery import apply_surgery

    config = load_config(str(folder))
    strip_marker(config)
    try:
        cls = auto_model_class(config)
    except UserError:  # an architecture lmcompress does not compress can still be described
        import transformers

        cls = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    apply_surgery(model, (recipe or {}).get("surgery") or [])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings, linear = set(), set()
    for name, module in model.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.Embedding) or (head is not None and module is head):
            embeddings.add(weight)
        elif is_prunable(module):
            linear.add(weight)
    return embeddings, linear


def folder_info(folder: str | Path) -> dict:
    """Size on disk by tensor kind, bits per weight and sparsity of a packed or plain safetensors folder.

    ``by_kind`` sums exactly to ``weights_bytes``, the size of the weight files (``header`` is the
    safetensors headers); ``linear`` covers the ``nn.Linear`` / ``Conv1D`` weights outside the embeddings
    and output head (the layers lmcompress compresses), with everything they take: values, masks, N:M
    indices, codes, scales and zero points.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a model folder (no config.json)")
    recipe = read_recipe(folder)
    embeddings, linear = _roles(folder, recipe)
    by_kind = dict.fromkeys(KINDS, 0)
    layouts: dict[str, int] = {}
    params = lin_params = lin_bytes = lin_nonzero = dense_equiv = 0
    unknown_sparsity = False  # compressed-tensors packed codes are not decoded here
    if recipe and recipe.get("storage") == "packed":
        index = _index_of(folder, recipe)
        header, sizes = packed_file_layout(folder / index.get("file", PACKED_FILE))
        weight_files = [folder / index.get("file", PACKED_FILE)]
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
                    group = "channel" if entry["group_size"] == -1 else f"g{entry['group_size']}"
                    label += f" int{entry['bits']} {group}"
                else:
                    label += f" {entry['dtype']}"
                layouts[label] = layouts.get(label, 0) + 1
    else:
        from safetensors import safe_open

        weight_files = sorted(folder.glob("*.safetensors"))
        if not weight_files:
            raise UserError(f"{folder} holds no *.safetensors weight files")
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
                    kind = "embeddings" if key in embeddings else "values" if key in linear else "other"
                    by_kind[kind] += size
                    shape = f.get_slice(key).get_shape()
                    numel = math.prod(shape)
                    params += numel
                    dense_equiv += size
                    if key in linear:
                        lin_params += numel
                        lin_bytes += size
                        lin_nonzero += int((f.get_tensor(key) != 0).sum())
                        label = f"dense {f.get_slice(key).get_dtype()}"
                        layouts[label] = layouts.get(label, 0) + 1
    weights_bytes = sum(p.stat().st_size for p in weight_files)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    summary = {k: recipe[k] for k in _RECIPE_SUMMARY if recipe and k in recipe}
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
        },
        "recipe": summary,
    }


def unpack_folder(folder: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write a packed folder out as a plain one (``model.safetensors`` in the stored dtype) that
    ``from_pretrained`` loads; quantized weights are written dequantized."""
    from lmcompress.io import check_output, save_model, source_dtype
    from lmcompress.loader import load

    folder = Path(folder)
    check_output(output, overwrite, source=folder)
    recipe = read_recipe(folder)
    _index_of(folder, recipe)
    model, tokenizer = load(folder, dtype="float32")
    plain = {k: v for k, v in recipe.items() if k not in ("storage", "packed")}
    plain["unpacked_from"] = str(folder)
    return save_model(model, tokenizer, output, plain, overwrite=overwrite, dtype=source_dtype(model.config))
