"""The search itself: per-unit compression levels under a budget, scored by KL divergence to the dense model.

1. Every prunable layer is compressed once at every level (a sparsity, or a bit width) from the dense model's
   calibration statistics (:mod:`lmcompress.search.database`).
2. Units are layers or whole blocks, costed and scored as :mod:`lmcompress.search.score` says.
3. The baselines are scored first, on the same windows: uniform (every unit at the target) and, for sparsity,
   OWL (its block sparsities placed on the level grid at the same budget). From the better one, every unit is
   moved alone to each level within ``sensitivity_span`` of its own and scored (the *sensitivity* pass); greedy
   level switches under the additive model these changes make give a third start, ``additive``. The best of
   the starts seeds the evolutionary search of :mod:`lmcompress.algorithms.evolution`, whose state is saved
   after every generation (:mod:`lmcompress.search.state`) so that a killed run continues from its last
   finished generation.
4. Each generation draws ``pool`` mutants, ranks them by an additive surrogate fitted to every candidate scored
   so far (the sensitivity pass's included; :mod:`lmcompress.search.surrogate`) and scores the best
   ``offspring`` (a quarter of them drawn unranked, and up to ``propose`` of them the surrogate's own greedy
   descent from the parent); a candidate scored before is answered from memory.

The rest of the search lives beside this loop: level grids (``levels``), the config and report (``config``),
the work folder's state files (``state``) and keys (``keys``), candidate scoring (``score``), the max-loss
bisection (``max_loss``), OWL tuning (``tune``), the whole job's work folder (``work``) and the driver that
picks one of them (``run``).
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.algorithms.evolution import SearchState, evolve
from lmcompress.checkpoint.allocation import check_layer_levels
from lmcompress.errors import UserError
from lmcompress.models.families import prunable_layers
from lmcompress.search import joint
from lmcompress.search.config import SearchConfig, SearchReport
from lmcompress.search.score import Candidates, ParentScorer, prepare
from lmcompress.search.state import (
    DENSE_FILE,
    keep_dense_weights,
    load_state,
    restore_dense_weights,
    save_state,
    state_name,
)
from lmcompress.search.surrogate import AdditiveSurrogate, Memo, load_memo, proposals, save_memo, surrogate_path
from lmcompress.transforms.prune import owl_pass


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
        return _search(model, config, calib, fitness_windows, Path(work), device=device, progress=progress)


def _search(model, config, calib, fitness_windows, work: Path, *, device, progress: bool) -> SearchReport:
    start = time.perf_counter()
    if len(fitness_windows) < max(config.stage_windows):
        raise UserError(
            f"{len(fitness_windows)} fitness windows are fewer than the largest stage of stage_windows "
            f"({max(config.stage_windows)}); draw more held-out windows or use smaller stages",
            param="stage_windows",
        )
    if config.start is not None:  # before the database is built
        check_start(prunable_layers(model), config.start, config.kind)
    cand = prepare(model, config, calib, fitness_windows, work, device=device, progress=progress)
    state, baselines, round_starts = load_state(work, cand.key)
    if config.rounds > 1:  # later rounds rebuild the database from the dense weights, kept here meanwhile
        keep_dense_weights(model, work / DENSE_FILE)
    screen = _Screen(cand, work, fresh=state is None)
    if state is None:  # a fresh search: score the baselines (the model is still dense here), seed from the best
        state, baselines = _seed(cand, calib, device, progress)
        screen.prior_from(cand.delta)
        save_state(work, state, cand.key, baselines, round_starts)
        screen.save(cand.round)
    run = _Run(model, calib, fitness_windows, work, device, progress, state, baselines, round_starts)
    run.screen = screen
    cand = run.evolve(cand, start)
    return _report(cand, model, state, baselines, round_starts, time.perf_counter() - start)


def _seed(cand: Candidates, calib: torch.Tensor, device, progress: bool) -> tuple[SearchState, dict]:
    """The starts (uniform, OWL, ``config.start``, the sensitivity pass's additive one) scored on the final
    stage's windows, and the state seeded from the best of them."""
    config, db, units, levels = cand.config, cand.db, cand.units, cand.levels
    final_stage = len(config.stage_windows) - 1
    starts = {"uniform": cand.place([cand.uniform_target()] * len(units), "uniform")}
    if config.kind == "sparsity":
        _, owl = owl_pass(
            cand.model, calib, torch.device(device), config.target, config.owl_m, config.owl_lambda, progress=progress
        )
        starts["owl"] = cand.place([owl.sparsities[db.block_of[u[0]]] for u in units], "OWL")
    if config.start is not None:
        starts["start"] = cand.place(_unit_targets(db, units, config.start, config.kind), "start")
    baselines = {name: cand.score(lv, final_stage) for name, lv in starts.items()}
    best = min(baselines, key=baselines.get)
    additive = cand.additive_start(starts[best], final_stage, progress=progress)
    if additive is not None:
        starts["additive"], baselines["additive"] = additive
        best = min(baselines, key=baselines.get)
    baselines["allocations"] = {name: [levels[k] for k in lv] for name, lv in starts.items()}
    return SearchState(list(starts[best]), baselines[best]), baselines


EXPLORE = 4  # one in this many scored offspring is drawn unranked (the surrogate can be wrong)


class _Screen:
    """The memo of every candidate scored and the additive surrogate fitted to them (:mod:`.surrogate`), saved
    beside the search state so that a resumed search screens as the uninterrupted one would."""

    def __init__(self, cand: Candidates, work: Path, *, fresh: bool) -> None:
        self.work, self.key = work, cand.key
        self.path = surrogate_path(work, state_name(cand.key))
        self.units, self.levels = len(cand.units), len(cand.levels)
        self.delta, entries, self.round = (None, [], 0) if fresh else load_memo(self.path, cand.key)
        self.restart(entries)
        self.attach(cand)

    def restart(self, entries: list[list]) -> None:
        """A new memo (and surrogate) holding ``entries``."""
        self.memo = Memo(AdditiveSurrogate(self.units, self.levels, self.delta))
        for levels, stage, value in entries:
            self.memo.record(levels, stage, value)

    def attach(self, cand: Candidates) -> None:
        cand.observer = self.memo.record

    def prior_from(self, delta) -> None:
        self.delta = delta
        self.memo.surrogate.set_delta(delta)

    def new_round(self, cand: Candidates, r: int) -> None:
        """Round ``r``'s database scores candidates differently: forget the old round's scores."""
        if self.round != r:
            self.round = r
            self.restart([])
        self.attach(cand)

    def save(self, round_: int) -> None:
        save_memo(self.path, self.key, self.memo, self.delta, round_)


class _Run:
    """The generations of one search, in rounds: each round after the first rebuilds the level database along
    the best allocation so far. The state is saved after every generation."""

    def __init__(self, model, calib, fitness_windows, work, device, progress, state, baselines, round_starts):
        self.model, self.calib, self.fitness_windows, self.work = model, calib, fitness_windows, work
        self.device, self.progress = device, progress
        self.state, self.baselines, self.round_starts = state, baselines, round_starts
        self.screen: _Screen | None = None

    def evolve(self, cand: Candidates, start: float) -> Candidates:
        """Run the generations left (or up to the time limit); the candidates of the last round."""
        config, state = cand.config, self.state
        per_round = -(-config.generations // config.rounds)  # generations of each round (the last may be shorter)
        bar = tqdm(total=config.generations, initial=state.generation, desc="search", disable=not self.progress,
                   unit="gen")  # fmt: skip
        scorer: ParentScorer | None = None
        while state.generation < config.generations:
            if config.time_limit_s is not None and time.perf_counter() - start > config.time_limit_s:
                break
            r = state.generation // per_round
            if r > 0 and cand.round != r:  # a new round (or a resumed one): the database along the parent's inputs
                bar.set_description(f"search: round {r + 1} database")
                cand = self.next_round(cand, r)
                bar.set_description("search")
            if scorer is None or scorer.cand is not cand:
                scorer = ParentScorer(cand)
            scorer.follow(state.levels)
            memo = self.screen.memo
            memo.surrogate.fit()
            rank = functools.partial(memo.rank, last_stage=len(config.stage_windows) - 1)
            count = min(config.propose, config.offspring // EXPLORE)  # a quarter at most: the rest are mutants
            proposed = [p for p in proposals(memo.surrogate, cand.space, state.levels, count)
                        if (tuple(p), 0) not in memo.scores]  # fmt: skip
            evolve(cand.space, memo.wrap(scorer), state, offspring=config.offspring, survivors=config.survivors,
                   max_switches=config.max_switches, seed=config.seed, pool=config.pool, rank=rank,
                   explore=config.offspring // EXPLORE, proposals=proposed)  # fmt: skip
            save_state(self.work, state, cand.key, self.baselines, self.round_starts)
            self.screen.save(cand.round)
            bar.update(1)
            bar.set_postfix(best=f"{state.fitness:.4f}")
        bar.close()
        return cand

    def next_round(self, cand: Candidates, r: int) -> Candidates:
        """Round ``r``'s candidates: the model made dense again, the database built along the round's parent."""
        state, round_starts = self.state, self.round_starts
        fresh = len(round_starts) < r
        if fresh:
            round_starts.append({"generation": state.generation, "levels": list(state.levels)})
        restore_dense_weights(self.model, self.work / DENSE_FILE)
        previous = cand.db.folder
        reference = cand.assignment(round_starts[r - 1]["levels"])
        nxt = prepare(self.model, cand.config, self.calib, self.fitness_windows, self.work, device=self.device,
                      progress=self.progress, reference=reference, fitness=cand.fitness)  # fmt: skip
        nxt.round = r
        self.screen.new_round(nxt, r)
        if previous != nxt.db.folder and r > 1:  # the round before's database is no longer needed (round 1's stays)
            shutil.rmtree(previous, ignore_errors=True)
        if fresh:  # the parent rescored: on this database it is its sequential version
            round_starts[-1]["fitness_before"] = state.fitness
            state.fitness = round_starts[-1]["fitness"] = nxt.score(state.levels, len(cand.config.stage_windows) - 1)
            save_state(self.work, state, nxt.key, self.baselines, round_starts)
        return nxt


def _report(cand: Candidates, model, state: SearchState, baselines, round_starts, seconds: float) -> SearchReport:
    """Put the best allocation into the model and describe it."""
    config, db, levels = cand.config, cand.db, cand.levels
    chosen = cand.assignment(state.levels)
    db.apply(model, chosen)
    if config.kind == "size":  # the "16" levels and the untouched tensors are counted in 16 bits: saved so too
        joint.store_floats_in_16_bits(model)
    weights = sum(db.sizes.values())
    spent = cand.space.total(state.levels)
    quantized = None
    if db.quantized or config.kind == "size":  # joint levels at 16 bits keep floats: no codes
        quantized = {f"{layer}.weight": db.codes(layer, k) for layer, k in chosen.items()}
        quantized = {name: qt for name, qt in quantized.items() if qt is not None}
    dropped, sixteen = [], joint.sixteen_bit_bytes(model)
    if config.kind == "size":  # blocks at level drop leave the model (the rest renumbered, codes renamed)
        dropped = joint.remove_dropped(model, {layer: levels[k] for layer, k in chosen.items()}, db.block_of, quantized)
    return SearchReport(
        config=config.to_dict(),
        levels=levels,
        units=cand.units,
        allocation=[levels[lv] for lv in state.levels],
        layer_levels={layer: levels[k] for layer, k in chosen.items()},
        achieved=_achieved(config.kind, spent, weights, cand.space),
        fitness=state.fitness,
        baselines={k: float(v) for k, v in baselines.items() if k != "allocations"},
        baseline_allocations=baselines["allocations"],
        history=state.history,
        wall_time_s=seconds,
        quantized=quantized,
        database=str(db.folder),
        rounds=[
            {k: v for k, v in r.items() if k != "levels"} | {"parent": [levels[k] for k in r["levels"]]}
            for r in round_starts
        ],
        size=_size(cand, chosen, spent, sixteen, dropped),
    )


def _size(cand: Candidates, chosen: dict[str, int], spent: float, sixteen: int, dropped: list[int]) -> dict | None:
    """A size search's bytes: the budget, the packed weights file as predicted, the part no level changes, the
    model's 16-bit size (before blocks were dropped), the blocks dropped; and each level's nominal bits per
    weight with their average over the searched weights (what ``lmcompress report`` draws)."""
    config, space, db = cand.config, cand.space, cand.db
    if config.kind != "size":
        return None
    bits = dict(zip(cand.levels, joint.uniform_values(config.joint_levels(), config.group_size), strict=True))
    mean = sum(bits[cand.levels[k]] * db.sizes[layer] for layer, k in chosen.items()) / sum(db.sizes.values())
    return {"budget": space.budget_bytes, "predicted": int(spent + space.fixed), "fixed": space.fixed,
            "sixteen_bit": sixteen, "dropped_blocks": dropped, "level_bits": bits,
            "nominal_bits_per_weight": mean}  # fmt: skip


def _achieved(kind: str, spent: float, weights: int, space) -> float:
    """Average sparsity by parameters, bits per weight with grids, or (size) the bytes of the packed weights file
    as predicted: the searched tensors' bytes plus everything else's (their difference to the budget is fixed)."""
    if kind == "sparsity":
        return 1.0 - spent / weights
    if kind == "bits":
        return spent / weights
    return spent + space.fixed


def check_start(layers, start: dict[str, float], kind: str = "sparsity") -> None:
    """Refuse a start allocation (of ``kind`` levels) whose layers are not exactly ``layers``."""
    check_layer_levels(layers, start, kind, what="start")


def _unit_targets(db, units: list[list[str]], start: dict[str, float], kind: str) -> list[float]:
    """Each unit's level in ``start`` (layer → level), averaged over its layers by their sizes."""
    check_start(db.layers, start, kind)
    size = db.sizes
    return [sum(start[layer] * size[layer] for layer in unit) / sum(size[layer] for layer in unit) for unit in units]
