"""Configuration of pruning and quantization runs, validated up front so that bad settings fail before any work."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmcompress.algorithms.masks import Pattern
from lmcompress.algorithms.quant import QuantSpec
from lmcompress.errors import UserError

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")
QUANT_METHODS = ("rtn", "gptq")


def check_quant_grid(bits: int | None, group_size: int, option: str = "--bits") -> None:
    """UserError unless ``bits`` is in 2..8 and ``group_size`` is positive or -1 (one grid per output row)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UserError(f"{option} must be an integer from 2 to 8 (2, 3, 4 and 8 are the usual choices), got {bits}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise UserError(f"--group-size must be a positive number of inputs or -1 (per channel), got {group_size}")


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
    bits: int | None = None  # joint mode (SparseGPT only): also quantize the kept weights to this many bits
    group_size: int = 128  # joint mode: inputs per quantization grid; -1 = one grid per output row
    sym: bool = True  # joint mode: symmetric grid

    def __post_init__(self) -> None:
        self.validate()

    @property
    def quant_spec(self) -> QuantSpec | None:
        """The quantization grid of the joint prune + quantize mode, or None when not quantizing."""
        return None if self.bits is None else QuantSpec(self.bits, self.group_size, self.sym)

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
        if self.bits is not None:
            if self.method != "sparsegpt":
                raise UserError(
                    f"--bits (joint pruning + quantization) works only with --method sparsegpt, not {self.method}; "
                    "to quantize a model pruned another way, run `lmcompress quantize` on the pruned folder"
                )
            check_quant_grid(self.bits, self.group_size)
            if self.include_head:
                raise UserError("--include-head cannot be combined with --bits: the output head is not quantized")
            if self.group_size != -1 and self.blocksize % self.group_size:
                raise UserError(
                    f"--group-size {self.group_size} must divide --blocksize {self.blocksize} in joint mode "
                    "(each grid is chosen when its group starts, inside one SparseGPT block)"
                )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantConfig:
    """How to quantize the linear layers of the blocks: ``bits`` per weight on a uniform grid per group.

    ``group_size`` inputs share a scale and zero point (-1: one per output row). ``keep_zeros`` keeps weights
    that are exactly zero (a pruned model) at exactly zero.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False  # GPTQ: process inputs by decreasing Hessian diagonal
    static_groups: bool = False  # GPTQ + act-order: fix the grids up front in natural column order
    percdamp: float = 0.01  # GPTQ dampening, fraction of the mean Hessian diagonal
    blocksize: int = 128  # GPTQ column block (lazy batch updates)
    keep_zeros: bool = True  # weights that are exactly zero stay exactly zero

    def __post_init__(self) -> None:
        self.validate()

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    def validate(self) -> None:
        if self.method not in QUANT_METHODS:
            raise UserError(f"unknown quantization method {self.method!r}: choose one of {', '.join(QUANT_METHODS)}")
        check_quant_grid(self.bits, self.group_size)
        if self.method == "rtn" and (self.act_order or self.static_groups):
            raise UserError("--act-order and --static-groups are GPTQ options; use them with --method gptq")
        if self.static_groups and self.group_size == -1:
            raise UserError("--static-groups needs groups: give --group-size N (not -1)")
        if not 0.0 <= self.percdamp < 1.0:
            raise UserError(f"--percdamp must be in [0, 1), got {self.percdamp}")
        if self.blocksize <= 0:
            raise UserError(f"--blocksize must be positive, got {self.blocksize}")

    def to_dict(self) -> dict:
        return asdict(self)
