"""What a search is asked (:class:`SearchConfig`, checked when built) and what it answers (:class:`SearchReport`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.errors import UserError
from lmcompress.measure.perplexity import check_confidence
from lmcompress.search.levels import (
    DATABASE_INPUTS,
    DEFAULT_LEVELS,
    GRANULARITIES,
    KINDS,
    METHODS,
    JointLevel,
    parse_joint_levels,
    parse_levels,
)
from lmcompress.search.scheme import check_search_scheme
from lmcompress.transforms.prune import PruneConfig

TUNINGS = ("owl",)
# how long or how a search is run, not where it goes: left out of the key that lets a later run resume it
RUN_FIELDS = (
    "generations",
    "time_limit_s",
    "fitness_windows",
    "max_loss",
    "max_loss_confidence",
    "tune",
    "trials",
    "keep_database",
)


@dataclass
class SearchConfig:
    """What to search: ``target`` average ``kind`` (sparsity, or bits per weight with grids) over ``levels``, or
    (``kind="size"``) joint levels (``SPARSITY/BITS``, see :func:`~lmcompress.search.levels.parse_joint_levels`)
    whose packed weights file takes at most ``target`` bytes (``size_relative``: that fraction of the model at
    16 bits), the output head included.

    ``method`` makes each level (sparsity: sparsegpt, wanda, magnitude; bits: gptq, rtn on ``group_size`` grids);
    ``granularity`` says whether a unit is a layer or a block. ``fitness_windows`` held-out windows score the
    candidates. ``max_loss`` (0.05 = +5% perplexity) looks for the largest average sparsity on the level grid
    within that loss (its upper bound at ``max_loss_confidence``) instead of meeting ``target``; ``tune="owl"``
    tunes OWL's M and λ with Optuna (``trials`` trials) instead of searching per-unit levels. The search's work
    folder (level database, state) is removed at the end unless ``keep_database``. Every field is checked when
    the config is built.
    """

    target: float = 0.7
    kind: str = "sparsity"
    method: str = "sparsegpt"
    levels: str | None = None  # default: DEFAULT_LEVELS[kind]
    granularity: str = "block"
    group_size: int = 128
    sym: bool = True
    generations: int = 50
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 1)
    stage_windows: tuple[int, ...] = (2, 8)  # fitness windows at each selection stage (the last: parent's)
    max_switches: int = 3
    pool: int = 128  # mutants drawn per generation, ranked by the additive surrogate; the best `offspring` scored
    propose: int = 0  # of the offspring (a quarter at most): the surrogate's descent from the parent (search.surrogate)
    time_limit_s: float | None = None
    fitness: str = "kl"  # kl: divergence to the dense model; ppl: the candidate's own log perplexity
    scheme: str | None = None  # w8a8 / fp8: the fitness runs each candidate as that scheme (search.scheme)
    dynamic: bool = False  # scheme fp8: per-token activation scales (the only FP8 a search simulates)
    seed: int = 0
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    database_inputs: str = "sequential"  # sequential: along the uniform model's inputs; dense: EvoPress's
    rounds: int = 1  # sequential inputs: rebuild the database along the best allocation so far, this many times − 1
    sensitivity_span: int | None = None  # levels each way of the sensitivity pass; None: 3 (blocks), 1 (layers); 0: off
    start: dict[str, float] | None = None  # layer → level: an extra start (e.g. a per-block search's, to refine)
    fitness_windows: int | None = None  # held-out windows the job draws for the fitness [16, or the largest stage]
    max_loss: float | None = None  # the largest sparsity within this perplexity increase (target then unused)
    max_loss_confidence: float = 0.9  # max_loss: a sparsity passes when the increase's upper bound is within it
    tune: str | None = None  # owl: tune OWL's M and λ instead of searching per-unit levels
    trials: int = 40  # tune: Optuna trials
    keep_database: bool = False  # keep the work folder (level database, search state) after the search
    size_relative: bool = False  # size: target is a fraction of the model's 16-bit size, not bytes
    decode: str | None = None  # size kind: a decode budget (2.5x, 40ms) instead of bytes (search.latency)

    def __post_init__(self) -> None:
        self.survivors, self.stage_windows = tuple(self.survivors), tuple(self.stage_windows)
        self.validate()

    @property
    def span(self) -> int:
        if self.sensitivity_span is not None:
            return self.sensitivity_span
        return 3 if self.granularity == "block" else 1

    def validate(self) -> list:
        """The checked level grid, in the order of falling cost (sparsities ascending, bit widths descending,
        joint levels by nominal bits per weight, as their labels)."""
        levels = self._check_levels()
        self._check_evolution()
        self._check_job()
        if self.decode is not None:  # a decode-time budget over the joint levels: target unused
            from lmcompress.search.latency import parse_decode

            if self.kind != "size":
                raise UserError("a decode budget chooses joint SPARSITY/BITS levels: use it as budget decode=…")
            parse_decode(self.decode)
        if self.kind == "size":
            self._check_size()
            return levels
        if self.kind == "sparsity":
            if self.max_loss is None:
                PruneConfig(method=self.method, sparsity=self.target)  # its checks apply too
            return levels
        return levels[::-1]  # bit widths from most to fewest: cost falls with the level index

    def _check_levels(self) -> list[float]:
        if self.kind not in KINDS:
            raise UserError(f"unknown budget kind {self.kind!r}: choose sparsity or bits", param="kind")
        if self.method not in METHODS[self.kind]:
            raise UserError(
                f"a {self.kind} search makes its levels with {' or '.join(METHODS[self.kind])}, not {self.method!r}",
                param="method",
            )
        if self.kind == "size":
            if not (self.group_size == -1 or self.group_size >= 1):
                raise UserError(
                    f"group_size must be ≥ 1 or -1 (per channel), got {self.group_size}", param="group_size"
                )
            return [lv.label for lv in self.joint_levels()]
        levels = parse_levels(self.levels or DEFAULT_LEVELS[self.kind], self.kind)
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.granularity!r}: choose layer or block", param="granularity")
        if self.max_loss is None and not levels[0] <= self.target <= levels[-1]:
            raise UserError(
                f"the budget {self.kind} {self.target:g} is outside the levels [{levels[0]:g}, {levels[-1]:g}]; "
                "widen the levels or change the budget"
            )
        if self.kind == "bits" and not (self.group_size == -1 or self.group_size >= 1):
            raise UserError(f"group_size must be ≥ 1 or -1 (per channel), got {self.group_size}", param="group_size")
        return levels

    def joint_levels(self) -> list[JointLevel]:
        """The joint levels of a size search, most expensive first."""
        return parse_joint_levels(self.levels or DEFAULT_LEVELS["size"], self.group_size)

    def _check_size(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.granularity!r}: choose layer or block", param="granularity")
        if not self.target > 0 or (self.size_relative and not self.target < 1):
            raise UserError(f"a size budget must be positive bytes or a fraction in (0, 1), got {self.target:g}")
        if self.granularity != "block" and any(level.drop for level in self.joint_levels()):
            raise UserError("the level drop removes whole blocks: use it with granularity block", param="levels")
        refused = {"rounds": self.rounds > 1, "start": self.start is not None}
        for name, given in refused.items():
            if given:
                raise UserError(f"{name} is not supported with a size budget yet", param=name)

    def _check_evolution(self) -> None:
        if self.generations < 0 or self.offspring < 1:
            raise UserError("generations must be ≥ 0 and offspring ≥ 1", param=("generations", "offspring"))
        if self.pool < 0:
            raise UserError(f"pool must be ≥ 0 (≤ offspring: no screening), got {self.pool}", param="pool")
        if self.propose < 0:
            raise UserError(
                f"propose must be ≥ 0 (0: no surrogate optima proposed), got {self.propose}", param="propose"
            )
        if self.rounds < 1 or (self.rounds > 1 and self.database_inputs != "sequential"):
            raise UserError("rounds must be ≥ 1, and more than one needs sequential database inputs", param="rounds")
        stages_ok = self.survivors and all(
            isinstance(n, int) and n >= 1 for n in (*self.survivors, *self.stage_windows)
        )
        if not stages_ok or len(self.stage_windows) != len(self.survivors) or self.survivors[-1] != 1:
            raise UserError(
                "give one number of fitness windows per selection stage; the last stage keeps 1",
                param=("stage_windows", "survivors"),
            )
        if self.database_inputs not in DATABASE_INPUTS:
            raise UserError(
                f"unknown database inputs {self.database_inputs!r}: choose {' or '.join(DATABASE_INPUTS)}",
                param="database_inputs",
            )
        if self.fitness not in ("kl", "ppl"):
            raise UserError(f"unknown fitness {self.fitness!r}: choose kl or ppl", param="fitness")
        if self.sensitivity_span is not None and self.sensitivity_span < 0:
            raise UserError(
                f"the sensitivity span must be ≥ 0 levels (0: no sensitivity pass), got {self.sensitivity_span}",
                param="sensitivity_span",
            )
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise UserError(f"the time limit must be positive, got {self.time_limit_s:g} s", param="time_limit_s")
        if self.start is not None and not self.start:
            raise UserError("the start allocation is empty: give an earlier search's search.json", param="start")
        mode = "tune owl" if self.tune is not None else "max_loss" if self.max_loss is not None else None
        check_search_scheme(self.scheme, self.dynamic, self.kind, mode)

    @property
    def held_out(self) -> int:
        """How many held-out fitness windows a whole job draws beside the calibration windows."""
        return self.fitness_windows if self.fitness_windows is not None else max(16, *self.stage_windows)

    def _check_job(self) -> None:
        if self.fitness_windows is not None and self.fitness_windows < max(self.stage_windows):
            raise UserError(
                f"fitness_windows ({self.fitness_windows}) must be at least the largest stage "
                f"({max(self.stage_windows)}) of stage_windows",
                param=("fitness_windows", "stage_windows"),
            )
        if self.tune is not None and self.tune not in TUNINGS:
            raise UserError(f"unknown tuning {self.tune!r}: only owl can be tuned", param="tune")
        if self.tune is not None and self.kind != "sparsity":
            raise UserError("tuning OWL needs a sparsity budget (budget sparsity=F)", param="tune")
        if self.trials < 1:
            raise UserError(f"trials must be at least 1, got {self.trials}", param="trials")
        if self.max_loss is None:
            return
        if self.tune is not None:
            raise UserError("choose one of tuning OWL and a maximum loss, not both", param=("tune", "max_loss"))
        if self.kind != "sparsity":
            raise UserError("max_loss searches the largest sparsity: use it with a sparsity search", param="max_loss")
        if not 0 < self.max_loss < 10:
            raise UserError(
                f"the allowed perplexity increase must be a positive fraction (0.05 = +5%), got {self.max_loss}",
                param="max_loss",
            )
        check_confidence(self.max_loss_confidence)

    @property
    def needs_calibration(self) -> bool:
        return True  # the fitness always needs windows, whatever makes the levels

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchReport:
    """The chosen allocation, how the search got there, and the baselines at the same budget."""

    config: dict
    levels: list[float]
    units: list[list[str]]  # layers of each unit
    allocation: list[float]  # level (sparsity or bits) of each unit
    layer_levels: dict[str, float]  # the allocation per layer
    achieved: float  # average sparsity by parameters, or bits per weight with grids
    fitness: float
    baselines: dict[str, float]  # fitness of uniform (and OWL) at the same budget, same windows
    baseline_allocations: dict[str, list[float]] = field(default_factory=dict)  # their level per unit
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    quantized: dict[str, QuantizedTensor] | None = None  # bits: the chosen codes of every layer, by parameter
    tuned: dict | None = None  # --tune owl: the best M and λ
    bisection: list[dict] | None = None  # --max-loss: every sparsity tried, its perplexity, whether it passed
    database: str | None = None  # the level database's folder in the work folder
    rounds: list[dict] = field(default_factory=list)  # later rounds: generation, parent fitness before / after
    size: dict | None = None  # size budget: budget, predicted and fixed bytes of the packed weights file
    decode: dict | None = None  # decode budget: seconds per token, budget and predicted (search.latency)

    def to_dict(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        return {k: v for k, v in asdict(self).items() if k not in ("quantized", "database")}
