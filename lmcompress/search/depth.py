"""Which blocks to drop, searched (EvoPress's depth search): the evolutionary engine over keep/drop levels.

Every block is a unit with two levels, keep (cost 1) and drop (cost 0); the budget is ``blocks − count`` kept
blocks, exactly, so a level switch (:func:`lmcompress.algorithms.evolution.mutate`) swaps a kept block for a
dropped one. A candidate is the dense model with its dropped blocks passing their input through, and its fitness
is the mean per-token KL(dense ‖ candidate) of the next-token distributions (:class:`~lmcompress.search.fitness.
KLFitness`) on the first few calibration windows (stage 0) and then on all the fitness windows (stage 1). The
search starts from the cosine ranking's drop set and is elitist, so its result never scores worse than it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.algorithms.evolution import LevelSpace, SearchState, evolve
from lmcompress.models.families import get_blocks
from lmcompress.search.fitness import KLFitness

FITNESS_SEQLEN = 256  # tokens per fitness window (the calibration windows are cut to this length)
STAGE0_WINDOWS = 2


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


def search_drop_set(
    model: nn.Module,
    start: list[int],
    calib: torch.Tensor,
    *,
    generations: int,
    offspring: int = 16,
    fitness_windows: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[list[int], dict]:
    """The drop set (ascending block indices, as many as ``start``) of lowest KL found in ``generations``
    generations from ``start``, and what the search did (fitness of the start and of the result, per generation)."""
    began = time.perf_counter()
    n = len(get_blocks(model))
    windows = calib[:fitness_windows, :FITNESS_SEQLEN]
    tuple_output = _returns_tuple(model, windows[:1].to(device))
    kl = KLFitness(model, windows, device=device)
    stages = (min(STAGE0_WINDOWS, windows.shape[0]), windows.shape[0])

    def fitness(levels, stage: int) -> float:
        with dropped(model, [i for i, lv in enumerate(levels) if lv == 1], tuple_output):
            return kl(model, stages[stage])

    space = LevelSpace(tuple((1.0, 0.0) for _ in range(n)), budget=float(n - len(start)))
    levels = [1 if i in set(start) else 0 for i in range(n)]
    state = SearchState(levels, fitness(levels, 1))
    start_fitness = state.fitness
    history = []
    for _ in tqdm(range(generations), desc="depth search", disable=not progress, unit="gen"):
        gen = evolve(space, fitness, state, offspring=offspring, survivors=(4, 1), max_switches=2, seed=seed)
        history.append({"generation": gen.index, "kl": gen.fitness, "improved": gen.improved})
    drop = [i for i, lv in enumerate(state.levels) if lv == 1]
    info = {
        "fitness": "kl",
        "fitness_windows": windows.shape[0],
        "fitness_seqlen": windows.shape[1],
        "generations": generations,
        "offspring": offspring,
        "start_drop": sorted(start),
        "start_kl": start_fitness,
        "kl": state.fitness,
        "history": history,
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
            seed=config.seed,
            device=device,
            progress=progress,
        )

    return choose
