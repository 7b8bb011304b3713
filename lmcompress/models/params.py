"""Parameter counts (shared by the transforms' reports and ``measure.profile``)."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters, shared (tied) tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
