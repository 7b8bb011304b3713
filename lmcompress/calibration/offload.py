"""Where the block walkers get each block from: memory, or a stream that reads it from disk (``--offload disk``).

:func:`lmcompress.calibration.engine.walk_blocks` and :func:`~lmcompress.calibration.engine.for_each_block` hold
one loop over the blocks; what happens around each block is a :class:`BlockSource`'s: ``load`` it before the work,
``finish`` it after (write it out, with the next block's inputs), ``free`` it. A model held in memory is its own
source (:class:`InMemory`: a block moves to the compute device and back). A streamed model is built on the meta
device and carries its source under the attribute :data:`STREAM_ATTR` (``lmcompress.checkpoint.stream.DiskStream``,
which only reads and writes tensors), so the transforms are the same code either way.

The transforms register the dictionaries their reports are built from with :func:`track` (layer name → number or
quantized codes): a stream saves each block's new entries with the block, so a resumed run rebuilds the same
report as an uninterrupted one, and it drops the codes of quantized layers once they are on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

import torch
from torch import nn

from lmcompress.models.families import get_blocks

STREAM_ATTR = "lmcompress_stream"


class BlockSource(Protocol):
    """What the walkers ask of the place a model's blocks live."""

    read_only: bool  # walks only read the blocks (OWL's outlier pass): nothing is finished
    io_phase: str | None  # the phase (``calibration.phases``) that load / finish count to; None: not timed apart

    def begin(self) -> int:
        """Start a pass over the blocks; the first block it works on (later than 0 when a run is resumed)."""
        ...

    def capturing(self) -> AbstractContextManager:
        """Around capturing block 0's inputs: what the forward up to block 0 reads is available inside."""
        ...

    def resumed_inputs(self, i: int, device: torch.device) -> torch.Tensor:
        """The saved inputs of block ``i``, where a resumed pass starts."""
        ...

    def load(self, i: int, device: torch.device | None) -> None:
        """Make block ``i``'s weights real, on ``device`` (``None``: where they are kept)."""
        ...

    def finish(self, i: int, hidden: torch.Tensor | None) -> None:
        """Block ``i`` is done; ``hidden`` are the next block's inputs (``None`` when nobody reads them)."""
        ...

    def free(self, i: int) -> None:
        """Put block ``i`` back where it is kept."""
        ...

    def track(self, **dicts: dict | None) -> None: ...


class InMemory:
    """The blocks of a model held in memory: each visits the compute device while it is worked on."""

    read_only = False
    io_phase = None

    def __init__(self, model: nn.Module) -> None:
        self.blocks = get_blocks(model)
        self.homes: dict[int, torch.device] = {}

    def begin(self) -> int:
        return 0

    def capturing(self) -> AbstractContextManager:
        return nullcontext()

    def resumed_inputs(self, i: int, device: torch.device) -> torch.Tensor:
        raise RuntimeError("a model held in memory has no saved block inputs")

    def load(self, i: int, device: torch.device | None) -> None:
        if device is not None:
            self.homes[i] = next(self.blocks[i].parameters()).device
            self.blocks[i].to(device)

    def finish(self, i: int, hidden: torch.Tensor | None) -> None:
        pass

    def free(self, i: int) -> None:
        if i in self.homes:
            self.blocks[i].to(self.homes.pop(i))

    def track(self, **dicts: dict | None) -> None:
        pass


def active_stream(model: nn.Module) -> BlockSource | None:
    """The block stream of a streamed model, ``None`` for a model held in memory."""
    return getattr(model, STREAM_ATTR, None)


def block_source(model: nn.Module) -> BlockSource:
    """Where the walkers get ``model``'s blocks from: its stream, or memory."""
    return active_stream(model) or InMemory(model)


def track(model: nn.Module, **dicts: dict | None) -> None:
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
