"""Saving: dense folders that plain from_pretrained loads, quantized folders, and unpacking packed ones."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from lmcompress.algorithms.actquant import FP8Weight
from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.checkpoint.folder import RECIPE_FILE, RESIZED_MARKER, json_text, read_recipe, save_atomic
from lmcompress.checkpoint.packed import _index_of


def save_model(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    recipe: dict,
    *,
    overwrite: bool = False,
    dtype=None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save a model that loads with ``from_pretrained``, its tokenizer and the ``lmcompress.json`` recipe.

    ``extra_files`` (name → text) are written into the same folder before it is moved into place.
    """

    def write(tmp: Path) -> None:
        state = None
        if dtype is not None:  # store in the checkpoint's own dtype without touching the in-memory model
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state)
        config = json.loads((tmp / "config.json").read_text())
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        if recipe.get("surgery"):
            _guard_from_plain_loading(tmp, config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(json_text(recipe) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return save_atomic(out_dir, write, overwrite=overwrite)


def _guard_from_plain_loading(folder: Path, config: dict) -> None:
    """Make plain ``from_pretrained`` fail loudly on a folder whose layers its config cannot describe.

    Without this it may load such a folder *wrongly*: a bias that the config has no flag for is dropped with
    a mere warning. The weight files keep their content (``lmcompress.load`` reads every ``*.safetensors``)
    but lose the names transformers looks for, and the config names the way to load them.
    """
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).exists():
            (folder / name).rename(folder / name.replace("model.safetensors", "model.resized.safetensors"))
    config["quantization_config"] = {"quant_method": RESIZED_MARKER}


def save_quantized(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    recipe: dict,
    quantized: dict[str, QuantizedTensor],
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
    fp8: dict[str, FP8Weight] | None = None,
) -> Path:
    """Save ``model`` with its quantized layers packed as codes + grids (see ``checkpoint.packed.save_packed``);
    ``fp8``: FP8 weights (scheme fp8) stored as their codes and scales."""
    from lmcompress.checkpoint.packed import save_packed

    return save_packed(
        model,
        tokenizer,
        out_dir,
        recipe,
        quantized=quantized,
        overwrite=overwrite,
        dtype=dtype,
        extra_files=extra_files,
        fp8=fp8,
    )


def unpack_folder(
    folder: str | Path, output: str | Path, *, overwrite: bool = False, trust_remote_code: bool = False
) -> Path:
    """Write a packed folder out as a plain one (``model.safetensors`` in the stored dtype) that
    ``from_pretrained`` loads; quantized weights are written dequantized. A ``.gguf`` file is unpacked the same
    way (float32, see :func:`unpack_gguf`)."""
    from lmcompress.checkpoint.folder import check_output
    from lmcompress.checkpoint.gguf import is_gguf

    if is_gguf(folder):
        return unpack_gguf(folder, output, overwrite=overwrite)
    from lmcompress.checkpoint.load import load, source_dtype

    folder = Path(folder)
    check_output(output, overwrite, source=folder)
    recipe = read_recipe(folder)
    _index_of(folder, recipe)
    model, tokenizer = load(folder, dtype="float32", trust_remote_code=trust_remote_code)
    plain = {k: v for k, v in recipe.items() if k not in ("storage", "packed", "scheme")}
    plain["unpacked_from"] = str(folder)
    if recipe.get("scheme"):  # W8A8 / FP8: the weights as quantized, the inputs no longer (a plain folder)
        from lmcompress.checkpoint.schemes import plain_linears

        plain_linears(model)
        plain["scheme_dropped"] = {**recipe["scheme"], "note": "weights dequantized; activations not quantized"}
    return save_model(model, tokenizer, output, plain, overwrite=overwrite, dtype=source_dtype(model.config))


def unpack_gguf(path: str | Path, output: str | Path, *, overwrite: bool = False, progress: bool = False) -> Path:
    """Write a GGUF file out as a plain folder (float32 safetensors, config, tokenizer, recipe) that
    ``AutoModelForCausalLM.from_pretrained`` loads and that gives the same logits as the GGUF-loaded model."""
    from lmcompress.checkpoint.folder import check_output
    from lmcompress.checkpoint.gguf import check_gguf, gguf_recipe, load_gguf

    file = check_gguf(path)
    check_output(output, overwrite, source=file)
    start = time.perf_counter()
    model, tokenizer = load_gguf(file, progress=progress)
    recipe = {**gguf_recipe(file), "unpack_time_s": time.perf_counter() - start}
    return save_model(model, tokenizer, output, recipe, overwrite=overwrite, dtype=torch.float32)
