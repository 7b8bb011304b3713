"""Threads that take turns: every call of a block can pause at a layer until all calls have reached it.

:func:`lmcompress.calibration.compress.compress_block` runs a block's calls (a few windows each) under
:class:`Turns` so that each group of layers is solved once every window's inputs to it are in, and the later
groups see the outputs of the layers already compressed, in one forward per block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class Turns:
    """Run ``task(c)`` for ``c = 0 … count−1``, each in its own thread but strictly one at a time, so that
    every block call can pause at a layer until all calls have reached it (:meth:`meet`) and then go on.

    The turn passes 0 → 1 → … → count−1 → 0 …: a call that meets hands the turn to the next one; the last
    call to arrive first runs the work given to :meth:`meet` (the layer's solve), then hands the turn back to
    call 0. Each call keeps its own working set (a few windows), as in a plain loop over calls. Threads serve
    only as resumable frames: no two ever compute at once, so the order of every sum is fixed.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.turn = 0
        self.met: list[list[int]] = [[] for _ in range(count)]  # the meetings (group numbers) each call reached
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.local = threading.local()

    def current(self) -> int:
        return self.local.c

    def _wait_for(self, c: int) -> None:
        while self.turn != c and self.error is None:
            self.cond.wait()
        if self.error is not None:
            raise Abandoned

    def _pass(self, to: int) -> None:
        self.turn = to
        self.cond.notify_all()

    def meet(self, k: int, last: Callable[[], None]) -> None:
        c = self.local.c
        with self.cond:
            self.met[c].append(k)
            if self.met[c] != self.met[0][: len(self.met[c])]:
                raise OutOfStep
            if c == self.count - 1:
                last()
                self._pass(0)
            else:
                self._pass(c + 1)
            if self.count > 1:
                self._wait_for(c)

    def run(self, task: Callable[[int], None]) -> None:
        if self.count == 1:  # nothing to take turns with: run here
            self.local.c = 0
            task(0)
            return

        def body(c: int) -> None:
            self.local.c = c
            try:
                with self.cond:
                    self._wait_for(c)
                    with torch.no_grad():
                        task(c)
                    if self.met[c] != self.met[0]:
                        raise OutOfStep
                    self._pass(c + 1)
            except Abandoned:
                pass
            except BaseException as exc:  # handed to the caller; the other calls give up
                with self.cond:
                    self.error = self.error or exc
                    self.cond.notify_all()

        threads = [threading.Thread(target=body, args=(c,), daemon=True) for c in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.error is not None:
            raise self.error


class Abandoned(Exception):
    """Raised in a waiting call once another has failed."""


class OutOfStep(RuntimeError):
    def __init__(self) -> None:
        super().__init__(
            "the calls of a block reached its layers differently (a layer that runs for some windows only, such "
            "as a routed expert): compress this model with in_block parallel (--in-block parallel)"
        )
