"""The evolutionary level search: budgets kept, levels in range, resumable, and it finds a known optimum."""

from __future__ import annotations

import copy
import itertools
import random

import pytest

from lmcompress.algorithms.evolution import (
    LevelSpace,
    SearchState,
    additive_descent,
    evolve,
    mutate,
    nearest_feasible,
)

SPARSITIES = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def sparsity_space(sizes: list[int], target: float) -> LevelSpace:
    """Cost = weights kept; budget = (1 − target) of all weights."""
    cost = tuple(tuple(n * (1 - s) for s in SPARSITIES) for n in sizes)
    return LevelSpace(cost, budget=sum(sizes) * (1 - target))


def test_level_switches_keep_the_budget_exactly_and_the_levels_in_range():
    sizes = [100, 100, 300, 300, 300, 50]
    space = sparsity_space(sizes, 0.7)
    levels = [SPARSITIES.index(0.7)] * len(sizes)
    rng = random.Random(1)
    for _ in range(500):
        levels = mutate(space, levels, rng)
        assert all(0 <= lv < len(SPARSITIES) for lv in levels)
        assert space.total(levels) == pytest.approx(space.budget, abs=1e-6)
    assert len(set(levels)) > 1  # it did move


def test_switches_between_units_of_different_sizes_move_weights_between_them_and_keep_the_budget():
    # a LLaMA block's layers in units of a k_proj: q and o 3, k and v 1, gate, up and down 8 (SmolLM2's ratios)
    sizes = [3, 1, 1, 3, 8, 8, 8] * 3
    space = sparsity_space([110 * n for n in sizes], 0.7)
    levels = [SPARSITIES.index(0.7)] * len(sizes)
    rng = random.Random(0)
    mlp_share = set()
    for _ in range(300):
        levels = mutate(space, levels, rng)
        assert space.total(levels) == pytest.approx(space.budget, abs=1e-6)
        mlp_share.add(round(sum(space.cost[u][lv] for u, lv in enumerate(levels) if sizes[u] == 8), 6))
    assert len(mlp_share) > 3  # the MLP layers' total changes: weights moved to and from attention


def test_a_unit_no_others_can_balance_never_moves():
    space = sparsity_space([100, 100, 37], 0.6)  # a step of the 37-weight unit is no sum of the others' steps
    levels = [SPARSITIES.index(0.6)] * 3
    rng = random.Random(0)
    for _ in range(200):
        levels = mutate(space, levels, rng)
        assert levels[2] == SPARSITIES.index(0.6) and space.feasible(levels)


def test_a_budget_outside_the_levels_is_refused():
    with pytest.raises(ValueError, match="outside"):
        sparsity_space([10, 10], 0.95)


def test_no_room_to_move_is_a_clear_error():
    space = sparsity_space([10, 10], 0.9)
    with pytest.raises(ValueError, match="no budget-preserving"):
        mutate(space, [6, 6], random.Random(0), tries=50)


def _separable_fitness(weights: list[float]):
    """Units differ in sensitivity: fitness = Σ w_u · s_u², minimised by pruning insensitive units more."""

    def fitness(levels, stage):
        return sum(w * SPARSITIES[lv] ** 2 for w, lv in zip(weights, levels, strict=True))

    return fitness


def test_search_reaches_the_brute_force_optimum_on_a_small_problem():
    sizes = [100] * 5
    weights = [5.0, 1.0, 3.0, 0.5, 2.0]
    space = sparsity_space(sizes, 0.6)
    fitness = _separable_fitness(weights)
    best = min(
        (c for c in itertools.product(range(len(SPARSITIES)), repeat=5) if space.feasible(c)),
        key=lambda c: fitness(c, 0),
    )
    start = [SPARSITIES.index(0.6)] * 5
    state = SearchState(start, fitness(start, 1))
    history = [state.fitness]
    for _ in range(60):
        evolve(space, fitness, state, offspring=8, survivors=(3, 1), seed=0)
        history.append(state.fitness)
    assert all(b <= a for a, b in itertools.pairwise(history))  # elitist: never worse
    assert state.fitness == pytest.approx(fitness(best, 0))
    assert space.feasible(state.levels)


def test_resuming_from_a_saved_state_gives_the_same_result():
    space = sparsity_space([100, 200, 100, 200], 0.5)
    fitness = _separable_fitness([1.0, 4.0, 2.0, 0.3])
    start = [SPARSITIES.index(0.5)] * 4
    straight = SearchState(list(start), fitness(start, 1))
    for _ in range(10):
        evolve(space, fitness, straight, seed=7)
    first = SearchState(list(start), fitness(start, 1))
    for _ in range(4):
        evolve(space, fitness, first, seed=7)
    resumed = copy.deepcopy(first)  # what a killed run reloads from disk
    for _ in range(6):
        evolve(space, fitness, resumed, seed=7)
    assert resumed.levels == straight.levels and resumed.fitness == straight.fitness
    assert resumed.history == straight.history


def test_bit_levels_with_unequal_steps_stay_within_the_slack():
    bits = [2, 3, 4, 8]
    sizes = [64, 64, 128, 128]
    # cost: bits stored; levels ordered from most to least bits so that cost does not grow with the level
    cost = tuple(tuple(n * b for b in reversed(bits)) for n in sizes)
    space = LevelSpace(cost, budget=sum(sizes) * 3.0, slack=64.0)
    levels = nearest_feasible(space, [3.0] * 4, list(reversed(bits)))
    assert space.feasible(levels)
    rng = random.Random(0)
    for _ in range(200):
        levels = mutate(space, levels, rng)
        assert space.budget - space.slack - 1e-6 <= space.total(levels) <= space.budget + 1e-6


def test_nearest_feasible_places_owl_like_targets_on_the_budget():
    sizes = [100] * 6
    space = sparsity_space(sizes, 0.7)
    targets = [0.62, 0.66, 0.71, 0.74, 0.69, 0.78]
    levels = nearest_feasible(space, targets, SPARSITIES)
    assert space.feasible(levels)
    assert levels[0] <= levels[-1]  # the order of the targets survives


def test_a_generation_with_no_room_to_move_keeps_the_parent():
    space = sparsity_space([10, 10], 0.9)
    state = SearchState([6, 6], 1.0)
    gen = evolve(space, lambda levels, stage: 0.0, state, seed=0)
    assert not gen.improved and state.levels == [6, 6] and gen.evaluations == 0 and state.generation == 1


def test_additive_descent_reaches_the_optimum_of_a_convex_additive_model_and_keeps_the_budget():
    sizes = [100] * 6  # equal units: every exchange is a pair switch, so the greedy is exact for convex terms
    weights = [5.0, 1.0, 3.0, 0.5, 2.0, 0.2]
    space = sparsity_space(sizes, 0.6)
    start = [SPARSITIES.index(0.6)] * len(sizes)
    fitness = _separable_fitness(weights)
    delta = [
        [fitness([*start[:u], lv, *start[u + 1 :]], 0) - fitness(start, 0) for lv in range(len(SPARSITIES))]
        for u in range(len(sizes))
    ]
    path = additive_descent(space, start, delta)
    assert path and all(space.feasible(p) for p in path)
    values = [fitness(p, 0) for p in [start, *path]]
    assert all(b < a for a, b in itertools.pairwise(values))  # every step lowers the (here exact) model
    best = min(
        (c for c in itertools.product(range(len(SPARSITIES)), repeat=len(sizes)) if space.feasible(c)),
        key=lambda c: fitness(c, 0),
    )
    assert values[-1] == pytest.approx(fitness(best, 0))  # convex per unit, equal-size pairs: the optimum


def test_additive_descent_never_enters_unmeasured_levels():
    space = sparsity_space([100] * 4, 0.6)
    start = [SPARSITIES.index(0.6)] * 4
    delta = [[None] * len(SPARSITIES) for _ in start]
    for u, lv in enumerate(start):  # only one level each way measured; unit 0 gains a lot from going down
        delta[u][lv], delta[u][lv - 1], delta[u][lv + 1] = 0.0, (-10.0 if u == 0 else 1.0), 0.5
    path = additive_descent(space, start, delta)
    assert path and all(abs(a - b) <= 1 for p in path for a, b in zip(p, start, strict=True))
    assert path[-1][0] == start[0] - 1
    assert additive_descent(space, start, [[None] * len(SPARSITIES)] * 4) == []
