"""Calibration statistics of a layer's inputs, accumulated token by token.

Each is fed by ``lmcompress.calibration.engine.collect`` through ``add(x)``, ``x`` one window's tensor
``[..., d]`` whose rows are tokens. ``lmcompress.algorithms.units.UnitStats`` (means and variances for
structured pruning) is one more of the same kind.
"""

from __future__ import annotations

import torch

GRAM_SLAB = 256  # features per row slab in add_gram_; narrower inputs take one plain product


def add_gram_(xtx: torch.Tensor, x: torch.Tensor) -> None:
    """``xtx += xᵀ x`` for ``x`` ``[tokens, d]``, computing only the upper triangle's row slabs.

    The Gram matrix is symmetric, so row slab ``i`` (features ``a..b``) is computed from column ``a`` on and
    its part right of the slab is copied, transposed, below it. With ``k`` slabs that is ``(k + 1) / 2k`` of
    the full product's work (9/16 for a 2048-wide input), and ``xtx`` stays whole and symmetric after every call.
    """
    d = x.shape[1]
    if d <= GRAM_SLAB:
        xtx.addmm_(x.t(), x)
        return
    step = -(-d // -(-d // GRAM_SLAB))  # equal slabs of at most GRAM_SLAB features
    for a in range(0, d, step):
        b = min(a + step, d)
        xtx[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])
        if b < d:
            xtx[b:, a:b] = xtx[a:b, b:].t()


class InputStats:
    """Sums over calibration tokens ``x`` (rows of the layer input): ``Σ x²`` per feature and ``Σ x xᵀ``."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool) -> None:
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self._scaled = False  # xtx has been turned into H in place (see hessian)

    def add(self, x: torch.Tensor) -> None:
        if self._scaled:
            raise RuntimeError("inputs added after the Hessian was taken")
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        if self.xtx is not None:
            add_gram_(self.xtx, x)

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2 X Xᵀ / n``: the Hessian of the mean squared layer reconstruction error.

        Scaled in place on first use (``xtx`` then holds ``H``; no second ``d × d`` copy is ever made), so no
        inputs can be added after it."""
        if self.xtx is None:
            raise RuntimeError("Hessian was not collected")
        if not self._scaled:
            self.xtx.mul_(2.0 / max(self.tokens, 1))
            self._scaled = True
        return self.xtx


class InputRows:
    """The inputs themselves, kept: ``rows`` is ``[tokens, d]``, every calibration token in window order.

    For statistics that must revisit the tokens after each decision (expert dropping re-scores the surviving
    experts and measures the routed output error on the same tokens).
    """

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self._parts.append(x.reshape(-1, x.shape[-1]))

    @property
    def rows(self) -> torch.Tensor:
        if not self._parts:
            raise RuntimeError("no inputs were collected")
        return torch.cat(self._parts)
