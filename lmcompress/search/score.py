"""Scoring candidates: a unit's levels assembled from the level database into the model, and their fitness.

Units are layers or whole blocks. A unit's cost at a level is the number of weights it keeps (sparsity) or the
bits it stores, grids included (bit widths). The budget is ``(1 − target) × Σ weights`` for an average sparsity
counted by parameters, met exactly (level switches pair units of equal size), or ``target × Σ weights`` bits, met
from below within one level step. :class:`ParentScorer` runs only the blocks where a child differs from its parent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.algorithms.evolution import LevelSpace, additive_descent, nearest_feasible
from lmcompress.algorithms.knapsack import knapsack
from lmcompress.calibration.data import windows_hash
from lmcompress.errors import UserError
from lmcompress.models.families import prunable_layers
from lmcompress.search import joint, latency
from lmcompress.search.config import SearchConfig
from lmcompress.search.database import LevelDatabase, build_database, pruner, quantizer
from lmcompress.search.fitness import PrefixCache, make_fitness
from lmcompress.search.keys import database_dir, database_key, open_database, trajectory_key
from lmcompress.search.scheme import SchemeSimulation, simulated
from lmcompress.transforms.prune import PruneConfig


def units_of(db: LevelDatabase, granularity: str) -> list[list[str]]:
    if granularity == "layer":
        return [[layer] for layer in db.layers]
    blocks: dict[int, list[str]] = {}
    for layer in db.layers:
        blocks.setdefault(db.block_of[layer], []).append(layer)
    return [blocks[i] for i in sorted(blocks)]


def level_space(db: LevelDatabase, units: list[list[str]], config: SearchConfig, model=None) -> LevelSpace:
    cost = tuple(tuple(sum(db.cost[layer][k] for layer in unit) for k in range(len(db.levels))) for unit in units)
    if config.decode is not None:  # seconds per token from the latency table (search.latency)
        return latency.decode_space(latency.costs_of(model, config), units, db.block_of)
    if config.kind == "size":  # bytes of the packed weights file, the rest of the model's tensors included
        fixed = joint.fixed_bytes(model, set(db.layers), joint.ByteCost(model))
        budget = joint.budget_bytes(model, config.target, config.size_relative)
        heads = [u for u, unit in enumerate(units) if any(db.block_of[layer] == joint.HEAD_BLOCK for layer in unit)]
        return joint.size_space([list(c) for c in cost], fixed, budget, list(db.levels), heads)
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


def on_budget(space: LevelSpace, targets: list[float], levels: list[float], what: str) -> list[int]:
    try:
        return nearest_feasible(space, targets, levels)
    except ValueError:
        raise UserError(
            f"the {what} allocation cannot be placed on the budget with levels {levels}; choose a budget "
            "on the level grid (e.g. one of the levels) or finer levels"
        ) from None


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
    scheme: SchemeSimulation | None = None  # config.scheme: every scoring forward runs the candidate as that scheme
    observer: Callable[[list[int], int, float], None] | None = None  # told every (levels, stage, fitness) scored
    delta: list[list[float | None]] | None = None  # the last sensitivity pass's measurement

    def assignment(self, unit_levels) -> dict[str, int]:
        return {layer: lv for unit, lv in zip(self.units, unit_levels, strict=True) for layer in unit}

    def hold(self, unit_levels) -> None:
        """Make the model hold this candidate. Only the layers whose level differs from what the model holds are
        read from the database: a mutant changes a few units, so this costs little next to its forward passes."""
        wanted = self.assignment(unit_levels)
        changed = {layer: k for layer, k in wanted.items() if self.applied.get(layer) != k}
        self.db.apply(self.model, changed)
        if self.scheme is not None:
            self.scheme.forget(changed)
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
        if start < 0:  # the head (and a tied embedding) changed: no cached block input holds
            prefix, start, capture = None, 0, None
        with simulated(self.scheme):
            value = self.fitness(self.model, n, prefix=prefix, start=start, capture=capture)
        if self.observer is not None:
            self.observer(list(unit_levels), stage, value)
        return value

    def first_block(self, unit_levels, base) -> int:
        """The first block in which two candidates differ (the last block when they are equal; ``HEAD_BLOCK``, i.e.
        a full forward, when the output head differs: tied, it is the input embedding too)."""
        blocks = [self.db.block_of[layer] for u, unit in enumerate(self.units) if unit_levels[u] != base[u]
                  for layer in unit]  # fmt: skip
        return min(blocks, default=max(self.db.block_of.values()))

    def sensitivity(self, base: list[int], span: int, *, progress: bool = True) -> list[list[float | None]]:
        """``delta[u][l]``: the fitness change (first stage's windows) of moving unit ``u`` alone from ``base``
        to level ``l``, for levels within ``span`` of its own (``None`` elsewhere). Blocks before the unit's
        first are read from a :class:`PrefixCache` of ``base``."""
        reference = self.score(base, 0)
        windows = self.fitness.windows[: self.config.stage_windows[0]]
        with simulated(self.scheme):
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
        self.delta = delta
        return delta

    def additive_start(self, base: list[int], stage: int, *, progress: bool = True) -> tuple[list[int], float] | None:
        """The best point (real fitness on stage ``stage``) of the additive descent from ``base`` and of the additive
        model's exact optimum, or None when the sensitivity pass is off or finds nothing that helps. Four points of
        the path are scored: a quarter, half, three quarters and all of it (units interact, so the whole path may
        overshoot); and the allocation within the measured levels that the model predicts best on the budget (a
        knapsack, :func:`~lmcompress.algorithms.knapsack.knapsack`: pairwise switches can stop short of it when
        units differ in size), where it is not on the path."""
        if self.config.span <= 0:
            return None
        delta = self.sensitivity(base, self.config.span, progress=progress)
        path = additive_descent(self.space, base, delta)
        points = (
            [path[i] for i in sorted({max(0, round(f * len(path)) - 1) for f in (0.25, 0.5, 0.75, 1.0)})]
            if path
            else []
        )
        measured = [[math.inf if d is None else d for d in row] for row in delta]
        best = knapsack(self.space, measured)
        if best is not None and best != list(base) and best not in points:
            points.append(best)
        if not points:
            return None
        fitness, i = min((self.score(p, stage), i) for i, p in enumerate(points))
        return points[i], fitness

    def place(self, targets: list[float], what: str) -> list[int]:
        """Per-unit targets (e.g. OWL's) on the level grid, on the budget (joint levels: in nominal bits per
        weight, see :meth:`uniform_target`)."""
        if self.config.kind == "size":  # every target is the budget's bits per weight (the uniform start)
            values = joint.uniform_values(self.config.joint_levels(), self.config.group_size)
            try:
                return joint.place_uniform(self.space, values, targets[0])
            except ValueError:
                return on_budget(self.space, targets, values, what)
        return on_budget(self.space, targets, self.levels, what)

    def uniform_target(self) -> float:
        """Every unit's target of the uniform start: the budget's level (joint levels: the budget's average bits
        per searched weight)."""
        if self.config.kind != "size":
            return self.config.target
        if self.config.decode is not None:  # the first level at which every layer meets the decode budget
            values = joint.uniform_values(self.config.joint_levels(), self.config.group_size)
            return values[latency.uniform_level(latency.costs_of(self.model, self.config))]
        return 8 * self.space.budget / max(sum(self.db.sizes.values()), 1)


PREFIX_CACHE_BYTES = 1 << 30  # the parent's hidden states kept for the evolution (windows beyond it run in full)


class ParentScorer:
    """``fitness(levels, stage)`` for :func:`evolve` that runs only the blocks where a child differs from its parent.

    The hidden states entering every block of the parent on the final stage's windows are kept in a
    :class:`PrefixCache` (up to ``PREFIX_CACHE_BYTES``); a child whose first changed unit sits in block ``b`` runs
    blocks ``b…`` only, with the same fitness as a full forward. The final stage's scoring captures the child's
    hidden states (the best so far of a generation's final stage is kept: the winner, should it beat the parent),
    so a child that becomes the parent is cached without another forward. Call :meth:`follow`
    with the parent before each generation.
    """

    def __init__(self, cand: Candidates, max_bytes: int = PREFIX_CACHE_BYTES) -> None:
        self.cand, self.max_bytes = cand, max_bytes
        self.final = len(cand.config.stage_windows) - 1
        self.base: list[int] | None = None
        self.prefix: PrefixCache | None = None
        self.pending: tuple[list[int], int, list] | None = None  # the best final-stage child, its start, its capture
        self.pending_score = float("inf")
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
            with simulated(self.cand.scheme):
                self.prefix = PrefixCache(self.cand.model, windows, device=fitness.device, max_bytes=self.max_bytes)
            if not self.prefix.usable:  # a family whose forward cannot skip blocks: full forwards from now on
                self.enabled, self.prefix = False, None
        self.base, self.pending, self.pending_score = list(parent), None, float("inf")

    def __call__(self, levels: list[int], stage: int) -> float:
        if self.prefix is None or self.base is None:
            return self.cand.score(levels, stage)
        start = self.cand.first_block(levels, self.base)
        capture: list | None = [] if stage == self.final and start >= 0 else None
        score = self.cand.score(levels, stage, prefix=self.prefix, start=start, capture=capture)
        if capture is not None and (self.pending is None or score < self.pending_score):  # the stage's best so far
            self.pending, self.pending_score = (list(levels), start, capture), score
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
    levels = config.validate()
    work.mkdir(parents=True, exist_ok=True)
    data = {"calib": windows_hash(calib), "fitness": windows_hash(fitness_windows)}
    if config.database_inputs == "dense":
        reference = None
    elif reference is None:  # every layer at the level nearest the target: the uniform model
        values, target = levels, config.target
        if config.kind == "size":  # nominal bits per weight of the levels, and the budget's
            values = joint.uniform_values(config.joint_levels(), config.group_size)
            budget = joint.budget_bytes(model, config.target, config.size_relative)
            target = 8 * budget / sum(w.numel() for w in model.state_dict().values())
        nearest = min(range(len(levels)), key=lambda k: (abs(values[k] - target), k))
        if config.decode is not None:  # a decode budget: the first level at which every layer meets it
            nearest = latency.uniform_level(latency.costs_of(model, config))
        reference = dict.fromkeys(prunable_layers(model), nearest)
    db_key = database_key(config, levels, data["calib"], reference)
    db_dir = database_dir(work, db_key)
    db = open_database(db_dir, levels, db_key)
    if db is None:
        extra = {}
        if config.kind == "size":  # bytes as the packed save writes them, and the output head at every level
            extra["byte_cost"] = joint.ByteCost(model)
            if joint.head_of(model) is not None:
                extra["head"] = joint.head_levels(model, config.joint_levels(), config.group_size, config.sym)
        db = build_database(model, compressor_of(config), calib, levels, db_dir, device=device, reference=reference,
                            progress=progress, **extra)  # fmt: skip
        (db_dir / "key.json").write_text(json.dumps({"key": db_key}))
    units = units_of(db, config.granularity)
    space = level_space(db, units, config, model)
    head = config.kind == "size" and joint.head_of(model) is not None
    fitness = fitness or make_fitness(config.fitness, model, fitness_windows, device=device, head_changes=head)
    scheme = SchemeSimulation(model, config.scheme, config.dynamic) if config.scheme is not None else None
    return Candidates(config, levels, db, units, space, trajectory_key(config, data), model, fitness, scheme=scheme)


def compressor_of(config: SearchConfig):
    """What makes every level of a layer: a pruner at the config's method, or a quantizer on its grids."""
    if config.kind == "sparsity":
        return pruner(PruneConfig(method=config.method, sparsity=config.target))
    if config.kind == "size":
        return joint.joint_compressor(config.joint_levels(), config.group_size, config.sym)
    return quantizer(config.method, config.group_size, config.sym)
