"""The layer-wise driver that pruning and quantization share: every block's linear layers, solved in order.

A method is a :class:`LayerSolver`: ``solve`` finds the new weights of a group of layers that read one input
(from its :class:`~lmcompress.calibration.stats.InputStats`, or from the weights alone), ``apply`` writes them
into the block and the report, ``block_done`` measures a finished block. :func:`compress_layers` walks the
blocks, from calibration windows (:func:`~lmcompress.calibration.engine.walk_blocks` with
:func:`~lmcompress.calibration.compress.compress_block`: statistics, solves shared over the ranks, the in-block
order) or without data (:func:`~lmcompress.calibration.engine.for_each_block`), in memory or streamed alike.
The routed experts of fused 3-D expert parameters are layers too, one per expert and matrix, with routed
statistics (:mod:`lmcompress.calibration.experts`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Protocol, TypeVar

import torch
from torch import nn

from lmcompress.calibration.compress import compress_block
from lmcompress.calibration.distributed import solve_cost, spread
from lmcompress.calibration.engine import BlockInputs, for_each_block, shared_inputs, walk_blocks
from lmcompress.calibration.experts import (
    FUSED,
    compress_experts,
    expert_layers,
    expert_name,
    find_fused_experts,
    unsupported_experts,
)
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

    # Optional: ``experts_done(i, param, names, layers, tokens)``: the experts ``names`` (layers of ``layers``) of
    # the fused parameter ``param`` (path inside block ``i``) are all applied; ``tokens``: routed tokens of each
    # (None without calibration). Quantization stacks their codes into the fused parameter's here.


def _solve_experts(
    i: int, block: nn.Module, solver: LayerSolver, inputs: BlockInputs | None, hessian: bool, in_block: str
) -> dict[str, nn.Module]:
    """Compress the routed experts of ``block``'s fused 3-D parameters (``calibration.experts``), each expert's
    matrix a layer; the expert layers by name (empty for a block without fused experts)."""
    for path in unsupported_experts(block):
        log.warning("block %d: 3-D parameter %s is not a fused-expert layout lmcompress handles: left dense", i, path)
    fused = find_fused_experts(block)
    if not fused:
        return {}
    experts = expert_layers(block, fused)
    tokens = compress_experts(
        block,
        inputs,
        experts,
        lambda g, stats: solver.solve(i, experts, g, stats),
        lambda g, result: solver.apply(i, experts, g, result),
        lambda g: solve_cost(experts, g),
        hessian=hessian,
        in_block=in_block,
    )
    done = getattr(solver, "experts_done", None)
    for path, module in fused.items():
        for param in FUSED:
            names = [expert_name(path, param, e) for e in range(getattr(module, param).shape[0])]
            if done is not None:
                full = f"{path}.{param}" if path else param
                done(i, full, names, experts, [tokens[n] for n in names] if tokens else None)
    return experts


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
            experts = _solve_experts(i, block, solver, None, hessian, in_block)
            solver.block_done(i, {**layers, **experts})

        for_each_block(model, each, desc=desc, progress=progress)
        return None, fallback

    @torch.no_grad()
    def visit(i: int, block: nn.Module, inputs: BlockInputs) -> bool:
        layers = find_prunable(block)
        moe = bool(find_fused_experts(block))
        experts = {}
        if moe and in_block == "parallel":  # from the unchanged block, as every other layer
            experts = _solve_experts(i, block, solver, inputs, hessian, in_block)
        done, why = compress_block(
            block,
            # sequential: the experts come after the block's linear layers (attention), from their compressed
            # outputs; the linear layers' one pass must not write the block's outputs yet (one copy of the inputs)
            replace(inputs, hidden=inputs.hidden.clone()) if moe and in_block != "parallel" else inputs,
            list(layers),
            lambda g, stats: solver.solve(i, layers, g, stats),
            lambda g, result: solver.apply(i, layers, g, result),
            lambda g: solve_cost(layers, g),
            hessian=hessian,
            in_block=in_block,
        )
        if why is not None:
            fallback[why] = fallback.get(why, 0) + 1
        if moe and in_block != "parallel":
            experts = _solve_experts(i, block, solver, inputs, hessian, in_block)
            done = False  # the block's outputs: run again with its experts compressed
        solver.block_done(i, {**layers, **experts})
        return done

    last = walk_blocks(model, calib, device, visit, desc=desc, progress=progress, last_outputs=last_outputs)
    for why, n in fallback.items():
        log.warning("%d blocks compressed in the parallel order: %s", n, why)
    return last, fallback
