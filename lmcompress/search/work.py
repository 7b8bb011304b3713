"""A whole search job's work folder and windows: ``.NAME.search-work`` beside the output holds the level database
and the search state until the end, so that a killed search run again continues. One process at a time holds it
(a lock file with its PID); a full disk removes it with a clear error."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from lmcompress.checkpoint.folder import pid_alive
from lmcompress.errors import UserError
from lmcompress.search.config import SearchConfig, SearchReport

LOCK_FILE = "lock"
_FULL = ("No space left", "StorageFull", "os error 28", "code: 28", "Disk quota exceeded")


def work_folder(output: str | Path) -> Path:
    """Where the search writing ``output`` keeps its database and state: a hidden folder beside it."""
    out = Path(output).expanduser()
    return out.parent / f".{out.name}.search-work"


@contextmanager
def held_work(output: str | Path, *, keep: bool = False) -> Iterator[Path]:
    """The work folder of the search writing ``output``, held by this process until the block ends.

    Another live search into the same output is refused before any work (the folder's lock names its PID; a
    killed search's lock is taken over). At the end the folder is removed unless ``keep``; after an error it
    stays (a search run again with the same settings continues), except on a full disk: then it is removed to
    give the space back, and the error says so.
    """
    work = work_folder(output)
    _take(work, output)
    try:
        yield work
    except Exception as exc:
        _release(work)
        if not disk_full(exc):
            raise
        shutil.rmtree(work, ignore_errors=True)
        raise UserError(
            f"the disk is full ({_reason(exc)}): the search's work folder {work} was removed and nothing was "
            f"written to {output}; free space (the level database takes about one copy of the model per level) "
            "and run the search again"
        ) from None
    except BaseException:  # an interrupt: the state stays for the next run
        _release(work)
        raise
    _release(work)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


def _take(work: Path, output: str | Path) -> None:
    """Create ``work/lock`` holding this PID, or refuse when a live process holds it."""
    try:
        work.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise UserError(f"the parent folder of output ({work.parent}) does not exist", param="output") from None
    except OSError as exc:
        raise UserError(f"cannot create the search's work folder {work} ({exc.strerror or exc})") from None
    lock = work / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None and holder != os.getpid() and pid_alive(holder):
                raise UserError(
                    f"another search (process {holder}) is writing {output}: its work folder {work} is in use; "
                    "wait for it to finish or choose another output"
                ) from None
            lock.unlink(missing_ok=True)  # left by a killed search: take it over
            continue
        except OSError as exc:
            raise UserError(f"cannot create the lock {lock} ({exc.strerror or exc})") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise UserError(f"another search took the work folder {work} at the same moment; run again")


def _holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _release(work: Path) -> None:
    """Remove this process's lock, and the work folder if nothing else is in it."""
    lock = work / LOCK_FILE
    if _holder(lock) == os.getpid():
        lock.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only when empty: a search that failed before any work leaves nothing
        work.rmdir()


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it was raised from) says the disk is full: an ``OSError`` ENOSPC / EDQUOT, or
    safetensors' error for the same."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, SafetensorError) and any(text in str(exc) for text in _FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _reason(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def split_windows(windows: torch.Tensor, nsamples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration windows (the first ``nsamples``) and the held-out fitness windows (the rest), which
    :func:`lmcompress.calibration.data.draw` cuts from a part of the text the calibration windows do not touch."""
    return windows[:nsamples], windows[nsamples:]


def recipe_fields(config: SearchConfig, report: SearchReport) -> dict:
    """What a search's recipe says was done."""
    max_loss = config.max_loss
    return {
        "search": config.to_dict(),
        "method": config.method,
        "budget": {"decode": config.decode} if config.decode is not None else {config.kind: report.config["target"]},
        "max_loss": max_loss,
        "max_loss_confidence": config.max_loss_confidence if max_loss is not None else None,
        "tuned": report.tuned,
        "achieved": report.achieved,
        "layer_levels": report.layer_levels,
        "fitness": {"kind": config.fitness, "value": report.fitness, "baselines": report.baselines},
        "fitness_windows": config.held_out,
    }
