"""lmcompress: make pretrained transformer language models smaller, and measure what that cost."""

__version__ = "0.1.0"

from lmcompress.algorithms.masks import Pattern
from lmcompress.api import evaluate_pretrained, prune_pretrained
from lmcompress.config import PruneConfig, QuantConfig
from lmcompress.errors import UserError
from lmcompress.evaluate import perplexity
from lmcompress.experts import ExpertConfig, drop_experts
from lmcompress.io import load_model, save_model
from lmcompress.jobs import calibration
from lmcompress.loader import load
from lmcompress.pruning import PruneReport, measure_sparsity
from lmcompress.pruning import prune as _prune_in_place
from lmcompress.quantization import quantize
from lmcompress.structured import StructureConfig, structured_prune


def prune(model, config: PruneConfig, calib_data=None, *, device="cpu", progress=True):
    """Prune an in-memory model in place; returns ``(model, report)``. See ``lmcompress.pruning.prune``."""
    report = _prune_in_place(model, config, calib_data, device=device, progress=progress)
    return model, report


__all__ = [
    "ExpertConfig",
    "Pattern",
    "PruneConfig",
    "PruneReport",
    "QuantConfig",
    "StructureConfig",
    "UserError",
    "calibration",
    "drop_experts",
    "evaluate_pretrained",
    "load",
    "load_model",
    "measure_sparsity",
    "perplexity",
    "prune",
    "prune_pretrained",
    "quantize",
    "save_model",
    "structured_prune",
]
