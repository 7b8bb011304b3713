"""An additive surrogate of the search's fitness, fitted to every candidate scored so far, that screens mutants.

The level database makes a candidate's fitness close to additive over units: ``f(x) ≈ c + Σ_u w[u][x_u]`` with
``x_u`` unit ``u``'s level. The sensitivity pass measures ``w`` around one allocation (``delta[u][l]``, see
:meth:`~lmcompress.search.score.Candidates.sensitivity`); units interact, so the search refits ``w`` to every
candidate it scores on the first stage's windows (the sensitivity candidates included) by ridge regression toward
that measurement:

    minimise  Σ_i (c + Σ_u w[u][x_iu] − f_i)²  +  Σ_{u,l} λ_ul (w[u][l] − p[u][l])²

``p`` is ``delta`` with the levels the pass did not reach filled in by extrapolating each unit's two nearest
measured levels linearly (constant from one; zero for a unit never measured); ``λ_ul`` is ``RIDGE`` where the pass
measured and ``VAGUE`` (nearly free) elsewhere. ``c`` is not penalised. A level neither measured nor observed
takes, after the fit, the linear extrapolation of its unit's fitted levels. The normal
equations are accumulated one observation at a time (``XᵀX`` counts, exact in float64), so a resumed search that
replays the same observations in the same order fits the same surrogate.

Each generation draws many mutants, ranks them by the surrogate and scores only the best few with the real
fitness (``pool`` and ``rank`` of :func:`~lmcompress.algorithms.evolution.evolve`). A candidate scored before is
ranked by its known first-stage fitness and answered from :class:`Memo` without a forward; one already judged on
the last stage goes last.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lmcompress.algorithms.evolution import LevelSpace, additive_descent
from lmcompress.algorithms.knapsack import knapsack
from lmcompress.checkpoint.folder import json_text, write_file_atomic

RIDGE = 1.0  # λ: how far observations may pull a weight from the sensitivity measurement
VAGUE = 1e-3  # λ of a weight the sensitivity pass did not measure (its prior is an extrapolation, or 0)
SURROGATE_FILE = "surrogate-{}.json"  # next to the state file of the same trajectory (same hash)


def complete_prior(delta: Sequence[Sequence[float | None]] | None, units: int, levels: int) -> list[list[float]]:
    """``delta`` with its unmeasured (``None``) levels extrapolated along each unit (see the module docstring);
    zeros where there is no ``delta``."""
    if delta is None:
        return [[0.0] * levels for _ in range(units)]
    prior = []
    for row in delta:
        known = [k for k, v in enumerate(row) if v is not None]
        if not known:
            prior.append([0.0] * levels)
            continue
        out = []
        for k in range(levels):
            if row[k] is not None:
                out.append(float(row[k]))
                continue
            side = [j for j in known if j < k] if k > known[-1] else [j for j in known if j > k]
            a = side[-1] if k > known[-1] else side[0]  # the nearest measured level on this side
            b = (side[-2] if len(side) > 1 else None) if k > known[-1] else (side[1] if len(side) > 1 else None)
            if b is None:
                out.append(float(row[a]))
            else:
                slope = (row[a] - row[b]) / (a - b)
                out.append(float(row[a] + slope * (k - a)))
        prior.append(out)
    return prior


class AdditiveSurrogate:
    """``predict(x) = c + Σ_u w[u][x_u]``, refitted by :meth:`fit` to the observations given to :meth:`observe`."""

    def __init__(
        self, units: int, levels: int, delta: Sequence[Sequence[float | None]] | None = None, ridge: float = RIDGE
    ) -> None:
        self.units, self.levels, self.ridge = units, levels, ridge
        self.delta = delta
        self.prior = complete_prior(delta, units, levels)
        size = 1 + units * levels  # c, then w[u][l] at 1 + u·levels + l
        self.gram = torch.zeros(size, size, dtype=torch.float64)  # XᵀX
        self.moment = torch.zeros(size, dtype=torch.float64)  # Xᵀf
        self.count = 0
        self.intercept = 0.0
        self.weights = torch.tensor(self.prior, dtype=torch.float64)
        self._stale = False

    def set_delta(self, delta: Sequence[Sequence[float | None]] | None) -> None:
        """Pull the weights toward this sensitivity measurement (completed) from the next :meth:`fit` on."""
        self.delta, self.prior, self._stale = delta, complete_prior(delta, self.units, self.levels), True

    def _index(self, levels: Sequence[int]) -> torch.Tensor:
        return torch.tensor([0] + [1 + u * self.levels + lv for u, lv in enumerate(levels)])

    def observe(self, levels: Sequence[int], value: float) -> None:
        """Add one scored candidate (its levels and its fitness on the first stage's windows)."""
        if len(levels) != self.units:
            raise ValueError(f"{len(levels)} levels for a surrogate of {self.units} units")
        idx = self._index(levels)
        self.gram.index_put_((idx[:, None], idx[None, :]), torch.ones(len(idx), len(idx), dtype=torch.float64),
                             accumulate=True)  # fmt: skip
        self.moment.index_put_((idx,), torch.full((len(idx),), float(value), dtype=torch.float64), accumulate=True)
        self.count += 1
        self._stale = True

    def fit(self) -> None:
        """Solve the ridge problem for ``c`` and ``w`` (nothing to do without new observations)."""
        if not self._stale:
            return
        self._stale = False
        prior = torch.tensor(self.prior, dtype=torch.float64).reshape(-1)
        if self.count == 0:  # nothing observed: the prior alone (the intercept is undetermined, and irrelevant)
            self.intercept, self.weights = 0.0, prior.reshape(self.units, self.levels)
            return
        measured = [[v is not None for v in row] for row in self.delta] if self.delta is not None else None
        strength = torch.full((self.units, self.levels), VAGUE, dtype=torch.float64)  # an extrapolated prior
        if measured is not None:
            strength[torch.tensor(measured)] = self.ridge
        penalty = torch.cat([torch.zeros(1, dtype=torch.float64), strength.reshape(-1)])
        rhs = self.moment + penalty * torch.cat([torch.zeros(1, dtype=torch.float64), prior])
        solution = torch.linalg.solve(self.gram + torch.diag(penalty), rhs)
        self.intercept = float(solution[0])
        weights = solution[1:].reshape(self.units, self.levels)
        # a level neither observed nor measured: extrapolated from the unit's fitted levels that are, not left at
        # the extrapolated prior (which, without a sensitivity pass, is a flat 0 that says nothing about it)
        seen = self.gram.diagonal()[1:].reshape(self.units, self.levels) > 0
        rows = []
        for u in range(self.units):
            measured = self.delta[u] if self.delta is not None else [None] * self.levels
            rows.append([float(weights[u, k]) if seen[u, k] or measured[k] is not None else None
                         for k in range(self.levels)])  # fmt: skip
        self.weights = torch.tensor(complete_prior(rows, self.units, self.levels), dtype=torch.float64)

    def predict(self, levels: Sequence[int]) -> float:
        return self.intercept + float(self.weights[torch.arange(self.units), torch.tensor(list(levels))].sum())


def optimum(surrogate: AdditiveSurrogate, space: LevelSpace, around: Sequence[int] | None = None,
            radius: int | None = None) -> list[int] | None:  # fmt: skip
    """The allocation on ``space``'s budget that the surrogate predicts best (an exact multiple-choice knapsack
    over its weights, :func:`~lmcompress.algorithms.knapsack.knapsack`), with every unit within ``radius`` levels
    of ``around`` when both are given; None where the knapsack cannot be solved exactly (incommensurate costs) or
    nothing in the radius meets the budget."""
    surrogate.fit()
    weights = surrogate.weights.tolist()
    if around is not None and radius is not None:
        weights = [[w if abs(k - around[u]) <= radius else float("inf") for k, w in enumerate(row)]
                   for u, row in enumerate(weights)]  # fmt: skip
    try:
        return knapsack(space, weights)
    except ValueError:
        return None


def proposals(surrogate: AdditiveSurrogate, space: LevelSpace, parent: Sequence[int], count: int) -> list[list[int]]:
    """Up to ``count`` allocations to score in a generation: the surrogate's greedy descent from ``parent`` after
    1, 2, … level switches (:func:`~lmcompress.algorithms.evolution.additive_descent` on its fitted weights: each
    step the budget-keeping pair of one-level moves it predicts best). Steps as small as a mutant's, because the
    additive model is trusted only near what was measured: its optimum on the budget (:func:`optimum`) predicts
    far more than it gives."""
    if count <= 0:
        return []
    surrogate.fit()
    weights = surrogate.weights
    delta = [[float(weights[u, k] - weights[u, lv]) for k in range(surrogate.levels)] for u, lv in enumerate(parent)]
    return additive_descent(space, parent, delta, max_steps=count)


class Memo:
    """Every fitness a search computed, by (levels, stage): the fitness is a function of the candidate on fixed
    windows, so a candidate drawn again costs nothing. First-stage scores also feed the surrogate."""

    def __init__(self, surrogate: AdditiveSurrogate | None) -> None:
        self.surrogate = surrogate
        self.scores: dict[tuple[tuple[int, ...], int], float] = {}
        self.entries: list[list] = []  # [levels, stage, value] in the order scored (saved for resuming)

    def record(self, levels: Sequence[int], stage: int, value: float) -> None:
        key = (tuple(levels), stage)
        if key in self.scores:
            return
        self.scores[key] = value
        self.entries.append([list(levels), stage, value])
        if stage == 0 and self.surrogate is not None:
            self.surrogate.observe(levels, value)

    def wrap(self, fitness: Callable[[Sequence[int], int], float]) -> Callable[[Sequence[int], int], float]:
        """``fitness`` answered from the memo where it can, recording what it computes."""

        def scored(levels: Sequence[int], stage: int) -> float:
            key = (tuple(levels), stage)
            if key not in self.scores:
                self.record(levels, stage, fitness(levels, stage))
            return self.scores[key]

        return scored

    def rank(self, levels: Sequence[int], last_stage: int = 1) -> tuple[bool, float]:
        """Sort key of a mutant, lower first: its first-stage fitness where known, else the surrogate's prediction
        of it; a candidate already judged on ``last_stage`` (which lost to the parent then, or it would be the
        parent: the search is elitist) goes last."""
        key = tuple(levels)
        if (key, last_stage) in self.scores:
            return True, 0.0
        known = self.scores.get((key, 0))
        if known is not None:
            return False, known
        return False, (self.surrogate.predict(levels) if self.surrogate is not None else 0.0)


def surrogate_path(work: Path, state_file: str) -> Path:
    """The surrogate file that goes with a state file (``state-HASH.json`` → ``surrogate-HASH.json``)."""
    return work / SURROGATE_FILE.format(state_file.removeprefix("state-").removesuffix(".json"))


def save_memo(path: Path, key: str, memo: Memo, delta, round_: int) -> None:
    """Write the observations and the sensitivity measurement (atomically) so that a resumed search fits the
    same surrogate."""
    write_file_atomic(path, json_text({"key": key, "round": round_, "delta": delta, "entries": memo.entries}) + "\n")


def load_memo(path: Path, key: str) -> tuple[list[list[float | None]] | None, list[list], int]:
    """The sensitivity measurement, entries and round saved for this key, or ``(None, [], 0)``."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None, [], 0
        return data["delta"], list(data["entries"]), int(data.get("round", 0))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None, [], 0
