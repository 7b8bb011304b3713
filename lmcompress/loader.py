"""``lmcompress.load``: load anything lmcompress wrote (dense, resized by surgery, or packed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmcompress.errors import UserError
from lmcompress.io import RECIPE_FILE, auto_model_class, load_config, load_model, parse_dtype, read_recipe
from lmcompress.surgery import apply_surgery


def needs_lmcompress(folder: str | Path) -> bool:
    """True when plain ``from_pretrained`` cannot load ``folder`` (packed weights or module surgery)."""
    recipe = read_recipe(folder) if Path(str(folder)).is_dir() else None
    return bool(recipe and (recipe.get("storage") == "packed" or recipe.get("surgery")))


def build_skeleton(config, dtype: torch.dtype, records: list[dict] | None = None) -> nn.Module:
    """The model class of ``config`` with surgery ``records`` applied, weights left for a state dict to fill."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = auto_model_class(config).from_config(config, dtype=dtype)
    return apply_surgery(model, records or [])


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the (possibly sharded) ``*.safetensors`` files of ``folder``."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no *.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as exc:
            raise UserError(f"cannot read {f}: {exc}; the file may be truncated or corrupted") from None
    return state


def fill(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> nn.Module:
    """Load ``state`` into ``model`` strictly (tied weights excepted), with an error naming what does not fit."""
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(
            f"the weights in {folder} do not fit the model described by its config and {RECIPE_FILE}: "
            f"{str(exc).splitlines()[-1].strip()}; the folder may be damaged or edited"
        ) from None
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise UserError(
            f"the weights in {folder} do not fit the model described by its config and {RECIPE_FILE}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}; the folder may be damaged or incomplete"
        )
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def load(
    folder: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` from a folder written by lmcompress, or any model plain transformers loads."""
    path = Path(str(folder)).expanduser()
    if not needs_lmcompress(path):
        model, tokenizer = load_model(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
        return model.to(device), tokenizer
    from transformers import AutoTokenizer

    recipe = json.loads((path / RECIPE_FILE).read_text())
    config = load_config(str(path), trust_remote_code)
    from lmcompress.storage import strip_marker

    strip_marker(config)  # the marker that stops plain from_pretrained on packed and resized folders
    model = build_skeleton(config, parse_dtype(dtype), recipe.get("surgery"))
    if recipe.get("storage") == "packed":
        from lmcompress.storage import load_packed_state  # packed layouts (bitmask, N:M, int-packed)

        state = load_packed_state(path, recipe)
    else:
        state = read_state_dict(path)
    state = {k: v.to(parse_dtype(dtype)) if v.is_floating_point() else v for k, v in state.items()}
    fill(model, state, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(f"could not load the tokenizer of {path}: {exc}") from None
    return model.to(device), tokenizer


def source_surgery(folder: str | Path) -> list[dict]:
    """The surgery records of a source folder (empty for plain models): a new output built from it needs them too."""
    recipe = read_recipe(folder) if Path(str(folder)).is_dir() else None
    return list((recipe or {}).get("surgery") or [])
