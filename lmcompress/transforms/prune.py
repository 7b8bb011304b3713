"""One-shot pruning of a whole model: the algorithms of ``lmcompress.algorithms`` driven block by block."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from lmcompress.algorithms import (
    magnitude_mask,
    outlier_ratio,
    owl_allocation,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)
from lmcompress.algorithms.gptq import ColumnQuantizer
from lmcompress.algorithms.masks import Pattern
from lmcompress.algorithms.obs import damping_fraction, damping_raised
from lmcompress.algorithms.owl import OwlAllocation
from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec
from lmcompress.calibration.compress import IN_BLOCK
from lmcompress.calibration.distributed import spread
from lmcompress.calibration.engine import (
    BlockInputs,
    collect_input_stats,
    head_input_stats,
    walk_blocks,
)
from lmcompress.calibration.experts import WEIGHTING, expert_layers, note_tokens, stack_quantized, warn_few_tokens
from lmcompress.calibration.offload import read_only, track
from lmcompress.calibration.stats import InputStats
from lmcompress.checkpoint.allocation import check_layer_levels, read_layer_levels
from lmcompress.errors import UserError
from lmcompress.job_options import DEFAULT_PERCDAMP, check_percdamp
from lmcompress.models.families import (
    blocks_path,
    find_prunable,
    get_blocks,
    get_final_norm,
    prunable_layers,
    set_weight_matrix,
    weight_matrix,
)
from lmcompress.models.sparsity import measure_sparsity  # noqa: F401  (public here: lmcompress.measure_sparsity)
from lmcompress.transforms.layerwise import compress_layers
from lmcompress.transforms.quantize import QuantConfig, check_quant_grid, quantize_head

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "layers")  # layers: one sparsity per layer, given in ``layer_targets``


@dataclass
class PruneConfig:
    """What to prune and how. ``sparsity`` is the fraction of weights removed from the pruned layers.

    With an N:M ``pattern`` the sparsity is implied (2:4 → 0.5); ``sparsity`` may be left ``None``.
    ``head_bits`` quantizes the output head without pruning it, on a symmetric grid of ``head_group_size`` inputs
    (-1: per channel): by GPTQ on the head's inputs when the run has calibration windows (Wanda, SparseGPT, OWL),
    else by rounding to nearest; the model is then saved packed with the head's codes.
    """

    method: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    owl_m: float = 5.0  # outlier threshold: scores above owl_m × the block mean count as outliers
    owl_lambda: float = 0.08  # spread of OWL's per-block sparsity: max − min = 2λ
    percdamp: float | str = DEFAULT_PERCDAMP  # SparseGPT dampening: fraction of mean diag H, or auto (algorithms.obs)
    blocksize: int = 128  # SparseGPT column block (lazy updates and adaptive mask selection)
    include_head: bool = False  # also prune the output head (lm_head)
    head_bits: int | None = None  # quantize the output head (not pruned) to this many bits
    head_group_size: int = -1  # head_bits: inputs per grid; -1 = one grid per output row
    bits: int | None = None  # joint mode (SparseGPT only): also quantize the kept weights to this many bits
    group_size: int = 128  # joint mode: inputs per quantization grid; -1 = one grid per output row
    sym: bool = True  # joint mode: symmetric grid
    # allocation "layers": the target sparsity of every pruned layer by full name (e.g. a search's choice)
    layer_targets: dict[str, float] | None = None
    # Wanda / SparseGPT: "sequential" compresses the layers of a block in the order the block runs them, each
    # group seeing the outputs of those already compressed (one forward per block); "parallel" gives every
    # layer of a block the uncompressed block's inputs (the papers' order; two forwards per block)
    in_block: str = "sequential"

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
            raise UserError(
                f"method {self.method!r} is unknown: choose one of the pruning methods {', '.join(METHODS)}",
                param="method",
            )
        if self.in_block not in IN_BLOCK:
            raise UserError(f"in_block must be one of {', '.join(IN_BLOCK)}, got {self.in_block!r}", param="in_block")
        if self.allocation not in ALLOCATIONS:
            raise UserError(
                f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}", param="allocation"
            )
        try:
            pattern = Pattern.parse(self.pattern)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.pattern = str(pattern)
        if (self.allocation == "layers") != (self.layer_targets is not None):
            raise UserError(
                "per-layer sparsities (layer_targets) go with allocation 'layers', and only with it",
                param="allocation",
            )
        if self.layer_targets is not None:
            self._check_layer_targets(pattern)
        if pattern.is_nm:
            self._check_nm(pattern)
        if self.sparsity is None:
            raise UserError("give sparsity (a fraction in [0, 1)) or an N:M pattern", param=("sparsity", "pattern"))
        if not 0.0 <= self.sparsity < 1.0:
            raise UserError(f"sparsity must be a fraction in [0, 1), got {self.sparsity}", param="sparsity")
        if self.owl_m <= 0:
            raise UserError(f"owl_m must be positive, got {self.owl_m}", param="owl_m")
        if not 0.0 <= self.owl_lambda < 0.5:
            raise UserError(f"owl_lambda must be in [0, 0.5), got {self.owl_lambda}", param="owl_lambda")
        self.percdamp = check_percdamp(self.percdamp)
        if self.blocksize <= 0:
            raise UserError(f"blocksize must be positive, got {self.blocksize}", param="blocksize")
        if self.method == "sparsegpt" and pattern.is_nm and self.blocksize % pattern.m:
            fit = max(pattern.m, self.blocksize // pattern.m * pattern.m)
            raise UserError(
                f"blocksize {self.blocksize} must be a multiple of M={pattern.m} for SparseGPT with pattern "
                f"{pattern} (each group of M inputs is pruned inside one block); use blocksize {fit}",
                param="blocksize",
            )
        if self.bits is not None:
            self._check_joint()
        self._check_head_bits()

    def _check_layer_targets(self, pattern: Pattern) -> None:
        """Per-layer sparsities: unstructured, at least one, each in [0, 1); ``sparsity`` becomes their mean."""
        if pattern.is_nm:
            raise UserError("a per-layer allocation needs pattern unstructured", param="pattern")
        if not self.layer_targets:
            raise UserError("the allocation file names no layers", param="allocation")
        bad = {k: v for k, v in self.layer_targets.items() if not 0.0 <= v < 1.0}
        if bad:
            name, value = next(iter(bad.items()))
            raise UserError(
                f"per-layer sparsities must be fractions in [0, 1): {len(bad)} are not (e.g. {name}: {value})",
                param="allocation",
            )
        self.sparsity = sum(self.layer_targets.values()) / len(self.layer_targets)  # nominal (by layers)

    def _check_nm(self, pattern: Pattern) -> None:
        """An N:M pattern implies the sparsity (N/M removed) and one fraction in every block (no OWL)."""
        if self.sparsity is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
            raise UserError(
                f"sparsity {self.sparsity} contradicts pattern {pattern}, which means {pattern.sparsity:g} "
                "of the weights removed; leave sparsity out with an N:M pattern",
                param="sparsity",
            )
        self.sparsity = pattern.sparsity
        if self.allocation == "owl":
            raise UserError(
                "OWL allocation varies the removed fraction per block; use it with pattern unstructured",
                param="pattern",
            )

    def _check_joint(self) -> None:
        """Joint pruning + quantization (``bits``): SparseGPT only, a valid grid, not the output head."""
        if self.method != "sparsegpt":
            raise UserError(
                f"bits (joint pruning + quantization) works only with method sparsegpt, not {self.method}; "
                "to quantize a model pruned another way, quantize the pruned model (`lmcompress quantize`)",
                param=("bits", "method"),
            )
        check_quant_grid(self.bits, self.group_size)
        if self.include_head:
            raise UserError(
                "include_head cannot be combined with bits: joint pruning + quantization works on the blocks; to "
                "quantize the output head without pruning it, give head_bits instead of include_head",
                param=("include_head", "bits"),
            )

    def _check_head_bits(self) -> None:
        """``head_bits``: a valid grid for the head, which is then quantized, not pruned."""
        if self.head_bits is None:
            if self.head_group_size != -1:
                raise UserError("head_group_size needs head_bits (quantizing the output head)", param="head_group_size")
            return
        check_quant_grid(self.head_bits, self.head_group_size, "head_bits", "head_group_size")
        if self.include_head:
            raise UserError(
                "head_bits quantizes the output head without pruning it, include_head prunes it: choose one",
                param=("head_bits", "include_head"),
            )

    @property
    def head_quant(self) -> QuantConfig | None:
        """How ``head_bits`` quantizes the output head (None without it): GPTQ when the run reads calibration
        windows, else RTN; SparseGPT's dampening and column block."""
        if self.head_bits is None:
            return None
        return QuantConfig(
            method="gptq" if self.needs_calibration else "rtn",
            bits=self.head_bits,
            group_size=self.head_group_size,
            percdamp=self.percdamp,
            blocksize=self.blocksize,
            include_head=True,
            head_bits=self.head_bits,
            head_group_size=self.head_group_size,
        )

    @property
    def saves_codes(self) -> bool:
        """Whether the result holds quantization codes (``bits``, ``head_bits``): it is then saved packed."""
        return self.bits is not None or self.head_bits is not None

    def check_model(self, model: nn.Module) -> None:
        """UserError, naming the layers, unless an N:M pattern's M divides the input width of every layer pruned.

        Cheap, needs only the shapes: run it right after loading, before any calibration.
        """
        if self.layer_targets is not None:  # routed experts not named take their block's target
            hint = ", with the same include_head setting"
            check_layer_levels(_pruned_modules(model, self, False), self.layer_targets, "sparsity", hint=hint)
        pattern = self.parsed_pattern
        if not pattern.is_nm:
            return
        modules = _pruned_modules(model, self)
        widths = {name: weight_matrix(m).shape[1] for name, m in modules.items() if m is not None}
        bad = {name: w for name, w in widths.items() if w % pattern.m}
        if bad:
            by_width: dict[int, list[str]] = {}
            for name, w in bad.items():
                by_width.setdefault(w, []).append(name)
            shown = "; ".join(
                f"{w} inputs: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                for w, names in sorted(by_width.items())
            )
            fits = [m for m in (4, 8, 16) if m != pattern.m and all(w % m == 0 for w in widths.values())]
            if set(bad) == {"lm_head"}:
                hint = "leave out include_head"
            elif fits:
                hint = f"a pattern whose M divides every width, e.g. pattern {fits[0] // 2}:{fits[0]}"
            else:
                hint = "pattern unstructured"
            raise UserError(
                f"pattern {pattern} needs input widths that are multiples of {pattern.m}, but {len(bad)} of the "
                f"{len(widths)} layers to prune are not ({shown}); use {hint}",
                param=("pattern", "include_head"),
            )

    def to_dict(self) -> dict:
        return asdict(self)


def read_allocation(path: str | Path) -> dict[str, float]:
    """Per-layer sparsities from a file: a search's ``search.json`` (or its output folder), or a JSON object
    ``{"layer name": sparsity, ...}``, or the recipe (``lmcompress.json``) of a run given such a file."""
    hint = ": a bit-width search (`lmcompress search --budget bits=...`) writes the quantized model itself"
    return read_layer_levels(path, "sparsity", what="allocation", hint=hint)


@dataclass
class PruneReport:
    """What a pruning run did: the targets it set and the sparsity it measured afterwards."""

    config: dict
    block_targets: list[float]  # target sparsity of each block (all equal unless OWL)
    layer_sparsity: dict[str, float]  # measured fraction of zeros of each pruned layer
    sparsity: float  # measured fraction of zeros over all pruned layers
    outlier_ratios: list[float] | None = None  # OWL: each block's outlier ratio
    damping: dict[str, float] = field(default_factory=dict)  # SparseGPT layers that needed extra dampening
    wall_time_s: float = 0.0
    # Joint mode (--bits): each layer's codes + grids by parameter name, and the fraction of weights the
    # pruning masks removed (exactly the target; `sparsity` also counts kept weights that rounded to 0).
    quantized: dict[str, QuantizedTensor] | None = None
    mask_sparsity: float | None = None
    owl_lambda_effective: float | None = None  # OWL: λ after shrinking so that no block leaves [0, 0.99]
    # in_block sequential: why blocks fell back to the parallel order (reason → number of blocks), if any did
    in_block_fallback: dict[str, int] = field(default_factory=dict)
    # head_bits: how the output head was quantized (method, bits, group_size; GPTQ's loss estimate)
    head_quantization: dict | None = None
    # routed experts of fused 3-D parameters (calibration.experts): routed tokens per expert by fused parameter,
    # and the experts with fewer tokens than inputs (0: solved as if their inputs were white, i.e. by magnitude)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    experts_few_tokens: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "quantized"}

    def recipe_fields(self) -> dict:
        """What the recipe (``lmcompress.json``) says this run did: its config's fields, then the results."""
        joint = {} if self.mask_sparsity is None else {"mask_sparsity": self.mask_sparsity}
        if self.head_quantization is not None:
            joint["head_quantization"] = self.head_quantization
        if self.expert_tokens:
            joint |= {"expert_statistics": WEIGHTING, "expert_tokens": self.expert_tokens}
            joint["experts_few_tokens"] = self.experts_few_tokens
        return {
            **self.config,
            "achieved_sparsity": self.sparsity,
            "block_targets": self.block_targets,
            "layer_sparsity": self.layer_sparsity,
            "outlier_ratios": self.outlier_ratios,
            "owl_lambda_effective": self.owl_lambda_effective,
            "damping_raised": self.damping,
            "in_block_fallback": self.in_block_fallback,
            **joint,
        }


@dataclass
class _LayerResult:
    weight: torch.Tensor  # new weight, float32 [out, in]
    damping: float | None = None  # SparseGPT: dampening it needed
    quantized: QuantizedTensor | None = None  # joint mode: codes + grids
    pruned: int = 0  # joint mode: weights removed by the mask


def prune_layer(
    config: PruneConfig,
    weight: torch.Tensor,
    stats: InputStats | None,
    sparsity: float,
    name: str,
    consume: bool = False,
) -> _LayerResult:
    """New weight for one layer; with ``config.bits``, SparseGPT quantizes the kept weights in the same pass.
    ``consume``: ``stats`` is not used again, so SparseGPT may overwrite its Hessian."""
    pattern = config.parsed_pattern
    w = weight.float()
    if config.method == "magnitude":
        mask = magnitude_mask(w, sparsity, pattern)
    elif config.method == "wanda":
        mask = wanda_mask(w, stats.sq_sum, sparsity, pattern)
    else:
        spec = config.quant_spec
        quantizer = None if spec is None else ColumnQuantizer(spec, tuple(w.shape), w.device)
        res = sparsegpt_prune(
            w,
            stats.hessian,
            sparsity,
            pattern,
            blocksize=config.blocksize,
            percdamp=damping_fraction(config.percdamp, w.shape[1], stats.tokens),
            quantizer=quantizer,
            layer=name,
            consume_hessian=consume,
        )
        if quantizer is None:
            return _LayerResult(res.weight, res.damping)
        return _LayerResult(res.weight, res.damping, quantizer.result().to("cpu"), int(res.mask.sum()))
    return _LayerResult(w.masked_fill(mask, 0.0))


def prune_layers(
    config: PruneConfig,
    weights: list[torch.Tensor],
    stats: InputStats | None,
    sparsities: list[float],
    names: list[str],
    consume: bool = False,
) -> list[_LayerResult]:
    """New weights for layers that read the same input (``stats``): SparseGPT solves them stacked row-wise in
    one pass (one inverse Hessian, one column sweep), each with its own mask budget; the rest one by one."""
    if config.method != "sparsegpt" or len(weights) == 1:
        if len(weights) == 1:
            return [prune_layer(config, weights[0], stats, sparsities[0], names[0], consume)]
        return [prune_layer(config, w, stats, s, n) for w, s, n in zip(weights, sparsities, names, strict=True)]
    w = torch.cat([x.float() for x in weights])
    rows = [x.shape[0] for x in weights]
    spec = config.quant_spec
    quantizer = None if spec is None else ColumnQuantizer(spec, tuple(w.shape), w.device)
    res = sparsegpt_prune(
        w,
        stats.hessian,
        sparsities,
        config.parsed_pattern,
        blocksize=config.blocksize,
        percdamp=damping_fraction(config.percdamp, w.shape[1], stats.tokens),
        quantizer=quantizer,
        segments=rows,
        layer=" + ".join(names),
        consume_hessian=consume,
    )
    codes = None if quantizer is None else quantizer.result().to("cpu")
    out, r0 = [], 0
    for r in rows:
        part = slice(r0, r0 + r)
        if codes is None:
            out.append(_LayerResult(res.weight[part], res.damping))
        else:
            out.append(_LayerResult(res.weight[part], res.damping, codes.rows(r0, r0 + r), int(res.mask[part].sum())))
        r0 += r
    return out


def owl_pass(
    model: nn.Module,
    calib: torch.Tensor,
    device: torch.device,
    target: float,
    owl_m: float,
    owl_lambda: float,
    *,
    progress: bool = True,
) -> tuple[list[float], OwlAllocation]:
    """OWL's first, dense pass: each block's outlier ratio, and the per-block targets averaging ``target``.

    Each block's outlier ratio is the share of its Wanda scores ``|W_ij|·‖x_j‖₂`` above ``owl_m`` × their mean
    (over all its linear layers); :func:`~lmcompress.algorithms.owl.owl_allocation` turns the ratios into
    targets spread ``2·owl_lambda`` apart (less if a block would leave its bounds). Used for unstructured sparsity
    and structured removal ratios alike.
    """
    ratios: list[float] = []

    def visit(_i: int, block: nn.Module, inputs: BlockInputs) -> None:
        layers = find_prunable(block)
        stats = collect_input_stats(block, inputs, list(layers), hessian=False)
        scores = [wanda_scores(weight_matrix(m), stats[n].sq_sum) for n, m in layers.items()]
        ratios.append(outlier_ratio(scores, owl_m))

    with read_only(model):  # a streamed model's blocks are read, not written
        walk_blocks(model, calib, device, visit, desc="OWL outlier ratios", progress=progress)
    return ratios, owl_allocation(ratios, target, owl_lambda)


def block_targets(
    model: nn.Module, config: PruneConfig, calib: torch.Tensor | None, device: torch.device, progress: bool
) -> tuple[list[float], list[float] | None, float | None]:
    """Each block's target sparsity, with OWL's outlier ratios and effective λ (``None`` without OWL): the
    config's target everywhere, OWL's allocation, or (per-layer targets) each block's layers weighted by size."""
    blocks, prefix = get_blocks(model), blocks_path(model)
    if config.allocation == "owl":
        ratios, owl = owl_pass(model, calib, device, config.target, config.owl_m, config.owl_lambda, progress=progress)
        log.info("OWL block sparsities: %s", ", ".join(f"{s:.3f}" for s in owl.sparsities))
        return owl.sparsities, ratios, owl.lam
    if config.layer_targets is None:
        return [config.target] * len(blocks), None, None
    targets = []
    for i, block in enumerate(blocks):
        sizes = {f"{prefix}.{i}.{n}": weight_matrix(m).numel() for n, m in find_prunable(block).items()}
        removed = sum(config.layer_targets[n] * k for n, k in sizes.items())
        targets.append(removed / max(sum(sizes.values()), 1))
    return targets, None, None


class _Pruner:
    """Pruning as a :class:`~lmcompress.transforms.layerwise.LayerSolver`: masks (and, joint, codes) per group,
    and the report's dictionaries, filled block by block (registered with a stream by ``track``)."""

    def __init__(self, config: PruneConfig, prefix: str, targets: list[float]) -> None:
        self.config, self.prefix, self.targets = config, prefix, targets
        self.layer_sparsity: dict[str, float] = {}
        self.damping: dict[str, float] = {}
        # joint mode's codes, and the head's (head_bits): tracked, so that a streamed model stores them too
        self.quantized: dict[str, QuantizedTensor] | None = {} if config.saves_codes else None
        self.pruned: dict[str, int] = {}  # joint mode: weights the masks removed, per layer
        self.zeros: dict[str, int] = {}  # zeros of each pruned layer after pruning
        self.expert_tokens: dict[str, list[int]] = {}  # fused expert parameter → routed tokens of each expert
        self.experts_few_tokens: dict[str, int] = {}  # experts with fewer routed tokens than inputs

    def dicts(self) -> dict[str, dict | None]:
        return {
            "layer_sparsity": self.layer_sparsity, "damping": self.damping, "pruned": self.pruned,
            "zeros": self.zeros, "quantized": self.quantized, "expert_tokens": self.expert_tokens,
            "experts_few_tokens": self.experts_few_tokens,
        }  # fmt: skip

    def solve(self, i: int, layers: dict[str, nn.Module], group: list[str], stats: InputStats | None):
        full = [f"{self.prefix}.{i}.{name}" for name in group]
        targets = self.config.layer_targets
        sparsities = [self.targets[i] if targets is None else targets.get(f, self.targets[i]) for f in full]
        weights = [weight_matrix(layers[name]) for name in group]
        return prune_layers(self.config, weights, stats, sparsities, full, consume=True)

    def apply(self, i: int, layers: dict[str, nn.Module], group: list[str], results: list[_LayerResult]) -> None:
        for name, res in zip(group, results, strict=True):
            f = f"{self.prefix}.{i}.{name}"
            set_weight_matrix(layers[name], res.weight)
            if res.damping is not None and damping_raised(res.damping, self.config.percdamp):
                self.damping[f] = res.damping
            if res.quantized is not None:
                self.quantized[f"{f}.weight"] = res.quantized
                self.pruned[f] = res.pruned

    def experts_done(
        self, i: int, param: str, names: list[str], layers: dict[str, nn.Module], tokens: list[int] | None
    ) -> None:
        """Routed token counts to the report; joint mode: the codes of a fused parameter's experts become the
        parameter's, rows stacked in expert order."""
        full_names = [f"{self.prefix}.{i}.{n}" for n in names]
        param_name = f"{self.prefix}.{i}.{param}"
        note_tokens(
            self.expert_tokens, self.experts_few_tokens, param_name, full_names, [layers[n] for n in names], tokens
        )
        keys = [f"{f}.weight" for f in full_names]
        if self.quantized is not None and all(k in self.quantized for k in keys):  # joint mode (not head_bits alone)
            self.quantized[f"{self.prefix}.{i}.{param}"] = stack_quantized([self.quantized.pop(k) for k in keys])

    def block_done(self, i: int, layers: dict[str, nn.Module]) -> None:
        for n, m in layers.items():  # one counting pass per weight
            w = weight_matrix(m)
            self.zeros[f"{self.prefix}.{i}.{n}"] = count = int(torch.count_nonzero(w == 0))
            self.layer_sparsity[f"{self.prefix}.{i}.{n}"] = count / w.numel()


def prune(
    model: nn.Module,
    config: PruneConfig,
    calib: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place.

    ``calib`` holds calibration token windows ``[nsamples, seqlen]`` (needed by Wanda, SparseGPT and OWL).
    Blocks are pruned in order, each seeing the outputs of the already-pruned blocks before it.
    """
    start = time.perf_counter()
    config.validate()
    if config.include_head:
        get_final_norm(model)  # a UserError now, before any work, where there is no final norm to find
    device = torch.device(device)
    if config.needs_calibration and (calib is None or calib.numel() == 0):
        raise UserError(f"{config.method} with {config.allocation} allocation needs calibration data")
    config.check_model(model)
    model.eval()

    targets, ratios, owl_lambda = block_targets(model, config, calib, device, progress)
    pruner = _Pruner(config, blocks_path(model), targets)
    track(model, **pruner.dicts())
    last, fallback = compress_layers(
        model,
        pruner,
        None if config.method == "magnitude" else calib,
        device,
        hessian=config.method == "sparsegpt",
        in_block=config.in_block,
        last_outputs=config.include_head or config.head_bits is not None,
        desc=config.method,
        progress=progress,
    )
    if config.include_head:
        pruner.layer_sparsity.update(_prune_head(model, config, last, device))
        pruner.zeros["lm_head"] = int((model.get_output_embeddings().weight == 0).sum())
    head_quantization = None
    if config.head_bits is not None:  # the head quantized, not pruned: saved as codes beside the pruned blocks
        head = config.head_quant
        qt, loss = quantize_head(model, head, last, device, head.head_spec)
        pruner.quantized["lm_head.weight"] = qt
        head_quantization = {"method": head.method, "bits": head.head_bits, "group_size": head.head_group_size}
        head_quantization["loss"] = loss

    warn_few_tokens(pruner.experts_few_tokens, "magnitude")
    # counted block by block: a streamed model's blocks are back on disk (numel reads only the shapes)
    total = sum(weight_matrix(m).numel() for m in _pruned_modules(model, config).values())
    quantized = pruner.quantized
    return PruneReport(
        config=config.to_dict(),
        block_targets=targets,
        layer_sparsity=pruner.layer_sparsity,
        sparsity=sum(pruner.zeros.values()) / max(total, 1),
        outlier_ratios=ratios,
        damping=pruner.damping,
        wall_time_s=time.perf_counter() - start,
        quantized=quantized,
        mask_sparsity=None if config.bits is None else sum(pruner.pruned.values()) / max(total, 1),
        owl_lambda_effective=owl_lambda,
        in_block_fallback=fallback,
        head_quantization=head_quantization,
        expert_tokens=pruner.expert_tokens,
        experts_few_tokens=pruner.experts_few_tokens,
    )


def _pruned_modules(model: nn.Module, config: PruneConfig, experts: bool = True) -> dict[str, nn.Module]:
    """The layers pruned, by full name: the blocks' linear layers, each routed expert's matrices of fused 3-D
    expert parameters (``experts``; :mod:`lmcompress.calibration.experts`), and the head (``include_head``)."""
    out = prunable_layers(model)
    if experts:
        prefix = blocks_path(model)
        for i, block in enumerate(get_blocks(model)):
            out |= {f"{prefix}.{i}.{n}": m for n, m in expert_layers(block).items()}
    if config.include_head:
        out["lm_head"] = model.get_output_embeddings()
    return out


@torch.no_grad()
def _prune_head(model: nn.Module, config: PruneConfig, last: BlockInputs | None, device) -> dict[str, float]:
    head = model.get_output_embeddings()
    if head is None:
        raise UserError("include_head: this model has no output head", param="include_head")
    if head.weight is model.get_input_embeddings().weight:
        log.warning("lm_head is tied to the input embeddings: pruning it prunes the embeddings too")
    stats = None
    if config.method != "magnitude":
        stats = head_input_stats(model, last, device, config.method == "sparsegpt")
    target = config.target if config.layer_targets is None else config.layer_targets["lm_head"]
    weight = head.weight.data.to(device)  # solved where its statistics are
    new = spread([weight], lambda w: prune_layer(config, w, stats, target, "lm_head").weight)[0]
    head.weight.data.copy_(new.to(head.weight.dtype))
    return {"lm_head": (head.weight == 0).float().mean().item()}
