"""How many calibration windows run through a block in one call: the one rule the walker and the ranks share.

The walker (:mod:`lmcompress.calibration.engine`) calls each block on :func:`window_batch` windows at a time, and
under torch.distributed each rank's share of the windows is cut on those same batches
(:func:`lmcompress.calibration.distributed.shard_bounds`), so every rank runs exactly the calls one process would.
"""

from __future__ import annotations

WINDOW_TOKENS = 1024  # tokens per block call: enough rows for efficient matrix products, little extra memory


def window_batch(seqlen: int) -> int:
    """Calibration windows of ``seqlen`` tokens run through a block in one call (at least 1)."""
    return max(1, WINDOW_TOKENS // max(seqlen, 1))
