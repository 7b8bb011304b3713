"""The block-by-block walker: feed calibration windows through a model one transformer block at a time.

Only the block being worked on sits on the compute device, and only one block's worth of activations
(``nsamples × seqlen × hidden``) is alive at a time. The rest of the model stays where it was loaded.

:func:`collect` is the one way every transform gathers calibration statistics inside a block: hook modules,
run the windows, feed what they see to objects with an ``add(x)`` (``calibration.stats``, ``UnitStats``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.calibration.stats import InputStats
from lmcompress.models.families import get_blocks, weight_matrix

# Keyword arguments a block gets that carry a KV cache; they are dropped so that blocks run stateless.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class _Captured(Exception):
    """Raised from inside block 0 once its inputs are recorded, to stop the forward there."""


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # [nsamples, seqlen, hidden] inputs of the current block
    args: tuple = ()  # other positional arguments of the block call (sample 0's)
    kwargs: dict = field(default_factory=dict)  # keyword arguments (masks, positions, rotary tables)


def _non_block_tensors(model: nn.Module, blocks: nn.ModuleList) -> list[torch.Tensor]:
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    out = [p for p in model.parameters() if id(p) not in inside]
    out += [b for b in model.buffers() if id(b) not in inside]
    return out


@contextmanager
def _outside_blocks_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Temporarily move embeddings, rotary tables, norms and head (everything but the blocks) to device."""
    tensors = _non_block_tensors(model, blocks)
    homes = [t.data.device for t in tensors]
    for t in tensors:
        t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, home in zip(tensors, homes, strict=True):
            t.data = t.data.to(home)


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, device: torch.device) -> BlockInputs:
    """Run the model's own embedding code on each window and record what block 0 receives."""
    blocks = get_blocks(model)
    extra: dict = {}
    store: list[torch.Tensor] = []  # one preallocated [nsamples, seqlen, hidden] tensor, filled row by row
    row_index = 0

    def hook(_module, args, kwargs):
        if not store:
            store.append(args[0].new_empty((input_ids.shape[0], *args[0].shape[1:])))
            extra["args"] = tuple(None if type(a).__name__.endswith("Cache") else a for a in args[1:])
            extra["kwargs"] = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
            if "use_cache" in extra["kwargs"]:
                extra["kwargs"]["use_cache"] = False
        store[0][row_index] = args[0][0].detach()
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _outside_blocks_on(model, blocks, device):
            for row_index, row in enumerate(input_ids):  # noqa: B007  (read by the hook)
                with suppress(_Captured):
                    model(row.unsqueeze(0).to(device), use_cache=False)
    finally:
        handle.remove()
    if not store:
        raise RuntimeError("block 0 was never called: is this a decoder model of a supported family?")
    return BlockInputs(store[0], extra["args"], extra["kwargs"])


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, *, keep: str = "new") -> torch.Tensor | None:
    """Run the block on every calibration window, one window per call.

    ``keep="new"`` returns a new tensor of outputs; ``"inplace"`` writes each window's output over its input
    (each window is independent, so only one copy of the activations is ever alive); ``"none"`` discards
    the outputs (a pass for the hooks only).
    """
    hidden = inputs.hidden
    outs = torch.empty_like(hidden) if keep == "new" else hidden
    for i in range(hidden.shape[0]):
        out = block(hidden[i : i + 1], *inputs.args, **inputs.kwargs)
        if keep != "none":
            outs[i] = out[0] if isinstance(out, tuple | list) else out
    return None if keep == "none" else outs


class Statistic(Protocol):
    """Anything that accumulates tensors seen during calibration: ``InputStats``, ``UnitStats``, ``InputRows``."""

    def add(self, x: torch.Tensor) -> None: ...


S = TypeVar("S", bound=Statistic)


@torch.no_grad()
def collect(
    block: nn.Module,
    inputs: BlockInputs,
    names: list[str],
    new: Callable[[str, nn.Module], S],
    *,
    output: bool = False,
) -> dict[str, S]:
    """Run every calibration window through ``block`` and feed what its modules ``names`` see to statistics.

    ``names`` are module paths inside ``block``; ``new(name, module)`` makes each one's statistic, and every
    call of the module hands its first input (its output, with ``output=True``) to that statistic's
    ``add(x)``. Modules that see the same tensor (q/k/v reading one normed input, gate/up) share one
    statistic, computed and stored once; which ones do is found by one probe window first.
    """
    modules = {n: block.get_submodule(n) for n in names}
    shared = len(modules) > 1 and not output  # outputs are each module's own

    keys: dict[str, tuple] = {}
    alive: list[torch.Tensor] = []  # held so that a freed input's address cannot be reused by another input
    if shared:

        def probe(name):
            def fn(_m, args):
                keys[name] = (args[0].data_ptr(), tuple(args[0].shape))
                alive.append(args[0])

            return fn

        handles = [m.register_forward_pre_hook(probe(n)) for n, m in modules.items()]
        try:
            run_block(block, replace(inputs, hidden=inputs.hidden[:1]), keep="none")
        finally:
            for h in handles:
                h.remove()
        alive.clear()
    owner_of_key: dict[tuple, str] = {}
    stats: dict[str, S] = {}
    for name in names:
        owner = owner_of_key.setdefault(keys.get(name, (name,)), name)
        stats[name] = new(name, modules[name]) if owner == name else stats[owner]

    def feed(name):
        if output:
            return lambda _m, _args, out: stats[name].add((out[0] if isinstance(out, tuple | list) else out).detach())
        return lambda _m, args: stats[name].add(args[0].detach())

    owners = sorted(set(owner_of_key.values()))
    hook = "register_forward_hook" if output else "register_forward_pre_hook"
    handles = [getattr(modules[n], hook)(feed(n)) for n in owners]
    try:
        run_block(block, inputs, keep="none")
    finally:
        for h in handles:
            h.remove()
    return stats


def collect_input_stats(
    block: nn.Module, inputs: BlockInputs, names: list[str], hessian: bool
) -> dict[str, InputStats]:
    """:class:`InputStats` (``Σ x²``, and ``Σ x xᵀ`` with ``hessian``) of the named linear layers' inputs."""
    device = inputs.hidden.device
    return collect(block, inputs, names, lambda _n, m: InputStats(weight_matrix(m).shape[1], device, hessian))


def walk_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device,
    visit: Callable[[int, nn.Module, BlockInputs], None],
    *,
    desc: str = "blocks",
    progress: bool = True,
) -> BlockInputs:
    """Call ``visit(i, block, inputs)`` for each block in order, then pass its (possibly changed) outputs on.

    ``visit`` may modify the block (prune it); the next block then sees the modified block's outputs,
    as in the sequential procedure of SparseGPT and Wanda. Returns the last block's outputs.
    """
    blocks = get_blocks(model)
    inputs = capture_block_inputs(model, input_ids, device)
    inputs.args, inputs.kwargs = _to(inputs.args, device), _to(inputs.kwargs, device)
    for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, unit="block"):
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        visit(i, block, inputs)
        run_block(block, inputs, keep="inplace")
        block.to(home)
    return inputs
