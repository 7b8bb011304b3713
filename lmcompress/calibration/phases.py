"""Where a job's time goes: wall seconds per phase, written to the recipe as ``timings_s``.

Phases nest and are exclusive: time spent in an inner phase (the statistics pass inside a block's visit) is
not counted again in the outer one (the layer solves), so the phases of a job add up to its wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

_seconds: dict[str, float] = {}
_stack: list[list] = []  # [phase, start of its current stretch]


def reset() -> None:
    """Forget every phase measured so far (a job calls this when it starts)."""
    _seconds.clear()
    _stack.clear()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the wall time of the ``with`` body to ``name``, pausing the enclosing phase meanwhile."""
    now = time.perf_counter()
    if _stack:
        outer = _stack[-1]
        _seconds[outer[0]] = _seconds.get(outer[0], 0.0) + now - outer[1]
    _stack.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        _, start = _stack.pop()
        _seconds[name] = _seconds.get(name, 0.0) + now - start
        if _stack:
            _stack[-1][1] = now


def seconds() -> dict[str, float]:
    """Seconds per phase so far, rounded to milliseconds, in the order the phases were first entered."""
    return {k: round(v, 3) for k, v in _seconds.items()}
