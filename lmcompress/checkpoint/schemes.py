"""Loading a weight-and-activation scheme folder (W8A8 int8, FP8): the layers rebuilt to run as the scheme does.

A folder that ``lmcompress quantize --scheme w8a8|fp8`` wrote has a ``scheme`` entry in its recipe (name,
weight and activation quantization, static input scales by layer; ``transforms.schemes.scheme_fields``) and its
weights packed: int8 codes as lmcompress's 8-bit symmetric per-channel :class:`QuantizedTensor`, FP8 codes as
``float8_e4m3fn`` with per-row scales. :func:`install_scheme` replaces each of those layers by an
:class:`~lmcompress.algorithms.actquant.ActQuantLinear` holding the stored codes, so that ``eval``,
``generate`` and the Python API quantize activations exactly as the exported checkpoint runs them.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmcompress.algorithms.actquant import SCHEMES, ActQuantLinear, ActScheme, FP8Weight
from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.errors import UserError


def recipe_scheme(recipe: dict | None, folder: str | Path = "") -> dict | None:
    """The recipe's ``scheme`` entry, checked (None for a folder without one)."""
    scheme = (recipe or {}).get("scheme")
    if scheme is None:
        return None
    if not isinstance(scheme, dict) or scheme.get("name") not in SCHEMES:
        raise UserError(f"{folder} names an unknown quantization scheme {scheme!r}; the folder is damaged or newer")
    scales = scheme.get("input_scales") or {}
    if not isinstance(scales, dict) or not all(isinstance(v, int | float) and v > 0 for v in scales.values()):
        raise UserError(f"{folder} has invalid static input scales in its scheme; the folder is damaged")
    return scheme


def layer_act(scheme: dict, module_name: str) -> ActScheme:
    """How the layer ``module_name`` of a scheme folder quantizes its input."""
    if scheme["name"] == "w8a8":
        return ActScheme("int8", symmetric=scheme.get("activations_symmetric", True) is not False)
    scales = scheme.get("input_scales") or {}
    if "static" in scheme.get("activations", "") and module_name not in scales:
        raise UserError(f"the scheme has no static input scale for {module_name}; the folder is damaged")
    return ActScheme("fp8", static_scale=scales.get(module_name))


def install_scheme(
    model: nn.Module, scheme: dict, quantized: dict[str, QuantizedTensor], fp8: dict[str, FP8Weight]
) -> list[str]:
    """Replace the scheme's layers of ``model`` (filled with their dequantized weights) by
    :class:`ActQuantLinear` modules holding the stored codes; in place. Returns the replaced module names."""
    from transformers.pytorch_utils import Conv1D

    weights: dict[str, QuantizedTensor | FP8Weight] = {**quantized, **fp8}
    if not weights:
        raise UserError(f"the folder's recipe names scheme {scheme['name']} but it holds no quantized layers")
    names = []
    for param, w in weights.items():
        name = param.removesuffix(".weight")
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear | Conv1D):
            raise UserError(f"{name} is a {type(module).__name__}, not a linear layer; the folder is damaged")
        act = layer_act(scheme, name)
        if isinstance(w, FP8Weight):
            layer = ActQuantLinear(w.codes, w.scale, module.bias, act)
        else:
            try:
                layer = ActQuantLinear.from_quantized(w, module.bias, act)
            except ValueError as exc:
                raise UserError(f"{name}: {exc}; the folder is damaged") from None
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        names.append(name)
    return names


def plain_linears(model: nn.Module) -> dict[str, ActQuantLinear]:
    """Replace, in place, every :class:`ActQuantLinear` of ``model`` by an ``nn.Linear`` holding its dequantized
    weight (float32; inputs no longer quantized). Returns the replaced modules by name."""
    replaced = {name: m for name, m in model.named_modules() if isinstance(m, ActQuantLinear)}
    for name, m in replaced.items():
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.codes.device)
        linear.weight.data = m.dequantized_weight()
        if m.bias is not None:
            linear.bias.data = m.bias.detach().float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return replaced
