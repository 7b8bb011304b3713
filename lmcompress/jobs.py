"""What every whole-model job shares: check the inputs, load the source, draw calibration windows, describe it.

``prune_pretrained``, ``quantize_pretrained``, ``structured_prune_pretrained``, ``drop_experts_pretrained``,
``factorize_pretrained`` and ``search_pretrained`` are each one call of :func:`run_job`: checks →
:func:`open_job` → one in-place transformation → ``job.recipe(...)`` → save. Its :class:`JobOptions`
(``lmcompress.job_options``) are the same for every kind of job.

How the model's blocks are held and walked is the job's *placement*, chosen once before any work: in memory
(:class:`InMemory`), in memory on every rank of a ``torchrun`` launch with the windows and solves shared out
(:class:`Distributed`, ``calibration.distributed``), or streamed from disk block by block
(:class:`lmcompress.streaming.Streamed`, ``--offload disk``). The transformation is the same code in all three.

Times, the same for every kind of job: the recipe's ``wall_time_s`` is the whole job (checks, loading, drawing
the calibration windows and the transformation, up to the save that writes the recipe); its ``<kind>_time_s``
(``prune_time_s``, ``quantize_time_s``, ``structured_time_s``, ``experts_time_s``, ``factorize_time_s``) and the
returned report's ``wall_time_s`` are the transformation alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from torch import nn

from lmcompress import __version__
from lmcompress.calibration import distributed, phases
from lmcompress.calibration.data import check_text_source, draw, embedding_rows, tokenized_source
from lmcompress.calibration.phases import phase
from lmcompress.checkpoint.folder import check_output, json_text, read_recipe
from lmcompress.checkpoint.load import is_gguf, load_config, load_model, resolve_source, source_dtype
from lmcompress.checkpoint.save import save_model, save_quantized
from lmcompress.errors import UserError
from lmcompress.job_options import JobOptions
from lmcompress.models.layouts import MOE_LAYOUTS, head_shape, structure_layout
from lmcompress.runtime import check_device, resolve_seqlen, versions
from lmcompress.search.run import SearchConfig, SearchReport
from lmcompress.streaming import Streamed, should_stream
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
    output: Path | None = None  # the checked output folder (written only at the end)
    overwrite: bool = False

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


class Placement(Protocol):
    """How a job holds its model and walks its blocks: :class:`InMemory`, :class:`Distributed` or
    :class:`lmcompress.streaming.Streamed`."""

    name: str
    shows_progress: bool  # whether this process draws progress bars
    tokenize_meanwhile: bool  # tokenize the calibration text in a thread while the model loads

    def load(self, source: str, *, dtype: str, trust_remote_code: bool, allow_pickle: bool) -> tuple: ...

    def attach(self, job: Job, kind: str, config, *, resume: bool) -> None: ...

    def running(self) -> AbstractContextManager: ...

    def recipe_fields(self) -> dict: ...

    def save(self, job: Job, recipe: dict, *, how: str, report, extra_files: Callable | None) -> None: ...


class InMemory:
    """The whole model loaded in memory; each block visits the compute device while it is worked on."""

    name = "memory"
    shows_progress = True
    tokenize_meanwhile = True  # loading takes long enough to hide the tokenizing

    def load(self, source: str, *, dtype: str, trust_remote_code: bool, allow_pickle: bool) -> tuple:
        with phase("load"):
            return load_model(source, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def attach(self, job: Job, kind: str, config, *, resume: bool) -> None:
        pass

    def running(self) -> AbstractContextManager:
        return nullcontext()

    def recipe_fields(self) -> dict:
        return {}

    def save(self, job: Job, recipe: dict, *, how: str, report, extra_files: Callable | None) -> None:
        """Save the model ``how`` says: ``dense``, ``packed`` or ``quantized`` (the report's codes)."""
        save = {"overwrite": job.overwrite, "dtype": source_dtype(job.model.config)}
        if extra_files is not None:
            save["extra_files"] = extra_files(report)
        if how == "quantized":
            fp8 = getattr(report, "fp8", None) or None  # scheme fp8: E4M3 codes + scales
            save_quantized(job.model, job.tokenizer, job.output, recipe, report.quantized, fp8=fp8, **save)
        elif how == "packed":
            from lmcompress.checkpoint.packed import save_packed

            save_packed(job.model, job.tokenizer, job.output, recipe, **save)
        else:
            save_model(job.model, job.tokenizer, job.output, recipe, **save)


class Distributed(InMemory):
    """Every rank of a ``torchrun`` launch holds the model; the windows and the layer solves are shared out
    (``calibration.distributed``). Rank 0 alone draws progress and writes the output; the others wait for it."""

    name = "distributed"

    @property
    def shows_progress(self) -> bool:
        return distributed.is_main()

    def running(self) -> AbstractContextManager:
        return distributed.session()

    def recipe_fields(self) -> dict:
        return distributed.recipe_fields()

    def save(self, job: Job, recipe: dict, *, how: str, report, extra_files: Callable | None) -> None:
        if distributed.is_main():
            super().save(job, recipe, how=how, report=report, extra_files=extra_files)
        distributed.barrier()


def choose_placement(kind: str, source: str, config, options: JobOptions, storage: str) -> Placement:
    """Where the job's model lives: streamed from disk (``offload``, ``resume``, or a model too big for memory),
    shared over the ranks of a process group, or in memory. Refuses what cannot be done before any work."""
    flags = {"dtype": options.dtype, "trust_remote_code": options.trust_remote_code}
    streams = should_stream(kind, source, config, offload=options.offload, resume=options.resume, **flags)
    several = distributed.world()[1] > 1
    if streams and several:
        raise UserError(
            "streaming from disk (offload disk, resume) does not run under torch.distributed yet: run it as "
            "one process, or load the model whole (offload none) under torchrun",
            param=("offload", "resume"),
        )
    if (streams or several) and getattr(config, "smooths", False):
        raise UserError(
            "SmoothQuant / AWQ need the model in memory in one process (not supported with offload disk, resume "
            "or torch.distributed yet): use offload none and run it as one process",
            param=("smoothquant", "awq", "offload"),
        )
    if streams:
        return Streamed(storage)
    return Distributed() if several else InMemory()


def open_job(
    source: str,
    output: Path,
    options: JobOptions,
    *,
    needs_calibration: bool,
    placement: Placement | None = None,
    check_source: Callable[[object, dict | None], None] | None = None,
    check_model: Callable[[nn.Module], None] | None = None,
    start: float | None = None,
    held_out: int = 0,
) -> Job:
    """Check what can be checked before the weights, then load the ``source`` (resolved) and draw the windows.

    ``check_source(config, recipe)`` sees the source's config (and ``lmcompress.json``, if it has one) before its
    weights are loaded, ``check_model`` the loaded model before calibration text is read. ``output`` has been
    checked (:func:`lmcompress.checkpoint.folder.check_output`); the job saves into it at the end. ``held_out``
    windows follow the ``options.nsamples`` calibration windows, cut from a part of the text they do not touch.
    """
    placement = placement or InMemory()
    check_device(options.device)
    recipe_of_source = read_recipe(source) if Path(str(source)).is_dir() else None
    if check_source is not None:
        check_source(load_config(source, options.trust_remote_code), recipe_of_source)
    prepared = None
    if needs_calibration:
        check_text_source(options.calib_data)  # a wrong path fails now, not after the model has loaded
        if placement.tokenize_meanwhile:
            prepared = _tokenize_meanwhile(source, options.calib_data, options.trust_remote_code)
    net, tokenizer = placement.load(
        source, dtype=options.dtype, trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle
    )
    if check_model is not None:
        check_model(net)
    length = resolve_seqlen(net, options.seqlen)  # checked even when unused: a wrong --seqlen is an error
    calib, calib_info = None, None
    if needs_calibration:
        with phase("calibration text"):
            ready = _result_or_none(prepared)
            calib, calib_info = draw(
                tokenizer, options.calib_data, nsamples=options.nsamples, seqlen=length, seed=options.seed,
                prepared=ready, vocab_size=embedding_rows(net), held_out=held_out,
            )  # fmt: skip
    surgery = list((recipe_of_source or {}).get("surgery") or [])
    begun = time.perf_counter() if start is None else start
    o = options
    return Job(str(source), net, tokenizer, calib, calib_info, o.device, o.dtype, surgery, begun, output, o.overwrite)


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
    fields: Callable[[R], dict] | None = None,
    save_as: str | Callable[[R], str] = "dense",
    check_source: Callable[[object, dict | None], None] | None = None,
    check_model: Callable[[nn.Module], None] | None = None,
    extra_files: Callable[[R], dict[str, str]] | None = None,
    storage: str = "dense",
    held_out: int = 0,
    **options,
) -> R:
    """The one pipeline of every whole job: check, :func:`open_job`, transform, recipe, save.

    ``transform(model, config, calib, device=..., progress=...)`` changes the model in place and returns its
    report; ``fields(report)`` is what the recipe says was done (default: ``report.recipe_fields()``). The recipe
    also gets ``<kind>_time_s``, the report's ``wall_time_s`` (the transform alone), and ``wall_time_s``, the
    whole job from the first check to the save. ``save_as`` (a string, or a function of the report): ``dense``
    (plain ``from_pretrained`` loads it), ``packed`` (sparse layout, see docs/storage.md) or ``quantized`` (the
    report's ``quantized`` codes). ``extra_files(report)`` (name → text) are saved in the same folder.
    ``options`` are :class:`JobOptions` fields by name; the two checks go to :func:`open_job`. The placement
    (:func:`choose_placement`) decides where the model lives; a streamed one stores its output as ``storage``
    (dense or packed). ``held_out`` windows are drawn after the calibration windows (:func:`open_job`).
    """
    start = time.perf_counter()
    opts = JobOptions.of(options)
    config.validate()
    phases.reset()
    distributed.refuse_unsupported(kind)  # under torchrun: prune and quantize split their work, others refuse
    opts = replace(opts, device=distributed.init_from_env(opts.device))  # cuda:LOCAL_RANK with NCCL
    out = check_output(output, opts.overwrite, source=model)
    source = resolve_source(model, opts.allow_pickle)
    placement = choose_placement(kind, source, config, opts, storage)
    job = open_job(
        source,
        out,
        opts,
        needs_calibration=config.needs_calibration,
        placement=placement,
        check_source=check_source,
        check_model=check_model,
        start=start,
        held_out=held_out,
    )
    placement.attach(job, kind, config, resume=opts.resume)
    with placement.running(), phase("transform (rest)"):
        report = transform(
            job.model, config, job.calib, device=job.device, progress=opts.progress and placement.shows_progress
        )
    said = fields(report) if fields is not None else report.recipe_fields()
    recipe = job.recipe(kind, {**said, f"{kind}_time_s": report.wall_time_s, **placement.recipe_fields()})
    how = save_as(report) if callable(save_as) else save_as
    placement.save(job, recipe, how=how, report=report, extra_files=extra_files)
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

    ``options`` are :class:`~lmcompress.job_options.JobOptions` by name (``calib_data``, ``nsamples``, ``seqlen``,
    ``seed``, ``device``, ``dtype``, ``overwrite``, ``trust_remote_code``, ``allow_pickle``, ``offload``,
    ``resume``). Every input is checked before
    any work; the result is written to a temporary folder and renamed into place at the end, and the source
    model is never written to. ``save_format``: ``dense`` (loads with plain ``from_pretrained``) or ``packed``
    (zeros stored as a bitmask / N:M layout: a smaller file that loads with ``lmcompress.load``; see
    docs/storage.md). Joint quantization (``config.bits``) always saves packed.
    """
    if save_format not in ("dense", "packed"):
        raise UserError(f"unknown save_format {save_format!r}: choose dense or packed", param="save_format")

    def save_as(report: PruneReport) -> str:  # joint prune + quantize (--bits): store the codes packed
        return "quantized" if report.quantized is not None else save_format

    return run_job(
        "prune",
        model,
        config,
        output,
        prune,
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
    return run_job(
        "quantize",
        model,
        config,
        output,
        quantize,
        save_as="quantized",
        progress=progress,
        storage="packed",
        **options,
    )


def structured_prune_pretrained(
    model: str | Path, config: StructureConfig, output: str | Path, *, progress: bool = True, **options
) -> StructureReport:
    """Load ``model``, remove FFN channels / heads as ``config`` says, and save it with its recipe to ``output``.

    ``options`` are :class:`JobOptions` by name. Everything that can be checked is checked before
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

    return run_job(
        "structured",
        model,
        config,
        output,
        structured_prune,
        progress=progress,
        check_source=check_source,
        **options,
    )


def drop_experts_pretrained(
    model: str | Path, config: ExpertConfig, output: str | Path, *, progress: bool = True, **options
) -> ExpertReport:
    """Load ``model``, drop experts as ``config`` says, save to ``output`` (loads with plain ``from_pretrained``).

    ``options`` are :class:`JobOptions` by name; a bad ``--keep`` fails before weights are loaded.
    """
    return run_job(
        "experts",
        model,
        config,
        output,
        drop_experts,
        progress=progress,
        check_source=lambda cfg, _recipe: config.check_model(cfg),
        **options,
    )


def depth_prune_pretrained(model: str | Path, config, output: str | Path, *, progress: bool = True, **options):
    """Load ``model``, remove its least influential blocks (or skip sublayers) as ``config`` (a
    :class:`~lmcompress.transforms.depth.DepthConfig`) says, and save it to ``output``.

    Removed blocks give a plain ``from_pretrained`` folder; skipped sublayers are surgery records (loads with
    ``lmcompress.load``). ``options`` are :class:`JobOptions` by name; a count the model cannot give (all its
    blocks, or more) and a family without a depth table row fail before the weights are loaded.
    """
    from lmcompress.search.depth import drop_chooser
    from lmcompress.transforms.depth import depth_prune

    def transform(net, cfg, calib, *, device, progress):
        choose = drop_chooser(cfg) if cfg.criterion == "search" else None
        return depth_prune(net, cfg, calib, device=device, progress=progress, choose=choose)

    def check_source(cfg, recipe: dict | None) -> None:
        if recipe and (recipe.get("surgery") or recipe.get("storage")):
            raise UserError(
                f"{model} was written by lmcompress with per-layer shapes, skipped sublayers or packed storage; "
                "depth pruning needs a model that plain from_pretrained loads"
            )
        config.check_model(cfg)

    return run_job("depth", model, config, output, transform, progress=progress, check_source=check_source, **options)


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

    ``options`` are :class:`JobOptions` by name. A resized source keeps its surgery records (they
    rebuild the layers that the low-rank records then replace).
    """
    return run_job(
        "factorize",
        model,
        config,
        output,
        factorize,
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
    (drawn from a part of the text the calibration windows do not touch) score the candidates. The database and
    the search state live in a hidden work folder beside ``output``, held by this process, until the end (kept with
    ``config.keep_database``): a killed search run again with the same settings continues from its last finished
    generation (:mod:`lmcompress.search.work`). Sparsity searches save a dense folder (zeros stored), bit-width
    searches a packed one (each layer's codes at its chosen width). ``config.max_loss`` and ``config.tune`` pick
    the other searches (:func:`lmcompress.search.run.run_search`).
    """
    from lmcompress.search.run import run_search
    from lmcompress.search.work import held_work, recipe_fields, split_windows

    check_output(output, options.get("overwrite", False), source=model)  # before its work folder is made beside it
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
            nsamples=nsamples,
            held_out=config.held_out,
            **options,
        )
