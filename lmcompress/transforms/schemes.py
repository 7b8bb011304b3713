"""Weight-and-activation schemes of a whole model: W8A8 int8 and FP8 E4M3 (``QuantConfig.scheme``).

* ``w8a8``: weights int8 per output channel, on lmcompress's 8-bit symmetric per-channel grid (``s = max|w| /
  127.5``, by RTN or GPTQ in :mod:`lmcompress.transforms.quantize`); activations int8 per token, dynamic.
* ``fp8``: weights FP8 E4M3 per output channel, rounded to nearest (:class:`~lmcompress.algorithms.actquant.
  FP8Weight`); activations FP8 per tensor with one static scale per layer, ``max|x| / 448`` over the calibration
  windows, or (``dynamic``) per token.

The linear layers of the blocks are quantized; the embeddings, norms and output head stay in float, as vLLM's
schemes keep them. In memory the layers end up holding their dequantized weights (plain ``nn.Linear``); the
recipe's ``scheme`` entry (:func:`scheme_fields`) tells :func:`lmcompress.load` to rebuild them as
:class:`~lmcompress.algorithms.actquant.ActQuantLinear`, which quantize their inputs as the scheme does.
"""

from __future__ import annotations

import torch
from torch import nn

from lmcompress.algorithms.actquant import SCHEMES, ActQuantLinear, ActScheme, FP8Weight, static_fp8_scale
from lmcompress.calibration import distributed
from lmcompress.calibration.engine import BlockInputs, collect, for_each_block, run_block, walk_blocks
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
    if scheme == "fp8" and config.method != "rtn":
        raise UserError(
            "scheme fp8 rounds weights to nearest (method rtn): GPTQ's column solver works on lmcompress's "
            "uniform integer grids, and FP8's grid is a floating-point one (its spacing doubles with every "
            "binade), which it does not implement; give method rtn, or scheme w8a8 for GPTQ",
            param=("scheme", "method"),
        )


def act_scheme(scheme: str, static_scale: float | None = None) -> ActScheme:
    """How a layer of ``scheme`` quantizes its input (``static_scale``: an FP8 layer's calibrated scale)."""
    return ActScheme("int8") if scheme == "w8a8" else ActScheme("fp8", static_scale=static_scale)


def scheme_fields(config: dict, input_scales: dict[str, float]) -> dict:
    """The recipe's ``scheme`` entry (nothing without a scheme): name, weight and activation quantization, and
    the static per-tensor input scales by layer (FP8 static)."""
    scheme = config.get("scheme")
    if scheme is None:
        return {}
    if scheme == "w8a8":
        activations = "int8 per token, dynamic"
    else:
        activations = "fp8_e4m3 per token, dynamic" if config.get("dynamic") else "fp8_e4m3 per tensor, static"
    return {
        "scheme": {
            "name": scheme,
            "weights": WEIGHTS[scheme],
            "activations": activations,
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


@torch.no_grad()
def fp8_quantize(
    model: nn.Module, config, calib: torch.Tensor | None, *, device: torch.device, progress: bool = True
) -> tuple[dict[str, FP8Weight], dict[str, float]]:
    """Quantize the blocks' linear layers to FP8 E4M3 per output channel, in place (each keeps its dequantized
    weight). Returns ``(weights, input_scales)``: the FP8 codes and scales by parameter name, and (static
    activations) each layer's input scale by module name.

    Static scales are calibrated block after block: each block, its weights already quantized, reads the
    outputs of the blocks before it run as the scheme runs them (FP8 weights and statically quantized inputs),
    and each layer's scale is ``max|x| / 448`` over every calibration token it reads.
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

    def quantize_weights(i: int, layers: dict[str, nn.Module]) -> None:
        for name, module in layers.items():
            home = weight_matrix(module).device
            fp8 = FP8Weight.quantize(weight_matrix(module).to(device).float())
            set_weight_matrix(module, fp8.dequantize().to(home))
            weights[f"{prefix}.{i}.{name}.weight"] = fp8.to("cpu")

    if config.dynamic or calib is None:
        if not config.dynamic:
            raise UserError("static FP8 activation scales need calibration data (give calib_data)", param="calib_data")
        for_each_block(model, lambda i, block: quantize_weights(i, find_prunable(block)), desc="fp8", progress=progress)
        return weights, input_scales

    def visit(i: int, block: nn.Module, inputs: BlockInputs) -> bool:
        layers = find_prunable(block)
        quantize_weights(i, layers)
        absmax = collect(block, inputs, list(layers), lambda _n, _m: _AbsMax())
        plain = dict(layers)
        simulated = {}
        for name, module in plain.items():
            scale = static_fp8_scale(absmax[name].value)
            input_scales[f"{prefix}.{i}.{name}"] = scale
            w = weights[f"{prefix}.{i}.{name}.weight"].to(weight_matrix(module).device)
            simulated[name] = ActQuantLinear(w.codes, w.scale, module.bias, ActScheme("fp8", static_scale=scale))
        _swap(block, layers, simulated)  # the next block reads this one's outputs as the scheme computes them
        run_block(block, inputs, keep="inplace")
        _swap(block, layers, plain)
        return True

    walk_blocks(model, calib, device, visit, desc="fp8 calibration", progress=progress, last_outputs=False)
    return weights, input_scales
