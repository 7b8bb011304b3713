"""The search itself: per-unit compression levels under a budget, scored by KL divergence to the dense model.

1. Every prunable layer is compressed once at every level (a sparsity, or a bit width) from the dense model's
   calibration statistics (:mod:`lmcompress.search.database`).
2. Units are layers or whole blocks. A unit's cost at a level is the number of weights it keeps (sparsity) or
   the bits it stores, grids included (bit widths). The budget is ``(1 − target) × Σ weights`` for an average
   sparsity counted by parameters, met exactly (level switches pair units of equal size), or
   ``target × Σ weights`` bits, met from below within one level step.
3. The baselines are scored first, on the same windows: uniform (every unit at the target) and, for sparsity,
   OWL (its block sparsities placed on the level grid at the same budget). From the better one, every unit is
   moved alone to each level within ``sensitivity_span`` of its own and scored (the *sensitivity* pass); greedy
   level switches under the additive model these changes make give a third start, ``additive``. The best of
   the starts seeds the evolutionary search of :mod:`lmcompress.algorithms.evolution`, whose state is saved
   after every generation so that a killed run continues from its last finished generation.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from lmcompress.algorithms.evolution import LevelSpace, SearchState, additive_descent, evolve, nearest_feasible
from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.errors import UserError
from lmcompress.models.families import prunable_layers, set_weight_matrix, weight_matrix
from lmcompress.search.database import LevelDatabase, build_database, pruner, quantizer
from lmcompress.search.fitness import PrefixCache, make_fitness
from lmcompress.transforms.prune import PruneConfig, owl_pass

KINDS = ("sparsity", "bits")
DEFAULT_LEVELS = {"sparsity": "0.3:0.95:0.05", "bits": "2,3,4,8"}
METHODS = {"sparsity": ("sparsegpt", "wanda", "magnitude"), "bits": ("gptq", "rtn")}
GRANULARITIES = ("layer", "block")
DATABASE_INPUTS = ("sequential", "dense")
DENSE_FILE = "dense.safetensors"  # the dense weights, for rebuilding the database in later rounds
STATE_FILE = "state-{}.json"  # one per search trajectory (the key's hash), so that bisection steps resume too


def parse_levels(text: str, kind: str = "sparsity") -> list[float]:
    """``"0.3:0.95:0.05"`` (start:stop:step, both ends included) or ``"0.3,0.5,0.7"``, sorted ascending.

    Sparsities must lie in [0, 1); bit widths are integers from 2 to 8.
    """
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = round((stop - start) / step)
            values = [round(start + k * step, 6) for k in range(n + 1)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"levels {text!r} must look like 0.3:0.95:0.05 or 0.3,0.5,0.7") from None
    values = sorted(set(values))
    if kind == "bits":
        if len(values) < 2 or not all(v == int(v) and 2 <= v <= 8 for v in values):
            raise UserError(f"levels {text!r} need at least two integer bit widths from 2 to 8, e.g. 2,3,4,8")
        return [float(v) for v in values]
    if len(values) < 2 or not all(0.0 <= v < 1.0 for v in values):
        raise UserError(f"levels {text!r} need at least two sparsities in [0, 1)")
    return values


def read_start(path: str | Path, kind: str) -> dict[str, float]:
    """Per-layer levels to start a search from: an earlier search's ``search.json`` (or its output folder) of the
    same kind, or a JSON object ``{"layer name": level, ...}``."""
    path = Path(path)
    if path.is_dir():
        path = path / "search.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"start file {path} does not exist", param="start") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"start file {path} is not readable JSON ({exc})", param="start") from None
    if isinstance(data, dict) and "layer_levels" in data:
        found = (data.get("config") or {}).get("kind") if isinstance(data.get("config"), dict) else None
        if found != kind:
            raise UserError(f"{path} holds {found or 'unknown'} levels; this search's budget is {kind}", param="start")
        data = data["layer_levels"]
    ok = isinstance(data, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values())
    if not ok or not data:
        raise UserError(
            f"start file {path} must be a search.json or a JSON object of layer name → {kind}", param="start"
        )
    return {str(k): float(v) for k, v in data.items()}


@dataclass
class SearchConfig:
    """What to search: ``target`` average ``kind`` (sparsity, or bits per weight with grids) over ``levels``.

    ``method`` makes each level (sparsity: sparsegpt, wanda, magnitude; bits: gptq, rtn on ``group_size`` grids);
    ``granularity`` says whether a unit is a layer or a block.
    """

    target: float = 0.7
    kind: str = "sparsity"
    method: str = "sparsegpt"
    levels: str | None = None  # default: DEFAULT_LEVELS[kind]
    granularity: str = "block"
    group_size: int = 128
    sym: bool = True
    generations: int = 50
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 1)
    stage_windows: tuple[int, ...] = (2, 8)  # fitness windows at each selection stage (the last: parent's)
    max_switches: int = 3
    time_limit_s: float | None = None
    fitness: str = "kl"  # kl: divergence to the dense model; ppl: the candidate's own log perplexity
    seed: int = 0
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    database_inputs: str = "sequential"  # sequential: along the uniform model's inputs; dense: EvoPress's
    rounds: int = 1  # sequential inputs: rebuild the database along the best allocation so far, this many times − 1
    sensitivity_span: int | None = None  # levels each way of the sensitivity pass; None: 3 (blocks), 1 (layers); 0: off
    start: dict[str, float] | None = None  # layer → level: an extra start (e.g. a per-block search's, to refine)

    @property
    def span(self) -> int:
        if self.sensitivity_span is not None:
            return self.sensitivity_span
        return 3 if self.granularity == "block" else 1

    def validate(self) -> list[float]:
        if self.kind not in KINDS:
            raise UserError(f"unknown budget kind {self.kind!r}: choose sparsity or bits")
        if self.method not in METHODS[self.kind]:
            raise UserError(
                f"a {self.kind} search makes its levels with {' or '.join(METHODS[self.kind])}, not {self.method!r}"
            )
        levels = parse_levels(self.levels or DEFAULT_LEVELS[self.kind], self.kind)
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.granularity!r}: choose layer or block")
        if not levels[0] <= self.target <= levels[-1]:
            raise UserError(
                f"the budget {self.kind} {self.target:g} is outside the levels [{levels[0]:g}, {levels[-1]:g}]; "
                "widen the levels or change the budget"
            )
        if self.generations < 0 or self.offspring < 1:
            raise UserError("generations must be ≥ 0 and offspring ≥ 1")
        if self.rounds < 1 or (self.rounds > 1 and self.database_inputs != "sequential"):
            raise UserError("rounds must be ≥ 1, and more than one needs sequential database inputs")
        if len(self.stage_windows) != len(self.survivors) or self.survivors[-1] != 1:
            raise UserError("give one number of fitness windows per selection stage; the last stage keeps 1")
        if self.database_inputs not in DATABASE_INPUTS:
            raise UserError(f"unknown database inputs {self.database_inputs!r}: choose {' or '.join(DATABASE_INPUTS)}")
        if self.fitness not in ("kl", "ppl"):
            raise UserError(f"unknown fitness {self.fitness!r}: choose kl or ppl")
        if self.sensitivity_span is not None and self.sensitivity_span < 0:
            raise UserError(
                f"the sensitivity span must be ≥ 0 levels (0: no sensitivity pass), got {self.sensitivity_span}"
            )
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise UserError(f"the time limit must be positive, got {self.time_limit_s:g} s")
        if self.start is not None and not self.start:
            raise UserError("the start allocation is empty: give an earlier search's search.json")
        if self.kind == "sparsity":
            PruneConfig(method=self.method, sparsity=self.target)  # its checks apply too
            return levels
        return levels[::-1]  # bit widths from most to fewest: cost falls with the level index

    @property
    def needs_calibration(self) -> bool:
        return True  # the fitness always needs windows, whatever makes the levels

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchReport:
    """The chosen allocation, how the search got there, and the baselines at the same budget."""

    config: dict
    levels: list[float]
    units: list[list[str]]  # layers of each unit
    allocation: list[float]  # level (sparsity or bits) of each unit
    layer_levels: dict[str, float]  # the allocation per layer
    achieved: float  # average sparsity by parameters, or bits per weight with grids
    fitness: float
    baselines: dict[str, float]  # fitness of uniform (and OWL) at the same budget, same windows
    baseline_allocations: dict[str, list[float]] = field(default_factory=dict)  # their level per unit
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    quantized: dict[str, QuantizedTensor] | None = None  # bits: the chosen codes of every layer, by parameter
    tuned: dict | None = None  # --tune owl: the best M and λ
    bisection: list[dict] | None = None  # --max-loss: every sparsity tried, its perplexity, whether it passed
    database: str | None = None  # the level database's folder in the work folder
    rounds: list[dict] = field(default_factory=list)  # later rounds: generation, parent fitness before / after

    def to_dict(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        return {k: v for k, v in asdict(self).items() if k not in ("quantized", "database")}


def _units(db: LevelDatabase, granularity: str) -> list[list[str]]:
    if granularity == "layer":
        return [[layer] for layer in db.layers]
    blocks: dict[int, list[str]] = {}
    for layer in db.layers:
        blocks.setdefault(db.block_of[layer], []).append(layer)
    return [blocks[i] for i in sorted(blocks)]


def _space(db: LevelDatabase, units: list[list[str]], config: SearchConfig) -> LevelSpace:
    cost = tuple(tuple(sum(db.cost[layer][k] for layer in unit) for k in range(len(db.levels))) for unit in units)
    weights = sum(db.sizes.values())
    if config.kind == "sparsity":  # level switches between units of equal size keep the total exactly
        return LevelSpace(cost, budget=weights * (1.0 - config.target))
    steps = [abs(c[k] - c[k + 1]) for c in cost for k in range(len(c) - 1)]
    lo, hi = sum(c[-1] for c in cost) / weights, sum(c[0] for c in cost) / weights
    if not lo <= config.target <= hi:
        raise UserError(
            f"budget bits={config.target:g} cannot be met: with their grids (scales, zero points) these levels take "
            f"{lo:.3f} to {hi:.3f} bits per weight; raise the budget, add a lower level or use a larger group size"
        )
    return LevelSpace(cost, budget=weights * config.target, slack=max(steps))  # within one level step below


def _on_budget(space: LevelSpace, targets: list[float], levels: list[float], what: str) -> list[int]:
    try:
        return nearest_feasible(space, targets, levels)
    except ValueError:
        raise UserError(
            f"the {what} allocation cannot be placed on the budget with levels {levels}; choose a budget "
            "on the level grid (e.g. one of the levels) or finer levels"
        ) from None


def _save_state(work: Path, state: SearchState, key: str, baselines: dict, round_starts: list) -> None:
    from lmcompress.checkpoint.folder import json_text, write_file_atomic

    data = {
        "key": key,
        "baselines": baselines,
        "round_starts": round_starts,
        "levels": state.levels,
        "fitness": state.fitness,
        "generation": state.generation,
        "history": state.history,
        "rng_state": state.rng_state,
    }
    write_file_atomic(work / _state_name(key), json_text(data) + "\n")


def _state_name(key: str) -> str:
    import hashlib

    return STATE_FILE.format(hashlib.sha256(key.encode()).hexdigest()[:16])


def _load_state(work: Path, key: str) -> tuple[SearchState | None, dict, list]:
    """The saved state, baselines and round starts of a search with the same settings, or ``(None, {}, [])``."""
    path = work / _state_name(key)
    if not path.is_file():
        return None, {}, []
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None, {}, []
        rng = data["rng_state"]
        rng_state = None if rng is None else (rng[0], tuple(rng[1]), rng[2])
        state = SearchState(
            list(data["levels"]), float(data["fitness"]), int(data["generation"]), list(data["history"]), rng_state
        )
        baselines = dict(data["baselines"])
        if not {"uniform", "allocations"} <= set(baselines):
            return None, {}, []
        starts = [dict(r, levels=list(map(int, r["levels"]))) for r in data.get("round_starts", [])]
        return state, baselines, starts
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None, {}, []  # a damaged state file: start the search again


@dataclass
class Candidates:
    """What a search scores candidates with: the database, the units, the budget, and the fitness."""

    config: SearchConfig
    levels: list[float]
    db: LevelDatabase
    units: list[list[str]]
    space: LevelSpace
    key: str  # the settings and data that decide a search's trajectory
    model: nn.Module
    fitness: object  # make_fitness(config.fitness, …): (model, n windows) → float
    applied: dict[str, int] = field(default_factory=dict)  # the level each layer of the model now holds
    round: int = 0  # which database round these candidates come from

    def assignment(self, unit_levels) -> dict[str, int]:
        return {layer: lv for unit, lv in zip(self.units, unit_levels, strict=True) for layer in unit}

    def hold(self, unit_levels) -> None:
        """Make the model hold this candidate. Only the layers whose level differs from what the model holds are
        read from the database: a mutant changes a few units, so this costs little next to its forward passes."""
        wanted = self.assignment(unit_levels)
        self.db.apply(self.model, {layer: k for layer, k in wanted.items() if self.applied.get(layer) != k})
        self.applied = wanted

    def score(
        self,
        unit_levels,
        stage: int,
        *,
        prefix: PrefixCache | None = None,
        start: int = 0,
        capture: list | None = None,
    ) -> float:
        """Fitness of the candidate on stage ``stage``'s windows (the model then holds the candidate).

        ``prefix`` and ``start``: the candidate equals ``prefix``'s base before block ``start``; ``capture``
        collects its hidden states (see ``PrefixCache``).
        """
        self.hold(unit_levels)
        n = self.config.stage_windows[stage]
        return self.fitness(self.model, n, prefix=prefix, start=start, capture=capture)

    def first_block(self, unit_levels, base) -> int:
        """The first block in which two candidates differ (the last block when they are equal)."""
        blocks = [self.db.block_of[layer] for u, unit in enumerate(self.units) if unit_levels[u] != base[u]
                  for layer in unit]  # fmt: skip
        return min(blocks, default=max(self.db.block_of.values()))

    def sensitivity(self, base: list[int], span: int, *, progress: bool = True) -> list[list[float | None]]:
        """``delta[u][l]``: the fitness change (first stage's windows) of moving unit ``u`` alone from ``base``
        to level ``l``, for levels within ``span`` of its own (``None`` elsewhere). Blocks before the unit's
        first are read from a :class:`PrefixCache` of ``base``."""
        reference = self.score(base, 0)
        windows = self.fitness.windows[: self.config.stage_windows[0]]
        prefix = PrefixCache(self.model, windows, device=self.fitness.device)
        first = [min(self.db.block_of[layer] for layer in unit) for unit in self.units]
        delta: list[list[float | None]] = [[None] * len(self.levels) for _ in self.units]
        jobs = []
        for u, lv in enumerate(base):
            delta[u][lv] = 0.0
            jobs += [(u, k) for k in range(max(0, lv - span), min(len(self.levels), lv + span + 1)) if k != lv]
        for u, k in tqdm(jobs, desc="search: sensitivity", disable=not progress, unit="cand", leave=False):
            child = list(base)
            child[u] = k
            delta[u][k] = self.score(child, 0, prefix=prefix, start=first[u]) - reference
        return delta

    def additive_start(self, base: list[int], stage: int, *, progress: bool = True) -> tuple[list[int], float] | None:
        """The best point (real fitness on stage ``stage``) of the additive descent from ``base``, or None when the
        sensitivity pass is off or finds no switch that helps. Four points of the path are scored: a quarter,
        half, three quarters and all of it (units interact, so the whole path may overshoot)."""
        if self.config.span <= 0:
            return None
        delta = self.sensitivity(base, self.config.span, progress=progress)
        path = additive_descent(self.space, base, delta)
        if not path:
            return None
        points = sorted({max(0, round(f * len(path)) - 1) for f in (0.25, 0.5, 0.75, 1.0)})
        scored = [(self.score(path[i], stage), i) for i in points]
        fitness, i = min(scored)
        return path[i], fitness

    def place(self, targets: list[float], what: str) -> list[int]:
        """Per-unit targets (e.g. OWL's) on the level grid, on the budget."""
        return _on_budget(self.space, targets, self.levels, what)


PREFIX_CACHE_BYTES = 1 << 30  # the parent's hidden states kept for the evolution (windows beyond it run in full)


class ParentScorer:
    """``fitness(levels, stage)`` for :func:`evolve` that runs only the blocks where a child differs from its parent.

    The hidden states entering every block of the parent on the final stage's windows are kept in a
    :class:`PrefixCache` (up to ``PREFIX_CACHE_BYTES``); a child whose first changed unit sits in block ``b`` runs
    blocks ``b…`` only, with the same fitness as a full forward. The final stage's scoring captures the child's
    hidden states, so a child that becomes the parent is cached without another forward. Call :meth:`follow`
    with the parent before each generation.
    """

    def __init__(self, cand: Candidates, max_bytes: int = PREFIX_CACHE_BYTES) -> None:
        self.cand, self.max_bytes = cand, max_bytes
        self.final = len(cand.config.stage_windows) - 1
        self.base: list[int] | None = None
        self.prefix: PrefixCache | None = None
        self.pending: tuple[list[int], int, list] | None = None  # the last final-stage child, its start, its capture
        self.enabled = True

    def follow(self, parent: list[int]) -> None:
        """Cache ``parent`` (from the last captured child when that is the parent, else by one full forward)."""
        if not self.enabled or parent == self.base:
            return
        if self.prefix is not None and self.pending is not None and self.pending[0] == parent:
            _, start, captured = self.pending
            self.prefix = self.prefix.rebased(start, captured)
        else:
            self.cand.hold(parent)
            fitness = self.cand.fitness
            windows = fitness.windows[: self.cand.config.stage_windows[self.final]]
            self.prefix = PrefixCache(self.cand.model, windows, device=fitness.device, max_bytes=self.max_bytes)
            if not self.prefix.usable:  # a family whose forward cannot skip blocks: full forwards from now on
                self.enabled, self.prefix = False, None
        self.base, self.pending = list(parent), None

    def __call__(self, levels: list[int], stage: int) -> float:
        if self.prefix is None or self.base is None:
            return self.cand.score(levels, stage)
        start = self.cand.first_block(levels, self.base)
        capture: list | None = [] if stage == self.final else None
        score = self.cand.score(levels, stage, prefix=self.prefix, start=start, capture=capture)
        if capture is not None:
            self.pending = (list(levels), start, capture)
        return score


def prepare(
    model: nn.Module,
    config: SearchConfig,
    calib: torch.Tensor,
    fitness_windows: torch.Tensor,
    work: Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    reference: dict[str, int] | None = None,
    fitness: object | None = None,
) -> Candidates:
    """Build (or reopen) the level database in ``work`` and the dense model's reference for the fitness.

    The model must be dense. ``reference`` (layer → level index) is the allocation whose inputs a sequential
    database is built along [default: every layer at the level nearest the target]; ``fitness`` reuses the
    dense reference of an earlier call.
    """
    from lmcompress.calibration.data import windows_hash

    levels = config.validate()
    work.mkdir(parents=True, exist_ok=True)
    data = {"calib": windows_hash(calib), "fitness": windows_hash(fitness_windows)}
    settings = config.to_dict()
    if config.database_inputs == "dense":
        reference = None
    elif reference is None:  # every layer at the level nearest the target: the uniform model
        nearest = min(range(len(levels)), key=lambda k: (abs(levels[k] - config.target), k))
        reference = dict.fromkeys(prunable_layers(model), nearest)
    fields = ("kind", "method", "levels", "group_size", "sym", "database_inputs")
    # the database depends on the calibration windows only: searches that differ in fitness windows share it
    db_key = json.dumps(
        {k: settings[k] for k in fields} | {"levels": levels, "calib": data["calib"], "reference": reference}
    )
    # what decides the trajectory (how long to run does not)
    key = json.dumps({k: v for k, v in settings.items() if k not in ("generations", "time_limit_s")} | data)
    if config.kind == "sparsity":
        compressor = pruner(PruneConfig(method=config.method, sparsity=config.target))
    else:
        compressor = quantizer(config.method, config.group_size, config.sym)
    db_dir = database_dir(work, db_key)
    db = _open_database(db_dir, levels, db_key)
    if db is None:
        db = build_database(
            model, compressor, calib, levels, db_dir, device=device, reference=reference, progress=progress
        )
        (db_dir / "key.json").write_text(json.dumps({"key": db_key}))
    units = _units(db, config.granularity)
    space = _space(db, units, config)
    fitness = fitness or make_fitness(config.fitness, model, fitness_windows, device=device)
    return Candidates(config, levels, db, units, space, key, model, fitness)


@contextmanager
def model_on(model: nn.Module, device: str | torch.device) -> Iterator[None]:
    """The whole model on ``device`` while a search scores candidates on it, then back where it was.

    A search runs every candidate through the whole model, so the model must fit on the device; the level
    database stays on disk and each layer's weights are copied in when a candidate changes it."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def search(
    model: nn.Module,
    config: SearchConfig,
    calib: torch.Tensor,
    fitness_windows: torch.Tensor,
    work: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SearchReport:
    """Search per-unit levels for ``model``; on return the model holds the chosen allocation.

    ``work`` keeps the level database and the search state between runs: with the same settings a second
    call continues from the last finished generation.
    """
    with model_on(model, device):
        return _search(model, config, calib, fitness_windows, work, device=device, progress=progress)


def _search(
    model: nn.Module,
    config: SearchConfig,
    calib: torch.Tensor,
    fitness_windows: torch.Tensor,
    work: str | Path,
    *,
    device: str | torch.device,
    progress: bool,
) -> SearchReport:
    start = time.perf_counter()
    work = Path(work)
    if config.start is not None:  # before the database is built
        check_start(list(prunable_layers(model)), config.start)
    cand = prepare(model, config, calib, fitness_windows, work, device=device, progress=progress)
    levels, db, units, space, key = cand.levels, cand.db, cand.units, cand.space, cand.key
    final_stage = len(config.stage_windows) - 1
    state, baselines, round_starts = _load_state(work, key)
    if config.rounds > 1:  # later rounds rebuild the database from the dense weights, kept here meanwhile
        _keep_dense_weights(model, work / DENSE_FILE)
    if state is None:  # a fresh search: score the baselines (the model is still dense here), seed from the best
        starts = {"uniform": cand.place([config.target] * len(units), "uniform")}
        if config.kind == "sparsity":
            _, owl = owl_pass(
                model, calib, torch.device(device), config.target, config.owl_m, config.owl_lambda, progress=progress
            )
            block_targets = owl.sparsities
            starts["owl"] = cand.place([block_targets[db.block_of[u[0]]] for u in units], "OWL")
        if config.start is not None:
            starts["start"] = cand.place(_unit_targets(db, units, config.start), "start")
        baselines = {name: cand.score(lv, final_stage) for name, lv in starts.items()}
        best = min(baselines, key=baselines.get)
        additive = cand.additive_start(starts[best], final_stage, progress=progress)
        if additive is not None:
            starts["additive"], baselines["additive"] = additive
            best = min(baselines, key=baselines.get)
        baselines["allocations"] = {name: [levels[k] for k in lv] for name, lv in starts.items()}
        state = SearchState(list(starts[best]), baselines[best])
        _save_state(work, state, key, baselines, round_starts)
    per_round = -(-config.generations // config.rounds)  # generations of each round (the last may be shorter)
    bar = tqdm(total=config.generations, initial=state.generation, desc="search", disable=not progress, unit="gen")
    scorer: ParentScorer | None = None
    while state.generation < config.generations:
        if config.time_limit_s is not None and time.perf_counter() - start > config.time_limit_s:
            break
        r = state.generation // per_round
        if r > 0 and cand.round != r:  # a new round (or a resumed one): the database along the parent's inputs
            fresh = len(round_starts) < r
            if fresh:
                round_starts.append({"generation": state.generation, "levels": list(state.levels)})
            bar.set_description(f"search: round {r + 1} database")
            parent = round_starts[r - 1]["levels"]
            cand = _next_round(model, config, calib, fitness_windows, work, cand, parent, r, device, progress)
            if fresh:  # the parent rescored: on this database it is its sequential version
                round_starts[-1]["fitness_before"] = state.fitness
                state.fitness = round_starts[-1]["fitness"] = cand.score(state.levels, final_stage)
                _save_state(work, state, key, baselines, round_starts)
            bar.set_description("search")
        if scorer is None or scorer.cand is not cand:
            scorer = ParentScorer(cand)
        scorer.follow(state.levels)
        evolve(
            space,
            scorer,
            state,
            offspring=config.offspring,
            survivors=config.survivors,
            max_switches=config.max_switches,
            seed=config.seed,
        )
        _save_state(work, state, key, baselines, round_starts)
        bar.update(1)
        bar.set_postfix(best=f"{state.fitness:.4f}")
    bar.close()
    db, assignment = cand.db, cand.assignment
    chosen = assignment(state.levels)
    db.apply(model, chosen)
    weights = sum(db.sizes.values())
    spent = space.total(state.levels)
    achieved = 1.0 - spent / weights if config.kind == "sparsity" else spent / weights
    quantized = None
    if db.quantized:
        quantized = {f"{layer}.weight": db.codes(layer, k) for layer, k in chosen.items()}
    allocation = [levels[lv] for lv in state.levels]
    return SearchReport(
        config=config.to_dict(),
        levels=levels,
        units=units,
        allocation=allocation,
        layer_levels={layer: levels[k] for layer, k in chosen.items()},
        achieved=achieved,
        fitness=state.fitness,
        baselines={k: float(v) for k, v in baselines.items() if k != "allocations"},
        baseline_allocations=baselines["allocations"],
        history=state.history,
        wall_time_s=time.perf_counter() - start,
        quantized=quantized,
        database=str(db.folder),
        rounds=[
            {k: v for k, v in r.items() if k != "levels"} | {"parent": [levels[k] for k in r["levels"]]}
            for r in round_starts
        ],
    )


def check_start(layers, start: dict[str, float]) -> None:
    """Refuse a start allocation whose layers are not exactly ``layers``."""
    missing = [layer for layer in layers if layer not in start]
    unknown = sorted(set(start) - set(layers))
    if missing or unknown:
        parts = [f"{len(missing)} layers missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unknown)} layers this model lacks (e.g. {unknown[0]})"] if unknown else []
        raise UserError(
            f"the start allocation does not fit this model: {'; '.join(parts)}. Give a search.json searched on "
            "this model",
            param="start",
        )


def _unit_targets(db: LevelDatabase, units: list[list[str]], start: dict[str, float]) -> list[float]:
    """Each unit's level in ``start`` (layer → level), averaged over its layers by their sizes."""
    check_start(db.layers, start)
    size = db.sizes
    return [sum(start[layer] * size[layer] for layer in unit) / sum(size[layer] for layer in unit) for unit in units]


def _keep_dense_weights(model: nn.Module, path: Path) -> None:
    """Save the dense prunable weights once (the model must still be dense the first time)."""
    if not path.is_file():
        from lmcompress.checkpoint.folder import write_path_atomic

        tensors = {name: weight_matrix(m).detach().cpu().contiguous() for name, m in prunable_layers(model).items()}
        write_path_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def _next_round(model, config, calib, fitness_windows, work, cand, parent, r, device, progress) -> Candidates:
    """Round ``r``'s candidates: the model made dense again, the database built along ``parent``'s inputs."""
    modules = prunable_layers(model)
    with safe_open(str(work / DENSE_FILE), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            set_weight_matrix(modules[name], f.get_tensor(name))
    previous = cand.db.folder
    reference = cand.assignment(parent)
    nxt = prepare(
        model,
        config,
        calib,
        fitness_windows,
        work,
        device=device,
        progress=progress,
        reference=reference,
        fitness=cand.fitness,
    )
    nxt.round = r
    if previous != nxt.db.folder and r > 1:  # the round before's database is no longer needed (round 1's stays)
        shutil.rmtree(previous, ignore_errors=True)
    return nxt


def database_dir(work: Path, db_key: str) -> Path:
    """Where the level database of these settings lives in ``work`` (one folder per settings and reference)."""
    import hashlib

    return work / f"database-{hashlib.sha256(db_key.encode()).hexdigest()[:12]}"


def _open_database(folder: Path, levels: list[float], key: str) -> LevelDatabase | None:
    """The database a run with the same settings left behind, if it is complete."""
    try:
        if json.loads((folder / "key.json").read_text())["key"] == key:
            db = LevelDatabase.open(folder)
            return db if db.levels == levels else None
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    return None


def search_max_loss(
    model: nn.Module,
    config: SearchConfig,
    calib: torch.Tensor,
    fitness_windows: torch.Tensor,
    work: str | Path,
    *,
    max_loss: float,
    confidence: float = 0.9,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SearchReport:
    """The largest average sparsity on the level grid whose searched model stays within ``max_loss`` perplexity.

    Bisection over the budget: at each tried sparsity a search (``config.generations`` generations) finds the
    best allocation, and its perplexity on the held-out windows is compared with the dense model's on the same
    windows: a sparsity passes when the upper bound of the increase at ``confidence`` (over the windows, see
    :func:`increase_upper_bound`; 0.5: the point estimate) is within ``max_loss``. The quality is assumed to fall
    as sparsity grows. Every step shares one level database and keeps its own search state, so a killed run
    resumes. The report's ``bisection`` lists every step.
    """
    from dataclasses import replace

    from lmcompress.measure.perplexity import check_confidence, increase_upper_bound, perplexity

    if config.kind != "sparsity":
        raise UserError("max_loss searches the largest sparsity: use it with a sparsity search")
    if not 0 < max_loss < 10:
        raise UserError(f"the allowed perplexity increase must be a positive fraction (0.05 = +5%), got {max_loss}")
    levels = config.validate()
    check_confidence(confidence)
    work = Path(work)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense = perplexity(model, fitness_windows, device=device, progress=False)
    dense_ppl = dense.perplexity
    steps: list[dict] = []
    lo, hi = -1, len(levels)  # levels[lo] is known to pass (−1: dense), levels[hi] to fail (len: beyond the grid)
    best: SearchReport | None = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        model.load_state_dict(dense_state)
        report = search(
            model, replace(config, target=levels[mid]), calib, fitness_windows, work, device=device, progress=progress
        )
        result = perplexity(model, fitness_windows, device=device, progress=False)
        upper = increase_upper_bound(result.window_nll, dense.window_nll, confidence)
        ok = upper <= max_loss
        steps.append(
            {
                "sparsity": levels[mid],
                "perplexity": result.perplexity,
                "dense_perplexity": dense_ppl,
                "increase": result.perplexity / dense_ppl - 1,
                "upper_bound": upper,
                "confidence": confidence,
                "within": ok,
            }
        )
        # sequential databases differ per budget: keep only the one the final model needs (dense ones are shared)
        if ok:
            old, lo, best = best, mid, report
            if old is not None and old.database != report.database:
                shutil.rmtree(old.database, ignore_errors=True)
        else:
            hi = mid
            if best is None or best.database != report.database:
                shutil.rmtree(report.database, ignore_errors=True)
    if best is None:
        model.load_state_dict(dense_state)
        raise UserError(
            f"even the lowest level ({levels[0]:g}) may cost more than +{max_loss:.1%} perplexity "
            f"({steps[-1]['perplexity']:.3g} against dense {dense_ppl:.3g}, up to "
            f"+{steps[-1]['upper_bound']:.1%} at confidence {confidence:g}); allow more loss, a lower confidence "
            "or add lower levels"
        )
    model.load_state_dict(dense_state)
    final = search(
        model,
        replace(config, target=best.config["target"]),
        calib,
        fitness_windows,
        work,
        device=device,
        progress=False,
    )  # resumes from its finished state: the same allocation
    final.bisection = steps
    return final
