"""The hook between the block walkers and a model whose weights stay on disk (``--offload disk``).

A streamed model is built on the meta device and carries a *block stream* (``lmcompress.checkpoint.stream``)
under the attribute :data:`STREAM_ATTR`. :func:`lmcompress.calibration.engine.walk_blocks` and
:func:`for_each_block` hand the walk to it: it reads each block's tensors from the source shards just before
the block is worked on, writes the finished block to the output and frees it again. Without a stream both run
the in-memory loop, so the transforms are the same code either way.

The transforms register the dictionaries their reports are built from with :func:`track` (layer name →
number or quantized codes): the stream saves each block's new entries with the block, so a resumed run rebuilds
the same report as an uninterrupted one, and it drops the codes of quantized layers once they are on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from torch import nn
from tqdm.auto import tqdm

from lmcompress.calibration.distributed import is_main
from lmcompress.models.families import get_blocks

STREAM_ATTR = "lmcompress_stream"


class BlockStream(Protocol):
    """What a model's block stream does (``lmcompress.checkpoint.stream.DiskStream``)."""

    read_only: bool

    def walk(self, model: nn.Module, input_ids, device, visit, *, desc: str, progress: bool): ...

    def for_each(self, model: nn.Module, fn: Callable[[int, nn.Module], None], *, desc: str, progress: bool): ...

    def track(self, **dicts: dict) -> None: ...


def active_stream(model: nn.Module) -> BlockStream | None:
    """The block stream of a streamed model, ``None`` for a model held in memory."""
    return getattr(model, STREAM_ATTR, None)


def track(model: nn.Module, **dicts: dict) -> None:
    """Register report dictionaries (name → dict filled block by block) with the model's stream, if any."""
    stream = active_stream(model)
    if stream is not None:
        stream.track(**dicts)


@contextmanager
def read_only(model: nn.Module) -> Iterator[None]:
    """Walks inside this context only read the blocks (OWL's outlier pass): a stream writes nothing."""
    stream = active_stream(model)
    if stream is None:
        yield
        return
    before, stream.read_only = stream.read_only, True
    try:
        yield
    finally:
        stream.read_only = before


def for_each_block(
    model: nn.Module, fn: Callable[[int, nn.Module], None], *, desc: str = "blocks", progress: bool = True
) -> None:
    """Call ``fn(i, block)`` on every block in order, without calibration data (magnitude pruning, RTN)."""
    stream = active_stream(model)
    if stream is not None:
        stream.for_each(model, fn, desc=desc, progress=progress)
        return
    blocks = get_blocks(model)
    for i in tqdm(range(len(blocks)), desc=desc, disable=not (progress and is_main()), unit="block"):
        fn(i, blocks[i])
