"""Output folders and files: checks before any work, atomic writes (temp name, then rename), recipes.

Every folder lmcompress writes goes through :func:`save_atomic` and every single file through
:func:`write_file_atomic`: the result is written under a hidden temporary name ``.NAME.tmp-PID-XXXXXXXX`` next
to its destination and renamed into place only when complete, so a failed or killed job never leaves a
half-written output. The PID in the name lets a later write remove what a killed process left behind.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from lmcompress.errors import UserError

log = logging.getLogger(__name__)

RECIPE_FILE = "lmcompress.json"
# config.json marker of folders that only lmcompress.load reads: plain transformers warns with this text
RESIZED_MARKER = "lmcompress-resized (load with lmcompress.load)"

_STARTED = time.time()  # temporaries older than this process and owned by a dead PID are stale
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


# ------------------------------------------------------------------------------------------------------------
# JSON that is always valid


def _finite(obj):
    """``obj`` with every NaN / ±inf float replaced by ``None`` (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj, *, indent: int | None = 2) -> str:
    """Strict JSON for ``obj``: non-finite floats become ``null`` and other objects their ``str``.

    ``json.dumps`` would otherwise write bare ``NaN`` / ``Infinity``, which JSON parsers reject.
    """
    return json.dumps(_finite(obj), indent=indent, default=str, allow_nan=False)


# ------------------------------------------------------------------------------------------------------------
# checks before any work


def check_not_nested(output: str | Path, source: str | Path | None, what: str = "output") -> None:
    """Refuse an output that is the source folder, lies inside it, or contains it (``--overwrite`` would delete it)."""
    if source is None:
        return
    src = _expand(source)
    if not _exists(src) or not src.exists():  # a hub id (or a broken link, which the loader names)
        return
    src, out = _resolve(src), _resolve(_expand(output))
    if out == src:
        raise UserError(f"{what} {output} is the source model folder; lmcompress never modifies its input")
    if src.is_relative_to(out):
        raise UserError(
            f"{what} {output} contains the source model {source}: replacing it would delete the source; "
            "choose an output folder outside it"
        )
    if out.is_relative_to(src):
        raise UserError(
            f"{what} {output} is inside the source model folder {source}; lmcompress never writes into its "
            "input: choose an output folder outside it"
        )


def check_writable(folder: Path, name: str) -> None:
    """Create and remove a temporary folder in ``folder``: a clear error now instead of after all the work."""
    probe = folder / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UserError(f"the output name {name!r} is too long for the file system; choose a shorter one") from None
        raise UserError(f"cannot write to {folder} ({exc.strerror or exc}); choose a writable output folder") from None


def _expand(path: str | Path) -> Path:
    """``path`` with ``~`` expanded; ``~nouser`` is a :class:`UserError`."""
    try:
        return Path(str(path)).expanduser()
    except RuntimeError:
        raise UserError(f"cannot expand {path}: no such user's home folder; give the full path") from None


def _resolve(path: Path) -> Path:
    """``path.resolve()``, with a symbolic link loop a :class:`UserError`."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        raise UserError(f"cannot use the path {path}: {exc}; fix the symbolic link") from None


def _exists(path: Path) -> bool:
    """``path.exists()``, with a name too long for the file system (or another OS refusal) a :class:`UserError`."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            return False
        raise UserError(f"cannot use the path {path}: {exc.strerror or exc}; choose a shorter or valid path") from None
    return path.exists() or path.is_symlink()


def check_output(output: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """Refuse an output folder that exists (unless ``overwrite``), is or holds or lies in the source model, is or
    holds the current folder, or whose parent folder is missing or not writable."""
    out = _expand(output)
    check_not_nested(out, source)
    exists = _exists(out)
    if exists and Path.cwd().resolve().is_relative_to(_resolve(out)):
        raise UserError(
            f"output {output} is the current folder or holds it: replacing it would delete the folder you work in; "
            "choose another output",
            param="output",
        )
    if exists and not overwrite:
        raise UserError(
            f"output folder {out} already exists; choose another output or pass overwrite",
            param=("output", "overwrite"),
        )
    if exists and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if not out.parent.is_dir():
        raise UserError(f"the parent folder of output ({out.parent}) does not exist", param="output")
    check_writable(out.parent, out.name)
    return out


# ------------------------------------------------------------------------------------------------------------
# atomic writes


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporaries of ``target`` (``.NAME.tmp-PID-*``) left by killed processes; the removed paths.

    A temporary is stale when it is older than this process and the PID in its name is not running. A stale
    ``.NAME.old-PID-*`` (the previous output, moved aside while the new one is renamed in) is removed only when
    ``target`` exists; otherwise it may be the only copy and is reported, not deleted.
    """
    removed: list[Path] = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():  # not glob: the name may hold glob characters
        m = _TEMP.match(path.name)
        if not m or m["name"] != target.name or pid_alive(int(m["pid"])):
            continue
        try:
            if path.lstat().st_mtime >= _STARTED:
                continue
            if m["kind"] == "old" and not target.exists():
                log.warning("%s holds the previous %s from a killed run; rename it back if you need it", path, target)
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove the stale temporary %s: %s", path, exc)
            continue
        log.info("removed %s, left behind by a killed run (process %s)", path, m["pid"])
        removed.append(path)
    return removed


def _temp_name(target: Path, kind: str = "tmp") -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _write_error(target: Path, exc: Exception) -> UserError:
    """The error for a failed write: an ``OSError``, or a library's own error around one (safetensors raises
    ``SafetensorError: Error while serializing: IoError(Os { code: 28, kind: StorageFull ...})``)."""
    reason = getattr(exc, "strerror", None) or str(exc)
    code = getattr(exc, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or any(w in str(exc) for w in ("StorageFull", "No space left"))
    hint = " (the disk is full)" if full else ""
    work = _work_folder(target)
    if work is not None:  # a streamed run keeps its finished blocks to resume from: say so, not "nothing written"
        return UserError(
            f"could not write {target}: {reason}{hint}; the blocks finished so far are kept in {work}: free space "
            f"and rerun the same command with resume to continue, or delete {work}",
            param="resume",
        )
    return UserError(
        f"could not write {target}: {reason}{hint}; nothing was written: free space or choose another output folder"
    )


def _work_folder(target: Path) -> Path | None:
    """The work folder ``.NAME.partial`` of a streamed run that ``target`` lies in or is the output of, if any."""
    for folder in (target, *target.parents):
        if folder.name.startswith(".") and folder.name.endswith(".partial"):
            return folder
    sibling = target.parent / f".{target.name}.partial"
    return sibling if sibling.is_dir() else None


def _is_write_error(exc: Exception) -> bool:
    """Whether ``exc`` is a failed write: an ``OSError`` or a ``SafetensorError`` (which wraps the OS's error)."""
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def _replace(out: Path, tmp: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed once ``tmp`` is in place. An
    ``out`` that is a symbolic link is replaced as a link (its target is left alone)."""
    if not (out.exists() or out.is_symlink()):
        tmp.rename(out)
        return
    old = _temp_name(out, "old")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_symlink() or not old.is_dir():
        old.unlink(missing_ok=True)
    else:
        shutil.rmtree(old, ignore_errors=True)


def save_atomic(out_dir: str | Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Call ``write(tmp_folder)`` then rename the folder into place; nothing half-written is ever left.

    An ``OSError`` or ``SafetensorError`` while writing (a full disk, a read-only folder) becomes a
    :class:`UserError`; the temporary folder is removed and an existing output (``overwrite``) is kept as it was.
    """
    out = check_output(out_dir, overwrite)
    clean_stale(out)
    tmp = _temp_name(out)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise _write_error(out, exc) from None
    try:
        write(tmp)
        _replace(out, tmp)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_error(exc):
            raise _write_error(out, exc) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_file_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file beside it and an atomic rename."""
    raw = data.encode() if isinstance(data, str) else data
    return write_path_atomic(path, lambda tmp: tmp.write_bytes(raw))


def write_path_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_file)`` (a writer that opens the file itself) and rename the file to ``path`` when it
    returns; on any error the temporary file is removed and an existing ``path`` is left as it was."""
    path = Path(path)
    clean_stale(path)
    tmp = _temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        if _is_write_error(exc):
            raise _write_error(path, exc) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------------------
# recipes

_RECIPE_TYPES = {"surgery": list, "storage": str, "packed": dict, "kind": str, "source_model": str}


def read_recipe(folder: str | Path) -> dict | None:
    """The ``lmcompress.json`` of ``folder`` (``None`` if it has none), checked to be an object whose keys that
    loading relies on have the right types."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the folder is damaged") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path} holds a JSON {type(recipe).__name__}, not an object; the folder is damaged")
    for key, kind in _RECIPE_TYPES.items():
        if recipe.get(key) is not None and not isinstance(recipe[key], kind):
            raise UserError(
                f"{path}: {key!r} is a {type(recipe[key]).__name__}, expected a {kind.__name__}; the folder is damaged"
            )
    if any(not isinstance(r, dict) for r in recipe.get("surgery") or []):
        raise UserError(f"{path}: 'surgery' must be a list of objects; the folder is damaged")
    return recipe
