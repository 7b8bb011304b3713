"""The additive surrogate: it learns a planted additive loss, screening scores only the best few mutants, and a
search that screens reaches a planted optimum with fewer real evaluations."""

from __future__ import annotations

import copy
import math
import random

import pytest

from lmcompress.algorithms.evolution import LevelSpace, SearchState, evolve
from lmcompress.search.run import SearchConfig, search
from lmcompress.search.surrogate import AdditiveSurrogate, Memo, complete_prior, load_memo, save_memo

LEVELS = 7


def space_of(units: int, target: int = 3) -> LevelSpace:
    """Units of equal size; cost = weights kept; the budget every unit at level ``target``."""
    return LevelSpace(tuple(tuple(float(LEVELS - k) for k in range(LEVELS)) for _ in range(units)),
                      budget=float(units * (LEVELS - target)))  # fmt: skip


def planted(units: int, seed: int = 0):
    """An additive loss, convex in each unit's level, with unit weights drawn at random."""
    rng = random.Random(seed)
    weight = [rng.uniform(0.1, 2.0) for _ in range(units)]
    table = [[weight[u] * math.exp(0.6 * k) for k in range(LEVELS)] for u in range(units)]
    return table, lambda levels: sum(table[u][lv] for u, lv in enumerate(levels))


def optimum(space: LevelSpace, table) -> list[int]:
    """The exact optimum of an additive convex loss over equal-size units: pairwise exchanges until none helps."""
    levels = [3] * space.units
    while True:
        best = None
        for a in range(space.units):
            for b in range(space.units):
                if a != b and levels[a] + 1 < LEVELS and levels[b] > 0:
                    gain = table[a][levels[a] + 1] - table[a][levels[a]] + table[b][levels[b] - 1] - table[b][levels[b]]
                    if gain < -1e-12 and (best is None or gain < best[0]):
                        best = (gain, a, b)
        if best is None:
            return levels
        levels[best[1]] += 1
        levels[best[2]] -= 1


def test_the_surrogate_learns_a_planted_additive_loss_and_ranks_by_it():
    units = 6
    _, loss = planted(units)
    rng = random.Random(1)
    surrogate = AdditiveSurrogate(units, LEVELS)
    for _ in range(200):
        x = [rng.randrange(LEVELS) for _ in range(units)]
        surrogate.observe(x, loss(x))
    surrogate.fit()
    probes = [[rng.randrange(LEVELS) for _ in range(units)] for _ in range(50)]
    for x in probes:
        assert surrogate.predict(x) == pytest.approx(loss(x), rel=1e-3)
    assert sorted(probes, key=surrogate.predict) == sorted(probes, key=loss)


def test_without_observations_the_surrogate_is_its_prior_and_the_prior_extrapolates_each_unit():
    delta = [[None, None, 1.0, 0.0, 2.0, None, None], [None] * LEVELS]
    prior = complete_prior(delta, 2, LEVELS)
    assert prior[0] == [3.0, 2.0, 1.0, 0.0, 2.0, 4.0, 6.0]  # linear from the two nearest measured levels
    assert prior[1] == [0.0] * LEVELS  # never measured: no preference
    surrogate = AdditiveSurrogate(2, LEVELS, prior)
    surrogate.fit()
    assert surrogate.predict([0, 3]) == pytest.approx(3.0)
    assert surrogate.predict([3, 3]) == pytest.approx(0.0)


def test_screening_scores_only_the_offspring_of_a_larger_pool_ranked_by_the_surrogate():
    space = space_of(10)
    _, loss = planted(10)
    calls, ranked = {0: 0, 1: 0}, []

    def fitness(levels, stage):
        calls[stage] += 1
        return loss(levels)

    def rank(levels):
        ranked.append(list(levels))
        return loss(levels)

    state = SearchState([3] * 10, loss([3] * 10))
    evolve(space, fitness, state, offspring=5, survivors=(2, 1), pool=60, rank=rank, seed=0)
    assert calls == {0: 5, 1: 2}  # 5 of the pool scored, 2 of them on the second stage
    distinct = {tuple(x) for x in ranked}
    assert len(ranked) == len(distinct) > 5  # every distinct mutant of the pool was ranked, once
    best_five = sorted(ranked, key=loss)[:5]
    assert state.fitness == pytest.approx(loss(best_five[0]))  # the pool's best was among the scored
    calls.update({0: 0, 1: 0})
    evolve(space, fitness, SearchState([3] * 10, loss([3] * 10)), offspring=5, survivors=(2, 1), seed=0)
    assert calls == {0: 5, 1: 2}  # without a pool: the same count, drawn without screening


def _evaluations_to_optimum(pool: int, seed: int) -> int:
    units = 12
    space = space_of(units)
    table, loss = planted(units, seed)
    best = optimum(space, table)
    memo = Memo(AdditiveSurrogate(units, LEVELS))
    evaluations = [0]

    def fitness(levels, stage):
        evaluations[0] += 1
        return loss(levels)

    scored = memo.wrap(fitness)
    state = SearchState([3] * units, scored([3] * units, 1))
    for _ in range(400):
        if state.levels == best:
            return evaluations[0]
        memo.surrogate.fit()
        evolve(space, scored, state, offspring=8, survivors=(2, 1), pool=pool, rank=memo.rank, seed=seed, explore=2)
    return evaluations[0]


def test_a_search_that_screens_reaches_a_planted_optimum_with_fewer_evaluations():
    plain = [_evaluations_to_optimum(0, seed) for seed in range(3)]
    screened = [_evaluations_to_optimum(96, seed) for seed in range(3)]
    assert sum(screened) < 0.5 * sum(plain), (screened, plain)


def test_the_memo_answers_a_repeated_candidate_and_survives_a_save(tmp_path):
    memo = Memo(AdditiveSurrogate(2, LEVELS))
    calls = []
    scored = memo.wrap(lambda levels, stage: calls.append(1) or float(sum(levels) + stage))
    assert scored([1, 2], 0) == scored([1, 2], 0) == 3.0 and len(calls) == 1
    assert scored([1, 2], 1) == 4.0 and len(calls) == 2  # another stage is another score
    assert memo.rank([1, 2]) == (True, 0.0) and memo.rank([2, 1])[0] is False  # judged on the last stage: last
    save_memo(tmp_path / "s.json", "key", memo, memo.surrogate.prior, 0)
    prior, entries, round_ = load_memo(tmp_path / "s.json", "key")
    assert entries == memo.entries and round_ == 0 and prior == memo.surrogate.prior
    assert load_memo(tmp_path / "s.json", "another key") == (None, [], 0)


FAST = {"levels": "0.3:0.9:0.1", "offspring": 4, "survivors": (2, 1), "stage_windows": (1, 2), "method": "wanda"}


@pytest.fixture(scope="module")
def base(tokenizer):
    from lmcompress.models.tiny import build_tiny_model

    return build_tiny_model("llama", tokenizer.vocab_size)


def test_a_screening_search_scores_offspring_per_generation_and_is_deterministic(base, calib, tmp_path, monkeypatch):
    from lmcompress.search import score as score_module

    stage0 = []
    real = score_module.Candidates.score

    def counted(self, levels, stage, **kwargs):
        stage0.append(stage == 0)
        return real(self, levels, stage, **kwargs)

    monkeypatch.setattr(score_module.Candidates, "score", counted)
    config = SearchConfig(target=0.6, generations=3, pool=40, sensitivity_span=0, **FAST)
    a = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "a", progress=False)
    assert sum(stage0) <= 3 * 4  # at most `offspring` first-stage scores a generation (the memo answers repeats)
    b = search(copy.deepcopy(base), config, calib[:4], calib[4:6], tmp_path / "b", progress=False)
    assert a.allocation == b.allocation and a.history == b.history
    with pytest.raises(Exception, match="pool"):
        SearchConfig(target=0.6, pool=-1, **FAST)
