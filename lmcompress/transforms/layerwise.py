"""The layer-wise driver that pruning and quantization share: every block's linear layers, solved in order.

A method is a :class:`LayerSolver`: ``solve`` finds the new weights of a group of layers that read one input
(from its :class:`~lmcompress.calibration.stats.InputStats`, or from the weights alone), ``apply`` writes them
into the block and the report, ``block_done`` measures a finished block. :func:`compress_layers` walks the
blocks, from calibration windows (:func:`~lmcompress.calibration.engine.walk_blocks` with
:func:`~lmcompress.calibration.compress.compress_block`: statistics, solves shared over the ranks, the in-block
order) or without data (:func:`~lmcompress.calibration.engine.for_each_block`), in memory or streamed alike.
"""

from __future__ import annotations

import logging
from typing import Protocol, TypeVar

import torch
from torch import nn

from lmcompress.calibration.compress import compress_block
from lmcompress.calibration.distributed import solve_cost, spread
from lmcompress.calibration.engine import BlockInputs, for_each_block, shared_inputs, walk_blocks
from lmcompress.calibration.stats import InputStats
from lmcompress.models.families import find_prunable

log = logging.getLogger(__name__)

R = TypeVar("R")


class LayerSolver(Protocol[R]):
    """One method's work on block ``i``'s linear layers ``layers`` (name inside the block → module)."""

    def solve(self, i: int, layers: dict[str, nn.Module], group: list[str], stats: InputStats | None) -> R:
        """New weights of the layers ``group`` (they read one input; ``stats`` is ``None`` without data)."""
        ...

    def apply(self, i: int, layers: dict[str, nn.Module], group: list[str], result: R) -> None:
        """Write ``result`` into the layers of ``group`` and into the report (on every rank)."""
        ...

    def block_done(self, i: int, layers: dict[str, nn.Module]) -> None:
        """Block ``i`` is compressed (measure it)."""
        ...


def compress_layers(
    model: nn.Module,
    solver: LayerSolver,
    calib: torch.Tensor | None,
    device: torch.device,
    *,
    hessian: bool,
    in_block: str,
    last_outputs: bool,
    desc: str,
    progress: bool,
) -> tuple[BlockInputs | None, dict[str, int]]:
    """Compress the linear layers of every block of ``model`` with ``solver``, block after block.

    With ``calib`` (token windows) each block sees the outputs of the blocks compressed before it, and each group
    its :class:`InputStats` (``Σ x xᵀ`` too with ``hessian``), in ``in_block`` order; without, each layer is its
    own group, solved from its weights. Returns the last block's outputs (``last_outputs``, with calibration data;
    else ``None``) and why blocks fell back from the sequential to the parallel order (reason → blocks).
    """
    fallback: dict[str, int] = {}
    if calib is None:

        @torch.no_grad()
        def each(i: int, block: nn.Module) -> None:
            layers = find_prunable(block)
            groups = shared_inputs(layers, None)  # one layer per group
            results = spread(groups, lambda g: solver.solve(i, layers, g, None), lambda g: solve_cost(layers, g))
            for group, result in zip(groups, results, strict=True):
                solver.apply(i, layers, group, result)
            solver.block_done(i, layers)

        for_each_block(model, each, desc=desc, progress=progress)
        return None, fallback

    @torch.no_grad()
    def visit(i: int, block: nn.Module, inputs: BlockInputs) -> bool:
        layers = find_prunable(block)
        done, why = compress_block(
            block,
            inputs,
            list(layers),
            lambda g, stats: solver.solve(i, layers, g, stats),
            lambda g, result: solver.apply(i, layers, g, result),
            lambda g: solve_cost(layers, g),
            hessian=hessian,
            in_block=in_block,
        )
        if why is not None:
            fallback[why] = fallback.get(why, 0) + 1
        solver.block_done(i, layers)
        return done

    last = walk_blocks(model, calib, device, visit, desc=desc, progress=progress, last_outputs=last_outputs)
    for why, n in fallback.items():
        log.warning("%d blocks compressed in the parallel order: %s", n, why)
    return last, fallback
