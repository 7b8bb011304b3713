"""How sparse a model is: the fraction of zero weights in its blocks' linear layers (read by every layer above)."""

from __future__ import annotations

from torch import nn

from lmcompress.models.families import prunable_layers, weight_matrix


def zero_fractions(modules: dict[str, nn.Module]) -> dict[str, float]:
    """Fraction of exactly-zero weights of each module, by name."""
    return {n: (weight_matrix(m) == 0).float().mean().item() for n, m in modules.items()}


def measure_sparsity(model: nn.Module) -> tuple[float, dict[str, float]]:
    """Fraction of zeros over the prunable layers of the blocks, overall (weighted by size) and per layer."""
    modules = prunable_layers(model)
    per_layer = zero_fractions(modules)
    total = sum(weight_matrix(m).numel() for m in modules.values())
    zeros = sum(per_layer[n] * weight_matrix(m).numel() for n, m in modules.items())
    return zeros / max(total, 1), per_layer
