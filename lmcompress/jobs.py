"""What every whole-model job shares: check the inputs, load the source, draw calibration windows, describe it.

``prune_pretrained``, ``quantize_pretrained``, ``structured_prune_pretrained``, ``drop_experts_pretrained`` and
``factorize_pretrained`` are each one call of :func:`run_job`: :func:`open_job` → one in-place transformation →
``job.recipe(...)`` → save.

Times, the same for every kind of job: the recipe's ``wall_time_s`` is the whole job (checks, loading, drawing
the calibration windows and the transformation, up to the save that writes the recipe); its ``<kind>_time_s``
(``prune_time_s``, ``quantize_time_s``, ``structured_time_s``, ``experts_time_s``, ``factorize_time_s``) and the
returned report's ``wall_time_s`` are the transformation alone.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from lmcompress import __version__
from lmcompress.calibration import distributed, phases
from lmcompress.calibration.data import check_text_source, draw, tokenized_source
from lmcompress.calibration.phases import phase
from lmcompress.checkpoint.folder import check_output, json_text, read_recipe
from lmcompress.checkpoint.load import is_gguf, load_config, load_model, resolve_source, source_dtype
from lmcompress.checkpoint.save import save_model, save_quantized
from lmcompress.errors import UserError
from lmcompress.models.families import context_length
from lmcompress.models.layouts import MOE_LAYOUTS, head_shape, structure_layout
from lmcompress.search.run import SearchConfig, SearchReport
from lmcompress.transforms.experts import ExpertConfig, ExpertReport, drop_experts
from lmcompress.transforms.factorize import FactorizeConfig, FactorizeReport, factorize
from lmcompress.transforms.prune import PruneConfig, PruneReport, prune
from lmcompress.transforms.quantize import QuantConfig, QuantReport, quantize
from lmcompress.transforms.shrink import (
    StructureConfig,
    StructureReport,
    _n_remove,
    structured_prune,
)


def resolve_seqlen(model: nn.Module, seqlen: int | None, minimum: int = 1) -> int:
    """``seqlen`` checked against the model's context; ``None`` means min(2048, context). Perplexity needs
    ``minimum=2``: a window of one token predicts nothing."""
    ctx = context_length(model.config)
    if seqlen is None:
        return min(2048, ctx or 2048)
    if seqlen < minimum:
        need = "at least 2 (one token to predict from, one predicted)" if minimum == 2 else f"at least {minimum}"
        raise UserError(f"seqlen must be {need}, got {seqlen}", param="seqlen")
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
    """Accept only ``cpu``, ``cuda`` and ``cuda:N`` of a GPU that exists: other torch devices (meta, mps, xpu...)
    would pass ``torch.device`` and fail deep inside a job."""
    text = str(device).strip().lower()
    if text == "cpu":
        return
    if text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise UserError(f"unsupported device {device!r}: use cpu, cuda or cuda:N", param="device")
    if not torch.cuda.is_available():
        raise UserError(f"device {device} was asked for but no CUDA GPU is available; use cpu", param="device")
    count = torch.cuda.device_count()
    if text != "cuda" and int(text[5:]) >= count:
        raise UserError(
            f"device {device}: there is no such GPU ({count} available: cuda:0..cuda:{count - 1})", param="device"
        )


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
        recipe["timings_s"] = phases.seconds()  # where the time went, up to here (calibration.phases)
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
    prepared = None
    if needs_calibration:
        check_text_source(calib_data)  # a wrong path fails now, not after the model has loaded
        prepared = _tokenize_meanwhile(resolved, calib_data, trust_remote_code)
    with phase("load"):
        net, tokenizer = load_model(
            resolved, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
    if check_model is not None:
        check_model(net)
    length = resolve_seqlen(net, seqlen)  # checked even when unused: a wrong --seqlen is an error
    calib, calib_info = None, None
    if needs_calibration:
        with phase("calibration text"):
            ready = _result_or_none(prepared)
            calib, calib_info = draw(tokenizer, calib_data, nsamples=nsamples, seqlen=length, seed=seed, prepared=ready)
    surgery = list((recipe_of_source or {}).get("surgery") or [])
    return Job(str(resolved), net, tokenizer, calib, calib_info, device, dtype, surgery, start)


def _tokenize_meanwhile(source: str, calib_data: str, trust_remote_code: bool) -> Future | None:
    """Tokenize the calibration text in a thread while the model loads (the tokenizer's Rust code releases
    the GIL): a plain model folder's own tokenizer, loaded once more for it. None where that does not apply."""
    folder = Path(str(source))
    if not folder.is_dir() or is_gguf(str(source)) or not (folder / "tokenizer.json").is_file():
        return None

    def work():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        return tokenized_source(tokenizer, calib_data)

    pool = ThreadPoolExecutor(1, thread_name_prefix="lmcompress-tokenize")
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def _result_or_none(future: Future | None):
    """The thread's tokenized text, or None (then the text is tokenized here, where errors are reported)."""
    if future is None:
        return None
    try:
        return future.result()
    except Exception:
        return None


R = TypeVar("R")


def run_job(
    kind: str,
    model: str | Path,
    config,
    output: str | Path,
    transform: Callable[..., R],
    *,
    fields: Callable[[R], dict],
    save_as: str | Callable[[R], str] = "dense",
    progress: bool = True,
    check_source: Callable[[object, dict | None], None] | None = None,
    check_model: Callable[[nn.Module], None] | None = None,
    extra_files: Callable[[R], dict[str, str]] | None = None,
    offload: str = "auto",
    resume: bool = False,
    storage: str = "dense",
    **options,
) -> R:
    """The one skeleton of every whole job: validate ``config``, :func:`open_job`, transform, recipe, save.

    ``transform(model, config, calib, device=..., progress=...)`` changes the model in place and returns its
    report; ``fields(report)`` is what the recipe says was done. The recipe also gets ``<kind>_time_s``, the
    report's ``wall_time_s`` (the transform alone), and ``wall_time_s``, the whole job from the first check
    to the save. ``save_as`` (a string, or a function of the report): ``dense`` (plain ``from_pretrained``
    loads it), ``packed`` (sparse layout, see docs/storage.md) or ``quantized`` (the report's ``quantized``
    codes). ``extra_files(report)`` (name → text) are saved in the same folder. ``options`` and the two checks go
    to :func:`open_job`. ``offload`` / ``resume``: stream the weights from disk (:mod:`lmcompress.streaming`;
    ``storage``, dense or packed, is then how the output is stored).
    """
    config.validate()
    phases.reset()
    distributed.refuse_unsupported(kind)  # under torchrun: prune and quantize split their work, others refuse
    options["device"] = distributed.init_from_env(options.get("device", "cpu"))  # cuda:LOCAL_RANK with NCCL
    from lmcompress.streaming import run_streamed, should_stream

    check_output(output, options.get("overwrite", False), source=model)  # errors in the order open_job gives them
    source = resolve_source(model, options.get("allow_pickle", False))
    flags = {"dtype": options.get("dtype", "float32"), "trust_remote_code": options.get("trust_remote_code", False)}
    if should_stream(kind, source, config, offload=offload, resume=resume, **flags):
        if distributed.active():
            raise UserError(
                "streaming from disk (offload disk, resume) does not run under torch.distributed yet: run it as "
                "one process, or load the model whole (offload none) under torchrun",
                param=("offload", "resume"),
            )
        return run_streamed(
            kind,
            source,
            config,
            output,
            transform,
            fields=fields,
            storage=storage,
            progress=progress,
            check_model=check_model,
            extra_files=extra_files,
            resume=resume,
            **options,
        )
    job = open_job(
        model,
        output,
        needs_calibration=config.needs_calibration,
        check_source=check_source,
        check_model=check_model,
        **options,
    )
    with distributed.session(), phase("transform (rest)"):  # several processes: windows and solves shared out
        report = transform(job.model, config, job.calib, device=job.device, progress=progress and distributed.is_main())
    recipe = job.recipe(kind, {**fields(report), f"{kind}_time_s": report.wall_time_s, **distributed.recipe_fields()})
    if not distributed.is_main():  # rank 0 writes the output; the others wait for it
        distributed.barrier()
        return report
    how = save_as(report) if callable(save_as) else save_as
    save = {"overwrite": options.get("overwrite", False), "dtype": source_dtype(job.model.config)}
    if extra_files is not None:
        save["extra_files"] = extra_files(report)
    if how == "quantized":
        save_quantized(job.model, job.tokenizer, output, recipe, report.quantized, **save)
    elif how == "packed":
        from lmcompress.checkpoint.packed import save_packed

        save_packed(job.model, job.tokenizer, output, recipe, **save)
    else:
        save_model(job.model, job.tokenizer, output, recipe, **save)
    distributed.barrier()
    return report


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

    def fields(report: PruneReport) -> dict:
        joint = {} if report.quantized is None else {"mask_sparsity": report.mask_sparsity}
        return {
            **config.to_dict(),
            "achieved_sparsity": report.sparsity,
            "block_targets": report.block_targets,
            "layer_sparsity": report.layer_sparsity,
            "outlier_ratios": report.outlier_ratios,
            "owl_lambda_effective": report.owl_lambda_effective,
            "damping_raised": report.damping,
            "in_block_fallback": report.in_block_fallback,
            **joint,
        }

    def save_as(report: PruneReport) -> str:  # joint prune + quantize (--bits): store the codes packed
        return "quantized" if report.quantized is not None else save_format

    return run_job(
        "prune",
        model,
        config,
        output,
        prune,
        fields=fields,
        save_as=save_as,
        progress=progress,
        check_model=config.check_model,
        storage="packed" if config.bits is not None or save_format == "packed" else "dense",
        **options,
    )


def quantize_pretrained(
    model: str | Path, config: QuantConfig, output: str | Path, *, progress: bool = True, **options
) -> QuantReport:
    """Load ``model``, quantize its block linear layers as ``config`` says, and save it packed to ``output``.

    ``options`` as for :func:`prune_pretrained`. Inputs are checked before any work; nothing is written unless
    the whole job succeeds, and the source model is never written to.
    """

    def fields(report: QuantReport) -> dict:
        return {
            "quantization": config.to_dict(),
            "quantized_layers": len(report.quantized),
            "quantized_weights": report.weights,
            "nominal_bits_per_weight": report.nominal_bits_per_weight,
            "layer_loss": report.layer_loss,
            "damping_raised": report.damping,
            "in_block_fallback": report.in_block_fallback,
        }

    return run_job(
        "quantize",
        model,
        config,
        output,
        quantize,
        fields=fields,
        save_as="quantized",
        progress=progress,
        storage="packed",
        **options,
    )


def structured_prune_pretrained(
    model: str | Path, config: StructureConfig, output: str | Path, *, progress: bool = True, **options
) -> StructureReport:
    """Load ``model``, remove FFN channels / heads as ``config`` says, and save it with its recipe to ``output``.

    ``options`` are those of :func:`lmcompress.jobs.open_job`. Everything that can be checked is checked before
    the model is loaded; the result is written to a temporary folder and renamed into place, and the source is
    never written to.
    """

    def check_source(cfg, recipe: dict | None) -> None:
        if recipe and (recipe.get("surgery") or recipe.get("storage")):
            raise UserError(
                f"{model} was written by lmcompress with per-layer shapes or packed storage; structured pruning "
                "needs a model that plain from_pretrained loads (a dense model, or one pruned with one ratio)"
            )
        for s in config.structures:
            layout = structure_layout(cfg, s)
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

    def fields(report: StructureReport) -> dict:
        return {
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
            "surgery": report.surgery,
        }

    return run_job(
        "structured",
        model,
        config,
        output,
        structured_prune,
        fields=fields,
        progress=progress,
        check_source=check_source,
        **options,
    )


def drop_experts_pretrained(
    model: str | Path, config: ExpertConfig, output: str | Path, *, progress: bool = True, **options
) -> ExpertReport:
    """Load ``model``, drop experts as ``config`` says, save to ``output`` (loads with plain ``from_pretrained``).

    ``options`` are those of :func:`lmcompress.jobs.open_job`; a bad ``--keep`` fails before weights are loaded.
    """

    def fields(report: ExpertReport) -> dict:
        return {
            **config.to_dict(),
            "experts_before": report.experts_before,
            "experts_after": report.experts_after,
            "kept_experts": report.kept,
            "expert_scores": report.scores,
            "relative_error": report.relative_error,
            "params_before": report.params_before,
            "params_after": report.params_after,
        }

    return run_job(
        "experts",
        model,
        config,
        output,
        drop_experts,
        fields=fields,
        progress=progress,
        check_source=lambda cfg, _recipe: config.check_model(cfg),
        **options,
    )


def _refuse_moe(config) -> None:
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

    def fields(report: FactorizeReport) -> dict:
        return {
            **config.to_dict(),
            "threshold": report.threshold,
            "layers": {k: asdict(v) for k, v in report.layers.items()},
            "params_before": report.params_before,
            "params_after": report.params_after,
            "linear_params_before": report.linear_params_before,
            "linear_params_after": report.linear_params_after,
            "surgery": report.surgery,
        }

    return run_job(
        "factorize",
        model,
        config,
        output,
        factorize,
        fields=fields,
        progress=progress,
        check_source=lambda cfg, _recipe: _refuse_moe(cfg),
        **options,
    )


def search_pretrained(
    model: str | Path,
    config: SearchConfig,
    output: str | Path,
    *,
    progress: bool = True,
    nsamples: int = 128,
    **options,
) -> SearchReport:
    """Search per-layer (or per-block) levels as ``config`` asks and save the chosen model.

    ``nsamples`` windows give the statistics the level database is built from, ``config.held_out`` more
    (drawn with them, never used for statistics) score the candidates. The database and the search state live
    in a hidden work folder beside ``output``, held by this process, until the end (kept with
    ``config.keep_database``): a killed search run again with the same settings continues from its last finished
    generation (:mod:`lmcompress.search.work`). Sparsity searches save a dense folder (zeros stored), bit-width
    searches a packed one (each layer's codes at its chosen width). ``config.max_loss`` and ``config.tune`` pick
    the other searches (:func:`lmcompress.search.run.run_search`).
    """
    from lmcompress.search.run import run_search
    from lmcompress.search.work import held_work, recipe_fields, split_windows

    with held_work(output, keep=config.keep_database) as work:

        def transform(net, cfg, windows, *, device, progress):
            calib, held_out = split_windows(windows, nsamples)
            return run_search(net, cfg, calib, held_out, work, device=device, progress=progress)

        return run_job(
            "search",
            model,
            config,
            output,
            transform,
            fields=lambda r: recipe_fields(config, r),
            save_as=lambda r: "quantized" if r.quantized is not None else "dense",
            progress=progress,
            extra_files=lambda r: {"search.json": json_text(r.to_dict()) + "\n"},
            nsamples=nsamples + config.held_out,
            **options,
        )
