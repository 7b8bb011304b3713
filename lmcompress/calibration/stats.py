"""Calibration statistics of a layer's inputs, accumulated token by token."""

from __future__ import annotations

import torch


class InputStats:
    """Sums over calibration tokens ``x`` (rows of the layer input): ``Σ x²`` per feature and ``Σ x xᵀ``."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool) -> None:
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2 X Xᵀ / n``: the Hessian of the mean squared layer reconstruction error."""
        if self.xtx is None:
            raise RuntimeError("Hessian was not collected")
        return self.xtx * (2.0 / max(self.tokens, 1))
