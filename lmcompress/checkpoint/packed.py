"""Packed model folders: weights stored in the layouts of :mod:`lmcompress.checkpoint.packing`, so file size follows
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
from pathlib import Path

import torch
from torch import nn

from lmcompress.algorithms.actquant import FP8_DTYPE, FP8Weight
from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.checkpoint.checks import regular_file
from lmcompress.checkpoint.folder import RECIPE_FILE, RESIZED_MARKER, json_text, read_recipe, save_atomic
from lmcompress.checkpoint.packing import Packed, pack_quantized, pack_tensor, unpack_quantized, unpack_tensor
from lmcompress.errors import UserError

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
    fp8: dict[str, FP8Weight] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The safetensors tensors and the per-tensor index of ``model`` in packed form."""
    quantized = dict(quantized or {})
    state = model.state_dict()
    unknown = sorted((set(quantized) | set(fp8 or {})) - set(state))
    if unknown:
        raise ValueError(f"quantized names parameters the model does not have: {unknown[:5]}")
    transposed = _transposed_params(model)
    tensors, index = pack_named(state, transposed, quantized=quantized, dtype=dtype, layout=layout, fp8=fp8)
    return tensors, {"format": FORMAT_VERSION, "file": PACKED_FILE, "tensors": index}


def _pack_fp8(name: str, w: FP8Weight, matrix: torch.Tensor) -> Packed:
    """An FP8 weight's parts, checked against the model's (dequantized) weight ``matrix`` ``[out, in]``."""
    rows, cols = matrix.shape
    if tuple(w.codes.shape) != (rows, cols) or tuple(w.scale.shape) != (rows, 1) or w.codes.dtype != FP8_DTYPE:
        raise ValueError(f"fp8[{name!r}] must be {FP8_DTYPE} codes {(rows, cols)} with scales {(rows, 1)}")
    eps = torch.finfo(matrix.dtype).eps
    if bool(((w.dequantize() - matrix.float()).abs() > 4 * eps * matrix.float().abs() + 1e-12).any()):
        raise ValueError(f"fp8[{name!r}] does not match the model's weight: pass the FP8 weight it was set from")
    parts = {"codes": w.codes.detach().cpu().contiguous(), "scale": w.scale.detach().cpu().float().contiguous()}
    return Packed("fp8", parts, {"shape": [rows, cols]})


def _unpack_fp8(p: Packed) -> FP8Weight:
    rows, cols = p.meta["shape"]
    codes, scale = _fp8_parts(p.parts)
    if tuple(codes.shape) != (rows, cols) or tuple(scale.shape) != (rows, 1) or codes.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 codes {tuple(codes.shape)} {codes.dtype} / scales {tuple(scale.shape)} do not fit")
    return FP8Weight(codes, scale.float())


def _fp8_parts(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if set(parts) != {"codes", "scale"}:
        raise ValueError(f"an fp8 weight has the parts codes and scale, not {sorted(parts)}")
    return parts["codes"], parts["scale"]


def pack_named(
    state: dict[str, torch.Tensor],
    transposed: set[str],
    *,
    quantized: dict[str, QuantizedTensor] | None = None,
    dtype: torch.dtype | None = None,
    layout: str = "auto",
    fp8: dict[str, FP8Weight] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The packed parts and index entries of the named tensors ``state`` (a whole model's, or one block's when
    streaming). ``transposed`` names the ``Conv1D`` weights; tensors sharing storage are stored once. ``fp8``
    weights (scheme fp8) are stored as their ``float8_e4m3fn`` codes and float32 per-row scales (layout
    ``fp8``)."""
    quantized = quantized or {}
    fp8 = fp8 or {}
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
        stacked = value.dim() == 3  # fused experts [E, out, in]: packed as the matrix [E·out, in], rows stacked
        matrix = matrix.reshape(-1, matrix.shape[-1]) if stacked else matrix
        if name in quantized:
            _check_quantized(name, quantized[name], matrix)
            packed = pack_quantized(quantized[name], layout)
            kind = "quantized"
            store_dtype = dtype if dtype is not None and value.is_floating_point() else value.dtype
        elif name in fp8:
            packed = _pack_fp8(name, fp8[name], matrix)
            kind = "fp8"
            store_dtype = dtype if dtype is not None else value.dtype
        else:
            if dtype is not None and value.is_floating_point():
                matrix = matrix.to(dtype)
            packed = pack_tensor(matrix, layout if value.is_floating_point() else "dense")
            kind = "tensor"
            store_dtype = matrix.dtype
            if packed.layout == "dense":  # untouched: stored under its own name, in its own orientation
                original = matrix.t() if flip else matrix.reshape(value.shape)
                packed = Packed("dense", {"values": original}, {**packed.meta, "shape": list(original.shape)})
                flip = stacked = False
        entry = {"kind": kind, "layout": packed.layout, **packed.meta, "dtype": _dtype_name(store_dtype)}
        entry["transposed"] = flip
        if stacked:
            entry["stacked"] = list(value.shape)  # rebuilt as this 3-D shape
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
    return tensors, index


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
    extra_files: dict[str, str] | None = None,
    fp8: dict[str, FP8Weight] | None = None,
) -> Path:
    """Save ``model`` packed (smallest layout per tensor), its tokenizer, config and recipe, atomically.

    ``quantized`` maps parameter names to the :class:`QuantizedTensor` the (dequantized) weight came from;
    ``dtype`` is the storage dtype of float tensors (default: as in memory). ``layout``: ``auto`` (smallest),
    or force ``dense`` / ``bitmask`` / ``N:M`` for every tensor it applies to (tests and benchmarks).
    ``extra_files`` (name → text) are written into the folder before it is moved into place. ``fp8`` maps
    parameter names to the FP8 weights (scheme fp8) the dequantized weights came from.
    """
    from safetensors.torch import save_file

    tensors, index = pack_state(model, quantized=quantized, dtype=dtype, layout=layout, fp8=fp8)
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
        (tmp / RECIPE_FILE).write_text(json_text(full) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

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
    packed_path(folder, index)
    return index


def packed_path(folder: Path, index: dict) -> Path:
    """The packed weights file the index names: a plain file name inside ``folder`` (no path, no ``..``, no link
    out of the folder), a regular file (a FIFO would block the reader forever)."""
    name = index.get("file", PACKED_FILE)
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise UserError(
            f"{folder / RECIPE_FILE} names the packed file {name!r}, which is not a file name inside the folder; "
            "the folder is damaged or was edited"
        )
    path = folder / name
    if not (path.exists() or path.is_symlink()):
        raise UserError(f"{path} is missing; the packed folder is incomplete")
    if path.resolve().parent != folder.resolve():
        raise UserError(f"{path} is a link out of {folder}; the folder is damaged or was edited")
    regular_file(path, "packed weights file")
    return path


def _read_parts(folder: Path, index: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the packed file, checked against the index (keys, dtypes, shapes, sha256)."""
    from safetensors import safe_open

    path = packed_path(folder, index)
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
    folder: str | Path,
    recipe: dict | None = None,
    *,
    dequantize: bool = True,
    fp8: dict[str, FP8Weight] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """``(state_dict, quantized)`` of a packed folder: every tensor rebuilt (quantized weights dequantized
    to float32) and the exact :class:`QuantizedTensor` of each quantized weight (``[out, in]``; a fused 3-D
    expert parameter ``[E, out, in]``: ``[E·out, in]``, the experts' rows stacked).

    ``dequantize=False`` leaves the quantized weights out of the state dict (those another tensor is tied to
    excepted), for a caller that runs them from their codes (:mod:`lmcompress.kernels`). FP8 weights are in the
    state dict dequantized; a dict given as ``fp8`` receives their codes and scales by name."""
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
            if entry["kind"] == "fp8":
                w = _unpack_fp8(packed)
                if fp8 is not None:
                    fp8[name] = w
                value = w.dequantize()
            elif entry["kind"] == "quantized":
                q = unpack_quantized(packed)
                quantized[name] = q
                if not dequantize and "stacked" not in entry:  # fused experts: no kernel runs them, always dense
                    continue
                value = q.dequantize()
            else:
                value = unpack_tensor(packed)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"tensor {name!r} in {folder} cannot be rebuilt ({exc}); the folder is damaged") from None
        state[name] = value.t().contiguous() if entry.get("transposed") else value
        if "stacked" in entry:
            try:
                state[name] = value.reshape(entry["stacked"])
            except (RuntimeError, TypeError):
                raise UserError(f"tensor {name!r} in {folder} does not fit its shape; the folder is damaged") from None
    for name, target in aliases.items():
        if target not in state and target in quantized:  # tied to a weight left quantized
            q = quantized[target]
            state[target] = (
                q.dequantize().t().contiguous() if index["tensors"][target].get("transposed") else q.dequantize()
            )
        if target not in state:
            raise UserError(
                f"tensor {name!r} in {folder} is tied to {target!r}, which is not stored; the folder is damaged"
            )
        state[name] = state[target]
    return state, quantized


def load_packed_state(folder: str | Path, recipe: dict | None = None) -> dict[str, torch.Tensor]:
    """The full state dict of a packed folder (used by :func:`lmcompress.load`)."""
    return read_packed(folder, recipe)[0]


# ----------------------------------------------------------------------------------------------------------
# what a folder holds: bytes by tensor kind, bits per weight, sparsity (``lmcompress info``)
