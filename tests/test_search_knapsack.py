"""The surrogate's optimum on the budget: an exact multiple-choice knapsack, proposed to the search each generation,
and the knapsack start after the sensitivity pass."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest

from lmcompress.algorithms.evolution import LevelSpace, SearchState, evolve
from lmcompress.algorithms.knapsack import knapsack
from lmcompress.search.run import SearchConfig, search
from lmcompress.search.surrogate import AdditiveSurrogate, optimum, proposals


def _value(space: LevelSpace, value, levels) -> float:
    return sum(value[u][lv] for u, lv in enumerate(levels))


@pytest.mark.parametrize("slack", [0.0, 250.0])
def test_the_knapsack_is_the_exact_optimum_on_the_budget(slack):
    rng = random.Random(0)
    for _ in range(60):
        units, levels = rng.randint(2, 5), rng.randint(2, 4)
        sizes = [rng.choice((1, 3, 8)) * 1000 for _ in range(units)]  # SmolLM2's k/v, q/o and MLP ratios
        cost = tuple(tuple(s * (1 - 0.05 * k) for k in range(levels)) for s in sizes)
        start = [rng.randrange(levels) for _ in range(units)]
        space = LevelSpace(cost, sum(cost[u][k] for u, k in enumerate(start)), slack)
        value = [[rng.uniform(-1, 1) for _ in range(levels)] for _ in range(units)]
        got = knapsack(space, value)
        best = min(_value(space, value, x) for x in itertools.product(range(levels), repeat=units) if space.feasible(x))
        assert got is not None and space.feasible(got)
        assert _value(space, value, got) == pytest.approx(best, abs=1e-12)


def test_the_knapsack_keeps_out_of_forbidden_levels_and_says_when_it_cannot():
    space = LevelSpace(((3.0, 2.0, 1.0),) * 3, budget=6.0)  # the levels must sum to 3
    value = [[0.0, 0.0, -5.0], [0.0, 0.0, math.inf], [0.0, 1.0, math.inf]]
    assert knapsack(space, value) == [2, 1, 0]  # unit 0 takes its cheapest level; the rest balance the budget
    with pytest.raises(ValueError, match="budget"):
        knapsack(space, [[0.0, math.inf, math.inf]] * 3)  # every unit held at level 0: the total is 9, not 6
    incommensurate = LevelSpace(((1.0, 0.0), (math.sqrt(2), 0.0)), budget=1.0)
    assert knapsack(incommensurate, [[0.0, 0.0]] * 2) is None  # no common grain: the caller falls back


def test_the_surrogate_optimum_meets_the_budget_and_predicts_no_worse_than_uniform():
    units, levels = 12, 7
    space = LevelSpace(tuple(tuple(float(levels - k) for k in range(levels)) for _ in range(units)),
                       budget=float(units * (levels - 3)))  # fmt: skip
    rng = random.Random(3)
    scale = [rng.uniform(0.1, 2.0) for _ in range(units)]
    delta = [[scale[u] * (math.exp(0.6 * (k - 3)) - 1) if abs(k - 3) <= 2 else None for k in range(levels)]
             for u in range(units)]  # fmt: skip
    surrogate = AdditiveSurrogate(units, levels, delta)
    uniform = [3] * units
    best = optimum(surrogate, space)
    assert space.total(best) == space.total(uniform)  # on the budget exactly
    assert surrogate.predict(best) < surrogate.predict(uniform) - 0.1  # unequal sensitivities: a real gain
    near = optimum(surrogate, space, uniform, 1)
    assert max(abs(a - b) for a, b in zip(near, uniform, strict=True)) <= 1
    assert surrogate.predict(best) <= surrogate.predict(near) <= surrogate.predict(uniform)
    found = proposals(surrogate, space, uniform, 3)
    assert len(found) == 3 and all(space.feasible(x) for x in found)
    for k, x in enumerate(found):  # k + 1 level switches: 2 (k + 1) one-level moves
        assert sum(abs(a - b) for a, b in zip(x, uniform, strict=True)) == 2 * (k + 1)
    predicted = [surrogate.predict(x) for x in [uniform, *found]]
    assert all(b < a for a, b in itertools.pairwise(predicted))  # each step predicted better
    assert proposals(surrogate, space, uniform, 0) == []


def test_proposals_take_the_place_of_ranked_offspring_and_leave_the_draws_alone():
    units, levels = 8, 7
    space = LevelSpace(tuple(tuple(float(levels - k) for k in range(levels)) for _ in range(units)),
                       budget=float(units * (levels - 3)))  # fmt: skip
    loss = lambda x: sum((u + 1) * k * k for u, k in enumerate(x))  # noqa: E731
    proposal = [5, 5, 4, 3, 2, 2, 2, 1]
    assert space.feasible(proposal)
    for pool in (0, 40):
        scored = {0: [], 1: []}

        def fitness(x, stage, scored=scored):
            scored[stage].append(list(x))
            return float(loss(x))

        plain, with_ = SearchState([3] * units, loss([3] * units)), SearchState([3] * units, loss([3] * units))
        evolve(space, fitness, plain, offspring=6, survivors=(2, 1), pool=pool, rank=loss, explore=2, seed=1)
        scored[0].clear()
        evolve(space, fitness, with_, offspring=6, survivors=(2, 1), pool=pool, rank=loss, explore=2, seed=1,
               proposals=[proposal, [3] * units])  # fmt: skip
        assert scored[0][0] == proposal and len(scored[0]) == 6  # first, in place of one; the parent is not rescored
        assert [3] * units not in scored[0]
        assert plain.rng_state == with_.rng_state  # the same random draws with or without proposals
        assert with_.levels == proposal  # the best of this loss, so it wins


FAST = {"levels": "0.3:0.9:0.1", "offspring": 4, "survivors": (2, 1), "stage_windows": (1, 2), "method": "wanda"}


@pytest.fixture(scope="module")
def base(tokenizer):
    from lmcompress.models.tiny import build_tiny_model

    return build_tiny_model("llama", tokenizer.vocab_size)


def test_a_proposing_search_scores_at_most_offspring_per_generation(base, calib, tmp_path, monkeypatch):
    from lmcompress.search import loop as loop_module
    from lmcompress.search import score as score_module

    stages, per_generation, proposed = [], [], []
    real_score, real_evolve = score_module.Candidates.score, loop_module.evolve

    def counted(self, levels, stage, **kwargs):
        stages.append(stage)
        return real_score(self, levels, stage, **kwargs)

    def generation(*args, **kwargs):
        before = len(stages)
        proposed.append(len(kwargs["proposals"]))
        out = real_evolve(*args, **kwargs)
        per_generation.append(stages[before:])
        return out

    monkeypatch.setattr(score_module.Candidates, "score", counted)
    monkeypatch.setattr(loop_module, "evolve", generation)
    config = SearchConfig(target=0.6, generations=3, pool=40, propose=2, granularity="layer", **FAST)
    report = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "a", progress=False)
    assert len(per_generation) == 3 and sum(proposed) > 0  # the surrogate proposed candidates
    assert all(g.count(0) <= 4 and g.count(1) <= 2 for g in per_generation)  # proposals count among the offspring
    assert report.fitness <= min(report.baselines.values()) + 1e-12
    with pytest.raises(Exception, match="propose"):
        SearchConfig(target=0.6, propose=-1, **FAST)
