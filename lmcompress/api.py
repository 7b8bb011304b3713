"""The Python API behind the CLI: whole jobs from a model name to a saved, described result."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch
from torch import nn

import lmcompress
from lmcompress.config import PruneConfig
from lmcompress.data import calibration_windows, eval_windows, load_text, windows_hash
from lmcompress.errors import UserError
from lmcompress.evaluate import perplexity
from lmcompress.families import context_length
from lmcompress.io import check_output, load_model, read_recipe, resolve_source, save_model, source_dtype
from lmcompress.pruning import PruneReport, measure_sparsity
from lmcompress.pruning import prune as prune_model

log = logging.getLogger(__name__)


def resolve_seqlen(model: nn.Module, seqlen: int | None) -> int:
    """``seqlen`` checked against the model's context; ``None`` means min(2048, context)."""
    ctx = context_length(model.config)
    if seqlen is None:
        return min(2048, ctx or 2048)
    if seqlen <= 0:
        raise UserError(f"--seqlen must be positive, got {seqlen}")
    if ctx is not None and seqlen > ctx:
        raise UserError(f"--seqlen {seqlen} is longer than the model's context of {ctx} tokens; use --seqlen {ctx}")
    return seqlen


def calibration(tokenizer, source: str, *, nsamples: int = 128, seqlen: int = 2048, seed: int = 0):
    """Calibration windows ``[nsamples, seqlen]`` and a description of them for the recipe."""
    text = load_text(source, role="calib")
    windows = calibration_windows(tokenizer, text.text, nsamples, seqlen, seed)
    info = {
        "source": text.description,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "sha256": windows_hash(windows),
    }
    return windows, info


def versions() -> dict:
    import transformers

    return {
        "lmcompress": lmcompress.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def prune_pretrained(
    model: str | Path,
    config: PruneConfig,
    output: str | Path,
    *,
    calib_data: str = "c4",
    nsamples: int = 128,
    seqlen: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> PruneReport:
    """Load ``model``, prune it as ``config`` says, and save it with its recipe to ``output``.

    Every input is checked before any work; the result is written to a temporary folder and renamed into
    place at the end, and the source model is never written to.
    """
    start = time.perf_counter()
    config.validate()
    check_output(output, overwrite, source=model)
    resolved = resolve_source(model, allow_pickle)
    _check_device(device)
    net, tokenizer = load_model(resolved, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    seqlen = resolve_seqlen(net, seqlen)
    calib, calib_info = None, None
    if config.needs_calibration:
        calib, calib_info = calibration(tokenizer, calib_data, nsamples=nsamples, seqlen=seqlen, seed=seed)
    report = prune_model(net, config, calib, device=device, progress=progress)
    recipe = {
        "lmcompress_version": lmcompress.__version__,
        "kind": "prune",
        "source_model": str(resolved),
        **config.to_dict(),
        "calibration": calib_info,
        "compute_dtype": dtype,
        "device": device,
        "achieved_sparsity": report.sparsity,
        "block_targets": report.block_targets,
        "layer_sparsity": report.layer_sparsity,
        "outlier_ratios": report.outlier_ratios,
        "damping_raised": report.damping,
        "prune_time_s": report.wall_time_s,
        "versions": versions(),
    }
    recipe["wall_time_s"] = time.perf_counter() - start
    save_model(net, tokenizer, output, recipe, overwrite=overwrite, dtype=source_dtype(net.config))
    return report


def evaluate_pretrained(
    model: str | Path,
    ppl_data: str,
    *,
    seqlen: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict:
    """Perplexity of a model (dense or compressed) and the sparsity measured in its weights."""
    _check_device(device)
    net, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    seqlen = resolve_seqlen(net, seqlen)
    text = load_text(ppl_data, role="eval")
    result = perplexity(net, eval_windows(tokenizer, text.text, seqlen), device=device, progress=progress)
    sparsity, per_layer = measure_sparsity(net)
    recipe = read_recipe(model) if Path(str(model)).is_dir() else None
    return {
        "model": str(model),
        "data": text.description,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "tokens": result.tokens,
        "windows": result.windows,
        "seqlen": result.seqlen,
        "sparsity": sparsity,
        "layer_sparsity": per_layer,
        "recipe": recipe,
    }


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
