"""Sweeps: a grid of compressions of one dense model, each made from a copy in memory, saved once to measure its
size on disk, and evaluated on the same tasks; each result is written as soon as it exists, and a rerun skips
what is done. Three kinds of axes: pruning (method × allocation × pattern × sparsity), quantization (RTN / GPTQ
× bits, or × weight-and-activation scheme × SmoothQuant α) and structured shrinking (FFN channels / attention
heads × allocation × ratio). A W8A8 / FP8 point is evaluated with its activations quantized exactly as the folder
``lmcompress quantize --scheme`` writes runs them (its layers rebuilt as ``load`` rebuilds them).

Layout of a results folder::

    RESULTS_DIR/sweep.json          settings that shape every number (model, tasks, calibration...) + the grid
    RESULTS_DIR/points/dense.json   the dense baseline, evaluated once
    RESULTS_DIR/points/<id>.json    one file per grid point, e.g. wanda-owl-unstructured-0.600.json,
                                    gptq-4bit-g128.json, rtn-w8a8-sq0.5.json, ffn-uniform-0.300.json
    RESULTS_DIR/sweep.lock          while a sweep runs: its PID and host (a second sweep is refused)

Every file is written to a temporary name and renamed, so a killed sweep leaves only finished points.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmcompress.algorithms.actquant import SCHEMES
from lmcompress.algorithms.masks import Pattern
from lmcompress.checkpoint.folder import (
    check_not_nested,
    check_writable,
    json_text,
    pid_alive,
    write_file_atomic,
)
from lmcompress.checkpoint.load import DTYPES
from lmcompress.errors import UserError
from lmcompress.job_options import DEFAULT_PERCDAMP, check_percdamp
from lmcompress.transforms.prune import METHODS, PruneConfig
from lmcompress.transforms.quantize import QuantConfig, check_quant_grid
from lmcompress.transforms.shrink import StructureConfig

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
POINTS = "points"
DENSE_ID = "dense"
LOCK_FILE = "sweep.lock"
SIZES = ".sizes"  # folders saved to measure each point's size on disk, removed after


MAX_POINTS = 1000  # a grid larger than this is a mistake (each point is a compression plus an evaluation)
QUANT_METHODS = ("rtn", "gptq")
SHRINK_METHODS = ("ffn", "heads")  # structured: FFN channels, or KV groups of attention heads
ALL_METHODS = (*METHODS, *QUANT_METHODS, *SHRINK_METHODS)
WEIGHT_ONLY = "none"  # the scheme axis value of weight-only points (the bits axis)


def _too_many(n: int, what: str) -> UserError:
    return UserError(
        f"{what} would give {n:,} sweep points; a sweep compresses and evaluates every point, so at most "
        f"{MAX_POINTS:,} are accepted: use a larger step or fewer values",
        param=what.split()[0],
    )


def parse_levels(text: str, name: str = "sparsities") -> list[float]:
    """``"0.1:0.9:0.1"`` (start:stop:step, stop included) or ``"0.3,0.5,0.7"`` → sorted fractions in (0, 1).

    The number of values is counted before any is made: more than :data:`MAX_POINTS` is an error."""
    text = text.strip()
    n = 0
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not (step > 0 and stop >= start and math.isfinite(start) and math.isfinite(stop)):
                raise ValueError
            n = math.floor((stop - start) / step + 1e-9) + 1
            values = [] if n > MAX_POINTS else [round(start + i * step, 6) for i in range(n)]
        else:
            values = [round(float(x), 6) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"{name} {text!r}: write START:STOP:STEP (e.g. 0.1:0.9:0.1) or a list (e.g. 0.3,0.5,0.7)", param=name
        ) from None
    if n > MAX_POINTS:
        raise _too_many(n, f"{name} {text!r}")
    bad = [v for v in values if not 0.0 < v < 1.0]
    if not values or bad:
        raise UserError(f"{name} must be fractions strictly between 0 and 1, got {values}", param=name)
    return sorted(set(values))


def parse_sparsities(text: str) -> list[float]:
    """Sparsity levels, as :func:`parse_levels` reads them."""
    return parse_levels(text, "sparsities")


def parse_bits(text: str) -> list[int]:
    """``"8,4,3"`` → the bit widths, largest first (each checked to be an integer from 2 to 8)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bits {text!r}: write a list of integers, e.g. 8,4,3", param="bits") from None
    if not values:
        raise UserError("bits needs at least one bit width, e.g. 8,4,3", param="bits")
    return sorted(set(values), reverse=True)


def _split(text: str | list[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else text
    return [s.strip() for s in items if s.strip()]


def parse_smoothquant(text: str) -> list[float | str | None]:
    """``"none,0.5,auto"`` → ``[None, 0.5, "auto"]``: SmoothQuant's α values (each checked when its point's config
    is built: a number in [0, 1], or ``auto``); ``none`` is a point without SmoothQuant."""
    out: list[float | str | None] = []
    for item in _split(text):
        if item.lower() in ("none", "auto"):
            out.append(None if item.lower() == "none" else "auto")
            continue
        try:
            out.append(round(float(item), 6))
        except ValueError:
            raise UserError(
                f"smoothquant {item!r}: give α values in [0, 1], auto or none, e.g. none,0.5,auto", param="smoothquant"
            ) from None
    if not out:
        raise UserError("smoothquant needs at least one value, e.g. none,0.5,auto", param="smoothquant")
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Point:
    """One grid point. Pruning: ``allocation``, ``pattern``, ``sparsity``; quantization: ``bits``,
    ``group_size``, and for a weight-and-activation scheme (``w8a8`` / ``fp8``; bits 8 per channel) ``scheme``,
    ``dynamic`` (FP8 per-token activations) and ``smoothquant`` (α or ``"auto"``); structured (``ffn`` /
    ``heads``): ``allocation``, ``ratio`` (fraction of units removed)."""

    method: str
    allocation: str | None = None
    pattern: str | None = None
    sparsity: float | None = None
    bits: int | None = None
    group_size: int | None = None
    ratio: float | None = None
    scheme: str | None = None
    dynamic: bool | None = None
    smoothquant: float | str | None = None

    @property
    def kind(self) -> str:
        return "quant" if self.method in QUANT_METHODS else "shrink" if self.method in SHRINK_METHODS else "prune"

    @property
    def id(self) -> str:
        if self.kind == "quant" and self.scheme is not None:
            sq = self.smoothquant
            sq = "" if sq is None else "-sqauto" if sq == "auto" else f"-sq{sq:g}"
            return f"{self.method}-{self.scheme}{'-dynamic' if self.dynamic else ''}{sq}"
        if self.kind == "quant":
            return f"{self.method}-{self.bits}bit-{'channel' if self.group_size == -1 else f'g{self.group_size}'}"
        if self.kind == "shrink":
            return f"{self.method}-{self.allocation}-{self.ratio:.3f}"
        return f"{self.method}-{self.allocation}-{self.pattern.replace(':', 'of')}-{self.sparsity:.3f}"


@dataclass
class SweepConfig:
    """Everything a sweep needs besides the model. Grid axes are lists; the rest are shared by every point.

    ``methods`` mixes three kinds, each with its own axes: pruning (magnitude, wanda, sparsegpt) over
    ``allocations`` × ``patterns`` × ``sparsities``; quantization (rtn, gptq) over ``schemes``: ``"none"``
    (weight only) over ``bits`` at ``group_size``, ``"w8a8"`` / ``"fp8"`` (8 bits per channel, activations
    quantized; FP8 per token with ``dynamic``, else per tensor, calibrated) over ``smoothquant`` (α values,
    ``"auto"``, ``None``: without); structured shrinking (ffn, heads) over ``allocations`` × ``ratios``."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    allocations: list[str] = field(default_factory=lambda: ["uniform"])
    sparsities: list[float] = field(default_factory=lambda: parse_sparsities("0.1:0.9:0.1"))
    patterns: list[str] = field(default_factory=lambda: ["unstructured"])
    bits: list[int] = field(default_factory=lambda: [8, 4, 3])
    group_size: int = 128
    ratios: list[float] = field(default_factory=lambda: parse_levels("0.1:0.5:0.1", "ratios"))
    schemes: list[str] = field(default_factory=lambda: [WEIGHT_ONLY])
    dynamic: bool = False
    smoothquant: list[float | str | None] = field(default_factory=lambda: [None])
    tasks: str = "ppl:wikitext2"
    harness: str | None = None
    limit: int | None = None
    shots: int = 0
    eval_seed: int = 0
    retrieval_lengths: list[int] | None = None
    calib_data: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    percdamp: float | str = DEFAULT_PERCDAMP  # fraction of mean diag H, or auto
    blocksize: int = 128
    dtype: str = "float32"
    batch_size: int = 16
    agreement: bool = True  # KL / top-1 agreement against the dense model on the first ppl task's windows

    def __post_init__(self) -> None:
        self.percdamp = check_percdamp(self.percdamp)
        self.validate()

    def kinds(self) -> set[str]:
        return {Point(m).kind for m in _split(self.methods)}

    def count(self) -> int:
        """How many points :meth:`points` will make (an upper bound), counted without making them."""
        m = _split(self.methods)
        nm = sum(Pattern.parse(p).is_nm for p in self.patterns)
        per_prune = len(self.allocations) * ((len(self.patterns) - nm) * len(self.sparsities) + nm)
        per_quant = len(self.bits) * (WEIGHT_ONLY in self.schemes) + len(self.smoothquant) * sum(
            s != WEIGHT_ONLY for s in self.schemes
        )
        return (
            sum(x in METHODS for x in m) * per_prune
            + sum(x in QUANT_METHODS for x in m) * per_quant
            + sum(x in SHRINK_METHODS for x in m) * len(self.allocations) * len(self.ratios)
        )

    def points(self) -> list[Point]:
        """The grid, invalid combinations (OWL with N:M) left out with a warning, duplicates removed."""
        if self.count() > MAX_POINTS:
            raise _too_many(self.count(), "methods × axes")
        out: dict[Point, None] = {}
        for method in self.methods:
            kind = Point(method).kind
            if kind == "quant":
                out.update(dict.fromkeys(self._quant_points(method)))
            elif kind == "shrink":
                out.update((Point(method, a, ratio=r), None) for a in self.allocations for r in self.ratios)
            else:
                out.update(dict.fromkeys(self._prune_points(method)))
        if not out:
            raise UserError(
                "the sweep grid is empty: check methods, allocations and patterns",
                param=("methods", "allocations", "patterns"),
            )
        return list(out)

    def _quant_points(self, method: str) -> list[Point]:
        out = []
        for scheme in self.schemes:
            if scheme == WEIGHT_ONLY:
                out += [Point(method, bits=b, group_size=self.group_size) for b in self.bits]
            else:
                dynamic = True if scheme == "fp8" and self.dynamic else None
                out += [Point(method, bits=8, group_size=-1, scheme=scheme, dynamic=dynamic, smoothquant=sq)
                        for sq in self.smoothquant]  # fmt: skip
        return out

    def _prune_points(self, method: str) -> list[Point]:
        out = []
        for allocation in self.allocations:
            for pattern in self.patterns:
                nm = Pattern.parse(pattern).is_nm
                if nm and allocation == "owl":
                    log.warning("skipping %s with OWL and pattern %s: OWL needs unstructured sparsity", method, pattern)
                    continue
                levels = [Pattern.parse(pattern).sparsity] if nm else self.sparsities
                out += [Point(method, allocation, str(Pattern.parse(pattern)), round(s, 6)) for s in levels]
        return out

    def validate(self) -> None:
        """Check every field (a :class:`UserError` names the bad one) and every grid point's transform config;
        comma-separated ``methods``, ``allocations`` and ``patterns`` become lists."""
        self.methods, self.allocations = _split(self.methods), _split(self.allocations)
        self.patterns = _split(self.patterns)
        for m in self.methods:
            if m not in ALL_METHODS:
                raise UserError(
                    f"unknown method {m!r} in methods: choose pruning ({', '.join(METHODS)}), quantization "
                    f"({', '.join(QUANT_METHODS)}) or structured ({', '.join(SHRINK_METHODS)})",
                    param="methods",
                )
        for a in self.allocations:
            if a not in ("uniform", "owl"):
                raise UserError(
                    f"unknown allocation {a!r} in allocations: choose from uniform, owl",
                    param="allocations",
                )
        for p in self.patterns:
            try:
                Pattern.parse(p)
            except ValueError as exc:
                raise UserError(f"patterns {p!r}: {exc}", param="patterns") from None
        if not self.methods or not self.allocations or not self.patterns:
            raise UserError(
                "methods, allocations and patterns each need at least one value",
                param=("methods", "allocations", "patterns"),
            )
        self._validate_numbers()
        self._validate_evaluation()
        for p in self.points():  # every point is a valid transform config (raises UserError otherwise)
            self.transform_config(p)

    def _validate_numbers(self) -> None:
        if self.nsamples <= 0:
            raise UserError(f"nsamples must be positive, got {self.nsamples}", param="nsamples")
        if self.seqlen is not None and self.seqlen < 2:
            raise UserError(
                f"seqlen must be at least 2 (one to predict from, one predicted), got {self.seqlen}", param="seqlen"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {self.batch_size}", param="batch_size")
        if "quant" in self.kinds():
            self._validate_schemes()
            if WEIGHT_ONLY in self.schemes and not self.bits:
                raise UserError("bits needs at least one bit width, e.g. 8,4,3", param="bits")
            for b in self.bits if WEIGHT_ONLY in self.schemes else []:
                check_quant_grid(b, self.group_size)
        if "shrink" in self.kinds() and (not self.ratios or any(not 0 < r < 1 for r in self.ratios)):
            raise UserError(f"ratios must be fractions strictly between 0 and 1, got {self.ratios}", param="ratios")
        if "prune" in self.kinds() and (not self.sparsities or any(not 0 < s < 1 for s in self.sparsities)):
            raise UserError(
                f"sparsities must be fractions strictly between 0 and 1, got {self.sparsities}", param="sparsities"
            )

    def _validate_schemes(self) -> None:
        self.schemes = _split(self.schemes)
        unknown = [s for s in self.schemes if s != WEIGHT_ONLY and s not in SCHEMES]
        if not self.schemes or unknown:
            raise UserError(
                f"schemes {self.schemes}: choose from {WEIGHT_ONLY} (weight-only, the bits axis), {', '.join(SCHEMES)}",
                param="schemes",
            )
        if not isinstance(self.smoothquant, list) or not self.smoothquant:
            raise UserError("smoothquant needs a list of α values, auto or None", param="smoothquant")
        if self.smoothquant != [None] and set(self.schemes) == {WEIGHT_ONLY}:
            raise UserError(
                "smoothquant applies to the scheme points (w8a8, fp8): add a scheme, or drop smoothquant",
                param=("smoothquant", "schemes"),
            )
        if self.dynamic and "fp8" not in self.schemes:
            raise UserError(
                "dynamic applies to scheme fp8 (per-token activation scales): add fp8 to schemes, or drop dynamic",
                param=("dynamic", "schemes"),
            )

    def _validate_evaluation(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise UserError(f"limit must be a positive number of examples per task, got {self.limit}", param="limit")
        if self.shots < 0:
            raise UserError(f"shots must be >= 0, got {self.shots}", param="shots")
        if self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}", param="dtype")

    def transform_config(self, p: Point) -> PruneConfig | QuantConfig | StructureConfig:
        """The config of the transform that makes point ``p`` (validated when built)."""
        if p.kind == "quant":
            return QuantConfig(
                method=p.method,
                bits=p.bits,
                group_size=p.group_size,
                percdamp=self.percdamp,
                blocksize=self.blocksize,
                scheme=p.scheme,
                dynamic=bool(p.dynamic),
                smoothquant=p.smoothquant,
            )
        if p.kind == "shrink":
            return StructureConfig(
                structure=p.method, ratio=p.ratio, allocation=p.allocation, owl_m=self.owl_m, owl_lambda=self.owl_lambda
            )
        return self.prune_config(p)

    def prune_config(self, p: Point) -> PruneConfig:
        nm = Pattern.parse(p.pattern).is_nm
        return PruneConfig(
            method=p.method,
            sparsity=None if nm else p.sparsity,
            pattern=p.pattern,
            allocation=p.allocation,
            owl_m=self.owl_m,
            owl_lambda=self.owl_lambda,
            percdamp=self.percdamp,
            blocksize=self.blocksize,
        )

    def settings(self, model: str) -> dict:
        """What shapes every number of the sweep (not the grid, not batch size): reruns must match it."""
        s = asdict(self)
        grid = ("methods", "allocations", "sparsities", "patterns", "bits", "group_size", "ratios", "batch_size")
        for key in (*grid, "schemes", "dynamic", "smoothquant"):  # the scheme axes are the points' (their ids)
            s.pop(key)
        model_path = Path(str(model)).expanduser()
        s["model"] = str(model_path.resolve()) if model_path.exists() else str(model)
        return s


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as strict JSON to ``path`` atomically (:func:`lmcompress.checkpoint.folder.write_file_atomic`)."""
    write_file_atomic(path, json_text(obj) + "\n")


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or a :class:`UserError` saying the file is damaged and what to do."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {what}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; {what}")
    return value


POINT_KEYS = {"id": str, "method": str, "metrics": dict, "higher_is_better": dict}


def read_sweep_file(path: Path) -> dict:
    """``sweep.json``, checked to have the shape this module writes: ``settings`` object, ``grid`` of points."""
    what = "the results folder is damaged: delete it, or overwrite it to start the sweep again"
    record = _read_json(path, what)
    settings, grid = record.get("settings"), record.get("grid", [])
    if not isinstance(settings, dict) or not isinstance(grid, list):
        raise UserError(f"{path} has no 'settings' object and 'grid' list; {what}")
    try:
        [Point(**p) for p in grid]
    except TypeError:
        raise UserError(f"{path}: its 'grid' holds entries that are not sweep points; {what}") from None
    return record


# ---------------------------------------------------------------------------------------------- the folder


def _lock_holder(path: Path) -> str | None:
    """Who holds the lock file ``path`` (``"PID 123 on host"``), or ``None`` when it is stale (its process,
    on this machine, is gone) or was just removed."""
    try:
        holder = json.loads(path.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"an unreadable lock ({path})"
    if host == socket.gethostname() and not pid_alive(pid):
        return None
    return f"PID {pid} on {host}"


def _refuse_if_locked(out: Path) -> None:
    holder = _lock_holder(out / LOCK_FILE)
    if holder is not None:
        raise UserError(
            f"another sweep ({holder}) is running into {out}: two sweeps into one folder would compute the same "
            f"points twice. Wait for it to finish and run again (finished points are kept), or use another "
            f"output. If no such sweep runs, delete {out / LOCK_FILE}",
            param="output",
        )


def acquire_lock(out: Path) -> Path:
    """Create ``out/sweep.lock`` (this process's PID and host) atomically, taking over a stale one; a live one
    is a :class:`UserError` (a second sweep into the same folder is refused, not queued)."""
    path = out / LOCK_FILE
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_if_locked(out)
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        return path
    _refuse_if_locked(out)
    raise UserError(f"cannot take the lock {path}; delete it if no sweep runs into {out}")


def release_lock(path: Path) -> None:
    """Remove the lock file if this process holds it."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


@dataclass
class FolderPlan:
    """What :func:`check_folder` found: finished points to keep, the grid of earlier runs, whether to discard."""

    done: dict[str, dict]
    known: list[dict]
    discard: bool


def check_folder(out: Path, settings: dict, overwrite: bool) -> FolderPlan:
    """Check the results folder without writing to it: the finished points that match ``settings``."""
    sweep_file = out / SWEEP_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder", param="output")
    if out.is_dir():
        _refuse_if_locked(out)
    if out.exists() and not sweep_file.is_file() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise UserError(
            f"output {out} is a non-empty folder that holds no sweep; choose a new or empty folder", param="output"
        )
    if not out.parent.exists():
        raise UserError(f"the parent folder of output ({out.parent}) does not exist", param="output")
    check_writable(out if out.is_dir() else out.parent, SWEEP_FILE)
    if not sweep_file.is_file():
        return FolderPlan({}, [], False)
    try:
        old = read_sweep_file(sweep_file)
    except UserError:
        if not overwrite:
            raise
        log.warning("%s is damaged; overwrite: starting the sweep again", sweep_file)
        return FolderPlan({}, [], True)
    finished = [f for f in (out / POINTS).glob("*.json") if not f.name.startswith(".")]
    if old.get("settings") == settings:
        return FolderPlan(load_points(out, settings_hash(settings)), old.get("grid", []), False)
    if finished and not overwrite:
        diff = sorted(k for k in set(settings) | set(old["settings"]) if old["settings"].get(k) != settings.get(k))
        details = "; ".join(f"{k}: {old['settings'].get(k)!r} → {settings.get(k)!r}" for k in diff)
        raise UserError(
            f"{out} holds a sweep made with other settings ({details}). Its points cannot be mixed with "
            "these: use a new output, or pass overwrite to discard the old points",
            param=("output", "overwrite"),
        )
    return FolderPlan({}, [], True)  # overwrite, or a run that stopped before its first point


def open_folder(out: Path, settings: dict, grid: list[Point], plan: FolderPlan) -> tuple[Path, dict[str, dict]]:
    """Create the folder, take its lock, apply ``plan`` and write ``sweep.json``; ``(lock, finished points)``.

    The finished points are read again under the lock: what another sweep finished meanwhile is not redone."""
    try:
        out.mkdir(exist_ok=True)
        lock = acquire_lock(out)
    except OSError as exc:
        raise UserError(f"cannot create {out} ({exc.strerror or exc}); choose a writable output folder") from None
    try:
        if plan.discard:
            shutil.rmtree(out / POINTS, ignore_errors=True)
        shutil.rmtree(out / SIZES, ignore_errors=True)  # measuring folders of a killed run
        (out / POINTS).mkdir(exist_ok=True)
        ids = [p.id for p in grid]
        known_ids = {Point(**k).id for k in plan.known}
        merged = plan.known + [asdict(p) for p in grid if p.id not in known_ids]
        record = {"settings": settings, "settings_hash": settings_hash(settings), "grid": merged, "last_grid": ids}
        write_json_atomic(out / SWEEP_FILE, record)
        return lock, load_points(out, settings_hash(settings))
    except OSError as exc:
        release_lock(lock)
        raise UserError(f"cannot write into {out} ({exc.strerror or exc}); choose a writable output folder") from None
    except BaseException:
        release_lock(lock)
        raise


def check_point(path: Path, record: dict) -> None:
    """A :class:`UserError` naming ``path`` and what is wrong when a point lacks a key the report reads."""
    fix = "delete it and rerun the sweep to redo that point"
    for key, kind in POINT_KEYS.items():
        if not isinstance(record.get(key), kind):
            got = "missing" if key not in record else f"a {type(record[key]).__name__}, not a {kind.__name__}"
            raise UserError(f"{path}: '{key}' is {got}; {fix}")
    bad = [k for k, v in record["metrics"].items() if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
        raise UserError(f"{path}: metric {bad[0]!r} is not a number; {fix}")
    undirected = [k for k in record["metrics"] if not isinstance(record["higher_is_better"].get(k), bool)]
    if undirected:
        raise UserError(f"{path}: 'higher_is_better' has no true/false for metric {undirected[0]!r}; {fix}")
    if record["id"] != DENSE_ID:
        try:
            point = Point(**{k: record.get(k) for k in Point.__dataclass_fields__})
            point.id  # noqa: B018  (every field the id needs is there)
        except (TypeError, AttributeError, ValueError):
            raise UserError(f"{path}: its method and levels do not describe a sweep point; {fix}") from None
        key = {"quant": "bits", "shrink": "ratio"}.get(point.kind, "sparsity")
        if isinstance(record.get(key), bool) or not isinstance(record.get(key), int | float):
            raise UserError(f"{path}: '{key}' (the level of this {point.kind} point) is missing or not a number; {fix}")


def load_points(out: Path, expected_hash: str | None = None) -> dict[str, dict]:
    """Finished points of a results folder (id → result); a point from other settings, or one that is not
    shaped as this module writes it, is an error naming its file."""
    done = {}
    for path in sorted((out / POINTS).glob("*.json")):
        if path.name.startswith("."):
            continue
        result = _read_json(path, "delete it and rerun the sweep to redo that point")
        if not isinstance(result.get("id"), str):
            raise UserError(f"{path} has no point 'id'; delete it and rerun the sweep to redo that point")
        if expected_hash is not None and result.get("settings_hash") != expected_hash:
            raise UserError(
                f"{path} was made with other settings than {out / SWEEP_FILE}; delete it or use overwrite",
                param="overwrite",
            )
        check_point(path, result)
        done[result["id"]] = result
    return done


def _evaluate(lm, tasks, harness) -> dict:
    from lmcompress.measure.tasks import run_tasks

    return run_tasks(lm, tasks, harness=harness)


def check_shrink_points(model, points: list[Point]) -> None:
    """Refuse, before any work, structured points that ``model``'s family or sizes cannot take."""
    from lmcompress.models.layouts import structure_layout
    from lmcompress.transforms.shrink import _n_remove, _unit_count

    for p in points:
        if p.kind != "shrink":
            continue
        layout = structure_layout(model.config, p.method)
        if p.method == "heads" and layout.heads == "uniform" and p.allocation != "uniform":
            raise UserError(
                f"{model.config.model_type} models read their head count from the config in forward, so heads "
                "can only be removed with one ratio for all blocks: use allocation uniform for heads",
                param="allocations",
            )
        _n_remove(p.ratio, _unit_count(model, layout, p.method), p.method, f" (point {p.id})")


def _transform(target, config: SweepConfig, p: Point, calib, device: str) -> tuple[dict, dict | None, object]:
    """Compress ``target`` in place as point ``p`` says: ``(what the point records, quantized codes, report)``."""
    from lmcompress.transforms.prune import prune
    from lmcompress.transforms.quantize import quantize
    from lmcompress.transforms.shrink import structured_prune

    cfg = config.transform_config(p)
    if p.kind == "quant":
        report = quantize(target, cfg, calib, device=device, progress=False)
        info = {
            "nominal_bits_per_weight": report.nominal_bits_per_weight,
            "damping_raised": report.damping,
            "time_s": report.wall_time_s,
        }
        if report.smoothing is not None:
            info["smoothing"] = report.smoothing
        return {"quantize": info}, report.quantized, report
    if p.kind == "shrink":
        report = structured_prune(target, cfg, calib, device=device, progress=False)
        info = {
            "params_before": report.params_before,
            "params_after": report.params_after,
            "ffn_widths": report.ffn_widths,
            "kv_heads": report.kv_heads,
            "time_s": report.wall_time_s,
        }
        return {"shrink": info}, None, report
    report = prune(target, cfg, calib, device=device, progress=False)
    info = {
        "achieved_sparsity": report.sparsity,
        "block_targets": report.block_targets,
        "outlier_ratios": report.outlier_ratios,
        "owl_lambda_effective": report.owl_lambda_effective,
        "layer_sparsity": report.layer_sparsity,
        "damping_raised": report.damping,
        "time_s": report.wall_time_s,
    }
    return {"prune": info}, None, report


def simulate_scheme(target, report) -> list[str]:
    """Rebuild, in place, the layers of a model that ``quantize`` put on a W8A8 / FP8 scheme as the folder it would
    save loads them (:func:`~lmcompress.checkpoint.schemes.install_scheme`: the stored codes, inputs quantized
    as the scheme runs them); nothing for weight-only quantization. Returns the rebuilt layers' names."""
    from lmcompress.checkpoint.schemes import install_scheme
    from lmcompress.transforms.schemes import scheme_fields

    scheme = scheme_fields(report.config, report.input_scales).get("scheme")
    if scheme is None:
        return []
    return install_scheme(target, scheme, report.quantized, report.fp8)


def size_on_disk(target, kind: str, report, quantized: dict | None, folder: Path) -> dict:
    """Save ``target`` as its verb would (pruned: packed; quantized: packed codes; structured and dense: plain
    safetensors) in the source's dtype into ``folder``, measure it with ``lmcompress info``'s
    :func:`~lmcompress.checkpoint.inspect.folder_info`, and remove it. Bytes of the weight files."""
    from transformers.utils import logging as hf_logging

    from lmcompress.checkpoint.inspect import folder_info
    from lmcompress.checkpoint.load import source_dtype
    from lmcompress.checkpoint.packed import save_packed
    from lmcompress.checkpoint.save import save_model

    dtype = source_dtype(target.config)
    recipe: dict = {"kind": f"sweep-{kind}"}
    folder.parent.mkdir(exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar under the sweep's own
    try:
        if kind in ("prune", "quant"):
            save_packed(
                target, None, folder, recipe, quantized=quantized, dtype=dtype, fp8=getattr(report, "fp8", None)
            )
        else:
            surgery = getattr(report, "surgery", None) or []
            save_model(target, None, folder, {**recipe, **({"surgery": surgery} if surgery else {})}, dtype=dtype)
        info = folder_info(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()
    return {
        "weights_bytes": info["weights_bytes"],
        "linear_bytes": info["linear"]["bytes"],
        "params": info["params"],
        "bits_per_param": info["bits_per_param"],
        "storage": info["storage"],
    }


@dataclass
class _Prepared:
    """What every point shares: the dense model, tokenizer, tasks and calibration windows."""

    net: object
    tokenizer: object
    tasks: list
    calib: object
    common: dict
    lm_args: dict
    windows: object = None  # the windows of the first ppl task, for the agreement with the dense model


def _prepare(resolved: str, config: SweepConfig, specs, todo: list, device: str, flags: dict) -> _Prepared:
    """Load the dense model and everything its points share; checks the structured points against it."""
    from lmcompress.calibration.data import draw, embedding_rows
    from lmcompress.checkpoint.load import load_model
    from lmcompress.measure.tasks import LM, prepare_tasks
    from lmcompress.runtime import resolve_seqlen, versions

    net, tokenizer = load_model(resolved, dtype=config.dtype, **flags)
    check_shrink_points(net, [p for p in todo if p is not None])
    seqlen, vocab = resolve_seqlen(net, config.seqlen), embedding_rows(net)  # token ids checked against vocab
    lm_args = dict(device=device, batch_size=config.batch_size, progress=False)
    max_length = LM(net, tokenizer, **lm_args).max_length
    tasks = prepare_tasks(
        specs,
        tokenizer,
        seqlen=seqlen,
        max_length=max_length,
        limit=config.limit,
        shots=config.shots,
        seed=config.eval_seed,
        retrieval_lengths=config.retrieval_lengths,
        vocab_size=vocab,
    )
    calib, calib_info = None, None
    if any(p is not None and config.transform_config(p).needs_calibration for p in todo):
        calib, calib_info = draw(
            tokenizer, config.calib_data, nsamples=config.nsamples, seqlen=seqlen, seed=config.seed, vocab_size=vocab
        )
    common = {"seqlen": seqlen, "calibration": calib_info, "versions": versions()}
    windows = agreement_windows(specs, tokenizer, seqlen, config.limit, vocab) if config.agreement else None
    return _Prepared(net, tokenizer, tasks, calib, common, lm_args, windows)


def agreement_windows(specs, tokenizer, seqlen: int, limit: int | None, vocab_size: int | None = None):
    """The windows the first ``ppl`` task scores (as :func:`~lmcompress.measure.tasks.prepare_tasks` cuts them),
    or ``None`` when there is no ``ppl`` task (then no agreement is measured); ``vocab_size``: the model's
    embedding rows, checked against the text's token ids."""
    from lmcompress.calibration.data import eval_windows, load_text

    spec = next((s for s in specs if s.kind == "ppl"), None)
    if spec is None:
        log.warning("no ppl task: the agreement with the dense model (KL, top-1) is not measured")
        return None
    windows = eval_windows(tokenizer, load_text(spec.source, role="eval").text, seqlen, vocab_size=vocab_size)
    return windows[:limit] if limit is not None else windows


AGREEMENT_METRICS = {"kl_mean": "KL divergence from dense (mean, nats)", "top1_agreement": "top-1 agreement with dense"}


def add_agreement(record: dict, found: dict | None) -> None:
    """Put the agreement with dense into ``record``: all of it under ``agreement``, the mean KL and the top-1
    agreement also as metrics (``agreement/kl_mean``, ``agreement/top1_agreement``). ``found`` ``None``: the
    dense point itself (KL 0, agreement 1, exactly)."""
    from lmcompress.measure.agreement import HIGHER_IS_BETTER, KEYS

    if found is None:
        found = {**{k: 0.0 for k in KEYS}, "top1_agreement": 1.0}
    record["agreement"] = found
    for key, label in AGREEMENT_METRICS.items():
        record["metrics"][f"agreement/{key}"] = float(found[key])
        record["higher_is_better"][f"agreement/{key}"] = HIGHER_IS_BETTER[key]
        record.setdefault("labels", {})[f"agreement/{key}"] = label


def _run_point(p: Point | None, config: SweepConfig, ready: _Prepared, out: Path, device: str) -> dict:
    """Compress (a copy of the dense model), measure the size on disk, evaluate: the point's record."""
    from lmcompress.measure.tasks import LM

    start = time.perf_counter()
    pid = p.id if p else DENSE_ID
    record: dict = {"id": pid}
    quantized, report = None, None
    if p is None:
        target, kind = ready.net, "dense"
        record.update(method="dense", allocation=None, pattern=None, sparsity=0.0)
    else:
        target, kind = copy.deepcopy(ready.net), p.kind
        record.update({k: v for k, v in asdict(p).items() if v is not None}, kind=kind)
        info, quantized, report = _transform(target, config, p, ready.calib, device)
        record.update(info)
    record["size"] = size_on_disk(target, kind, report, quantized, out / SIZES / pid)
    if kind == "quant":  # W8A8 / FP8: evaluated as the saved folder runs (activations quantized)
        simulate_scheme(target, report)
    harness = None
    if config.harness:
        from lmcompress.measure.tasks.harness import run_harness

        names, opts = _split(config.harness), dict(shots=config.shots, limit=config.limit, device=device)
        harness = lambda t=target: run_harness(t, ready.tokenizer, names, batch_size=config.batch_size, **opts)  # noqa: E731
    eval_start = time.perf_counter()
    record.update(_evaluate(LM(target, ready.tokenizer, **ready.lm_args), ready.tasks, harness))
    if ready.windows is not None:
        from lmcompress.measure.agreement import agreement

        found = None if p is None else agreement(target, ready.net, ready.windows, device=device)
        add_agreement(record, found)
    record.update(ready.common, eval_time_s=time.perf_counter() - eval_start, wall_time_s=time.perf_counter() - start)
    return record


def run_sweep(
    model: str | Path,
    config: SweepConfig,
    output: str | Path,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict:
    """Run every grid point not already in ``output``; returns ``{"ran": [...], "skipped": [...], "output"}``.

    The dense model is loaded once and never modified: each point compresses a deep copy of it. Nothing is
    written before the model has loaded and every option is checked; while the sweep runs, ``sweep.lock``
    holds its PID and a second sweep into the same folder is refused.
    """
    from lmcompress.checkpoint.load import resolve_source
    from lmcompress.measure.tasks import parse_tasks
    from lmcompress.runtime import check_device

    config.validate()
    specs = parse_tasks(config.tasks) if config.tasks else []
    if not specs and not config.harness:
        raise UserError(
            "a sweep needs something to measure: give tasks (e.g. ppl:wikitext2) or harness", param=("tasks", "harness")
        )
    check_device(device)
    if config.harness:
        from lmcompress.measure.tasks.harness import _import_lm_eval

        _import_lm_eval()  # fail before any work when lm-eval is missing
    resolved = resolve_source(model, allow_pickle)
    out = Path(output).expanduser()
    check_not_nested(out, resolved, "output")
    settings = config.settings(resolved)
    grid = config.points()
    plan = check_folder(out, settings, overwrite)
    todo = [p for p in [None, *grid] if (p.id if p else DENSE_ID) not in plan.done]
    if not todo:
        lock, _ = open_folder(out, settings, grid, plan)  # records the grid of this run
        release_lock(lock)
        return {"ran": [], "skipped": [p.id for p in grid] + [DENSE_ID], "output": str(out)}
    flags = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    ready = _prepare(resolved, config, specs, todo, device, flags)
    lock, done = open_folder(out, settings, grid, plan)
    try:
        return _run_points(out, grid, done, config, ready, device, settings_hash(settings), progress)
    finally:
        shutil.rmtree(out / SIZES, ignore_errors=True)
        release_lock(lock)


def _run_points(out, grid, done, config, ready, device, hash_: str, progress: bool) -> dict:
    todo = [p for p in [None, *grid] if (p.id if p else DENSE_ID) not in done]
    skipped = [p.id for p in grid if p.id in done] + ([DENSE_ID] if DENSE_ID in done else [])
    if skipped:
        log.info("%d of %d points already done in %s; running %d", len(skipped), len(grid) + 1, out, len(todo))
    ran = []
    bar = tqdm(todo, desc="sweep", unit="point", disable=not progress)
    for p in bar:
        pid = p.id if p else DENSE_ID
        bar.set_postfix_str(pid)
        record = _run_point(p, config, ready, out, device)
        record["settings_hash"] = hash_
        write_json_atomic(out / POINTS / f"{pid}.json", record)
        ran.append(pid)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"ran": ran, "skipped": skipped, "output": str(out)}
