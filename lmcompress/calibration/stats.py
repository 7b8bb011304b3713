"""Calibration statistics of a layer's inputs, accumulated token by token.

Each is fed by ``lmcompress.calibration.engine.collect`` through ``add(x)``, ``x`` one window's tensor
``[..., d]`` whose rows are tokens. ``lmcompress.algorithms.units.UnitStats`` (means and variances for
structured pruning) is one more of the same kind.
"""

from __future__ import annotations

import torch

GRAM_SLAB = 256  # features per row slab in add_gram_; narrower inputs take one plain product


def _slabs(d: int) -> list[tuple[int, int]]:
    """Equal row slabs of at most GRAM_SLAB features (one slab for narrower inputs)."""
    step = d if d <= GRAM_SLAB else -(-d // -(-d // GRAM_SLAB))
    return [(a, min(a + step, d)) for a in range(0, d, step)]


def add_gram_(xtx: torch.Tensor, x: torch.Tensor) -> None:
    """``xtx += xᵀ x`` on and above the diagonal's row slabs, for ``x`` ``[tokens, d]``.

    The Gram matrix is symmetric, so row slab ``i`` (features ``a..b``) is computed from column ``a`` on only:
    with ``k`` slabs that is ``(k + 1) / 2k`` of the full product's work (9/16 for a 2048-wide input). The part
    below the slabs is left as it was; :func:`fill_lower_` copies it from above once all inputs are in.
    """
    for a, b in _slabs(x.shape[1]):
        xtx[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])


def fill_lower_(xtx: torch.Tensor) -> torch.Tensor:
    """Make ``xtx`` whole and symmetric after :func:`add_gram_`: each slab's part right of it, transposed, below it."""
    for a, b in _slabs(xtx.shape[0]):
        if b < xtx.shape[0]:
            xtx[b:, a:b] = xtx[a:b, b:].t()
    return xtx


class InputStats:
    """Sums over calibration tokens ``x`` (rows of the layer input): ``Σ x²`` per feature and ``Σ x xᵀ``."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool) -> None:
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self._whole = True  # _gram's part below the slabs is up to date (see add_gram_)
        self._scaled = False  # xtx has been turned into H in place (see hessian)

    @property
    def xtx(self) -> torch.Tensor | None:
        """``Σ x xᵀ`` over the tokens so far, whole and symmetric (None when not collected)."""
        if self._gram is not None and not self._whole:
            fill_lower_(self._gram)
            self._whole = True
        return self._gram

    @xtx.setter
    def xtx(self, value: torch.Tensor | None) -> None:
        self._gram, self._whole = value, True

    def add(self, x: torch.Tensor) -> None:
        if self._scaled:
            raise RuntimeError("inputs added after the Hessian was taken")
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        self._add_gram(x)

    def _add_gram(self, x: torch.Tensor) -> None:
        if self._gram is not None:
            add_gram_(self._gram, x)
            self._whole = False

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2 X Xᵀ / n``: the Hessian of the mean squared layer reconstruction error.

        Scaled in place on first use (``xtx`` then holds ``H``; no second ``d × d`` copy is ever made), so no
        inputs can be added after it."""
        xtx = self.xtx
        if xtx is None:
            raise RuntimeError("Hessian was not collected")
        if not self._scaled:
            xtx.mul_(2.0 / max(self.tokens, 1))
            self._scaled = True
        return xtx


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
