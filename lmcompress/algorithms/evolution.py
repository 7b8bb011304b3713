"""Budget-preserving evolutionary search over per-unit compression levels (after EvoPress, Sieberling et al. 2024).

A *unit* (a layer or a block) can be compressed at one of a few *levels* (sparsities, bit widths). A candidate
assigns a level index to every unit; its *cost* is ``Σ_u cost[u][level_u]`` (weights kept, or bits stored),
and the search looks for the candidate of lowest fitness (e.g. KL divergence to the dense model) whose cost
stays on the budget.

Mutation (the level switch): move one unit one level, then move other units one level the other way until the
total cost is back within ``[budget − slack, budget]``. Between units of the same size this is EvoPress's switch
(one up, one down, the total unchanged exactly). Between units of different sizes (the layers of a block: in
SmolLM2 an MLP projection is 8 times a k_proj and q_proj 3 times) a step of a large unit is balanced by several
steps of smaller ones, so a sparsity budget is still kept exactly when the sizes are commensurate, and weights can
move between attention and MLP. For bit widths whose steps differ (2→3 is one bit, 4→8 four) the slack allows a
total a little under the budget.

Selection in steps: each generation makes ``offspring`` mutants of the parent, scores them all on a few tokens,
keeps the best ``survivors[0]``, scores those on more tokens, and so on; the parent is replaced only when the
last stage's winner beats it on the same tokens (elitist, so the fitness never gets worse).

This module is pure: fitness is a callable ``(levels, stage) → float`` supplied by the caller.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LevelSpace:
    """``cost[u][l]``: what unit ``u`` costs at level ``l`` (levels sorted, cost non-increasing in ``l``).

    ``budget`` is the largest total cost allowed and ``slack`` how far below it a candidate may fall.
    """

    cost: tuple[tuple[float, ...], ...]
    budget: float
    slack: float = 0.0

    def __post_init__(self) -> None:
        if not self.cost or any(len(c) != len(self.cost[0]) for c in self.cost):
            raise ValueError("every unit needs the same number of levels")
        for c in self.cost:
            if any(b > a + 1e-9 for a, b in itertools.pairwise(c)):
                raise ValueError("the cost of a unit must not grow with its level")
        lo = sum(c[-1] for c in self.cost)
        hi = sum(c[0] for c in self.cost)
        if not lo - 1e-9 <= self.budget <= hi + 1e-9:
            raise ValueError(f"budget {self.budget:g} is outside what the levels can reach ([{lo:g}, {hi:g}])")

    @property
    def units(self) -> int:
        return len(self.cost)

    @property
    def levels(self) -> int:
        return len(self.cost[0])

    def total(self, levels: Sequence[int]) -> float:
        return sum(self.cost[u][lv] for u, lv in enumerate(levels))

    @property
    def tolerance(self) -> float:
        """Float rounding allowed on a total (relative, so that a 70B model's sums compare as a tiny one's)."""
        return 1e-6 + 1e-12 * abs(self.budget)

    def feasible(self, levels: Sequence[int]) -> bool:
        total = self.total(levels)
        return self.budget - self.slack - self.tolerance <= total <= self.budget + self.tolerance


def mutate(space: LevelSpace, levels: Sequence[int], rng: random.Random, tries: int = 1000) -> list[int]:
    """One level switch: a random unit one level up or down, then other units one level the other way (drawn at
    random among those whose step does not carry the total past the budget's far side) until the total is back
    on the budget. At least one unit always moves each way.

    Returns a new list; raises ``ValueError`` when no feasible switch is found in ``tries`` draws (e.g. every
    unit already at an end of the level range).
    """
    n, cost = space.units, space.cost
    lo, hi = space.budget - space.slack - space.tolerance, space.budget + space.tolerance
    for _ in range(tries):
        a, way = rng.randrange(n), rng.choice((1, -1))  # +1: compress unit a more (its cost falls)
        if not 0 <= levels[a] + way < space.levels:
            continue
        child = list(levels)
        child[a] += way
        total = space.total(child)
        moved = {a}
        while len(moved) == 1 or not lo <= total <= hi:
            options = []  # (unit, cost change) of a step the other way that does not overshoot the budget
            for u in range(n):
                lv = child[u] - way
                if u in moved or not 0 <= lv < space.levels:
                    continue
                change = cost[u][lv] - cost[u][child[u]]
                if (way > 0 and total + change <= hi) or (way < 0 and total + change >= lo):
                    options.append((u, change))
            if not options:
                break
            u, change = options[rng.randrange(len(options))]
            child[u] -= way
            total += change
            moved.add(u)
        else:
            return child
    raise ValueError("no budget-preserving level switch found: the levels leave no room to move")


def mutate_many(space: LevelSpace, levels: Sequence[int], rng: random.Random, steps: int) -> list[int]:
    """``steps`` level switches in a row (EvoPress draws the number of switches per offspring)."""
    child = list(levels)
    for _ in range(steps):
        child = mutate(space, child, rng)
    return child


@dataclass
class Generation:
    """What one generation did: the best fitness after it (on the last stage's tokens) and what it scored."""

    index: int
    fitness: float
    levels: list[int]
    improved: bool
    evaluations: int


@dataclass
class SearchState:
    """Everything needed to resume: the parent, its fitness, the history, and the random generator's state."""

    levels: list[int]
    fitness: float
    generation: int = 0
    history: list[dict] = field(default_factory=list)
    rng_state: object = None


def evolve(
    space: LevelSpace,
    fitness: Callable[[Sequence[int], int], float],
    state: SearchState,
    *,
    offspring: int = 16,
    survivors: Sequence[int] = (4, 1),
    max_switches: int = 3,
    seed: int = 0,
    pool: int = 0,
    rank: Callable[[list[int]], object] | None = None,
    explore: int = 0,
    proposals: Sequence[Sequence[int]] = (),
) -> Generation:
    """Run one generation from ``state`` (changed in place) and return what it did.

    ``fitness(levels, stage)`` scores a candidate on stage ``stage``'s tokens (0: few, ``len(survivors)``: the
    most, which is also what ``state.fitness`` holds); lower is better. Offspring get 1..``max_switches`` switches.
    Screening: with ``rank`` and ``pool > offspring``, ``pool`` mutants are drawn, those equal to the parent or
    to an earlier one dropped, and the ``offspring − explore`` with the lowest ``rank(child)`` (e.g. a
    surrogate's prediction; ties keep the order drawn) are scored, with the first ``explore`` of the others as
    drawn (so that a wrong ranking cannot hide a region for good). ``proposals`` (e.g. a surrogate's optimum on
    the budget) are scored first, in place of as many of the ranked (or, unscreened, the last drawn) offspring;
    the random draws are the same with or without them.
    """
    if offspring < 1 or not survivors or any(s < 1 for s in survivors) or survivors[-1] != 1:
        raise ValueError("need offspring ≥ 1 and a survivor schedule ending in 1")
    if not 0 <= explore < offspring:
        raise ValueError("explore must be ≥ 0 and fewer than the offspring")
    rng = random.Random(seed)
    if state.rng_state is not None:
        rng.setstate(state.rng_state)
    screen = rank is not None and pool > offspring
    try:
        draws = pool if screen else offspring
        children = [mutate_many(space, state.levels, rng, rng.randint(1, max_switches)) for _ in range(draws)]
    except ValueError:  # no level switch stays on the budget (e.g. every unit at the lowest level): nothing to try
        children = []
    if screen:
        distinct = list({tuple(c): c for c in children if c != state.levels}.values())  # first draws, in order
        ranked = sorted(range(len(distinct)), key=lambda i: rank(distinct[i]))
        chosen = ranked[: offspring - explore]
        taken = set(chosen)
        explored = [i for i in range(len(distinct)) if i not in taken][:explore]  # a few unranked, as drawn
        children = [distinct[i] for i in chosen + explored]
    extra = list({tuple(p): list(p) for p in proposals if list(p) != state.levels}.values())[:offspring]
    if extra:  # in place of the last ranked (the explored ones kept) or, unscreened, the last drawn offspring
        kept = len(explored) if screen else 0
        head, tail = children[: len(children) - kept], children[len(children) - kept :]
        head = [c for c in head if c not in extra][: max(0, offspring - kept - len(extra))]
        children = (extra + head + [c for c in tail if c not in extra])[:offspring]
    evaluations = 0
    best_score = state.fitness
    for stage, keep in enumerate(survivors):
        if not children:
            break
        scored = []
        for child in children:
            scored.append((fitness(child, stage), child))
            evaluations += 1
        scored.sort(key=lambda pair: pair[0])
        children = [child for _, child in scored[:keep]]
        best_score = scored[0][0]
    improved = bool(children) and best_score < state.fitness
    if improved:
        state.levels, state.fitness = list(children[0]), best_score
    state.generation += 1
    state.rng_state = rng.getstate()
    gen = Generation(state.generation, state.fitness, list(state.levels), improved, evaluations)
    state.history.append({"generation": gen.index, "fitness": gen.fitness, "improved": improved})
    return gen


def nearest_feasible(space: LevelSpace, target: Sequence[float], values: Sequence[float]) -> list[int]:
    """Levels closest to per-unit ``target`` values (e.g. OWL's block sparsities) that lie on the budget.

    Each unit takes the level whose value is nearest its target; then single-unit steps that bring the total
    toward the budget are taken (cheapest change in value first) until it is feasible.
    """
    levels = [min(range(len(values)), key=lambda k: abs(values[k] - t)) for t in target]
    for _ in range(space.units * space.levels):
        total = space.total(levels)
        if space.feasible(levels):
            return levels
        up = total > space.budget  # too expensive: compress some unit more
        moves = [
            (abs(values[levels[u] + (1 if up else -1)] - target[u]), u)
            for u in range(space.units)
            if (levels[u] + 1 < space.levels if up else levels[u] > 0)
        ]
        if not moves:
            break
        _, u = min(moves)
        levels[u] += 1 if up else -1
        if not up and space.total(levels) > space.budget + space.tolerance:  # overshot upward: undo and stop
            levels[u] += 1
            break
    if not space.feasible(levels):
        raise ValueError("cannot place these targets on the budget with the given levels")
    return levels


def additive_descent(
    space: LevelSpace, start: Sequence[int], delta: Sequence[Sequence[float | None]], max_steps: int | None = None
) -> list[list[int]]:
    """Greedy level switches under an additive model of the fitness, from ``start``; the allocation after each.

    ``delta[u][l]`` is the fitness change measured with unit ``u`` alone at level ``l`` and every other unit at
    ``start`` (0 at ``start[u]``; ``None`` where not measured, a level the descent never enters). The model
    predicts ``f(levels) ≈ f(start) + Σ_u delta[u][levels[u]]``. Each step applies the level switch (one unit one
    level up, another one down, the total kept within the budget) that lowers the prediction most, and the
    descent stops when none lowers it. Units interact, so the prediction is only a guide: callers score points
    of the path with the real fitness.
    """
    levels = list(start)
    cost = space.cost
    total = space.total(levels)
    path: list[list[int]] = []
    for _ in range(max_steps if max_steps is not None else space.units * space.levels):
        ups, downs = [], []  # (change of the prediction, change of the cost, unit)
        for u, lv in enumerate(levels):
            here = delta[u][lv]
            if here is None:
                continue
            if lv + 1 < space.levels and delta[u][lv + 1] is not None:
                ups.append((delta[u][lv + 1] - here, cost[u][lv + 1] - cost[u][lv], u))
            if lv > 0 and delta[u][lv - 1] is not None:
                downs.append((delta[u][lv - 1] - here, cost[u][lv - 1] - cost[u][lv], u))
        best = None
        lo, hi = space.budget - space.slack - space.tolerance, space.budget + space.tolerance
        for gain_a, cost_a, a in ups:
            for gain_b, cost_b, b in downs:
                gain = gain_a + gain_b
                if (
                    a != b
                    and gain < -1e-12
                    and (best is None or gain < best[0])
                    and lo <= total + cost_a + cost_b <= hi
                ):
                    best = (gain, a, b, cost_a + cost_b)
        if best is None:
            break
        _, a, b, change = best
        levels[a] += 1
        levels[b] -= 1
        total += change
        path.append(list(levels))
    return path
