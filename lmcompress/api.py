"""The Python API behind the CLI: whole jobs from a model name to a saved, described result."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch
from torch import nn

import lmcompress
from lmcompress.config import PruneConfig, QuantConfig
from lmcompress.data import calibration_windows, eval_windows, load_text, windows_hash
from lmcompress.errors import UserError
from lmcompress.evaluate import perplexity
from lmcompress.families import context_length, is_encoder
from lmcompress.io import check_output, load_model, read_recipe, resolve_source, save_model, source_dtype
from lmcompress.loader import source_surgery
from lmcompress.pruning import PruneReport, measure_sparsity
from lmcompress.pruning import prune as prune_model
from lmcompress.quantization import QuantReport, check_group_size, save_quantized
from lmcompress.quantization import quantize as quantize_model

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
    save_format: str = "dense",
) -> PruneReport:
    """Load ``model``, prune it as ``config`` says, and save it with its recipe to ``output``.

    Every input is checked before any work; the result is written to a temporary folder and renamed into
    place at the end, and the source model is never written to. ``save_format``: ``dense`` (loads with plain
    ``from_pretrained``) or ``packed`` (zeros stored as a bitmask / N:M layout: a smaller file that loads with
    ``lmcompress.load``; see docs/storage.md). Joint quantization (``config.bits``) always saves packed.
    """
    if save_format not in ("dense", "packed"):
        raise UserError(f"unknown --save-format {save_format!r}: choose dense or packed")
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
    if surgery := source_surgery(resolved):  # a resized / factorized source: its shapes stay as they were
        recipe["surgery"] = surgery
    if report.quantized is not None:  # joint prune + quantize (--bits): store the codes packed
        recipe["mask_sparsity"] = report.mask_sparsity
        recipe["wall_time_s"] = time.perf_counter() - start
        save_quantized(
            net, tokenizer, output, recipe, report.quantized, overwrite=overwrite, dtype=source_dtype(net.config)
        )
        return report
    recipe["wall_time_s"] = time.perf_counter() - start
    if save_format == "packed":
        from lmcompress.storage import save_packed

        save_packed(net, tokenizer, output, recipe, overwrite=overwrite, dtype=source_dtype(net.config))
        return report
    save_model(net, tokenizer, output, recipe, overwrite=overwrite, dtype=source_dtype(net.config))
    return report


def quantize_pretrained(
    model: str | Path,
    config: QuantConfig,
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
) -> QuantReport:
    """Load ``model``, quantize its block linear layers as ``config`` says, and save it packed to ``output``.

    Inputs are checked before any work (the group size against the layer widths right after loading);
    nothing is written unless the whole job succeeds, and the source model is never written to.
    """
    start = time.perf_counter()
    config.validate()
    check_output(output, overwrite, source=model)
    resolved = resolve_source(model, allow_pickle)
    _check_device(device)
    net, tokenizer = load_model(resolved, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    check_group_size(net, config.group_size)
    seqlen = resolve_seqlen(net, seqlen)
    calib, calib_info = None, None
    if config.needs_calibration:
        calib, calib_info = calibration(tokenizer, calib_data, nsamples=nsamples, seqlen=seqlen, seed=seed)
    report = quantize_model(net, config, calib, device=device, progress=progress)
    recipe = {
        "lmcompress_version": lmcompress.__version__,
        "kind": "quantize",
        "source_model": str(resolved),
        "quantization": config.to_dict(),
        "calibration": calib_info,
        "compute_dtype": dtype,
        "device": device,
        "quantized_layers": len(report.quantized),
        "quantized_weights": report.weights,
        "nominal_bits_per_weight": report.nominal_bits_per_weight,
        "layer_loss": report.layer_loss,
        "damping_raised": report.damping,
        "quantize_time_s": report.wall_time_s,
        "versions": versions(),
    }
    if surgery := source_surgery(resolved):
        recipe["surgery"] = surgery
    recipe["wall_time_s"] = time.perf_counter() - start
    save_quantized(
        net, tokenizer, output, recipe, report.quantized, overwrite=overwrite, dtype=source_dtype(net.config)
    )
    return report


def evaluate_pretrained(
    model: str | Path,
    ppl_data: str | None = "wikitext2",
    *,
    tasks: str | None = None,
    harness: str | None = None,
    limit: int | None = None,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    retrieval_lengths: list[int] | None = None,
    seqlen: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    reference: str | None = None,
    pooling: str | None = None,
) -> dict:
    """Perplexity of a model (dense or compressed) and the sparsity measured in its weights.

    ``tasks`` (``"ppl:FILE,mc:TASK,qa:TASK,retrieval"``) and ``harness`` (lm-evaluation-harness task names) add
    the evaluations of ``lmcompress.tasks``; the result then also has ``tasks``, ``metrics`` and
    ``higher_is_better`` (see docs/evaluation.md), and the perplexity keys come from the first ``ppl`` task.

    Encoders (BERT-style) get MLM perplexity (if they have the head) and, against ``reference`` (or the
    recipe's local source model), sentence-embedding cosine similarity: see ``lmcompress.encoder_eval``.
    """
    _check_device(device)
    net, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    seqlen = resolve_seqlen(net, seqlen)
    if tasks or harness or limit is not None:  # lmcompress.tasks; ppl_data, if given, is one more task
        if is_encoder(net.config):
            raise UserError("--tasks, --harness and --limit evaluate causal LMs; for encoders use --ppl-data only")
        from lmcompress.tasks import evaluate_model

        result = evaluate_model(
            net,
            tokenizer,
            tasks=tasks,
            ppl_data=ppl_data,
            harness=harness,
            seqlen=seqlen,
            limit=limit,
            shots=shots,
            seed=seed,
            batch_size=batch_size,
            retrieval_lengths=retrieval_lengths,
            device=device,
            progress=progress,
        )
        sparsity, per_layer = measure_sparsity(net)
        recipe = read_recipe(model) if Path(str(model)).is_dir() else None
        return {"model": str(model), **result, "sparsity": sparsity, "layer_sparsity": per_layer, "recipe": recipe}
    text = load_text(ppl_data or "wikitext2", role="eval")
    if is_encoder(net.config):
        from lmcompress.encoder_eval import evaluate_encoder_folder

        enc = evaluate_encoder_folder(
            net,
            tokenizer,
            model,
            text.text,
            reference=reference,
            pooling=pooling,
            seqlen=seqlen,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            progress=progress,
        )
        sparsity, per_layer = measure_sparsity(net)
        recipe = read_recipe(model) if Path(str(model)).is_dir() else None
        mlm = enc["mlm"] or {}
        return {
            "model": str(model),
            "data": text.description,
            "perplexity": mlm.get("perplexity"),
            **enc,
            "sparsity": sparsity,
            "layer_sparsity": per_layer,
            "recipe": recipe,
        }
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
