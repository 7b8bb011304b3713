"""Which blocks to drop, searched (EvoPress's depth search): the evolutionary engine over keep/drop levels.

Every block is a unit with two levels, keep (cost 1) and drop (cost 0); the budget is ``blocks − count`` kept
blocks, exactly, so a level switch (:func:`lmcompress.algorithms.evolution.mutate`) swaps a kept block for a
dropped one. A candidate is the dense model with its dropped blocks passing their input through (no weights are
rewritten), and its fitness is the mean per-token KL(dense ‖ candidate) of the next-token distributions
(:class:`~lmcompress.search.fitness.KLFitness`, the dense model's side computed once) on the first few calibration
windows (stage 0) and then on all the fitness windows (stage 1).

A candidate that keeps and drops the same blocks as the current best before block ``b`` enters block ``b`` with
the best's hidden states, so those are cached (:class:`~lmcompress.search.fitness.PrefixCache`) and only blocks
``b…`` run: the same fitness for less compute.

The search starts from the cosine ranking's drop set. With ``swap_scans``, it first descends by single swaps
(one dropped block kept, one kept block dropped): every swap is scored on one window, the best few on all, and
the best of those replaces the current set when it scores lower; this repeats up to ``swap_scans`` times or
until no swap helps. Then come ``generations`` generations of evolution. Both are elitist, so the result never
scores worse than the ranking's drop set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.algorithms.evolution import LevelSpace, SearchState, evolve
from lmcompress.models.families import get_blocks
from lmcompress.search.fitness import KLFitness, PrefixCache

FITNESS_SEQLEN = 256  # tokens per fitness window (the calibration windows are cut to this length)
STAGE0_WINDOWS = 2
SCAN_WINDOWS = 1  # windows on which every single swap of a scan is scored
SCAN_KEEP = 4  # swaps of a scan re-scored on every fitness window


def _returns_tuple(model: nn.Module, window: torch.Tensor) -> bool:
    """Whether the model's blocks return a tuple (read as ``out[0]``) rather than a tensor."""
    seen: list[bool] = []
    handle = get_blocks(model)[0].register_forward_hook(lambda _m, _a, out: seen.append(isinstance(out, tuple)))
    try:
        with torch.no_grad():
            model(window, use_cache=False)
    finally:
        handle.remove()
    return bool(seen and seen[0])


@contextmanager
def dropped(model: nn.Module, drop: list[int], tuple_output: bool) -> Iterator[None]:
    """Within the ``with``, the blocks ``drop`` return their input hidden states, computing nothing."""
    blocks = get_blocks(model)
    saved = {i: blocks[i].__dict__.get("forward") for i in drop}

    def identity(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if tuple_output else hidden

    for i in drop:
        blocks[i].forward = identity
    try:
        yield
    finally:
        for i, forward in saved.items():
            if forward is None:
                del blocks[i].forward
            else:
                blocks[i].forward = forward


def _drop_of(levels: Sequence[int]) -> list[int]:
    return [i for i, lv in enumerate(levels) if lv == 1]


class DropFitness:
    """KL of a drop set (levels: 1 = dropped) on the first ``n`` windows, running only the blocks from the first
    one where it differs from the *base* (the best set so far) when the prefix cache is usable.

    ``prefix=False`` scores every candidate by the full forward (the reference the cached path must equal).
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        *,
        device: str | torch.device = "cpu",
        prefix: bool = True,
    ) -> None:
        self.model, self.windows, self.device, self.use_prefix = model, windows, device, prefix
        self.blocks = len(get_blocks(model))
        self.tuple_output = _returns_tuple(model, windows[:1].to(device))
        self.kl = KLFitness(model, windows, device=device)
        self.base: list[int] | None = None
        self.cache: PrefixCache | None = None
        self.captured: dict[tuple[int, ...], tuple[int, list]] = {}  # levels → (start, hidden states after it)
        self.block_runs = 0  # block forwards (dropped ones included) run over all windows scored
        self.full_block_runs = 0  # what they would have been without the prefix cache
        self.memo: dict[tuple[tuple[int, ...], int], float] = {}  # (levels, windows) → KL: repeats cost nothing

    def rebase(self, levels: Sequence[int]) -> None:
        """Make ``levels`` the base: from a capture made while scoring it on every window, else by a forward."""
        levels, captured = list(levels), self.captured
        self.captured = {}
        if not self.use_prefix or levels == self.base:
            return
        found = captured.get(tuple(levels))
        if found is not None and self.cache is not None:
            self.cache = self.cache.rebased(*found)
        else:
            with dropped(self.model, _drop_of(levels), self.tuple_output):
                self.cache = PrefixCache(self.model, self.windows, device=self.device)
            self.block_runs += self.blocks * self.windows.shape[0]
            self.use_prefix = self.cache.usable  # a family whose forward the cache cannot replay: full forwards
        self.base = levels

    def __call__(self, levels: Sequence[int], n: int, *, capture: bool = False) -> float:
        """Mean per-token KL on the first ``n`` windows; ``capture``: keep the hidden states for :meth:`rebase`
        (only when ``n`` covers every cached window)."""
        n = min(n, self.windows.shape[0])
        key = (tuple(levels), n)
        if key in self.memo:
            return self.memo[key]
        cache = self.cache if self.use_prefix and self.cache is not None and self.cache.usable else None
        start = 0
        if cache is not None:
            differs = [i for i, (a, b) in enumerate(zip(levels, self.base, strict=True)) if a != b]
            start = min(differs[0] if differs else self.blocks - 1, self.blocks - 1)
        rows: list | None = [] if cache is not None and capture and n >= cache.cached else None
        with dropped(self.model, _drop_of(levels), self.tuple_output):
            value = self.kl(self.model, n, prefix=cache, start=start, capture=rows)
        self.block_runs += (self.blocks - start) * n
        self.full_block_runs += self.blocks * n
        if rows is not None:
            self.captured[tuple(levels)] = (start, rows)
        self.memo[key] = value
        return value


def _swaps(levels: Sequence[int]) -> list[list[int]]:
    """Every drop set one swap away: one dropped block kept and one kept block dropped."""
    out = []
    for i in (i for i, lv in enumerate(levels) if lv == 1):
        for j in (j for j, lv in enumerate(levels) if lv == 0):
            child = list(levels)
            child[i], child[j] = 0, 1
            out.append(child)
    return out


def swap_scan(score: DropFitness, state: SearchState, n_all: int, keep: int = SCAN_KEEP) -> dict:
    """One steepest-descent step over single swaps (changes ``state`` when the best swap scores lower): every
    swap scored on :data:`SCAN_WINDOWS` windows, the ``keep`` best on ``n_all`` windows."""
    children = _swaps(state.levels)
    scored = sorted((score(child, SCAN_WINDOWS), child) for child in children)
    finalists = [(score(child, n_all, capture=True), child) for _, child in scored[:keep]]
    best_score, best = min(finalists)
    improved = best_score < state.fitness
    if improved:
        state.levels, state.fitness = list(best), best_score
    score.rebase(state.levels)
    return {"scan": True, "kl": state.fitness, "improved": improved, "evaluations": len(children) + len(finalists)}


def search_drop_set(
    model: nn.Module,
    start: list[int],
    calib: torch.Tensor,
    *,
    generations: int,
    offspring: int = 16,
    fitness_windows: int = 8,
    swap_scans: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    prefix: bool = True,
) -> tuple[list[int], dict]:
    """The drop set (ascending block indices, as many as ``start``) of lowest KL found by up to ``swap_scans``
    single-swap descents and then ``generations`` generations from ``start``, and what the search did (fitness
    of the start and of the result, per step). ``prefix=False`` turns the prefix cache off (same result, slower)."""
    began = time.perf_counter()
    n = len(get_blocks(model))
    windows = calib[:fitness_windows, :FITNESS_SEQLEN]
    score = DropFitness(model, windows, device=device, prefix=prefix)
    stages = (min(STAGE0_WINDOWS, windows.shape[0]), windows.shape[0])
    space = LevelSpace(tuple((1.0, 0.0) for _ in range(n)), budget=float(n - len(start)))
    levels = [1 if i in set(start) else 0 for i in range(n)]
    score.rebase(levels)
    state = SearchState(levels, score(levels, stages[1]))
    start_fitness = state.fitness
    history: list[dict] = []
    for _ in tqdm(range(swap_scans), desc="depth swaps", disable=not progress, unit="scan"):
        step = swap_scan(score, state, stages[1])
        history.append({"step": len(history) + 1, **step, "elapsed_s": time.perf_counter() - began})
        if not step["improved"]:
            break

    def fitness(child: Sequence[int], stage: int) -> float:
        return score(child, stages[stage], capture=stage == len(stages) - 1)

    for _ in tqdm(range(generations), desc="depth search", disable=not progress, unit="gen"):
        gen = evolve(space, fitness, state, offspring=offspring, survivors=(4, 1), max_switches=2, seed=seed)
        score.rebase(state.levels)
        step = {"generation": gen.index, "kl": gen.fitness, "improved": gen.improved}
        history.append({"step": len(history) + 1, **step, "elapsed_s": time.perf_counter() - began})
    drop = _drop_of(state.levels)
    info = {
        "fitness": "kl",
        "fitness_windows": windows.shape[0],
        "fitness_seqlen": windows.shape[1],
        "swap_scans": swap_scans,
        "generations": generations,
        "offspring": offspring,
        "start_drop": sorted(start),
        "start_kl": start_fitness,
        "kl": state.fitness,
        "history": history,
        "block_runs": score.block_runs,
        "full_block_runs": score.full_block_runs,
        "search_time_s": time.perf_counter() - began,
    }
    return drop, info


def drop_chooser(config) -> Callable:
    """``choose(model, ranking_drop, calib, device, progress) → (drop, info)`` for ``depth_prune`` with
    ``config.criterion == "search"``."""

    def choose(model, ranking_drop, calib, device, progress):
        return search_drop_set(
            model,
            ranking_drop,
            calib,
            generations=config.generations,
            offspring=config.offspring,
            fitness_windows=config.fitness_windows,
            swap_scans=config.swap_scans,
            seed=config.seed,
            device=device,
            progress=progress,
        )

    return choose
