"""The block-by-block walker: feed calibration windows through a model one transformer block at a time.

Only the block being worked on sits on the compute device, and only one block's worth of activations
(``nsamples × seqlen × hidden``) is alive at a time. The rest of the model stays where it was loaded: each block
comes from the model's block source (:mod:`lmcompress.calibration.offload`: memory, or a stream from disk), which
loads, finishes and frees it around the work; :func:`walk_blocks` and :func:`for_each_block` are the one loop.

:func:`collect` is the one way every transform gathers calibration statistics inside a block: hook modules,
run the windows, feed what they see to objects with an ``add(x)`` (``calibration.stats``, ``UnitStats``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcompress.calibration.batching import window_batch
from lmcompress.calibration.distributed import is_main, my_windows, new_input_stats, reduce_stats
from lmcompress.calibration.offload import BlockSource, block_source
from lmcompress.calibration.phases import phase
from lmcompress.calibration.stats import InputStats
from lmcompress.models.families import get_blocks, get_final_norm, skipped_blocks, weight_matrix

# Keyword arguments a block gets that carry a KV cache; they are dropped so that blocks run stateless.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")


class _Captured(Exception):
    """Raised from inside a block once the inputs wanted are recorded, to stop the forward there."""


@dataclass
class BlockInputs:
    """The calibration inputs of the current block, and what the model's own forward passes every block.

    ``per_block[i]`` holds the ``(args, kwargs)`` block ``i`` receives besides its hidden states (attention
    mask, positions, rotary tables: they depend on the window's length, not its content, so window 0's serve
    every window). Families with alternating sliding-window / global layers (Gemma 2/3, Cohere 2, Qwen 3 with
    ``layer_types``) give layers different masks and rotary tables; tensors shared between blocks are stored
    once. :func:`walk_blocks` calls :meth:`use_block` before visiting each block.
    """

    hidden: torch.Tensor  # [nsamples, seqlen, hidden] inputs of the current block
    args: tuple = ()  # other positional arguments of the current block's call
    kwargs: dict = field(default_factory=dict)  # keyword arguments (masks, positions, rotary tables)
    per_block: list[tuple[tuple, dict]] = field(default_factory=list)  # (args, kwargs) of every block
    batch: int = 1  # windows per block call (:func:`choose_batch`); 1 until a walk has checked the family
    windows: int = 0  # calibration windows over all ranks (``hidden`` holds this rank's share)

    def use_block(self, i: int) -> None:
        """Make ``args`` / ``kwargs`` those that block ``i`` receives in the model's own forward."""
        if self.per_block:
            self.args, self.kwargs = self.per_block[i]


def _non_block_tensors(model: nn.Module, blocks: nn.ModuleList) -> list[torch.Tensor]:
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    out = [p for p in model.parameters() if id(p) not in inside]
    out += [b for b in model.buffers() if id(b) not in inside]
    return out


@contextmanager
def _outside_blocks_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Temporarily move embeddings, rotary tables, norms and head (everything but the blocks) to device."""
    tensors = [t for t in _non_block_tensors(model, blocks) if not t.is_meta]  # a streamed model's head: unread
    homes = [t.data.device for t in tensors]
    for t in tensors:
        t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, home in zip(tensors, homes, strict=True):
            t.data = t.data.to(home)


def _to(obj, device: torch.device, memo: dict[int, torch.Tensor] | None = None):
    """``obj`` (nested tuples, lists, dicts of tensors) on ``device``; a tensor met twice is moved once."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _stateless(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block call's extra arguments with KV caches removed and ``use_cache`` off."""
    args = tuple(None if type(a).__name__.endswith("Cache") else a for a in args)
    kwargs = {k: (None if k in _CACHE_KWARGS or type(v).__name__.endswith("Cache") else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, device: torch.device) -> BlockInputs:
    """Run the model's own forward on each window and record what block 0 receives, and what every block gets.

    The blocks are skipped (each returns its input unchanged, ``models.families.skipped_blocks``), so only the
    embeddings run. Window 0 goes through the whole stack to record each block's extra arguments (its hidden
    states, which would be wrong with the blocks skipped, are not kept); the others stop at block 0.
    """
    blocks = get_blocks(model)
    last = len(blocks) - 1
    per_block: list[tuple[tuple, dict] | None] = [None] * len(blocks)
    store: list[torch.Tensor] = []  # one preallocated [nsamples, seqlen, hidden] tensor, filled row by row
    row_index = 0

    def on_call(i: int, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if i == 0:
            if not store:
                store.append(hidden.new_empty((input_ids.shape[0], *hidden.shape[1:])))
            store[0][row_index] = hidden[0].detach()
        if row_index == 0:
            per_block[i] = _stateless(args[1:], kwargs)
        if row_index > 0 or i == last:
            raise _Captured

    with phase("capture"), _outside_blocks_on(model, blocks, device):
        for row_index, row in enumerate(input_ids):
            for tuple_output in (False, True):  # blocks returning a tensor, or a tuple read as block(...)[0]
                try:
                    with skipped_blocks(blocks, on_call, tuple_output=tuple_output):
                        model(row.unsqueeze(0).to(device), use_cache=False)
                except _Captured:
                    break
                except Exception:
                    if tuple_output or row_index > 0:
                        raise
            if not store:
                raise RuntimeError("block 0 was never called: is this a decoder model of a supported family?")
    if any(p is None for p in per_block):
        raise RuntimeError("not every block was called in the model's forward: cannot capture their inputs")
    args, kwargs = per_block[0]
    return BlockInputs(store[0], args, kwargs, per_block=per_block)


def call_block(block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    """One call of ``block`` on ``hidden`` (some windows) with the extra arguments it gets in the model; its output."""
    out = block(hidden, *inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def choose_batch(block: nn.Module, inputs: BlockInputs) -> int:
    """How many windows ``block`` may take per call: :func:`window_batch`, if two windows run together give
    what they give one by one (the extra arguments were captured for one window and must broadcast), else 1.
    """
    batch = min(window_batch(inputs.hidden.shape[1]), inputs.hidden.shape[0])
    if batch == 1:
        return 1
    pair = inputs.hidden[:2]
    try:
        together = call_block(block, pair, inputs)
    except Exception:  # a family whose block cannot broadcast window 0's masks or positions: one at a time
        return 1
    alone = torch.cat([call_block(block, pair[i : i + 1], inputs) for i in range(2)])
    same = together.shape == alone.shape and torch.allclose(together, alone, rtol=1e-4, atol=1e-5)
    return batch if same else 1


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, *, keep: str = "new") -> torch.Tensor | None:
    """Run the block on every calibration window, ``inputs.batch`` windows per call.

    ``keep="new"`` returns a new tensor of outputs; ``"inplace"`` writes each call's outputs over its inputs
    (windows are independent, so only one copy of the activations is ever alive); ``"none"`` discards
    the outputs (a pass for the hooks only).
    """
    hidden = inputs.hidden
    outs = torch.empty_like(hidden) if keep == "new" else hidden
    step = max(1, inputs.batch)
    for i in range(0, hidden.shape[0], step):
        out = call_block(block, hidden[i : i + step], inputs)
        if keep != "none":
            outs[i : i + step] = out
    return None if keep == "none" else outs


class Statistic(Protocol):
    """Anything that accumulates tensors seen during calibration: ``InputStats``, ``UnitStats``, ``InputRows``."""

    def add(self, x: torch.Tensor) -> None: ...


S = TypeVar("S", bound=Statistic)
R = TypeVar("R")


@torch.no_grad()
def probe_inputs(block: nn.Module, inputs: BlockInputs, modules: dict[str, nn.Module]) -> tuple[dict, dict[str, int]]:
    """Run window 0 through ``block`` and note what each module reads: a key per input tensor (modules with
    equal keys read the same tensor) and how often each module ran; ``keys`` is in order of first call."""
    keys: dict[str, tuple] = {}
    calls: dict[str, int] = {}
    alive: list[torch.Tensor] = []  # held so that a freed input's address cannot be reused by another input

    def probe(name):
        def fn(_m, args):
            keys[name] = (args[0].data_ptr(), tuple(args[0].shape))
            calls[name] = calls.get(name, 0) + 1
            alive.append(args[0])

        return fn

    handles = [m.register_forward_pre_hook(probe(n)) for n, m in modules.items()]
    try:
        run_block(block, replace(inputs, hidden=inputs.hidden[:1]), keep="none")
    finally:
        for h in handles:
            h.remove()
    return keys, calls


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

    keys, calls = probe_inputs(block, inputs, modules) if shared else ({}, {})
    owner_of_key: dict[tuple, str] = {}
    stats: dict[str, S] = {}
    for name in names:
        owner = owner_of_key.setdefault(keys.get(name, (name,)), name)
        stats[name] = new(name, modules[name]) if owner == name else stats[owner]

    owners = sorted(set(owner_of_key.values()))
    # Once every watched module has read its input, the rest of the block's forward feeds nothing: stop it
    # there (the down projection of an MLP block, a quarter of its work). Only where the probe saw each
    # module run exactly once per call, so a module run twice, or an expert not routed to, is never cut short.
    stop_early = shared and all(calls.get(n) == 1 for n in names)
    fired: set[str] = set()

    def feed(name):
        def add(x: torch.Tensor) -> None:
            stats[name].add(x.detach())
            fired.add(name)
            if stop_early and len(fired) == len(owners):
                raise _Captured

        if output:
            return lambda _m, _args, out: add(out[0] if isinstance(out, tuple | list) else out)
        return lambda _m, args: add(args[0])

    hook = "register_forward_hook" if output else "register_forward_pre_hook"
    handles = [getattr(modules[n], hook)(feed(n)) for n in owners]
    try:
        run_windows(block, inputs, fired, _Captured)
    finally:
        for h in handles:
            h.remove()
    return stats


def run_windows(block: nn.Module, inputs: BlockInputs, fired: set, stop: type[Exception]) -> None:
    """Run every calibration window through ``block`` (``inputs.batch`` windows a call) for its hooks to see.

    ``fired`` is cleared before each call; a hook raises ``stop`` once everything it watches has fired, which ends
    that call's forward early (the rest of the block would feed nothing).
    """
    step = max(1, inputs.batch)
    for i in range(0, inputs.hidden.shape[0], step):
        fired.clear()
        with phase("statistics"), suppress(stop):
            call_block(block, inputs.hidden[i : i + step], inputs)


def collect_input_stats(
    block: nn.Module, inputs: BlockInputs, names: list[str], hessian: bool
) -> dict[str, InputStats]:
    """:class:`InputStats` (``Σ x²``, and ``Σ x xᵀ`` with ``hessian``) of the named linear layers' inputs.

    In a ``calibration.distributed`` session they cover the windows of every rank (``reduce_stats``)."""
    device = inputs.hidden.device
    stats = collect(block, inputs, names, lambda _n, m: new_input_stats(weight_matrix(m).shape[1], device, hessian))
    return reduce_stats(stats)  # under torch.distributed: the statistics of every rank's windows


def shared_inputs(names: Iterable[str], stats: dict[str, object] | None) -> list[list[str]]:
    """``names`` grouped by the statistic they share (:func:`collect` gives modules that read the same tensor
    one object), in order of first appearance; without ``stats`` every name is its own group."""
    groups: dict[object, list[str]] = {}
    for name in names:
        key = id(stats[name]) if stats is not None else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _io(source: BlockSource):
    """The phase a source's reading and writing count to (none for a model in memory)."""
    return phase(source.io_phase) if source.io_phase else nullcontext()


def _blocks_bar(start: int, n: int, desc: str, progress: bool):
    return tqdm(range(start, n), desc=desc, disable=not (progress and is_main()), unit="block", initial=start, total=n)


def walk_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device,
    visit: Callable[[int, nn.Module, BlockInputs], bool | None],
    *,
    desc: str = "blocks",
    progress: bool = True,
    last_outputs: bool = True,
) -> BlockInputs | None:
    """Call ``visit(i, block, inputs)`` for each block in order, then pass its (possibly changed) outputs on.

    ``visit`` may modify the block (prune it); the next block then sees the modified block's outputs,
    as in the sequential procedure of SparseGPT and Wanda. A visit that returns True has itself written the
    block's outputs over ``inputs.hidden`` (``calibration.compress.compress_block``'s one pass), and the block
    is not run again. Returns the last block's outputs (under ``calibration.distributed``, those of this rank's
    windows); with ``last_outputs=False`` nobody reads them, so the last block is not run again after its visit
    (the return value then holds its inputs). The model's :class:`~lmcompress.calibration.offload.BlockSource`
    (memory, or a stream from disk) loads, finishes and frees each block around the visit; a resumed stream
    starts after its last finished block (``None`` when every block is already done).
    """
    source = block_source(model)
    blocks = get_blocks(model)
    start = source.begin()
    if start >= len(blocks):
        return None
    with source.capturing():
        inputs = capture_block_inputs(model, my_windows(input_ids), device)  # this rank's share under distributed
    inputs.windows = input_ids.shape[0]
    inputs.per_block = _to(inputs.per_block, device)  # tensors shared between blocks stay shared
    if start:
        inputs.hidden = source.resumed_inputs(start, device)
    for i in _blocks_bar(start, len(blocks), desc, progress):
        inputs.use_block(i)
        with _io(source):
            source.load(i, device)
        if i == start:
            inputs.batch = choose_batch(blocks[i], inputs)
        with phase("solves"):  # the visit's own work; its statistics pass counts as "statistics"
            done = visit(i, blocks[i], inputs)
        wanted = last_outputs or i + 1 < len(blocks)  # the last block's outputs: only if the caller reads them
        if wanted and not done:
            with phase("block outputs"):
                run_block(blocks[i], inputs, keep="inplace")
        with _io(source):
            source.finish(i, inputs.hidden if wanted else None)
        source.free(i)
    return inputs


def for_each_block(
    model: nn.Module, fn: Callable[[int, nn.Module], None], *, desc: str = "blocks", progress: bool = True
) -> None:
    """Call ``fn(i, block)`` on every block in order, without calibration data (magnitude pruning, RTN); the
    blocks stay where they are kept (``fn`` moves what it computes on)."""
    source = block_source(model)
    blocks = get_blocks(model)
    for i in _blocks_bar(source.begin(), len(blocks), desc, progress):
        with _io(source):
            source.load(i, None)
        with phase("solves"):
            fn(i, blocks[i])
        with _io(source):
            source.finish(i, None)
        source.free(i)


@torch.no_grad()
def head_input_stats(model: nn.Module, last: BlockInputs, device: torch.device | str, hessian: bool) -> InputStats:
    """Statistics of what the output head reads: the final norm applied to the last block's outputs ``last``,
    window by window (all-reduced over the ranks under torch.distributed)."""
    head, norm = model.get_output_embeddings(), get_final_norm(model)
    home = head.weight.device
    norm.to(device)
    stats = new_input_stats(head.weight.shape[1], torch.device(device), hessian)
    for i in range(last.hidden.shape[0]):
        stats.add(norm(last.hidden[i : i + 1].to(device)))
    norm.to(home)
    return reduce_stats({"lm_head": stats})["lm_head"]
