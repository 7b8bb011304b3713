"""Configuration of a pruning run, validated up front so that bad settings fail before any work."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmcompress.algorithms.masks import Pattern
from lmcompress.errors import UserError

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")


@dataclass
class PruneConfig:
    """What to prune and how. ``sparsity`` is the fraction of weights removed from the pruned layers.

    With an N:M ``pattern`` the sparsity is implied (2:4 → 0.5); ``sparsity`` may be left ``None``.
    """

    method: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    owl_m: float = 5.0  # outlier threshold: scores above owl_m × the block mean count as outliers
    owl_lambda: float = 0.08  # spread of OWL's per-block sparsity: max − min = 2λ
    percdamp: float = 0.01  # SparseGPT dampening, fraction of the mean Hessian diagonal
    blocksize: int = 128  # SparseGPT column block (lazy updates and adaptive mask selection)
    include_head: bool = False  # also prune the output head (lm_head)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @property
    def target(self) -> float:
        """The sparsity the run aims at (implied by the pattern for N:M)."""
        p = self.parsed_pattern
        return p.sparsity if p.is_nm else float(self.sparsity)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.allocation == "owl"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown pruning method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        try:
            pattern = Pattern.parse(self.pattern)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.pattern = str(pattern)
        if pattern.is_nm:
            if self.sparsity is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
                raise UserError(
                    f"--sparsity {self.sparsity} contradicts pattern {pattern}, which means sparsity "
                    f"{pattern.sparsity:g}; leave --sparsity out with an N:M pattern"
                )
            self.sparsity = pattern.sparsity
            if self.allocation == "owl":
                raise UserError("OWL allocation varies sparsity per block; use it with --pattern unstructured")
        if self.sparsity is None:
            raise UserError("give --sparsity (a fraction in [0, 1)) or an N:M --pattern")
        if not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"sparsity must be a fraction in [0, 1), got {self.sparsity}")
        if self.owl_m <= 0:
            raise UserError(f"--owl-m must be positive, got {self.owl_m}")
        if not 0.0 <= self.owl_lambda < 0.5:
            raise UserError(f"--owl-lambda must be in [0, 0.5), got {self.owl_lambda}")
        if not 0.0 <= self.percdamp < 1.0:
            raise UserError(f"--percdamp must be in [0, 1), got {self.percdamp}")
        if self.blocksize <= 0 or (pattern.is_nm and self.blocksize % pattern.m):
            raise UserError(f"--blocksize must be a positive multiple of M, got {self.blocksize}")

    def to_dict(self) -> dict:
        return asdict(self)
