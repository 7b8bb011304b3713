"""A search whose fitness sees the weight-and-activation scheme the model will be deployed with (W8A8 / FP8).

A sparsity search with ``scheme`` scores every candidate as ``lmcompress quantize OUT --scheme SCHEME --method rtn``
would run it: each block linear layer's (pruned) weight quantized per output channel by round to nearest (int8 on
the ``max|w| / 127.5`` grid, or FP8 E4M3), and its input quantized at run time (int8 per token; FP8 per token, the
``dynamic`` variant). The layers compute exactly what :class:`~lmcompress.algorithms.actquant.ActQuantLinear`
computes in a loaded scheme folder. The dense reference of the KL fitness stays the unquantized model.

The output of the search is still the pruned model in float: quantize it with the same scheme to deploy it.
Static FP8 scales are calibrated on the final model, so a search simulates FP8 with per-token scales only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from lmcompress.algorithms.actquant import SCHEMES, ActScheme, dequantize, weight_scheme_quantize
from lmcompress.errors import UserError
from lmcompress.models.families import prunable_layers, weight_matrix


def check_search_scheme(scheme: str | None, dynamic: bool, kind: str, mode: str | None = None) -> None:
    """UserError unless a search of budget ``kind`` (and ``mode``: ``max_loss`` / ``tune`` / None) can simulate
    ``scheme`` in its fitness."""
    if scheme is None:
        if dynamic:
            raise UserError("dynamic applies to scheme fp8: give scheme fp8, or drop dynamic", param="dynamic")
        return
    if scheme not in SCHEMES:
        raise UserError(f"scheme {scheme!r} is unknown: choose w8a8 or fp8", param="scheme")
    if kind != "sparsity":
        raise UserError(
            f"scheme {scheme} quantizes every weight to 8 bits per output channel, so it leaves no bit widths to "
            f"search: use it with a sparsity budget (the fitness then runs each pruned candidate as {scheme})",
            param=("scheme", "budget"),
        )
    if scheme == "fp8" and not dynamic:
        raise UserError(
            "a search simulates scheme fp8 with per-token activation scales only (static scales are calibrated "
            "on the final model): add dynamic",
            param=("scheme", "dynamic"),
        )
    if mode is not None:
        raise UserError(f"scheme is not supported with {mode} yet: search per-unit levels at a budget", param="scheme")


class SchemeSimulation:
    """While :meth:`active`, the block linear layers of ``model`` run as ``scheme`` runs them.

    Each layer computes ``F.linear(act.fake_quantize(x), Q(W), b)`` in float32 (cast back to ``x``'s dtype), as
    :class:`~lmcompress.algorithms.actquant.ActQuantLinear` does, with ``Q(W)`` the dequantized round-to-nearest
    per-channel weight. ``Q(W)`` is kept per layer until :meth:`forget` is told that the layer's weight changed.
    """

    def __init__(self, model: nn.Module, scheme: str, dynamic: bool = False) -> None:
        check_search_scheme(scheme, dynamic, "sparsity")
        self.layers = prunable_layers(model)
        self.act = ActScheme("int8") if scheme == "w8a8" else ActScheme("fp8")
        self.weight_kind = self.act.kind
        self.scheme = scheme
        self._weights: dict[str, torch.Tensor] = {}

    def forget(self, layers: Iterable[str] | None = None) -> None:
        """Drop the quantized weights of ``layers`` (all when None): their float weights changed."""
        if layers is None:
            self._weights.clear()
        for name in layers or ():
            self._weights.pop(name, None)

    def weight(self, name: str) -> torch.Tensor:
        """Layer ``name``'s weight as the scheme stores it, dequantized (float32, ``[out, in]``)."""
        if name not in self._weights:
            w = weight_matrix(self.layers[name]).detach()
            self._weights[name] = dequantize(*weight_scheme_quantize(w, self.weight_kind))
        return self._weights[name]

    def _forward(self, name: str, module: nn.Module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            bias = None if module.bias is None else module.bias.float()
            return F.linear(self.act.fake_quantize(x), self.weight(name), bias).to(x.dtype)

        return forward

    @contextmanager
    def active(self) -> Iterator[None]:
        """The layers run the scheme inside the block; outside it they are the plain layers again."""
        for name, module in self.layers.items():
            module.forward = self._forward(name, module)
        try:
            yield
        finally:
            for module in self.layers.values():
                del module.forward  # the class's forward again


@contextmanager
def simulated(simulation: SchemeSimulation | None) -> Iterator[None]:
    """``simulation.active()``, or nothing when there is no scheme."""
    if simulation is None:
        yield
        return
    with simulation.active():
        yield
