"""What every whole-model job shares: check the inputs, load the source, draw calibration windows, describe it.

``prune_pretrained``, ``quantize_pretrained``, ``structured_prune_pretrained``, ``drop_experts_pretrained`` and
``factorize_pretrained`` are each: :func:`open_job` → one in-place transformation → ``job.recipe(...)`` → save.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmcompress import __version__
from lmcompress.calibration.data import draw
from lmcompress.checkpoint.folder import check_output, read_recipe
from lmcompress.checkpoint.load import load_config, load_model, resolve_source, source_dtype
from lmcompress.checkpoint.save import save_model, save_quantized
from lmcompress.errors import UserError
from lmcompress.models.families import context_length
from lmcompress.transforms.experts import ExpertConfig, ExpertReport, drop_experts
from lmcompress.transforms.factorize import FactorizeConfig, FactorizeReport, factorize
from lmcompress.transforms.prune import PruneConfig, PruneReport, prune
from lmcompress.transforms.quantize import QuantConfig, QuantReport, check_group_size, quantize
from lmcompress.transforms.shrink import (
    StructureConfig,
    StructureReport,
    _n_remove,
    head_shape,
    layout_of,
    structured_prune,
)


def resolve_seqlen(model: nn.Module, seqlen: int | None) -> int:
    """``seqlen`` checked against the model's context; ``None`` means min(2048, context)."""
    ctx = context_length(model.config)
    if seqlen is None:
        return min(2048, ctx or 2048)
    if seqlen <= 0:
        raise UserError(f"seqlen must be positive, got {seqlen}", param="seqlen")
    if ctx is not None and seqlen > ctx:
        raise UserError(
            f"seqlen {seqlen} is longer than the model's context of {ctx} tokens; use seqlen {ctx}", param="seqlen"
        )
    return seqlen


def versions() -> dict:
    import transformers

    return {
        "lmcompress": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def check_device(device: str) -> None:
    """A clear error for a device string torch does not know, or CUDA asked for where there is none."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N", param="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is available; use device cpu", param="device")


@dataclass
class Job:
    """A loaded source model with its calibration windows, and what the recipe says about both."""

    source: str  # the resolved folder or hub id
    model: nn.Module
    tokenizer: object
    calib: torch.Tensor | None
    calib_info: dict | None
    device: str
    dtype: str
    source_surgery: list[dict] = field(default_factory=list)  # shape records of a resized source, kept
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def recipe(self, kind: str, fields: dict) -> dict:
        """The recipe: what was done (``fields``), from what, on what data, with which versions and how long."""

        surgery = self.source_surgery + list(fields.get("surgery") or [])  # the source's records rebuild first
        recipe = {
            "lmcompress_version": __version__,
            "kind": kind,
            "source_model": self.source,
            **{k: v for k, v in fields.items() if k != "surgery"},
            "calibration": self.calib_info,
            "compute_dtype": self.dtype,
            "device": self.device,
            "versions": versions(),
        }
        if surgery:
            recipe["surgery"] = surgery
        recipe["wall_time_s"] = self.elapsed()
        return recipe


def open_job(
    model: str | Path,
    output: str | Path,
    *,
    needs_calibration: bool,
    calib_data: str = "c4",
    nsamples: int = 128,
    seqlen: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    check_source: Callable[[object, dict | None], None] | None = None,
    check_model: Callable[[nn.Module], None] | None = None,
) -> Job:
    """Check everything that can be checked before any work, then load the source and draw the windows.

    ``check_source(config, recipe)`` sees the source's config (and ``lmcompress.json``, if it has one) before its
    weights are loaded, ``check_model`` the loaded model before calibration text is read. The output folder
    is only checked here; the caller saves into it at the end.
    """
    start = time.perf_counter()
    check_output(output, overwrite, source=model)
    resolved = resolve_source(model, allow_pickle)
    check_device(device)
    recipe_of_source = read_recipe(resolved) if Path(str(resolved)).is_dir() else None
    if check_source is not None:
        check_source(load_config(resolved, trust_remote_code), recipe_of_source)
    net, tokenizer = load_model(resolved, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if check_model is not None:
        check_model(net)
    length = resolve_seqlen(net, seqlen)  # checked even when unused: a wrong --seqlen is an error
    calib, calib_info = None, None
    if needs_calibration:
        calib, calib_info = draw(tokenizer, calib_data, nsamples=nsamples, seqlen=length, seed=seed)
    surgery = list((recipe_of_source or {}).get("surgery") or [])
    return Job(str(resolved), net, tokenizer, calib, calib_info, device, dtype, surgery, start)


def prune_pretrained(
    model: str | Path,
    config: PruneConfig,
    output: str | Path,
    *,
    progress: bool = True,
    save_format: str = "dense",
    **options,
) -> PruneReport:
    """Load ``model``, prune it as ``config`` says, and save it with its recipe to ``output``.

    ``options`` are those of :func:`lmcompress.jobs.open_job` (``calib_data``, ``nsamples``, ``seqlen``, ``seed``,
    ``device``, ``dtype``, ``overwrite``, ``trust_remote_code``, ``allow_pickle``). Every input is checked before
    any work; the result is written to a temporary folder and renamed into place at the end, and the source
    model is never written to. ``save_format``: ``dense`` (loads with plain ``from_pretrained``) or ``packed``
    (zeros stored as a bitmask / N:M layout: a smaller file that loads with ``lmcompress.load``; see
    docs/storage.md). Joint quantization (``config.bits``) always saves packed.
    """
    if save_format not in ("dense", "packed"):
        raise UserError(f"unknown save_format {save_format!r}: choose dense or packed", param="save_format")
    config.validate()
    job = open_job(model, output, needs_calibration=config.needs_calibration, **options)
    report = prune(job.model, config, job.calib, device=job.device, progress=progress)
    fields = {
        **config.to_dict(),
        "achieved_sparsity": report.sparsity,
        "block_targets": report.block_targets,
        "layer_sparsity": report.layer_sparsity,
        "outlier_ratios": report.outlier_ratios,
        "damping_raised": report.damping,
        "prune_time_s": report.wall_time_s,
    }
    save = {"overwrite": options.get("overwrite", False), "dtype": source_dtype(job.model.config)}
    if report.quantized is not None:  # joint prune + quantize (--bits): store the codes packed
        recipe = job.recipe("prune", {**fields, "mask_sparsity": report.mask_sparsity})
        save_quantized(job.model, job.tokenizer, output, recipe, report.quantized, **save)
    elif save_format == "packed":
        from lmcompress.checkpoint.packed import save_packed

        save_packed(job.model, job.tokenizer, output, job.recipe("prune", fields), **save)
    else:
        save_model(job.model, job.tokenizer, output, job.recipe("prune", fields), **save)
    return report


def quantize_pretrained(
    model: str | Path, config: QuantConfig, output: str | Path, *, progress: bool = True, **options
) -> QuantReport:
    """Load ``model``, quantize its block linear layers as ``config`` says, and save it packed to ``output``.

    ``options`` as for :func:`prune_pretrained`. Inputs are checked before any work (the group size against the
    layer widths right after loading); nothing is written unless the whole job succeeds, and the source model
    is never written to.
    """
    config.validate()
    job = open_job(
        model,
        output,
        needs_calibration=config.needs_calibration,
        check_model=lambda net: check_group_size(net, config.group_size),
        **options,
    )
    report = quantize(job.model, config, job.calib, device=job.device, progress=progress)
    fields = {
        "quantization": config.to_dict(),
        "quantized_layers": len(report.quantized),
        "quantized_weights": report.weights,
        "nominal_bits_per_weight": report.nominal_bits_per_weight,
        "layer_loss": report.layer_loss,
        "damping_raised": report.damping,
        "quantize_time_s": report.wall_time_s,
    }
    save_quantized(
        job.model,
        job.tokenizer,
        output,
        job.recipe("quantize", fields),
        report.quantized,
        overwrite=options.get("overwrite", False),
        dtype=source_dtype(job.model.config),
    )
    return report


def structured_prune_pretrained(
    model: str | Path, config: StructureConfig, output: str | Path, *, progress: bool = True, **options
) -> StructureReport:
    """Load ``model``, remove FFN channels / heads as ``config`` says, and save it with its recipe to ``output``.

    ``options`` are those of :func:`lmcompress.jobs.open_job`. Everything that can be checked is checked before
    the model is loaded; the result is written to a temporary folder and renamed into place, and the source is
    never written to.
    """
    from lmcompress.checkpoint.load import source_dtype
    from lmcompress.checkpoint.save import save_model
    from lmcompress.jobs import open_job

    config.validate()

    def check_source(cfg, recipe: dict | None) -> None:
        if recipe and (recipe.get("surgery") or recipe.get("storage")):
            raise UserError(
                f"{model} was written by lmcompress with per-layer shapes or packed storage; structured pruning "
                "needs a model that plain from_pretrained loads (a dense model, or one pruned with one ratio)"
            )
        for s in config.structures:
            layout = layout_of(cfg, s)
            if s == "heads":
                if layout.heads == "uniform" and config.allocation != "uniform":
                    raise UserError(
                        f"{cfg.model_type} models read their head count from the config in forward: "
                        "use allocation uniform",
                        param="allocation",
                    )
                units = head_shape(cfg).kv_heads
            else:
                units = getattr(cfg, layout.ffn_width, None) or 4 * cfg.hidden_size
            _n_remove(config.ratio, units, s)

    job = open_job(model, output, needs_calibration=config.needs_calibration, check_source=check_source, **options)
    report = structured_prune(job.model, config, job.calib, device=job.device, progress=progress)
    fields = {
        **config.to_dict(),
        "uniform": report.uniform,
        "ffn_widths": report.ffn_widths,
        "heads": report.heads,
        "kv_heads": report.kv_heads,
        "block_ratios": report.block_ratios,
        "removed_units": report.removed,
        "outlier_ratios": report.outlier_ratios,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "prune_time_s": report.wall_time_s,
        "surgery": report.surgery,
    }
    recipe = job.recipe("structured", fields)
    save_model(
        job.model,
        job.tokenizer,
        output,
        recipe,
        overwrite=options.get("overwrite", False),
        dtype=source_dtype(job.model.config),
    )
    return report


def drop_experts_pretrained(
    model: str | Path, config: ExpertConfig, output: str | Path, *, progress: bool = True, **options
) -> ExpertReport:
    """Load ``model``, drop experts as ``config`` says, save to ``output`` (loads with plain ``from_pretrained``).

    ``options`` are those of :func:`lmcompress.jobs.open_job`; a bad ``--keep`` fails before weights are loaded.
    """
    from lmcompress.checkpoint.load import source_dtype
    from lmcompress.checkpoint.save import save_model
    from lmcompress.jobs import open_job

    config.validate()
    job = open_job(
        model, output, needs_calibration=True, check_source=lambda cfg, _recipe: config.check_model(cfg), **options
    )
    report = drop_experts(job.model, config, job.calib, device=job.device, progress=progress)
    fields = {
        **config.to_dict(),
        "experts_before": report.experts_before,
        "experts_after": report.experts_after,
        "kept_experts": report.kept,
        "expert_scores": report.scores,
        "relative_error": report.relative_error,
        "params_before": report.params_before,
        "params_after": report.params_after,
    }
    recipe = job.recipe("experts", fields)
    save_model(
        job.model,
        job.tokenizer,
        output,
        recipe,
        overwrite=options.get("overwrite", False),
        dtype=source_dtype(job.model.config),
    )
    report.wall_time_s = recipe["wall_time_s"]
    return report


def _refuse_moe(config) -> None:
    from lmcompress.transforms.experts import MOE_LAYOUTS

    if getattr(config, "model_type", None) in MOE_LAYOUTS:
        raise UserError(
            f"factorizing {config.model_type} (mixture-of-experts) models is not supported yet: transformers saves "
            "their fused experts per expert, which lmcompress.load cannot yet read back next to surgery records; "
            "drop experts instead (`lmcompress drop-experts`) to shrink MoE models"
        )


def factorize_pretrained(
    model: str | Path, config: FactorizeConfig, output: str | Path, *, progress: bool = True, **options
) -> FactorizeReport:
    """Load ``model``, factorize it as ``config`` says, and save it (loads with ``lmcompress.load``).

    ``options`` are those of :func:`lmcompress.jobs.open_job`. A resized source keeps its surgery records (they
    rebuild the layers that the low-rank records then replace).
    """
    from lmcompress.checkpoint.load import source_dtype
    from lmcompress.checkpoint.save import save_model
    from lmcompress.jobs import open_job

    config.validate()
    job = open_job(
        model,
        output,
        needs_calibration=config.needs_calibration,
        check_source=lambda cfg, _recipe: _refuse_moe(cfg),
        **options,
    )
    report = factorize(job.model, config, job.calib, device=job.device, progress=progress)
    fields = {
        **config.to_dict(),
        "threshold": report.threshold,
        "layers": {k: asdict(v) for k, v in report.layers.items()},
        "params_before": report.params_before,
        "params_after": report.params_after,
        "linear_params_before": report.linear_params_before,
        "linear_params_after": report.linear_params_after,
        "surgery": report.surgery,
    }
    recipe = job.recipe("factorize", fields)
    save_model(
        job.model,
        job.tokenizer,
        output,
        recipe,
        overwrite=options.get("overwrite", False),
        dtype=source_dtype(job.model.config),
    )
    report.wall_time_s = recipe["wall_time_s"]
    return report
