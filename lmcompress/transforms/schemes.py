"""Weight-and-activation schemes of a whole model: W8A8 int8 and FP8 E4M3 (``QuantConfig.scheme``).

* ``w8a8``: weights int8 per output channel, on lmcompress's 8-bit symmetric per-channel grid (``s = max|w| /
  127.5``, by RTN or GPTQ in :mod:`lmcompress.transforms.quantize`); activations int8 per token, dynamic.
* ``fp8``: weights FP8 E4M3 per output channel, by round to nearest (:class:`~lmcompress.algorithms.actquant.
  FP8Weight`) or by GPTQ on the FP8 grid (:mod:`lmcompress.algorithms.gptq_fp8`); activations FP8 per tensor
  with one static scale per layer, ``max|x| / 448`` over the calibration windows, or (``dynamic``) per token.

The linear layers of the blocks are quantized; the embeddings, norms and output head stay in float, as vLLM's
schemes keep them. In memory the layers end up holding their dequantized weights (plain ``nn.Linear``); the
recipe's ``scheme`` entry (:func:`scheme_fields`) tells :func:`lmcompress.load` to rebuild them as
:class:`~lmcompress.algorithms.actquant.ActQuantLinear`, which quantize their inputs as the scheme does.
"""

from __future__ import annotations

import torch
from torch import nn

from lmcompress.algorithms.actquant import SCHEMES, ActQuantLinear, ActScheme, FP8Weight, static_fp8_scale
from lmcompress.algorithms.gptq_fp8 import gptq_fp8
from lmcompress.algorithms.obs import damping_fraction
from lmcompress.calibration import distributed
from lmcompress.calibration.engine import (
    BlockInputs,
    collect,
    collect_input_stats,
    for_each_block,
    run_block,
    shared_inputs,
    walk_blocks,
)
from lmcompress.calibration.offload import active_stream
from lmcompress.errors import UserError
from lmcompress.models.families import blocks_path, find_prunable, set_weight_matrix, weight_matrix

WEIGHTS = {"w8a8": "int8 per channel", "fp8": "fp8_e4m3 per channel"}


def scheme_defaults(config) -> None:
    """A scheme fixes the weight grid (8 bits per output channel): ``bits`` / ``group_size`` left at
    :class:`QuantConfig`'s defaults (4, 128) take 8 and -1; other values are refused by :func:`check_scheme`."""
    if config.scheme in SCHEMES and (config.bits, config.group_size) == (4, 128):
        config.bits, config.group_size = 8, -1


def check_scheme_grid(scheme: str, bits: int, group_size: int) -> None:
    """UserError unless ``scheme`` is known and ``bits`` / ``group_size`` are its 8 bits per output channel."""
    if scheme not in SCHEMES:
        raise UserError(
            f"scheme {scheme!r} is unknown: choose w8a8 (int8 weights and activations) or fp8 (E4M3)", param="scheme"
        )
    if (bits, group_size) != (8, -1):
        raise UserError(
            f"scheme {scheme} quantizes weights on an 8-bit grid per output channel, but bits {bits} with group_size "
            f"{group_size} was asked: leave bits and group_size out (or give bits 8, group_size -1), or quantize "
            "the weights alone without a scheme",
            param=("scheme", "bits", "group_size"),
        )


def check_scheme(config) -> None:
    """UserError for a scheme a :class:`QuantConfig` cannot run, naming the option that conflicts."""
    scheme = config.scheme
    if config.asym_activations and scheme != "w8a8":
        raise UserError(
            "asym_activations applies to scheme w8a8 (int8 activations with a zero point per token): give scheme "
            "w8a8, or drop asym_activations",
            param=("asym_activations", "scheme"),
        )
    if scheme is None:
        if config.dynamic:
            raise UserError(
                "dynamic applies to scheme fp8 (per-token activation scales instead of static ones); "
                "give scheme fp8, or drop dynamic",
                param=("dynamic", "scheme"),
            )
        return
    check_scheme_grid(scheme, config.bits, config.group_size)
    if not config.sym or config.grid != "minmax":
        raise UserError(
            f"scheme {scheme} uses symmetric per-channel scales (compressed-tensors' convention): drop asym and "
            f"grid {config.grid}",
            param=("scheme", "sym", "grid"),
        )
    if config.include_head:
        raise UserError(
            f"scheme {scheme} keeps the output head in float (as vLLM's W8A8 / FP8 schemes do): drop include_head",
            param=("scheme", "include_head"),
        )


def scheme_fields(config: dict, input_scales: dict[str, float]) -> dict:
    """The recipe's ``scheme`` entry (nothing without a scheme): name, weight and activation quantization, and
    the static per-tensor input scales by layer (FP8 static)."""
    scheme = config.get("scheme")
    if scheme is None:
        return {}
    symmetric = not config.get("asym_activations")
    if scheme == "w8a8":
        activations = "int8 per token, dynamic" + ("" if symmetric else ", asymmetric (zero point per token)")
    else:
        activations = "fp8_e4m3 per token, dynamic" if config.get("dynamic") else "fp8_e4m3 per tensor, static"
    return {
        "scheme": {
            "name": scheme,
            "weights": WEIGHTS[scheme],
            "activations": activations,
            "activations_symmetric": symmetric,
            "input_scales": dict(input_scales),
        }
    }


class _AbsMax:
    """The largest ``|x|`` fed to :meth:`add` (a :class:`~lmcompress.calibration.engine.Statistic`)."""

    def __init__(self) -> None:
        self.value = 0.0

    def add(self, x: torch.Tensor) -> None:
        self.value = max(self.value, float(x.detach().abs().max()))


def _swap(block: nn.Module, layers: dict[str, nn.Module], new: dict[str, nn.Module]) -> None:
    for name, module in new.items():
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, module)
    layers.update(new)


Solved = dict[str, tuple[FP8Weight, float | None]]  # layer name → its FP8 codes and GPTQ's loss estimate (RTN: None)


def _gptq_fp8_group(
    layers: dict[str, nn.Module], group: list[str], stats, config, device: torch.device, prefix: str
) -> Solved:
    """GPTQ on the FP8 grid of the layers ``group`` (one input; its statistics ``stats``) stacked row-wise."""
    w = torch.cat([weight_matrix(layers[name]).to(device).float() for name in group])
    mask = (w == 0) if config.keep_zeros else None
    solved = gptq_fp8(
        w,
        stats.hessian,
        blocksize=config.blocksize,
        percdamp=damping_fraction(config.percdamp, w.shape[1], stats.tokens),
        act_order=config.act_order,
        mask=mask if mask is not None and mask.any() else None,
        layer=" + ".join(f"{prefix}.{name}" for name in group),
        consume_hessian=True,
    )
    out: Solved = {}
    row = 0
    for name in group:
        end = row + weight_matrix(layers[name]).shape[0]
        codes = FP8Weight(solved.fp8.codes[row:end], solved.fp8.scale[row:end])
        out[name] = codes, solved.row_loss[row:end].sum().item()
        row = end
    return out


def _gptq_fp8_block(
    block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module], config, device: torch.device, prefix: str
) -> Solved:
    """GPTQ per group of layers reading one input, each group's dequantized weights set in place before the next
    group's statistics; ``in_block`` sequential: each group's Hessian is collected after the groups before it are
    quantized (one more pass over the windows per group), parallel: all from the float block."""
    parallel = config.in_block == "parallel"
    stats = collect_input_stats(block, inputs, list(layers), hessian=parallel)
    out: Solved = {}
    for group in shared_inputs(layers, stats):
        own = stats[group[0]] if parallel else collect_input_stats(block, inputs, group, hessian=True)[group[0]]
        for name, (fp8, loss) in _gptq_fp8_group(layers, group, own, config, device, prefix).items():
            set_weight_matrix(layers[name], fp8.dequantize().to(weight_matrix(layers[name]).device))
            out[name] = fp8, loss
    return out


def _run_as_scheme(
    block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module], fp8: dict[str, FP8Weight], dynamic: bool
) -> dict[str, float]:
    """Replace ``inputs`` by the block's outputs as the scheme computes them (FP8 weights ``fp8``, inputs per token
    or, unless ``dynamic``, with static scales calibrated here: ``max|x| / 448`` over every token a layer reads).
    Returns those static scales by layer name (empty when dynamic)."""
    scales: dict[str, float] = {}
    if not dynamic:
        absmax = collect(block, inputs, list(layers), lambda _n, _m: _AbsMax())
        scales = {name: static_fp8_scale(absmax[name].value) for name in layers}
    plain = dict(layers)
    simulated = {}
    for name, module in plain.items():
        w = fp8[name].to(weight_matrix(module).device)
        simulated[name] = ActQuantLinear(w.codes, w.scale, module.bias, ActScheme("fp8", static_scale=scales.get(name)))
    _swap(block, layers, simulated)  # the next block reads this one's outputs as the scheme computes them
    run_block(block, inputs, keep="inplace")
    _swap(block, layers, plain)
    return scales


@torch.no_grad()
def fp8_quantize(
    model: nn.Module,
    config,
    calib: torch.Tensor | None,
    *,
    device: torch.device,
    progress: bool = True,
    layer_loss: dict[str, float] | None = None,
) -> tuple[dict[str, FP8Weight], dict[str, float]]:
    """Quantize the blocks' linear layers to FP8 E4M3 per output channel, in place (each keeps its dequantized
    weight), by round to nearest or (``config.method == "gptq"``) by GPTQ on the FP8 grid
    (:func:`~lmcompress.algorithms.gptq_fp8.gptq_fp8`, the layers that read one input solved together). Returns
    ``(weights, input_scales)``: the FP8 codes and scales by parameter name, and (static activations) each layer's
    input scale by module name. GPTQ's loss estimate of each layer goes into ``layer_loss`` by module name.

    With calibration data the blocks are walked in order: each block reads the outputs of the blocks before it
    run as the scheme runs them (FP8 weights, inputs quantized statically or per token); GPTQ's Hessians are
    collected from those inputs in float (``in_block`` as for the integer grids), and each static input scale is
    ``max|x| / 448`` over every calibration token the layer reads once its block's weights are quantized.
    """
    if active_stream(model) is not None:
        raise UserError(
            "scheme fp8 does not stream from disk yet (offload disk, resume): load the model whole (offload none)",
            param=("scheme", "offload"),
        )
    if distributed.world()[1] > 1:
        raise UserError("scheme fp8 does not run under torch.distributed yet: run it as one process", param="scheme")
    prefix = blocks_path(model)
    weights: dict[str, FP8Weight] = {}
    input_scales: dict[str, float] = {}
    gptq = config.method == "gptq"

    def rounded(layers: dict[str, nn.Module]) -> Solved:  # each layer's dequantized weight set in place
        out: Solved = {}
        for name, m in layers.items():
            out[name] = FP8Weight.quantize(weight_matrix(m).to(device).float()), None
            set_weight_matrix(m, out[name][0].dequantize().to(weight_matrix(m).device))
        return out

    def store(i: int, solved: Solved) -> None:
        for name, (fp8, loss) in solved.items():
            weights[f"{prefix}.{i}.{name}.weight"] = fp8.to("cpu")
            if loss is not None and layer_loss is not None:
                layer_loss[f"{prefix}.{i}.{name}"] = loss

    if calib is None or (config.dynamic and not gptq):  # round to nearest, scaled per token: no data to read
        if gptq or not config.dynamic:
            raise UserError("GPTQ and static FP8 activation scales need calibration data (give calib_data)",
                            param="calib_data")  # fmt: skip
        for_each_block(model, lambda i, b: store(i, rounded(find_prunable(b))), desc="fp8",
                       progress=progress)  # fmt: skip
        return weights, input_scales

    def visit(i: int, block: nn.Module, inputs: BlockInputs) -> bool:
        layers = find_prunable(block)
        solved = _gptq_fp8_block(block, inputs, layers, config, device, f"{prefix}.{i}") if gptq else rounded(layers)
        store(i, solved)
        scales = _run_as_scheme(block, inputs, layers, {name: fp8 for name, (fp8, _) in solved.items()}, config.dynamic)
        input_scales.update({f"{prefix}.{i}.{name}": scale for name, scale in scales.items()})
        return True

    desc = "fp8 gptq" if gptq else "fp8 calibration"
    walk_blocks(model, calib, device, visit, desc=desc, progress=progress, last_outputs=False)
    return weights, input_scales
