"""Several processes on one compression job, through ``torch.distributed`` (launched by ``torchrun``).

With ``torchrun --nproc-per-node N -m lmcompress prune|quantize ...`` every process loads the model and draws
the same calibration windows (same text, same seed), then, block by block:

1. each rank runs its contiguous share of the windows (:func:`my_windows`: whole batches of windows, those one
   process would run through a block together, where there are enough; else ``[⌊r·n/N⌋ .. ⌊(r+1)·n/N⌋)``)
   through the block, accumulating :class:`InputStats`;
2. the statistics are combined as one process would have them: the Hessian sums ``Σ X Xᵀ`` and the token counts
   are summed over ranks (all-reduce), so ``H = 2 Σ X Xᵀ / n`` uses the global ``n``, equal to the
   one-process value up to the order of float32 additions; Wanda's ``Σ x²`` per input is rebuilt *exactly*:
   every rank gathers each window's own ``Σ x²`` and adds them up in window order, the very additions one
   process performs, so Wanda masks and OWL's outlier ratios are identical to a one-process run;
3. the layer solves of the block (one per group of layers reading the same input, SparseGPT's and GPTQ's
   stacked solves) are dealt out over the ranks, largest first to the least loaded (:func:`spread`), and each
   result is broadcast from the rank that computed it, so every rank holds the same new weights;
4. each rank runs its own windows through the compressed block: the inputs of the next block.

Rank 0 alone writes the output folder and shows progress bars; the others wait for it. Nothing is sharded
outside a :func:`session` (``jobs.run_job`` opens one for ``prune`` and ``quantize``): library calls made in an
initialized process group without one run the whole job on every rank.
"""

from __future__ import annotations

import atexit
import io
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lmcompress.calibration.batching import window_batch
from lmcompress.calibration.stats import InputStats
from lmcompress.errors import UserError
from lmcompress.models.families import weight_matrix

# The verbs and job kinds that run sharded; every other one refuses under torchrun (see refuse_unsupported).
SUPPORTED = ("prune", "quantize")

_active = False  # inside a session(), with a process group of two or more ranks

T = TypeVar("T")
R = TypeVar("R")


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or a like launcher) as one of two or more ranks."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return world()[0] == 0


def active() -> bool:
    """True inside :func:`session` in a process group of two or more ranks: windows and solves are split."""
    return _active


def refuse_unsupported(verb: str) -> None:
    """UserError when launched as several processes for a verb that cannot split its work across them."""
    if launched() and verb not in SUPPORTED:
        raise UserError(
            f"{verb} does not support torch.distributed; run it as one process (without torchrun). "
            f"Only {' and '.join(SUPPORTED)} run on several processes"
        )


def init_from_env(device: str) -> str:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), if any.

    NCCL for CUDA devices (each rank takes GPU ``LOCAL_RANK``), Gloo for the CPU. Returns the device this rank
    computes on: ``device`` itself, or ``cuda:LOCAL_RANK`` for ``cuda``/``cuda:N`` with several ranks. Without a
    launcher's environment it does nothing and returns ``device``.
    """
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return device
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        if not dist.is_available():
            raise UserError("this torch build has no torch.distributed; run as one process (without torchrun)")
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_destroy)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session() -> Iterator[None]:
    """Split calibration windows and layer solves over the ranks of the process group while inside."""
    global _active
    before = _active
    _active = world()[1] > 1
    try:
        yield
    finally:
        _active = before


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must be for a collective: the current GPU with NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_bounds(n: int, world_size: int, align: int = 1) -> list[int]:
    """``world_size + 1`` boundaries splitting ``n`` windows into contiguous shares.

    With ``align`` > 1 the shares are whole runs of ``align`` windows (the last may be short), as long as
    there are at least ``world_size`` such runs: each rank then calls a block on exactly the window batches
    one process would (``calibration.batching.window_batch``), so activations match bit for bit. Otherwise,
    and with ``align`` = 1, share sizes differ by at most one window.
    """
    units = -(-n // align)
    if align > 1 and units >= world_size:
        return [min(r * units // world_size * align, n) for r in range(world_size + 1)]
    return [r * n // world_size for r in range(world_size + 1)]


def my_windows(windows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows (all of them outside an active session)."""
    if not _active:
        return windows
    rank, size = world()
    if windows.shape[0] < size:
        raise UserError(
            f"{windows.shape[0]} calibration windows cannot be shared by {size} processes: give nsamples "
            f"at least {size}, or run fewer processes",
            param="nsamples",
        )
    bounds = shard_bounds(windows.shape[0], size, align=window_batch(windows.shape[1]))
    return windows[bounds[rank] : bounds[rank + 1]]


class WindowInputStats(InputStats):
    """:class:`InputStats` that also keeps each ``add``'s own ``Σ x²`` (one per window and module call), so that
    :func:`reduce_stats` can redo one process's additions in window order."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool) -> None:
        super().__init__(in_features, device, hessian)
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        if self._scaled:
            raise RuntimeError("inputs added after the Hessian was taken")
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        part = (x * x).sum(0)
        self.parts.append(part)
        self.sq_sum += part
        self._add_gram(x)


def new_input_stats(in_features: int, device: torch.device, hessian: bool) -> InputStats:
    """The statistic :func:`reduce_stats` can combine across ranks (a plain :class:`InputStats` outside)."""
    return (WindowInputStats if _active else InputStats)(in_features, device, hessian)


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` ``[k_r, d]`` (``k_r`` may differ), stacked in rank order."""
    size = dist.get_world_size()
    comm = _comm_device()
    counts = torch.tensor([rows.shape[0]], dtype=torch.int64, device=comm)
    all_counts = [torch.zeros_like(counts) for _ in range(size)]
    dist.all_gather(all_counts, counts)
    ks = [int(c.item()) for c in all_counts]
    padded = rows.new_zeros((max(ks), rows.shape[1])).to(comm)
    padded[: rows.shape[0]] = rows.to(comm)
    out = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:k] for o, k in zip(out, ks, strict=True)]).to(rows.device)


def reduce_stats(stats: dict[str, InputStats]) -> dict[str, InputStats]:
    """Combine every rank's statistics into those of all windows, the same on every rank (in place).

    Token counts and ``Σ X Xᵀ`` are summed over ranks; ``Σ x²`` is rebuilt from the gathered per-window parts,
    added in global window order from zero, bit for bit what one process computes. Statistics shared by
    several names are combined once. A no-op outside an active session.
    """
    if not _active:
        return stats
    comm = _comm_device()
    seen: set[int] = set()
    for name in stats:  # the same names in the same order on every rank: the collectives line up
        s = stats[name]
        if id(s) in seen:
            continue
        seen.add(id(s))
        if not isinstance(s, WindowInputStats):
            raise RuntimeError(f"statistic of {name} cannot be combined across ranks: make it with new_input_stats")
        tokens = torch.tensor([s.tokens], dtype=torch.int64, device=comm)
        dist.all_reduce(tokens)
        s.tokens = int(tokens.item())
        local = torch.stack(s.parts) if s.parts else s.sq_sum.new_zeros((0, s.sq_sum.shape[0]))
        total = torch.zeros_like(s.sq_sum)
        for part in _gather_rows(local):
            total += part
        s.sq_sum, s.parts = total, []
        if s.xtx is not None:
            xtx = s.xtx.to(comm)
            dist.all_reduce(xtx)
            s.xtx = xtx.to(s.xtx.device)
    return stats


def owners(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that computes each item: largest cost first, each to the rank with the least work so far
    (ties to the lower rank). Deterministic, so every rank derives the same assignment."""
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += costs[k]
    return owner


def solve_cost(layers: dict[str, nn.Module], group: Sequence[str]) -> float:
    """Rough cost of one stacked solve of layers reading one input: column sweep (rows × in²) + inverse (in³)."""
    rows = sum(weight_matrix(layers[n]).shape[0] for n in group)
    width = weight_matrix(layers[group[0]]).shape[1]
    return float(rows * width**2 + width**3)


def spread(items: Sequence[T], solve: Callable[[T], R], cost: Callable[[T], float] | None = None) -> list[R]:
    """``[solve(x) for x in items]``, each computed on one rank and broadcast to the others.

    ``cost(x)`` (default 1) balances the ranks' work (:func:`owners`). Results may be any picklable objects;
    the tensors in them travel by broadcast, not pickled. Outside an active session every item is solved here.
    """
    if not _active:
        return [solve(x) for x in items]
    rank, size = world()
    owner = owners([cost(x) if cost else 1.0 for x in items], size)
    mine = {k: solve(x) for k, x in enumerate(items) if owner[k] == rank}
    return [_broadcast(mine.get(k), owner[k]) for k in range(len(items))]


def solve_on(k: int, solve: Callable[[], R]) -> R:
    """``solve()`` computed on rank ``k mod world size`` (the k-th of a sequence of solves that must run one
    after another) and broadcast to the others; computed here outside an active session."""
    if not _active:
        return solve()
    rank, size = world()
    src = k % size
    return _broadcast(solve() if rank == src else None, src)


def _broadcast(obj: R | None, src: int) -> R:
    """``obj`` from rank ``src`` on every rank: its structure pickled, its tensors broadcast one by one."""
    rank = dist.get_rank()
    comm = _comm_device()
    tensors: list[torch.Tensor] = []
    header: list[object] = [None]
    if rank == src:
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)

        def persistent_id(o):
            if isinstance(o, torch.Tensor):
                tensors.append(o)
                return len(tensors) - 1
            return None

        pickler.persistent_id = persistent_id
        pickler.dump(obj)
        header = [(buffer.getvalue(), [(tuple(t.shape), t.dtype, str(t.device)) for t in tensors])]
    dist.broadcast_object_list(header, src=src, device=comm)
    data, metas = header[0]
    received: list[torch.Tensor] = []
    for i, (shape, dtype, _device) in enumerate(metas):
        wire = torch.uint8 if dtype == torch.bool else dtype  # Gloo has no bool
        if rank == src:
            t = tensors[i].contiguous().to(device=comm, dtype=wire)
        else:
            t = torch.empty(shape, dtype=wire, device=comm)
        dist.broadcast(t, src=src)
        received.append(t.to(dtype))
    if rank == src:
        return obj
    unpickler = pickle.Unpickler(io.BytesIO(data))
    here = {}  # the device a tensor lived on at the source, mapped to this rank's (cuda:k → this rank's GPU)

    def persistent_load(i):
        device = metas[i][2]
        target = here.setdefault(device, torch.device("cpu") if device == "cpu" else comm)
        return received[i].to(target)

    unpickler.persistent_load = persistent_load
    return unpickler.load()


def recipe_fields() -> dict:
    """What the recipe records about the processes that did the job (empty for one process)."""
    size = world()[1]
    if size == 1:
        return {}
    return {"distributed": {"world_size": size, "backend": dist.get_backend(), "windows": "contiguous shares"}}
