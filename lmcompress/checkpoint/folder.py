"""Loading models safely and saving results atomically (temp folder, then rename)."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path

from lmcompress.errors import UserError

log = logging.getLogger(__name__)

RECIPE_FILE = "lmcompress.json"
# config.json marker of folders that only lmcompress.load reads: plain transformers warns with this text
RESIZED_MARKER = "lmcompress-resized (load with lmcompress.load)"


def check_output(output: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """Refuse an output folder that exists (unless ``overwrite``) or that is the source model itself."""
    out = Path(output).expanduser()
    if (
        source is not None
        and Path(str(source)).expanduser().exists()
        and out.resolve() == Path(str(source)).expanduser().resolve()
    ):
        raise UserError(f"output {out} is the source model folder; lmcompress never modifies its input")
    if out.exists() and not overwrite:
        raise UserError(
            f"output folder {out} already exists; choose another output or pass overwrite",
            param=("output", "overwrite"),
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if not out.parent.exists():
        raise UserError(f"the parent folder of output ({out.parent}) does not exist", param="output")
    return out


def save_atomic(out_dir: str | Path, write, *, overwrite: bool) -> Path:
    """Call ``write(tmp_folder)`` then move the folder into place; nothing half-written is ever left."""
    out = check_output(out_dir, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_recipe(folder: str | Path) -> dict | None:
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the folder is damaged") from None
