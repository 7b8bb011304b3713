"""lmcompress: make pretrained transformer language models smaller, and measure what that cost.

The names below are imported on first use, so that ``import lmcompress.algorithms.sparsegpt`` (pure tensor math)
does not pull in transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Pattern": "lmcompress.algorithms.masks",
    "load": "lmcompress.checkpoint.load",
    "load_model": "lmcompress.checkpoint.load",
    "save_model": "lmcompress.checkpoint.save",
    "UserError": "lmcompress.errors",
    "prune_pretrained": "lmcompress.jobs",
    "quantize_pretrained": "lmcompress.jobs",
    "evaluate_pretrained": "lmcompress.measure.evaluate",
    "perplexity": "lmcompress.measure.perplexity",
    "ExpertConfig": "lmcompress.transforms.experts",
    "drop_experts": "lmcompress.transforms.experts",
    "PruneConfig": "lmcompress.transforms.prune",
    "PruneReport": "lmcompress.transforms.prune",
    "measure_sparsity": "lmcompress.transforms.prune",
    "QuantConfig": "lmcompress.transforms.quantize",
    "quantize": "lmcompress.transforms.quantize",
    "StructureConfig": "lmcompress.transforms.shrink",
    "structured_prune": "lmcompress.transforms.shrink",
}


def prune(model, config, calib_data=None, *, device="cpu", progress=True):
    """Prune an in-memory model in place; returns ``(model, report)``. See ``lmcompress.transforms.prune.prune``."""
    from lmcompress.transforms.prune import prune as prune_in_place

    report = prune_in_place(model, config, calib_data, device=device, progress=progress)
    return model, report


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmcompress' has no attribute {name!r}")


__all__ = sorted([*_EXPORTS, "prune"])
