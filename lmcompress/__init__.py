"""lmcompress: make pretrained transformer language models smaller, and measure what that cost."""

__version__ = "0.1.0"

from lmcompress.algorithms.masks import Pattern
from lmcompress.checkpoint.load import load, load_model
from lmcompress.checkpoint.save import save_model
from lmcompress.errors import UserError
from lmcompress.jobs import calibration, prune_pretrained
from lmcompress.measure.evaluate import evaluate_pretrained
from lmcompress.measure.perplexity import perplexity
from lmcompress.transforms.experts import ExpertConfig, drop_experts
from lmcompress.transforms.prune import PruneConfig, PruneReport, measure_sparsity
from lmcompress.transforms.prune import prune as _prune_in_place
from lmcompress.transforms.quantize import QuantConfig, quantize
from lmcompress.transforms.shrink import StructureConfig, structured_prune


def prune(model, config: PruneConfig, calib_data=None, *, device="cpu", progress=True):
    """Prune an in-memory model in place; returns ``(model, report)``. See ``lmcompress.transforms.prune.prune``."""
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
