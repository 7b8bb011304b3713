"""The search itself: per-unit sparsity levels under an exact budget, scored by KL to the dense model.

1. Every prunable layer is pruned once at every level from the dense model's calibration statistics
   (:mod:`lmcompress.search.database`).
2. Units are layers or whole blocks; a unit's cost at a level is the number of weights it keeps, and the budget
   is ``(1 − target) × Σ weights``: the average sparsity counted by parameters, met exactly.
3. The baselines are scored first: uniform (every unit at the target) and OWL (its block sparsities placed on
   the level grid at the same budget). The better one seeds the evolutionary search of
   :mod:`lmcompress.algorithms.evolution`, whose state is saved after every generation so that a killed run
   continues from its last finished generation.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.algorithms.evolution import LevelSpace, SearchState, evolve, nearest_feasible
from lmcompress.algorithms.owl import owl_layer_sparsities
from lmcompress.errors import UserError
from lmcompress.search.database import LevelDatabase, build_database
from lmcompress.search.fitness import KLFitness
from lmcompress.transforms.prune import PruneConfig, _owl_ratios

GRANULARITIES = ("layer", "block")
STATE_FILE = "state.json"


def parse_levels(text: str) -> list[float]:
    """``"0.3:0.95:0.05"`` (start:stop:step, both ends included) or ``"0.3,0.5,0.7"``, sorted ascending."""
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
    if len(values) < 2 or not all(0.0 <= v < 1.0 for v in values):
        raise UserError(f"levels {text!r} need at least two sparsities in [0, 1)")
    return values


@dataclass
class SearchConfig:
    """What to search: ``target`` average sparsity over ``levels``, by ``method``, per ``granularity`` unit."""

    target: float = 0.7
    method: str = "sparsegpt"
    levels: str = "0.3:0.95:0.05"
    granularity: str = "block"
    generations: int = 50
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 1)
    stage_windows: tuple[int, ...] = (2, 8)  # fitness windows at each selection stage (the last: parent's)
    max_switches: int = 3
    time_limit_s: float | None = None
    seed: int = 0
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def validate(self) -> list[float]:
        levels = parse_levels(self.levels)
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.granularity!r}: choose layer or block")
        if not levels[0] <= self.target <= levels[-1]:
            raise UserError(
                f"the budget sparsity {self.target:g} is outside the levels [{levels[0]:g}, {levels[-1]:g}]; "
                "widen the levels or change the budget"
            )
        if self.generations < 0 or self.offspring < 1:
            raise UserError("generations must be ≥ 0 and offspring ≥ 1")
        if len(self.stage_windows) != len(self.survivors) or self.survivors[-1] != 1:
            raise UserError("give one number of fitness windows per selection stage; the last stage keeps 1")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise UserError(f"the time limit must be positive, got {self.time_limit_s:g} s")
        PruneConfig(method=self.method, sparsity=self.target)  # the method is checked there
        return levels

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchReport:
    """The chosen allocation, how the search got there, and the baselines at the same budget."""

    config: dict
    levels: list[float]
    units: list[list[str]]  # layers of each unit
    allocation: list[float]  # sparsity of each unit
    layer_sparsity: dict[str, float]  # the allocation per layer
    achieved_sparsity: float  # Σ size × sparsity / Σ size, over the prunable layers
    fitness: float
    baselines: dict[str, float]  # fitness of uniform and OWL at the same budget, same windows
    baseline_allocations: dict[str, list[float]] = field(default_factory=dict)  # their sparsity per unit
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _units(db: LevelDatabase, granularity: str) -> list[list[str]]:
    if granularity == "layer":
        return [[layer] for layer in db.layers]
    blocks: dict[int, list[str]] = {}
    for layer in db.layers:
        blocks.setdefault(db.block_of[layer], []).append(layer)
    return [blocks[i] for i in sorted(blocks)]


def _space(db: LevelDatabase, units: list[list[str]], levels: list[float], target: float) -> LevelSpace:
    sizes = [sum(db.sizes[layer] for layer in unit) for unit in units]
    cost = tuple(tuple(n * (1.0 - s) for s in levels) for n in sizes)
    return LevelSpace(cost, budget=sum(sizes) * (1.0 - target))


def _on_budget(space: LevelSpace, targets: list[float], levels: list[float], what: str) -> list[int]:
    try:
        return nearest_feasible(space, targets, levels)
    except ValueError:
        raise UserError(
            f"the {what} allocation cannot be placed on the budget exactly with levels {levels}; choose a budget "
            "on the level grid (e.g. one of the levels) or finer levels"
        ) from None


def _save_state(work: Path, state: SearchState, key: str, baselines: dict) -> None:
    from lmcompress.measure.sweep import write_json_atomic

    data = {
        "key": key,
        "baselines": baselines,
        "levels": state.levels,
        "fitness": state.fitness,
        "generation": state.generation,
        "history": state.history,
        "rng_state": state.rng_state,
    }
    write_json_atomic(work / STATE_FILE, data)


def _load_state(work: Path, key: str) -> tuple[SearchState | None, dict]:
    """The saved state and baselines of a search with the same settings, or ``(None, {})``."""
    path = work / STATE_FILE
    if not path.is_file():
        return None, {}
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None, {}
        rng = data["rng_state"]
        rng_state = None if rng is None else (rng[0], tuple(rng[1]), rng[2])
        state = SearchState(
            list(data["levels"]), float(data["fitness"]), int(data["generation"]), list(data["history"]), rng_state
        )
        baselines = dict(data["baselines"])
        if not {"uniform", "owl", "allocations"} <= set(baselines):
            return None, {}
        return state, baselines
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None, {}  # a damaged state file: start the search again


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
    """Search per-unit sparsities for ``model``; on return the model holds the chosen allocation.

    ``work`` keeps the level database and the search state between runs: with the same settings a second
    call continues from the last finished generation.
    """
    start = time.perf_counter()
    levels = config.validate()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    key = json.dumps({k: v for k, v in config.to_dict().items() if k != "time_limit_s"}, sort_keys=True)
    prune_config = PruneConfig(
        method=config.method, sparsity=config.target, owl_m=config.owl_m, owl_lambda=config.owl_lambda
    )
    db_dir = work / "database"
    if (db_dir / "database.json").is_file() and LevelDatabase.open(db_dir).levels == levels:
        db = LevelDatabase.open(db_dir)
    else:
        db = build_database(model, prune_config, calib, levels, db_dir, device=device, progress=progress)
    units = _units(db, config.granularity)
    space = _space(db, units, levels, config.target)
    fitness_fn = KLFitness(model, fitness_windows, device=device)

    def assignment(unit_levels) -> dict[str, int]:
        return {layer: lv for unit, lv in zip(units, unit_levels, strict=True) for layer in unit}

    def score(unit_levels, stage: int) -> float:
        db.apply(model, assignment(unit_levels))
        return fitness_fn(model, config.stage_windows[stage])

    final_stage = len(config.stage_windows) - 1
    state, baselines = _load_state(work, key)
    if state is None:  # a fresh search: score the baselines (the model is still dense here), seed from the best
        uniform = _on_budget(space, [config.target] * len(units), levels, "uniform")
        ratios = _owl_ratios(model, prune_config, calib, device, progress)
        block_targets = owl_layer_sparsities(ratios, config.target, config.owl_lambda)
        owl = _on_budget(space, [block_targets[db.block_of[unit[0]]] for unit in units], levels, "OWL")
        baselines = {"uniform": score(uniform, final_stage), "owl": score(owl, final_stage)}
        baselines["allocations"] = {"uniform": [levels[lv] for lv in uniform], "owl": [levels[lv] for lv in owl]}
        seed = uniform if baselines["uniform"] <= baselines["owl"] else owl
        state = SearchState(list(seed), min(baselines["uniform"], baselines["owl"]))
        _save_state(work, state, key, baselines)
    bar = tqdm(total=config.generations, initial=state.generation, desc="search", disable=not progress, unit="gen")
    while state.generation < config.generations:
        if config.time_limit_s is not None and time.perf_counter() - start > config.time_limit_s:
            break
        evolve(
            space,
            score,
            state,
            offspring=config.offspring,
            survivors=config.survivors,
            max_switches=config.max_switches,
            seed=config.seed,
        )
        _save_state(work, state, key, baselines)
        bar.update(1)
        bar.set_postfix(best=f"{state.fitness:.4f}")
    bar.close()
    db.apply(model, assignment(state.levels))
    allocation = [levels[lv] for lv in state.levels]
    layer_sparsity = {layer: s for unit, s in zip(units, allocation, strict=True) for layer in unit}
    total = sum(db.sizes.values())
    achieved = sum(db.sizes[layer] * s for layer, s in layer_sparsity.items()) / total
    return SearchReport(
        config.to_dict(),
        levels,
        units,
        allocation,
        layer_sparsity,
        achieved,
        state.fitness,
        {k: float(baselines[k]) for k in ("uniform", "owl")},
        baselines["allocations"],
        state.history,
        time.perf_counter() - start,
    )
