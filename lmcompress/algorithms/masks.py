"""Sparsity patterns and turning importance scores into pruning masks.

Convention used throughout lmcompress: a *mask* is a bool tensor shaped like the weight ``[out, in]``
that is ``True`` where the weight is removed (set to zero).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Pattern:
    """Where zeros may go: anywhere (``unstructured``) or N kept out of every M consecutive inputs.

    ``2:4`` follows NVIDIA's convention: at most 2 non-zeros in every group of 4 consecutive weights of
    a row, i.e. 50% sparsity that sparse tensor cores can use.
    """

    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (None for unstructured)."""
        return None if self.m is None else 1.0 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.m is None else f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str | Pattern | None) -> Pattern:
        """Parse ``"unstructured"``, ``"2:4"``, ``"4:8"`` or any ``"N:M"`` with 0 < N < M."""
        if isinstance(text, Pattern):
            return text
        if text is None or text.strip().lower() in ("", "unstructured", "none"):
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"malformed sparsity pattern {text!r}: use 'unstructured' or 'N:M' such as '2:4' or '4:8'")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"malformed N:M pattern {text!r}: need 0 < N < M (N weights kept in every M), e.g. '2:4'")
        return cls(n, m)


def check_nm_shape(weight: torch.Tensor, pattern: Pattern) -> None:
    """Raise a clear error if the input dimension cannot be split into groups of M."""
    if pattern.is_nm and weight.shape[1] % pattern.m != 0:
        raise ValueError(
            f"cannot apply {pattern} to a layer with {weight.shape[1]} inputs: not a multiple of {pattern.m}"
        )


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Prune the ``M-N`` lowest scores in every group of ``M`` consecutive inputs of each row."""
    check_nm_shape(scores, pattern)
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    drop = torch.topk(groups, pattern.m - pattern.n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's ``k``-th smallest entry (1-based) of a float32 ``[rows, n]`` tensor, as ``[rows, 1]``."""
    if scores.device.type != "cpu":
        return torch.kthvalue(scores, k, dim=1, keepdim=True).values
    part = np.partition(scores.detach().numpy(), k - 1, axis=1)
    return torch.from_numpy(np.ascontiguousarray(part[:, k - 1 : k]))


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the ``k`` lowest entries of each row of ``scores`` (``[rows, n]``; ties: lowest index).

    A selection, not a sort: each row's k-th smallest value is the threshold, entries below it are taken, and
    the first entries equal to it fill the count. On a CPU the threshold comes from NumPy's introselect
    (``np.partition``: about ten times faster than ``torch.kthvalue`` on a row of 10⁵ entries, and the
    same value, the k-th order statistic being unique); elsewhere from ``torch.kthvalue``.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[1]:
        return torch.ones_like(scores, dtype=torch.bool)
    scores = scores.float()
    threshold = kth_smallest(scores, k)
    at_most = scores <= threshold
    if bool((torch.count_nonzero(at_most, dim=1) == k).all()):  # no row has a tie at its threshold
        return at_most
    mask = scores < threshold
    need = k - mask.sum(1, keepdim=True)
    tie = scores == threshold
    return mask | (tie & (tie.cumsum(1) <= need))


def mask_from_scores(
    scores: torch.Tensor, sparsity: float, pattern: Pattern = Pattern(), *, per_row: bool = True
) -> torch.Tensor:
    """Remove the lowest-scoring weights.

    Unstructured: exactly ``round(sparsity · cols)`` per row when ``per_row`` (Wanda's comparison group),
    else exactly ``round(sparsity · numel)`` over the whole matrix. N:M: ``sparsity`` is ignored, the
    pattern decides.
    """
    if pattern.is_nm:
        return nm_mask(scores, pattern)
    if per_row:
        return lowest_k(scores, round(scores.shape[1] * sparsity))
    return lowest_k(scores.reshape(1, -1), round(scores.numel() * sparsity)).reshape(scores.shape)
