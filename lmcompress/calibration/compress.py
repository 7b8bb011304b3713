"""Compressing the linear layers of one block: statistics, solves and their order inside the block.

:func:`compress_block` is what Wanda, SparseGPT and GPTQ share inside a visit of
:func:`lmcompress.calibration.engine.walk_blocks`: it groups the layers that read one input, gathers each group's
:class:`~lmcompress.calibration.stats.InputStats`, hands them to the method's ``solve`` and ``apply``, and decides
the order: every group from the uncompressed block (``parallel``), or each group after the ones before it
(``sequential``, the block's calls taking turns, :class:`~lmcompress.calibration.turns.Turns`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from lmcompress.calibration.distributed import new_input_stats, reduce_stats, solve_on, spread
from lmcompress.calibration.engine import BlockInputs, call_block, collect, probe_inputs, shared_inputs
from lmcompress.calibration.phases import phase
from lmcompress.calibration.stats import InputStats
from lmcompress.calibration.turns import Turns
from lmcompress.models.families import weight_matrix

R = TypeVar("R")

IN_BLOCK = ("sequential", "parallel")
ONE_PASS_ELEMENTS = 2**28  # the most activation elements one call on every window may hold (1 GiB of float32)


def one_pass_refusal(inputs: BlockInputs, modules: dict[str, nn.Module], calls: dict) -> str | None:
    """Why the block's calls on every calibration window cannot pause together at each group's first
    layer (None if they can): all their activations are then alive at once. Decided from the model, the
    windows and the family only, never from the machine, so every machine and number of ranks gives one order."""
    if any(calls.get(n) != 1 for n in modules):
        return "a layer runs other than once per call (experts not routed to, or a layer called twice)"
    windows = max(inputs.windows, inputs.hidden.shape[0])
    seqlen, hidden = inputs.hidden.shape[1], inputs.hidden.shape[-1]
    widest = max(max(weight_matrix(m).shape) for m in modules.values())
    attention = max(1, hidden // 64) * seqlen  # per token: scores of up to hidden/64 heads
    if windows * seqlen * max(widest, attention) > ONE_PASS_ELEMENTS:
        return f"{windows} × {seqlen} tokens do not fit one call ({ONE_PASS_ELEMENTS:,} activation elements)"
    return None


def compress_block(
    block: nn.Module,
    inputs: BlockInputs,
    names: list[str],
    solve: Callable[[list[str], InputStats], R],
    apply: Callable[[list[str], R], None],
    cost: Callable[[list[str]], float],
    *,
    hessian: bool,
    in_block: str = "sequential",
) -> tuple[bool, str | None]:
    """Compress the linear layers ``names`` of ``block``: group the layers reading one input, collect each
    group's :class:`InputStats` (``Σ x xᵀ`` too with ``hessian``), ``solve`` it (on one rank, broadcast under
    torch.distributed) and ``apply`` the result on every rank. Returns ``(outputs_done, why_parallel)``.

    ``in_block="sequential"`` (GPTQ's "true sequential" order): the block's calls (``inputs.batch`` windows
    each) take turns (:class:`Turns`) and wait for one another at each group's first layer; once all have
    added their inputs there, the group is solved, so later groups (o after q/k/v, down after gate/up) see the
    outputs of the layers already compressed, and the calls' results are the compressed block's outputs: one
    forward per block, written over ``inputs.hidden`` (``outputs_done``).
    Where that cannot be done (:func:`one_pass_refusal`, returned as ``why_parallel``) and with ``"parallel"``
    (the SparseGPT and Wanda papers' order): one statistics pass through the unchanged block, then every group,
    and the caller runs the compressed block for its outputs.
    """
    modules = {n: block.get_submodule(n) for n in names}
    device = inputs.hidden.device

    def new(_name: str, module: nn.Module) -> InputStats:
        return new_input_stats(weight_matrix(module).shape[1], device, hessian)

    why = "in_block=parallel"
    if in_block == "sequential":
        keys, calls = probe_inputs(block, inputs, modules)
        why = one_pass_refusal(inputs, modules, calls)
    if why is not None:
        stats = reduce_stats(collect(block, inputs, names, new))
        groups = shared_inputs(names, stats)
        held = {g[0]: stats[g[0]] for g in groups}  # each group's statistic, freed once solved
        stats.clear()
        for group, result in zip(groups, spread(groups, lambda g: solve(g, held.pop(g[0])), cost), strict=True):
            apply(group, result)
        return False, None if in_block == "parallel" else why
    by_key: dict[tuple, list[str]] = {}
    for name in keys:  # first-call order: each group in the order its layers run
        by_key.setdefault(keys[name], []).append(name)
    _one_pass(block, inputs, modules, list(by_key.values()), new, solve, apply)
    return True, None


def _one_pass(
    block: nn.Module,
    inputs: BlockInputs,
    modules: dict[str, nn.Module],
    groups: list[list[str]],
    new: Callable[[str, nn.Module], InputStats],
    solve: Callable[[list[str], InputStats], R],
    apply: Callable[[list[str], R], None],
) -> None:
    """The sequential order: the block's calls take turns; at each group's first layer they all add their inputs,
    the last one to arrive solves the group, and each call's outputs replace its inputs once its forward is done."""
    n, step = inputs.hidden.shape[0], max(1, inputs.batch)
    spans = [(i, min(i + step, n)) for i in range(0, n, step)]  # the windows of each block call
    made: dict[int, InputStats] = {}
    solved: set[int] = set()

    def hook(k: int, group: list[str]):
        def fn(_m, args) -> None:
            c = turns.current()
            with phase("statistics"):
                if c == 0:
                    made[k] = new(group[0], modules[group[0]])
                made[k].add(args[0].detach())

            def solve_group() -> None:  # the last call has added its inputs: every window's are in
                with phase("statistics"):
                    stat = reduce_stats({group[0]: made.pop(k)})[group[0]]
                with phase("solves"):
                    apply(group, solve_on(k, lambda: solve(group, stat)))
                solved.add(k)

            turns.meet(k, solve_group)

        return fn

    def run(c: int) -> None:  # a call's outputs replace its own inputs only, once its forward is done
        i, j = spans[c]
        inputs.hidden[i:j] = call_block(block, inputs.hidden[i:j], inputs)

    turns = Turns(len(spans))
    handles = [modules[g[0]].register_forward_pre_hook(hook(k, g)) for k, g in enumerate(groups)]
    try:
        with phase("block outputs"):
            turns.run(run)
    finally:
        for h in handles:
            h.remove()
    if len(solved) < len(groups):
        missed = [g[0] for k, g in enumerate(groups) if k not in solved]
        raise RuntimeError(f"layers {missed} were not reached by the block's calls: use --in-block parallel")
