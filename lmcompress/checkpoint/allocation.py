"""Per-layer levels from a file: the one reader of what ``lmcompress search`` chose (``search.json``), what a
run given such a file recorded (its recipe's ``layer_targets``), or a plain JSON object of layer name → level; and
the one check that such levels fit the model they are applied to."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from lmcompress.checkpoint.folder import RECIPE_FILE
from lmcompress.errors import UserError

SEARCH_FILE = "search.json"
_NAMES = {"sparsity": "sparsities", "bits": "bit widths"}
_LEVEL = {"sparsity": "sparsity", "bits": "bit width"}  # what one layer has, by kind
_VERB = {"sparsity": "prunes", "bits": "quantizes"}


def read_layer_levels(
    path: str | Path, kind: str = "sparsity", *, what: str = "allocation", hint: str = ""
) -> dict[str, float]:
    """``{"layer name": level}`` from ``path``: a search's ``search.json``, an output folder (its ``search.json``,
    else its recipe), a recipe (``lmcompress.json``) whose ``layer_targets`` or ``layer_levels`` it holds, or a
    JSON object of layer name → level. The levels must be of ``kind`` (sparsity or bits).

    ``what`` names the file in errors (and is the parameter at fault); ``hint`` follows a wrong-kind error.
    """
    path = _file_of(Path(path).expanduser())
    data = _read_json(path, what)
    if isinstance(data, dict) and "layer_levels" in data:
        found = _kind_of(data)
        if found != kind:
            raise UserError(f"{path} holds {found or 'unknown'} levels, not {_NAMES.get(kind, kind)}{hint}", param=what)
        data = data["layer_levels"]
    elif isinstance(data, dict) and isinstance(data.get("layer_targets"), dict):
        data = data["layer_targets"]
    ok = isinstance(data, dict) and all(_number(v) for v in data.values())
    if not ok or not data:
        raise UserError(
            f"{what} file {path} must be a search.json or a non-empty JSON object of layer name → {kind} "
            "(finite numbers)",
            param=what,
        )
    return {str(k): float(v) for k, v in data.items()}


def check_layer_levels(
    layers: Iterable[str], given: Iterable[str], kind: str = "sparsity", *, what: str = "allocation", hint: str = ""
) -> None:
    """UserError unless the per-layer levels ``given`` (their layer names) name exactly ``layers``, the layers
    this run compresses; it says how many are missing or unknown, with a few names of each.

    ``what`` names the file in the error (and is the parameter at fault); ``hint`` follows its advice.
    """
    layers, given = set(layers), set(given)
    missing, unknown = layers - given, given - layers
    if not missing and not unknown:
        return
    verb = _VERB.get(kind, "compresses")
    parts = (
        [f"{len(missing)} of the model's layers have no {_LEVEL.get(kind, kind)} ({_some(missing)})"] if missing else []
    )
    parts += [f"{len(unknown)} names are not layers this run {verb} ({_some(unknown)})"] if unknown else []
    raise UserError(
        f"the {what} file's per-layer {_NAMES.get(kind, kind)} do not fit this model: {'; '.join(parts)}. Give {what} "
        f"a file searched on this model (its search.json){hint}",
        param=what,
    )


def _some(names: set[str]) -> str:
    shown = sorted(names)
    return ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")


def _file_of(path: Path) -> Path:
    """A folder's ``search.json``, or its recipe when it has no ``search.json`` but a recipe."""
    if not path.is_dir():
        return path
    if not (path / SEARCH_FILE).exists() and (path / RECIPE_FILE).is_file():
        return path / RECIPE_FILE
    return path / SEARCH_FILE


def _read_json(path: Path, what: str):
    if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
        raise UserError(f"{what} file {path} is not a regular file", param=what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist", param=what) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{what} file {path} is not readable JSON ({exc})", param=what) from None


def _kind_of(data: dict) -> str | None:
    """The budget kind of a ``search.json`` (its ``config``) or a search's recipe (its ``search``)."""
    for key in ("config", "search"):
        config = data.get(key)
        if isinstance(config, dict):
            return config.get("kind", "sparsity") if isinstance(config.get("kind", "sparsity"), str) else None
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
