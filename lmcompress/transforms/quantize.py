"""Weight quantization of a whole model (RTN or GPTQ), block by block, and saving the result packed.

The linear layers of the transformer blocks are quantized; embeddings and norms keep their dtype, and so does
the output head unless ``include_head`` asks for it too (on its own grid, ``head_bits`` / ``head_group_size``:
8 bits per channel by default, which CPU decoding runs by the int8 kernel and which costs next to nothing).
The in-memory model ends up holding the dequantized weights (so it can be evaluated as is), and the report
holds each layer's :class:`QuantizedTensor` (integer codes + grids) for packed storage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from lmcompress.algorithms.actquant import FP8Weight
from lmcompress.algorithms.gptq import GPTQResult, gptq_quantize
from lmcompress.algorithms.obs import damping_fraction, damping_raised
from lmcompress.algorithms.quant import (
    GRIDS,
    KTYPES,
    LEGACY,
    QuantizedTensor,
    QuantSpec,
    kquant_shape,
    rtn_quantize,
    scale_storage_dtype,
)
from lmcompress.calibration.compress import IN_BLOCK
from lmcompress.calibration.distributed import spread
from lmcompress.calibration.engine import BlockInputs, head_input_stats
from lmcompress.calibration.experts import (
    WEIGHTING,
    ExpertSlice,
    model_has_fused_experts,
    note_tokens,
    stack_quantized,
    warn_few_tokens,
)
from lmcompress.calibration.offload import track
from lmcompress.calibration.stats import InputStats
from lmcompress.errors import UserError
from lmcompress.job_options import DEFAULT_PERCDAMP, check_percdamp
from lmcompress.models.families import blocks_path, set_weight_matrix, weight_matrix
from lmcompress.models.gguf_mixes import check_mix, mix_types, type_spec
from lmcompress.transforms.layerwise import compress_layers
from lmcompress.transforms.schemes import check_scheme, fp8_quantize, scheme_defaults, scheme_fields
from lmcompress.transforms.smooth import SmoothConfig, smooth_model

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")


def check_quant_grid(bits: int | None, group_size: int, option: str = "bits", group_option: str = "group_size") -> None:
    """UserError unless ``bits`` is in 2..8 and ``group_size`` is positive or -1 (one grid per output row)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UserError(
            f"{option} must be an integer from 2 to 8 (2, 3, 4 and 8 are the usual choices), got {bits}", param=option
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise UserError(
            f"{group_option} must be a positive number of inputs or -1 (per channel), got {group_size}",
            param=group_option,
        )


@dataclass
class QuantConfig:
    """How to quantize the linear layers of the blocks: ``bits`` per weight on a uniform grid per group.

    ``group_size`` inputs share a scale and zero point (-1: one per output row); where it does not divide a
    layer's width, the last group of each row is shorter and has its own scale and zero point. ``keep_zeros``
    keeps weights that are exactly zero (a pruned model) at exactly zero. ``grid`` is how a group's scale is
    chosen (:mod:`lmcompress.algorithms.quant`): ``minmax`` from its range, ``q4_0`` as llama.cpp's ``Q4_0``
    (4-bit symmetric; with ``group_size`` 32 the codes are llama.cpp's own).
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    grid: str = "minmax"  # "minmax", a llama.cpp 32-weight block type (q4_0, q4_1, q5_0, q5_1, q8_0) or K-quant
    act_order: bool = False  # GPTQ: process inputs by decreasing Hessian diagonal
    static_groups: bool = False  # GPTQ + act-order: fix the grids up front in natural column order
    percdamp: float | str = DEFAULT_PERCDAMP  # GPTQ dampening: fraction of mean diag H, or auto (algorithms.obs)
    blocksize: int = 128  # GPTQ column block (lazy batch updates)
    keep_zeros: bool = True  # weights that are exactly zero stay exactly zero
    include_head: bool = False  # also quantize the output head (lm_head; tied embeddings then share its values)
    head_bits: int = 8  # the head's grid: bits ...
    head_group_size: int = -1  # ... and group (-1: per output channel, the int8 kernel's grid)
    # GPTQ: "sequential" quantizes the layers of a block in the order the block runs them, each group seeing
    # the outputs of those already quantized (GPTQ's "true sequential"; one forward per block); "parallel"
    # gives every layer of a block the unquantized block's inputs (two forwards per block)
    in_block: str = "sequential"
    # llama.cpp's quantization mix (q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, q4_0_mix, q5_0_mix; models/gguf_mixes.py):
    # every layer and the output head on the GGUF type the mix gives it (bits, group_size, sym, grid and head_*
    # are then unused)
    gguf_mix: str | None = None
    # before quantizing, fold per-channel scales into the blocks (transforms.smooth; calibration needed):
    # SmoothQuant's α (a number in [0, 1], or "auto" to search it per block), or AWQ with awq_grid exponents
    smoothquant: float | str | None = None
    awq: bool = False
    awq_grid: int = 20
    # weight-and-activation scheme (transforms.schemes): "w8a8" (int8 weights per channel, int8 activations per
    # token, dynamic) or "fp8" (E4M3 weights per channel, activations per tensor static, or per token if dynamic)
    scheme: str | None = None
    dynamic: bool = False
    # scheme w8a8: activations asymmetric per token (a zero point per token; vLLM's azp int8 kernels)
    asym_activations: bool = False

    def __post_init__(self) -> None:
        scheme_defaults(self)
        self.validate()

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym, self.grid)

    @property
    def head_spec(self) -> QuantSpec:
        """The output head's grid (``include_head``): symmetric, minmax scales."""
        return QuantSpec(self.head_bits, self.head_group_size, True, "minmax")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.smooths or (self.scheme == "fp8" and not self.dynamic)

    @property
    def smooths(self) -> bool:
        """SmoothQuant or AWQ runs before the quantization (:mod:`lmcompress.transforms.smooth`)."""
        return self.smoothquant is not None or self.awq

    def smooth_config(self) -> SmoothConfig:
        """The :class:`~lmcompress.transforms.smooth.SmoothConfig` of ``smoothquant`` / ``awq``: AWQ searched
        on this config's weight grid, SmoothQuant on the activation kind of the scheme (int8 unless fp8)."""
        scheme = getattr(self, "scheme", None)
        act = "fp8" if scheme == "fp8" else "int8_asym" if getattr(self, "asym_activations", False) else "int8"
        return SmoothConfig(
            alpha=self.smoothquant, act=act, awq=self.awq, awq_grid=self.awq_grid, weight_spec=self.spec
        )

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(
                f"method {self.method!r} is unknown: choose one of the quantization methods {', '.join(METHODS)}",
                param="method",
            )
        check_quant_grid(self.bits, self.group_size)
        check_quant_grid(self.head_bits, self.head_group_size, "head_bits", "head_group_size")
        if self.grid not in GRIDS:
            raise UserError(f"grid {self.grid!r} is unknown: choose one of {', '.join(GRIDS)}", param="grid")
        if self.grid in LEGACY and (self.bits, self.sym) != LEGACY[self.grid]:
            bits, sym = LEGACY[self.grid]
            raise UserError(
                f"grid {self.grid} is llama.cpp's {bits}-bit {'symmetric' if sym else 'asymmetric'} grid, but "
                f"bits={self.bits} {'sym' if self.sym else 'asym'} was asked: use bits {bits} with "
                f"{'sym' if sym else 'asym'}, or grid minmax",
                param=("grid", "bits", "sym"),
            )
        if self.gguf_mix is not None:
            self.gguf_mix = check_mix(self.gguf_mix)
        if self.grid in KTYPES and (self.bits, self.group_size, self.sym) != kquant_shape(self.grid):
            bits, group, sym = kquant_shape(self.grid)
            raise UserError(
                f"grid {self.grid} is llama.cpp's {self.grid.upper()}, {bits}-bit codes in groups of {group}: use "
                f"bits {bits} with group_size {group} and {'sym' if sym else 'asymmetric codes (not sym)'}",
                param=("grid", "bits", "group_size", "sym"),
            )
        if self.in_block not in IN_BLOCK:
            raise UserError(f"in_block must be one of {', '.join(IN_BLOCK)}, got {self.in_block!r}", param="in_block")
        if self.method == "rtn" and (self.act_order or self.static_groups):
            raise UserError(
                "act_order and static_groups are GPTQ options; use them with method gptq",
                param=("act_order", "static_groups", "method"),
            )
        if self.static_groups and self.group_size == -1:
            raise UserError(
                "static_groups needs groups: give group_size N (not -1)", param=("static_groups", "group_size")
            )
        self.percdamp = check_percdamp(self.percdamp)
        if self.blocksize <= 0:
            raise UserError(f"blocksize must be positive, got {self.blocksize}", param="blocksize")
        check_scheme(self)
        if self.smooths:
            self.smoothquant = self.smooth_config().alpha  # "auto" or a float; UserError: α outside [0, 1]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantReport:
    """What a quantization run did. ``quantized`` maps parameter names to codes + grids (not in to_dict)."""

    config: dict
    quantized: dict[str, QuantizedTensor]
    layer_loss: dict[str, float]  # GPTQ's estimate of ½‖WX − ŴX‖²/n per layer (empty for RTN)
    damping: dict[str, float] = field(default_factory=dict)  # layers that needed more than percdamp
    weights: int = 0  # number of quantized weights
    wall_time_s: float = 0.0
    # in_block sequential: why blocks fell back to the parallel order (reason → number of blocks), if any did
    in_block_fallback: dict[str, int] = field(default_factory=dict)
    smoothing: dict | None = None  # SmoothQuant / AWQ before quantizing: SmoothReport.recipe_fields()
    fp8: dict[str, FP8Weight] = field(default_factory=dict)  # scheme fp8: codes + scales (not in to_dict)
    input_scales: dict[str, float] = field(default_factory=dict)  # scheme fp8, static: each layer's input scale
    # routed experts of fused 3-D parameters (calibration.experts): routed tokens per expert by fused parameter,
    # and the experts with fewer tokens than inputs (0: solved as if their inputs were white, i.e. by RTN)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    experts_few_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def nominal_bits_per_weight(self) -> float:
        if self.fp8:  # 8-bit codes and one float32 scale per output row
            return sum(8 * w.codes.numel() + 32 * w.scale.numel() for w in self.fp8.values()) / max(self.weights, 1)
        return nominal_bits_per_weight(self.quantized)

    def to_dict(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("quantized", "fp8")}
        out["nominal_bits_per_weight"] = self.nominal_bits_per_weight
        return out

    def recipe_fields(self) -> dict:
        """What the recipe (``lmcompress.json``) says this run did: the config under ``quantization``, the results."""
        return {
            "quantization": self.config,
            "quantized_layers": len(self.quantized) + len(self.fp8),
            "quantized_weights": self.weights,
            "nominal_bits_per_weight": self.nominal_bits_per_weight,
            "layer_loss": self.layer_loss,
            "damping_raised": self.damping,
            "in_block_fallback": self.in_block_fallback,
            **(self._experts_fields() if self.expert_tokens else {}),
            **({"smoothing": self.smoothing} if self.smoothing is not None else {}),
            **scheme_fields(self.config, self.input_scales),
        }

    def _experts_fields(self) -> dict:
        return {
            "expert_statistics": WEIGHTING,
            "expert_tokens": self.expert_tokens,
            "experts_few_tokens": self.experts_few_tokens,
        }


def nominal_bits_per_weight(quantized: dict[str, QuantizedTensor]) -> float:
    """Code bits plus each group's scale (in the dtype packed storage keeps it in: fp16 when that is exact, else
    fp32), its zero point when asymmetric, and any act-order group index, as :func:`pack_quantized` stores them.

    An estimate over the quantized weights stored densely (a sparse layout can take less); ``lmcompress info``
    reports what the saved files really take. llama.cpp's block types count as GGUF stores them (Q4_K: 144 bytes
    per 256 weights, 4.5 bits; Q5_1: 24 bytes per 32, 6 bits).
    """
    bits = weights = 0
    for q in quantized.values():
        if q.spec.grid in KTYPES or q.spec.grid in LEGACY:
            block = KTYPES[q.spec.grid].block_bytes * 8 / 256 if q.spec.grid in KTYPES else _LEGACY_BITS[q.spec.grid]
            bits += q.codes.numel() * block
            weights += q.codes.numel()
            continue
        per_group = 8 * scale_storage_dtype(q.scale).itemsize + (0 if q.spec.sym else q.spec.bits)
        g_idx = 0 if q.g_idx is None else q.g_idx.numel() * max(1, math.ceil(math.log2(q.scale.shape[1])))
        bits += q.codes.numel() * q.spec.bits + q.scale.numel() * per_group + g_idx
        weights += q.codes.numel()
    return bits / max(weights, 1)


# bytes per 32-weight block × 8 / 32: fp16 d (and fp16 m for Q4_1 / Q5_1), the codes (Q5: plus 4 bytes of fifth bits)
_LEGACY_BITS = {"q4_0": 18 * 8 / 32, "q4_1": 20 * 8 / 32, "q5_0": 22 * 8 / 32, "q5_1": 24 * 8 / 32, "q8_0": 34 * 8 / 32}


class _Quantizer:
    """Quantization as a :class:`~lmcompress.transforms.layerwise.LayerSolver`: RTN layer by layer, or GPTQ on
    the layers reading one input stacked; the report's dictionaries filled block by block (``track``)."""

    def __init__(
        self, config: QuantConfig, prefix: str, device: torch.device, types: dict[str, str] | None = None
    ) -> None:
        self.config, self.prefix, self.device, self.spec = config, prefix, device, config.spec
        self.types = types  # gguf_mix: parameter name → GGUF type
        self.quantized: dict[str, QuantizedTensor] = {}
        self.layer_loss: dict[str, float] = {}
        self.damping: dict[str, float] = {}
        self.expert_tokens: dict[str, list[int]] = {}
        self.experts_few_tokens: dict[str, int] = {}

    def spec_of(self, i: int, name: str) -> QuantSpec | None:
        """The grid of layer ``name`` of block ``i``: the config's, or the GGUF mix's (None: left dense)."""
        if self.types is None:
            return self.spec
        return type_spec(self.types.get(f"{self.prefix}.{i}.{name}.weight", "f16"))

    def solve(
        self, i: int, layers: dict[str, nn.Module], group: list[str], stats: InputStats | None
    ) -> GPTQResult | QuantizedTensor | list | None:
        specs = [self.spec_of(i, name) for name in group]
        if stats is None:  # RTN: one layer, from its weights alone
            if specs[0] is None:
                return None
            return rtn_quantize(weight_matrix(layers[group[0]]).to(self.device).float(), specs[0])
        if len(set(specs)) > 1 or specs[0] is None:  # a GGUF mix: one stacked solve per grid, in order
            runs: list[tuple[list[str], QuantSpec | None]] = []
            for name, spec in zip(group, specs, strict=True):
                if runs and runs[-1][1] == spec:
                    runs[-1][0].append(name)
                else:
                    runs.append(([name], spec))
            last = max((k for k, (_, spec) in enumerate(runs) if spec is not None), default=-1)
            return [
                (names, None if spec is None else self._gptq(i, layers, names, stats, spec, consume=k == last))
                for k, (names, spec) in enumerate(runs)
            ]
        return self._gptq(i, layers, group, stats, specs[0], consume=True)

    def _gptq(
        self, i: int, layers: dict[str, nn.Module], group: list[str], stats: InputStats, spec: QuantSpec, consume: bool
    ) -> GPTQResult:
        config = self.config
        w = torch.cat([weight_matrix(layers[name]).float() for name in group])
        mask = (w == 0) if config.keep_zeros else None
        if mask is not None and not mask.any():
            mask = None
        return gptq_quantize(
            w,
            stats.hessian,
            spec,
            blocksize=config.blocksize,
            percdamp=damping_fraction(config.percdamp, w.shape[1], stats.tokens),
            act_order=config.act_order,
            # a fused parameter's experts share one group index (their codes are stacked): act-order experts
            # keep their grids in natural column order
            static_groups=config.static_groups or (config.act_order and isinstance(layers[group[0]], ExpertSlice)),
            mask=mask,
            layer=" + ".join(f"{self.prefix}.{i}.{name}" for name in group),
            consume_hessian=consume,  # each group's statistics serve this one solve (or the last of a mix's)
        )

    def apply(
        self, i: int, layers: dict[str, nn.Module], group: list[str], res: GPTQResult | QuantizedTensor | list | None
    ) -> None:
        if res is None:  # left dense (a GGUF mix's float type)
            return
        if isinstance(res, list):  # a GGUF mix's solves, one per grid
            for names, part in res:
                self.apply(i, layers, names, part)
            return
        if isinstance(res, QuantizedTensor):
            self._store(i, group[0], layers[group[0]], res.dequantize(), res)
            return
        r0 = 0
        for name in group:
            r1 = r0 + weight_matrix(layers[name]).shape[0]
            f = f"{self.prefix}.{i}.{name}"
            self._store(i, name, layers[name], res.weight[r0:r1], res.quantized.rows(r0, r1))
            self.layer_loss[f] = res.row_loss[r0:r1].sum().item()
            if damping_raised(res.damping, self.config.percdamp):
                self.damping[f] = res.damping
            r0 = r1

    def _store(self, i: int, name: str, module: nn.Module, new: torch.Tensor, qt: QuantizedTensor) -> None:
        set_weight_matrix(module, new)
        self.quantized[f"{self.prefix}.{i}.{name}.weight"] = qt.to("cpu")

    def block_done(self, i: int, layers: dict[str, nn.Module]) -> None:
        pass

    def experts_done(
        self, i: int, param: str, names: list[str], layers: dict[str, nn.Module], tokens: list[int] | None
    ) -> None:
        """The experts of the fused parameter ``param`` are quantized: their codes become the parameter's,
        rows stacked in expert order (``[E·out, in]``); their routed token counts go to the report."""
        full = f"{self.prefix}.{i}.{param}"
        parts = [self.quantized.pop(f"{self.prefix}.{i}.{n}.weight") for n in names]
        self.quantized[full] = stack_quantized(parts)
        full_names = [f"{self.prefix}.{i}.{n}" for n in names]
        note_tokens(self.expert_tokens, self.experts_few_tokens, full, full_names, [layers[n] for n in names], tokens)


@torch.no_grad()
def _quantize_embedding(model: nn.Module, types: dict[str, str], quantized: dict[str, QuantizedTensor]) -> None:
    """An untied input embedding on its GGUF mix type, by RTN (as llama-quantize: no importance reaches it), in
    place; a tied one is the head's (already quantized)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        return
    name = next((n for n, p in model.named_parameters() if p is emb.weight), None)
    spec = type_spec(types.get(name, "f16")) if name else None
    if spec is not None:
        qt = rtn_quantize(emb.weight.detach().float(), spec)
        emb.weight.data.copy_(qt.dequantize().to(emb.weight.device, emb.weight.dtype))
        quantized[name] = qt.to("cpu")


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> QuantReport:
    """Quantize the linear layers of ``model``'s blocks in place (they then hold the dequantized weights).

    GPTQ needs ``calib`` (token windows ``[nsamples, seqlen]``) and streams them through the model one block
    at a time, each block seeing the outputs of the already-quantized blocks before it. RTN needs no data.
    """
    start = time.perf_counter()
    config.validate()
    if config.needs_calibration and (calib is None or calib.numel() == 0):
        raise UserError(
            "GPTQ, SmoothQuant and AWQ need calibration data (give calib_data); RTN alone does not", param="calib_data"
        )
    device = torch.device(device)
    if config.scheme is not None and model_has_fused_experts(model):
        raise UserError(
            f"scheme {config.scheme} does not cover the fused routed experts of a mixture-of-experts model yet: "
            "quantize it weight-only (method rtn / gptq with bits, group_size)",
            param="scheme",
        )
    model.eval()
    smoothing = None
    if config.smoothquant is not None and getattr(config, "scheme", None) is None:
        log.warning(
            "SmoothQuant without a weight-and-activation scheme (scheme w8a8 / fp8): weight-only quantization "
            "gains nothing from moving activation outliers into the weights"
        )
    if config.smooths:
        smoothing = smooth_model(model, config.smooth_config(), calib, device=device, progress=progress)
    if config.scheme == "fp8":  # FP8 weights per channel, static input scales from the calibration windows
        layer_loss: dict[str, float] = {}
        fp8, input_scales = fp8_quantize(model, config, calib, device=device, progress=progress, layer_loss=layer_loss)
        return QuantReport(
            config=config.to_dict(),
            quantized={},
            layer_loss=layer_loss,
            weights=sum(w.codes.numel() for w in fp8.values()),
            wall_time_s=time.perf_counter() - start,
            smoothing=None if smoothing is None else smoothing.recipe_fields(),
            fp8=fp8,
            input_scales=input_scales,
        )

    types = None
    if config.gguf_mix is not None and model_has_fused_experts(model):
        raise UserError(
            "gguf_mix does not cover the fused routed experts of a mixture-of-experts model yet: quantize it with "
            "bits / group_size (or a grid such as q4_k) instead",
            param="gguf_mix",
        )
    if config.gguf_mix is not None:  # the GGUF type of every weight under llama.cpp's mix, the head's included
        widths = {k: v.shape[-1] for k, v in model.state_dict().items() if v.dim() == 2}
        types = mix_types(config.gguf_mix, model.config, widths)
    head = config.include_head or types is not None
    quantizer = _Quantizer(config, blocks_path(model), device, types)
    quantized, layer_loss = quantizer.quantized, quantizer.layer_loss
    track(
        model, quantized=quantized, layer_loss=layer_loss, damping=quantizer.damping,
        expert_tokens=quantizer.expert_tokens, experts_few_tokens=quantizer.experts_few_tokens,
    )  # fmt: skip
    last, fallback = compress_layers(
        model,
        quantizer,
        calib if config.method == "gptq" else None,
        device,
        hessian=True,
        in_block=config.in_block,
        last_outputs=head,
        desc=config.method,
        progress=progress,
    )
    head_spec = config.head_spec if types is None else type_spec(types.get("lm_head.weight", "f16"))
    if head and head_spec is not None:
        qt, loss = quantize_head(model, config, last, device, head_spec)
        quantized["lm_head.weight"] = qt
        if loss is not None:
            layer_loss["lm_head"] = loss
    if types is not None:
        _quantize_embedding(model, types, quantized)

    warn_few_tokens(quantizer.experts_few_tokens, "round to nearest")
    return QuantReport(
        config=config.to_dict(),
        quantized=quantized,
        layer_loss=layer_loss,
        damping=quantizer.damping,
        weights=sum(q.codes.numel() for q in quantized.values()),  # codes keep their shape when streamed
        wall_time_s=time.perf_counter() - start,
        in_block_fallback=fallback,
        smoothing=None if smoothing is None else smoothing.recipe_fields(),
        expert_tokens=quantizer.expert_tokens,
        experts_few_tokens=quantizer.experts_few_tokens,
    )


@torch.no_grad()
def quantize_head(
    model: nn.Module, config: QuantConfig, last: BlockInputs | None, device: torch.device, spec: QuantSpec
) -> tuple[QuantizedTensor, float | None]:
    """Quantize the output head on ``spec`` (``config.head_spec``, or the GGUF mix's) in place: RTN, or GPTQ with
    ``H = 2 Σ x xᵀ`` over the final norm's outputs of the last block's outputs ``last`` (what the head reads). A
    head tied to the input
    embeddings is one tensor: the embedding rows take the quantized values too (as llama.cpp's tied output)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UserError("include_head: this model has no output head", param="include_head")
    if head.weight is model.get_input_embeddings().weight:
        log.info("lm_head is tied to the input embeddings: the embeddings take the quantized head's values")
    w = head.weight.detach().to(device).float()
    if config.method == "rtn" or last is None:
        qt, loss = rtn_quantize(w, spec), None
        new = qt.dequantize()
    else:
        stats = head_input_stats(model, last, device, hessian=True)
        res = spread(
            [w],
            lambda weight: gptq_quantize(
                weight, stats.hessian, spec, blocksize=config.blocksize,
                percdamp=damping_fraction(config.percdamp, weight.shape[1], stats.tokens),
                mask=(weight == 0) if config.keep_zeros and bool((weight == 0).any()) else None, layer="lm_head",
                consume_hessian=True,
            ),
        )[0]  # fmt: skip
        qt, new, loss = res.quantized, res.weight, res.row_loss.sum().item()
    head.weight.data.copy_(new.to(head.weight.device, head.weight.dtype))
    return qt.to("cpu"), loss
