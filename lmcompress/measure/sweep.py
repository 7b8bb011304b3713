"""Sparsity sweeps: method × allocation × pattern × sparsity, every point pruned from one dense copy in memory
and evaluated on the same tasks; each result is written as soon as it exists, and a rerun skips what is done.

Layout of a results folder::

    RESULTS_DIR/sweep.json          settings that shape every number (model, tasks, calibration...) + the grid
    RESULTS_DIR/points/dense.json   the dense baseline, evaluated once
    RESULTS_DIR/points/<id>.json    one file per grid point, e.g. wanda-owl-unstructured-0.600.json

Every file is written to a temporary name and renamed, so a killed sweep leaves only finished points.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmcompress.algorithms.masks import Pattern
from lmcompress.checkpoint.folder import check_not_nested, check_writable, json_text, write_file_atomic
from lmcompress.errors import UserError
from lmcompress.transforms.prune import METHODS, PruneConfig

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
POINTS = "points"
DENSE_ID = "dense"


def parse_sparsities(text: str) -> list[float]:
    """``"0.1:0.9:0.1"`` (start:stop:step, stop included) or ``"0.3,0.5,0.7"`` → sorted fractions in (0, 1)."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = round((stop - start) / step) + 1
            values = [round(start + i * step, 6) for i in range(n) if start + i * step <= stop + 1e-9]
        else:
            values = [round(float(x), 6) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"sparsities {text!r}: write START:STOP:STEP (e.g. 0.1:0.9:0.1) or a list (e.g. 0.3,0.5,0.7)",
            param="sparsities",
        ) from None
    bad = [v for v in values if not 0.0 < v < 1.0]
    if not values or bad:
        raise UserError(f"sparsities must be fractions strictly between 0 and 1, got {values}", param="sparsities")
    return sorted(set(values))


def _split(text: str | list[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else text
    return [s.strip() for s in items if s.strip()]


@dataclass(frozen=True)
class Point:
    method: str
    allocation: str
    pattern: str
    sparsity: float

    @property
    def id(self) -> str:
        return f"{self.method}-{self.allocation}-{self.pattern.replace(':', 'of')}-{self.sparsity:.3f}"


@dataclass
class SweepConfig:
    """Everything a sweep needs besides the model. Grid axes are lists; the rest are shared by every point."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    allocations: list[str] = field(default_factory=lambda: ["uniform"])
    sparsities: list[float] = field(default_factory=lambda: parse_sparsities("0.1:0.9:0.1"))
    patterns: list[str] = field(default_factory=lambda: ["unstructured"])
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
    percdamp: float = 0.01
    blocksize: int = 128
    dtype: str = "float32"
    batch_size: int = 16

    def points(self) -> list[Point]:
        """The grid, invalid combinations (OWL with N:M) left out with a warning, duplicates removed."""
        out: list[Point] = []
        for method in self.methods:
            for allocation in self.allocations:
                for pattern in self.patterns:
                    nm = Pattern.parse(pattern).is_nm
                    if nm and allocation == "owl":
                        log.warning(
                            "skipping %s with OWL and pattern %s: OWL needs unstructured sparsity", method, pattern
                        )
                        continue
                    levels = [Pattern.parse(pattern).sparsity] if nm else self.sparsities
                    for s in levels:
                        p = Point(method, allocation, str(Pattern.parse(pattern)), round(s, 6))
                        if p not in out:
                            out.append(p)
        if not out:
            raise UserError(
                "the sweep grid is empty: check methods, allocations and patterns",
                param=("methods", "allocations", "patterns"),
            )
        return out

    def validate(self) -> None:
        self.methods, self.allocations = _split(self.methods), _split(self.allocations)
        self.patterns = _split(self.patterns)
        for m in self.methods:
            if m not in METHODS:
                raise UserError(
                    f"unknown pruning method {m!r} in methods: choose from {', '.join(METHODS)}", param="methods"
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
        if self.nsamples <= 0:
            raise UserError(f"nsamples must be positive, got {self.nsamples}", param="nsamples")
        if self.seqlen is not None and self.seqlen < 2:
            raise UserError(
                f"seqlen must be at least 2 (one to predict from, one predicted), got {self.seqlen}", param="seqlen"
            )
        for p in self.points():  # every point is a valid PruneConfig (raises UserError otherwise)
            self.prune_config(p)

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
        for key in ("methods", "allocations", "sparsities", "patterns", "batch_size"):
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


def _prepare_folder(out: Path, settings: dict, grid: list[Point], overwrite: bool) -> dict[str, dict]:
    """Create or check the results folder; the finished points that match ``settings`` (id → result)."""
    sweep_file = out / SWEEP_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder", param="output")
    if out.exists() and not sweep_file.is_file() and any(out.iterdir()):
        raise UserError(
            f"output {out} is a non-empty folder that holds no sweep; choose a new or empty folder", param="output"
        )
    if not out.parent.exists():
        raise UserError(f"the parent folder of output ({out.parent}) does not exist", param="output")
    check_writable(out if out.is_dir() else out.parent, SWEEP_FILE)
    known: list[dict] = []  # the grid of earlier runs with the same settings
    old = None
    if sweep_file.is_file():
        try:
            old = read_sweep_file(sweep_file)
        except UserError:
            if not overwrite:
                raise
            log.warning("%s is damaged; overwrite: starting the sweep again", sweep_file)
            shutil.rmtree(out / POINTS, ignore_errors=True)
    if old is not None:
        finished = [f for f in (out / POINTS).glob("*.json") if not f.name.startswith(".")]
        if old.get("settings") == settings:
            known = old.get("grid", [])
        elif finished and not overwrite:
            diff = sorted(
                k for k in set(settings) | set(old.get("settings", {})) if old["settings"].get(k) != settings.get(k)
            )
            details = "; ".join(f"{k}: {old['settings'].get(k)!r} → {settings.get(k)!r}" for k in diff)
            raise UserError(
                f"{out} holds a sweep made with other settings ({details}). Its points cannot be mixed with "
                "these: use a new output, or pass overwrite to discard the old points",
                param=("output", "overwrite"),
            )
        else:  # --overwrite, or a run that stopped before its first point (bad task file, missing lm-eval...)
            shutil.rmtree(out / POINTS, ignore_errors=True)
    try:
        (out / POINTS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create {out / POINTS} ({exc.strerror or exc}); choose a writable output folder"
        ) from None
    ids = [p.id for p in grid]
    merged = known + [asdict(p) for p in grid if p.id not in {Point(**k).id for k in known}]
    record = {"settings": settings, "settings_hash": settings_hash(settings), "grid": merged, "last_grid": ids}
    write_json_atomic(sweep_file, record)
    return load_points(out, settings_hash(settings))


def load_points(out: Path, expected_hash: str | None = None) -> dict[str, dict]:
    """Finished points of a results folder (id → result); a point from other settings is an error."""
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
        done[result["id"]] = result
    return done


def _evaluate(lm, tasks, harness) -> dict:
    from lmcompress.measure.tasks import run_tasks

    return run_tasks(lm, tasks, harness=harness)


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

    The dense model is loaded once and never modified: each point prunes a deep copy of it.
    """
    from lmcompress.calibration.data import draw
    from lmcompress.checkpoint.load import load_model, resolve_source
    from lmcompress.jobs import check_device, resolve_seqlen, versions
    from lmcompress.measure.tasks import LM, parse_tasks, prepare_tasks

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
    done = _prepare_folder(out, settings, grid, overwrite)
    todo = [p for p in [None, *grid] if (p.id if p else DENSE_ID) not in done]
    skipped = [p.id for p in grid if p.id in done] + ([DENSE_ID] if DENSE_ID in done else [])
    if skipped:
        log.info("%d of %d points already done in %s; running %d", len(skipped), len(grid) + 1, out, len(todo))
    if not todo:
        return {"ran": [], "skipped": skipped, "output": str(out)}

    net, tokenizer = load_model(
        resolved, dtype=config.dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    seqlen = resolve_seqlen(net, config.seqlen)
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
    )
    calib, calib_info = None, None
    if any(p is not None and config.prune_config(p).needs_calibration for p in todo):
        calib, calib_info = draw(
            tokenizer, config.calib_data, nsamples=config.nsamples, seqlen=seqlen, seed=config.seed
        )
    common = {
        "settings_hash": settings_hash(settings),
        "seqlen": seqlen,
        "calibration": calib_info,
        "versions": versions(),
    }

    ran = []
    bar = tqdm(todo, desc="sweep", unit="point", disable=not progress)
    for p in bar:
        pid = p.id if p else DENSE_ID
        bar.set_postfix_str(pid)
        start = time.perf_counter()
        record: dict = {"id": pid}
        if p is None:
            target = net
            record.update(method="dense", allocation=None, pattern=None, sparsity=0.0)
        else:
            from lmcompress.transforms.prune import prune

            target = copy.deepcopy(net)
            report = prune(target, config.prune_config(p), calib, device=device, progress=False)
            record.update(asdict(p))
            record["prune"] = {
                "achieved_sparsity": report.sparsity,
                "block_targets": report.block_targets,
                "outlier_ratios": report.outlier_ratios,
                "owl_lambda_effective": report.owl_lambda_effective,
                "layer_sparsity": report.layer_sparsity,
                "damping_raised": report.damping,
                "time_s": report.wall_time_s,
            }
        harness = None
        if config.harness:
            from lmcompress.measure.tasks.harness import run_harness

            harness = lambda t=target, names=_split(config.harness): run_harness(  # noqa: E731
                t, tokenizer, names, shots=config.shots, limit=config.limit, batch_size=config.batch_size, device=device
            )
        eval_start = time.perf_counter()
        result = _evaluate(LM(target, tokenizer, **lm_args), tasks, harness)
        record.update(result)
        record.update(common, eval_time_s=time.perf_counter() - eval_start, wall_time_s=time.perf_counter() - start)
        write_json_atomic(out / POINTS / f"{pid}.json", record)
        ran.append(pid)
        if target is not net:
            del target
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"ran": ran, "skipped": skipped, "output": str(out)}
