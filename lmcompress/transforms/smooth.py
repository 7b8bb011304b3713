"""SmoothQuant and AWQ on a whole model, block by block, before its weights (and activations) are quantized.

Both fold a per-input-channel scale ``s`` into each smoothing group (``models.smoothing``): the group's weight
columns are multiplied by ``s`` and the output of the module that produces its input is divided by ``s``, so the
model computes the same function (up to float rounding) and only what the later quantization sees changes.

:func:`smooth_model` walks the blocks with the calibration engine (``calibration.engine.walk_blocks``). Per
block, one pass over all windows records every group's per-channel input statistics and writes the block's
outputs ``Y`` over its inputs for the next block (folding leaves the block's function unchanged, so these are
the smoothed block's outputs up to float rounding); the outputs of the first few *search windows* are the
reference the searches compare against. Then

* **SmoothQuant** (``alpha``): ``s_j = max|X_j|^α / max|W_j|^(1−α)`` on every group of the block; with
  ``alpha="auto"`` the α of a grid whose smoothed block, run with every linear layer's weights and inputs
  fake-quantized as the scheme runs them (int8 per channel × int8 per token by default; ``actquant``), gives
  the lowest mean squared output error ``mean((Ŷ − Y)²)``, found by Fibonacci (golden-section) search along
  the grid (``alpha_search="golden"``: at most 5 trials of 11 points; the grid's minimum when the error is unimodal in
  α) or by trying every point (``"grid"``);
* **AWQ** (``awq``): for each group in turn, the exponent ``a`` of ``s_j = mean|X_j|^a`` (``algorithms.awq``)
  whose block, with that group's weights replaced by ``Q(W · diag(s)) · diag(s)⁻¹`` (the quantizer the later
  RTN / GPTQ uses, round to nearest on its grid), gives the lowest ``mean((Ŷ − Y)²)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from lmcompress.algorithms.actquant import ActScheme, dequantize, weight_scheme_quantize
from lmcompress.algorithms.awq import awq_search, effective_weight, rtn_quantizer
from lmcompress.algorithms.quant import QuantSpec
from lmcompress.algorithms.smoothquant import check_alpha, search_golden, search_grid
from lmcompress.calibration import distributed
from lmcompress.calibration.engine import BlockInputs, run_block, walk_blocks
from lmcompress.calibration.offload import active_stream
from lmcompress.errors import UserError
from lmcompress.models.families import blocks_path, find_prunable, set_weight_matrix, weight_matrix
from lmcompress.models.smoothing import (
    Group,
    block_groups,
    fold_scales,
    recorded_inputs,
    search_smoothing,
    smooth,
)

log = logging.getLogger(__name__)

ACT_KINDS = ("int8", "int8_asym", "fp8")  # int8_asym: int8 with a zero point per token
ALPHA_SEARCHES = {"golden": search_golden, "grid": search_grid}


def check_smoothquant(value: float | str | None, param: str = "smoothquant") -> float | str | None:
    """``None``, ``"auto"``, or a number in [0, 1] (as a float); else a UserError naming ``param``."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise UserError(f"{param} must be a number in [0, 1] or 'auto', got {value!r}", param=param)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{param} must be a number in [0, 1] or 'auto', got {value!r}", param=param) from None
    if not 0.0 <= number <= 1.0:
        raise UserError(f"{param}: α outside [0, 1] (got {value!r}); give a number in [0, 1] or 'auto'", param=param)
    return check_alpha(number, param)


@dataclass
class SmoothConfig:
    """What :func:`smooth_model` does. ``alpha``: SmoothQuant's α (a number in [0, 1], ``"auto"`` to search it
    per block on ``alpha_grid`` points, or None: no SmoothQuant); ``alpha_search``: how ``"auto"`` searches the
    grid (``golden``: Fibonacci search, about ``log_φ`` of the points in trials; ``grid``: every point); ``act``:
    how the search quantizes activations and weights (``int8``: W8A8 int8, ``int8_asym``: with a zero point per
    token, ``fp8``: FP8 E4M3 per token). ``awq``:
    AWQ with ``awq_grid`` exponents in [0, 1], searched with round to nearest on ``weight_spec``. The searches run
    on the first calibration windows holding ``search_tokens`` tokens (at least one window)."""

    alpha: float | str | None = None
    alpha_grid: int = 11
    alpha_search: str = "golden"
    act: str = "int8"
    awq: bool = False
    awq_grid: int = 20
    weight_spec: QuantSpec = field(default_factory=lambda: QuantSpec(4, 128, True, "minmax"))
    search_tokens: int = 1024

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.alpha = check_smoothquant(self.alpha)
        if self.alpha is not None and self.awq:
            raise UserError(
                "SmoothQuant and AWQ are alternatives (SmoothQuant for weight-and-activation schemes, AWQ for "
                "low-bit weights): give one of them",
                param=("smoothquant", "awq"),
            )
        if self.alpha_search not in ALPHA_SEARCHES:
            raise UserError(
                f"alpha_search must be one of {', '.join(ALPHA_SEARCHES)}, got {self.alpha_search!r}",
                param="alpha_search",
            )
        if self.act not in ACT_KINDS:
            raise UserError(f"act must be one of {', '.join(ACT_KINDS)}, got {self.act!r}", param="act")
        for name in ("alpha_grid", "awq_grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise UserError(f"{name} must be an integer of at least 2 grid points, got {value!r}", param=name)
        if isinstance(self.search_tokens, bool) or not isinstance(self.search_tokens, int) or self.search_tokens < 1:
            raise UserError(f"search_tokens must be a positive integer, got {self.search_tokens!r}")

    @property
    def active(self) -> bool:
        return self.alpha is not None or self.awq

    def to_dict(self) -> dict:
        out = asdict(self)
        out["weight_spec"] = asdict(self.weight_spec)
        return out


@dataclass
class SmoothReport:
    """What :func:`smooth_model` did: SmoothQuant's α per block (and the output error of each α tried), AWQ's
    exponent per group (full dotted name of the group's source) and each exponent's output error."""

    config: dict
    alpha: dict[int, float] = field(default_factory=dict)
    alpha_losses: dict[int, dict[float, float]] = field(default_factory=dict)
    awq_exponent: dict[str, float] = field(default_factory=dict)
    awq_losses: dict[str, dict[float, float]] = field(default_factory=dict)
    groups: int = 0
    search_windows: int = 0
    wall_time_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe_fields(self) -> dict:
        """The short account the recipe keeps: the method, α per block / exponent per group, the time."""
        out: dict = {"groups": self.groups, "search_windows": self.search_windows, "time_s": self.wall_time_s}
        if self.config.get("alpha") is not None:
            out["smoothquant"] = {"alpha": self.config["alpha"], "alpha_per_block": self.alpha}
            if self.config["alpha"] == "auto":
                out["smoothquant"] |= {"grid": self.config["alpha_grid"], "search": self.config["alpha_search"]}
        if self.config.get("awq"):
            out["awq"] = {"grid": self.config["awq_grid"], "exponent_per_group": self.awq_exponent}
        return out


def _fake_weight(weight: torch.Tensor, kind: str) -> torch.Tensor:
    return dequantize(*weight_scheme_quantize(weight.float(), kind))


@contextmanager
def simulated(block: nn.Module, act: ActScheme) -> Iterator[None]:
    """Within the ``with``, every linear layer of ``block`` runs as the scheme does: weights quantized by round to
    nearest per output channel (``act.kind``) and inputs fake-quantized per token; restored on exit."""
    layers = find_prunable(block)
    saved = {n: weight_matrix(m).clone() for n, m in layers.items()}

    def hook(_module, args):
        x = args[0]
        return (act.fake_quantize(x).to(x.dtype), *args[1:])

    handles = []
    try:
        for name, m in layers.items():
            set_weight_matrix(m, _fake_weight(saved[name], act.kind))
            handles.append(m.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for name, m in layers.items():
            set_weight_matrix(m, saved[name])


def _output_error(block: nn.Module, inputs: BlockInputs, reference: torch.Tensor) -> float:
    out = run_block(block, inputs, keep="new")
    return float((out.float() - reference.float()).pow(2).mean())


def _awq_loss(
    block: nn.Module, group: Group, inputs: BlockInputs, reference: torch.Tensor, spec: QuantSpec
) -> Callable[[torch.Tensor], float]:
    """``scales ↦`` the block's output error with ``group``'s weights as their quantized effective weights."""
    quantize = rtn_quantizer(spec)

    def loss(scales: torch.Tensor) -> float:
        saved = [(m, weight_matrix(m).clone()) for m in group.targets.values()]
        try:
            for m, w in saved:
                set_weight_matrix(m, effective_weight(w.float(), scales, quantize))
            return _output_error(block, inputs, reference)
        finally:
            for m, w in saved:
                set_weight_matrix(m, w)

    return loss


def _refuse_placement(model: nn.Module) -> None:
    if distributed.world()[1] > 1:
        raise UserError(
            "SmoothQuant / AWQ do not run under torch.distributed yet: run the job as one process",
            param=("smoothquant", "awq"),
        )
    if active_stream(model) is not None:
        raise UserError(
            "SmoothQuant / AWQ need the model in memory (they are not supported with offload disk or resume yet): "
            "use offload none",
            param=("smoothquant", "awq", "offload"),
        )


@torch.no_grad()
def smooth_model(
    model: nn.Module,
    config: SmoothConfig,
    calib: torch.Tensor | None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SmoothReport:
    """Fold SmoothQuant's or AWQ's scales into ``model``'s blocks in place (see the module docstring); the model
    computes the same function afterwards. ``calib``: token windows ``[nsamples, seqlen]``."""
    start = time.perf_counter()
    config.validate()
    report = SmoothReport(config=config.to_dict())
    if not config.active:
        return report
    if calib is None or calib.numel() == 0:
        raise UserError(
            "SmoothQuant / AWQ need calibration data: give calibration windows (calib_data)", param="calib_data"
        )
    _refuse_placement(model)
    device = torch.device(device)
    model.eval()
    prefix = blocks_path(model)
    windows = max(1, min(calib.shape[0], math.ceil(config.search_tokens / calib.shape[1])))
    report.search_windows = windows
    act = ActScheme("int8", symmetric=False) if config.act == "int8_asym" else ActScheme(config.act)

    def visit(i: int, block: nn.Module, inputs: BlockInputs) -> bool:
        groups = block_groups(block, model.config, f"{prefix}.{i}")
        report.groups += len(groups)
        if not groups:
            return False
        searching = config.alpha == "auto" or config.awq
        search = replace(inputs, hidden=inputs.hidden[:windows].clone()) if searching else None
        with recorded_inputs(groups) as stats:  # the statistics pass is also the pass that gives the outputs
            run_block(block, inputs, keep="inplace")
        reference = inputs.hidden[:windows].clone() if searching else None
        if config.alpha == "auto":

            def loss() -> float:
                with simulated(block, act):
                    return _output_error(block, search, reference)

            search_fn = ALPHA_SEARCHES[config.alpha_search]
            best, losses = search_smoothing(groups, stats, loss, config.alpha_grid, search_fn)
            report.alpha[i], report.alpha_losses[i] = best, losses
        elif config.alpha is not None:
            smooth(groups, stats, float(config.alpha))
            report.alpha[i] = float(config.alpha)
        if config.awq:
            for g in groups:
                res = awq_search(
                    None,
                    g.weights(),
                    rtn_quantizer(config.weight_spec),
                    config.awq_grid,
                    loss=_awq_loss(block, g, search, reference, config.weight_spec),
                    tie=g.tie,
                    act_absmean=stats[g.name].absmean,
                )
                fold_scales(g, res.scales)
                report.awq_exponent[g.name] = res.exponent
                report.awq_losses[g.name] = res.losses
        return True  # inputs.hidden holds the block's outputs

    walk_blocks(model, calib, device, visit, desc="smooth", progress=progress, last_outputs=False)
    report.wall_time_s = time.perf_counter() - start
    return report
