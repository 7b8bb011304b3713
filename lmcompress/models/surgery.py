"""Module surgery that a config cannot express: resized or factorized layers, recorded so they can be rebuilt.

A compressed model whose layers no longer match its config (per-layer FFN widths, head counts, low-rank
factors, fewer experts in some layers) is saved with a list of *records* in its recipe (``"surgery"``).
:func:`apply_surgery` replays them on a model freshly built from the config, after which the saved
state dict fits exactly. Records are plain JSON::

    {"module": "model.layers.3.mlp.up_proj", "kind": "linear", "in_features": 64, "out_features": 90, "bias": false}
    {"module": "model.layers.0.mlp.c_fc", "kind": "conv1d", "in_features": 64, "out_features": 200}
    {"module": "model.layers.1.self_attn.o_proj", "kind": "lowrank", "in_features": 64, "out_features": 64,
     "rank": 12, "bias": false}
    {"module": "model.layers.0.mlp.experts", "kind": "param", "name": "down_proj", "shape": [6, 64, 128]}
    {"module": "model.layers.0.mlp.experts", "kind": "attr", "name": "num_experts", "value": 6}
    {"module": "model.layers.5.self_attn", "kind": "skip", "sublayer": "attention", "layer_idx": 5}
"""

from __future__ import annotations

import torch
from torch import nn

from lmcompress.errors import UserError


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a Linear ``[out × in]`` stored as ``[out × rank] @ [rank × in]``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, **factory) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, **factory)
        self.up = nn.Linear(rank, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out × in]`` product, for code that reads ``.weight`` (not a parameter)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SkippedSublayer(nn.Module):
    """A skipped attention or FFN sublayer: it outputs zeros, so the block's residual stream passes it unchanged.

    An attention returns ``(zeros, None)`` like the attention modules it replaces, and still appends a one-wide
    zero key / value per token to a KV cache it is given (layer ``layer_idx``), so that the cache's length, which
    the model reads from its first layer, keeps counting the tokens seen. It holds no weights.
    """

    def __init__(self, sublayer: str, layer_idx: int | None = None) -> None:
        super().__init__()
        if sublayer not in ("attention", "ffn"):
            raise UserError(f"unknown skipped sublayer {sublayer!r}: attention or ffn")
        self.sublayer, self.layer_idx = sublayer, layer_idx

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.sublayer == "ffn":
            return torch.zeros_like(hidden)
        caches = [kwargs.get(k) for k in ("cache", "past_key_values", "past_key_value", "layer_past")]
        cache = next((c for c in caches if c is not None), None)
        if cache is not None and hasattr(cache, "update") and self.layer_idx is not None:
            stub = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(stub, stub, self.layer_idx)
        return torch.zeros_like(hidden), None

    def extra_repr(self) -> str:
        return f"sublayer={self.sublayer}, layer_idx={self.layer_idx}"


def record_skip(name: str, module: SkippedSublayer) -> dict:
    return {"module": name, "kind": "skip", "sublayer": module.sublayer, "layer_idx": module.layer_idx}


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        raise UserError(f"surgery record names {path!r}, which this model does not have") from None
    if not hasattr(parent, attr):
        raise UserError(f"surgery record names {path!r}, which this model does not have")
    return parent, attr


def _factory(module: nn.Module) -> dict:
    ref = next(module.parameters(), None)
    return {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}


def record_linear(name: str, module: nn.Module) -> dict:
    """The record that rebuilds ``module`` (an ``nn.Linear`` or GPT-2 ``Conv1D``) at its current shape."""
    if isinstance(module, nn.Linear):
        return {
            "module": name,
            "kind": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if type(module).__name__ == "Conv1D":  # weight stored [in, out]
        n_in, n_out = module.weight.shape
        return {"module": name, "kind": "conv1d", "in_features": n_in, "out_features": n_out}
    raise TypeError(f"cannot record a {type(module).__name__} at {name}")


def record_lowrank(name: str, module: LowRankLinear) -> dict:
    return {
        "module": name,
        "kind": "lowrank",
        "in_features": module.in_features,
        "out_features": module.out_features,
        "rank": module.rank,
        "bias": module.up.bias is not None,
    }


def apply_surgery(model: nn.Module, records: list[dict]) -> nn.Module:
    """Replay ``records`` on ``model`` in place (new modules get fresh, uninitialized-by-intent weights)."""
    for rec in records:
        kind, path = rec.get("kind"), rec.get("module", "")
        parent, attr = _parent(model, path)
        old = getattr(parent, attr)
        if kind == "linear":
            new = nn.Linear(rec["in_features"], rec["out_features"], bias=rec.get("bias", True), **_factory(old))
            setattr(parent, attr, new)
        elif kind == "conv1d":
            old.weight = nn.Parameter(old.weight.new_empty(rec["in_features"], rec["out_features"]))
            old.bias = nn.Parameter(old.bias.new_empty(rec["out_features"]))
            old.nf = rec["out_features"]
            if hasattr(old, "nx"):
                old.nx = rec["in_features"]
        elif kind == "lowrank":
            new = LowRankLinear(
                rec["in_features"], rec["out_features"], rec["rank"], bias=rec.get("bias", True), **_factory(old)
            )
            setattr(parent, attr, new)
        elif kind == "param":
            tensor = getattr(old, rec["name"])
            setattr(old, rec["name"], nn.Parameter(tensor.new_empty(rec["shape"]), requires_grad=False))
        elif kind == "attr":
            setattr(old, rec["name"], rec["value"])
        elif kind == "skip":
            setattr(parent, attr, SkippedSublayer(rec["sublayer"], rec.get("layer_idx")))
        else:
            raise UserError(
                f"unknown surgery record kind {kind!r} for {path!r}: was this folder written by a newer lmcompress?"
            )
    return model
