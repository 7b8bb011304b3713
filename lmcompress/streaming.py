"""Jobs whose weights stream from disk block by block (``--offload disk``), and the choice of when to stream.

``offload``: ``none`` loads the whole model (refused, naming ``--offload disk``, when it would not fit in the
available memory); ``disk`` streams it (:mod:`lmcompress.checkpoint.stream`); ``auto`` streams only when
loading it would not fit. "Fits" means the weights in the compute dtype, times :data:`HEADROOM`, are at most the
available memory (``MemAvailable``). Only pruning and quantization stream; the other verbs refuse ``disk``.

A streamed job is resumable: its work folder ``.OUTPUT.partial`` beside the output keeps the finished blocks, and
``resume`` continues a killed run from its last finished block (only with the same settings), giving the same
files as an uninterrupted run. Without ``resume`` an existing work folder is an error (``overwrite`` starts over).

:class:`Streamed` is the placement :func:`lmcompress.jobs.run_job` gives such a job: it loads a meta model and its
tokenizer, attaches the :class:`~lmcompress.checkpoint.stream.DiskStream` the block walkers read and write through,
and saves the output from the work folder; checks, calibration windows and recipe are the in-memory job's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmcompress import __version__
from lmcompress.calibration.offload import STREAM_ATTR
from lmcompress.checkpoint.folder import RECIPE_FILE, json_text, read_recipe, save_atomic
from lmcompress.checkpoint.gguf import is_gguf
from lmcompress.checkpoint.load import drop_foreign_auto_map, load_config, parse_dtype, source_dtype
from lmcompress.checkpoint.packed import MARKER
from lmcompress.checkpoint.stream import DiskStream, SourceShards, WorkFolder
from lmcompress.errors import UserError
from lmcompress.job_options import check_offload
from lmcompress.models.families import family_of, get_blocks

HEADROOM = 1.25  # loading whole takes about the weights plus this share for copies, activations and Python
STREAMABLE = {"prune": "prune", "quantize": "quantize"}
VERBS = {"structured": "shrink", "experts": "drop-experts", "factorize": "factorize", "search": "search"}


def available_memory() -> int:
    """Bytes of memory available to a new allocation without swapping (``MemAvailable``)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: assume it fits


def refuse_streaming(what: str, offload: str = "none", resume: bool = False) -> None:
    """A UserError when a command that holds the whole model is asked to stream (``offload disk``, ``resume``)."""
    if check_offload(offload) == "disk" or resume:
        raise UserError(
            f"{what} cannot stream weights from disk: it needs the whole model in memory. Use offload none; "
            "only prune and quantize stream (offload disk, resume)",
            param=("offload", "resume"),
        )


def _why_not(kind: str, source: str, config) -> str | None:
    """Why this job cannot stream (``None`` if it can)."""
    if kind not in STREAMABLE:
        return f"lmcompress {VERBS.get(kind, kind)} cannot stream: it needs the whole model in memory"
    path = Path(source)
    if is_gguf(source) or not path.is_dir():
        return "streaming reads a local model folder of safetensors shards (not a hub id or a .gguf file)"
    recipe = read_recipe(path)
    if recipe and (recipe.get("storage") == "packed" or recipe.get("surgery")):
        return f"{source} is a packed or resized lmcompress folder; streaming reads plain safetensors folders"
    if not any(path.glob("*.safetensors")):
        return f"{source} holds no *.safetensors files"
    if getattr(config, "include_head", False):
        return "include_head compresses the output head, which streaming does not load"
    if getattr(config, "head_quant", None) is not None:  # prune's head_bits
        return "head_bits quantizes the output head, which streaming does not load"
    return None


def should_stream(
    kind: str, source: str, config, *, offload: str, resume: bool, dtype: str, trust_remote_code: bool = False
) -> bool:
    """Whether this job streams, or a UserError: ``disk`` (or ``resume``) where it cannot stream, ``none`` (or
    ``auto`` where it cannot stream) for a model that does not fit in the available memory."""
    offload = check_offload(offload)
    if kind not in STREAMABLE:
        refuse_streaming(f"lmcompress {VERBS.get(kind, kind)}", offload, resume)
        return False
    if resume and offload == "none":
        raise UserError(
            "resume continues a streamed run: use it with offload disk (or auto)", param=("resume", "offload")
        )
    why = _why_not(kind, source, config)
    if why is None and family_of(load_config(source, trust_remote_code)).kind != "decoder":
        why = "only decoder (causal LM) models stream"
    if offload == "disk" or resume:
        if why:
            raise UserError(f"cannot stream this job ({why}); use offload none", param=("offload", "resume"))
        return True
    if not Path(source).is_dir():  # a hub id or a .gguf file: nothing to measure before loading
        return False
    try:
        need = int(SourceShards(Path(source)).nbytes(parse_dtype(dtype)) * HEADROOM)
    except UserError:  # pickle checkpoints: the loader says what it thinks of them
        return False
    have = available_memory()
    if need <= have:
        return False
    gb = f"~{need / 2**30:.1f} GiB with {dtype} weights, {have / 2**30:.1f} GiB available"
    if offload == "auto" and why is None:
        return True
    if why:
        raise UserError(f"{source} does not fit in memory ({gb}) and {why}; free memory or use a smaller dtype")
    raise UserError(
        f"{source} does not fit in memory ({gb}): use offload disk to stream it block by block "
        "(or offload auto), or free memory",
        param="offload",
    )


MMAP_THRESHOLD = 8 << 20  # bytes: from this size on, glibc gives each allocation its own mapping


def return_freed_memory() -> None:
    """Make the C allocator hand large freed buffers back to the system at once (glibc only; else nothing).

    glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with its own mapping, unmapped on free,
    but raises that threshold (up to 32 MiB) whenever such a buffer is freed, after which the same sizes come
    from the heap and can stay resident once freed. Fixing it keeps a streamed job's memory near what is alive
    (measured on a 4-block TinyLlama-shaped model: bench/HISTORY.md, "Streaming").
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def build_meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with every parameter on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights

    from lmcompress.checkpoint.load import auto_model_class

    with init_empty_weights():
        model = auto_model_class(config).from_config(config, dtype=dtype)
    return model.eval()


class Streamed:
    """A job's model streamed from disk: built on the meta device, its blocks read, compressed and written one at
    a time by a :class:`~lmcompress.checkpoint.stream.DiskStream`; the output folder is the work folder's blocks
    with the config, tokenizer and recipe that ``lmcompress.jobs.run_job`` would have saved."""

    name = "disk"
    shows_progress = True
    tokenize_meanwhile = False  # a meta model builds at once; a second tokenizer would only add to peak memory

    def __init__(self, storage: str) -> None:
        self.storage = storage  # dense or packed: how the output's weights are stored
        self.stream: DiskStream | None = None
        self.work: WorkFolder | None = None

    def load(self, source: str, *, dtype: str, trust_remote_code: bool, allow_pickle: bool):
        """The meta model of ``source``'s config, its tokenizer, and the dtype its weights are saved in."""
        from transformers import AutoTokenizer

        return_freed_memory()
        cfg = load_config(source, trust_remote_code)
        family_of(cfg)
        compute = parse_dtype(dtype)
        self.shards = SourceShards(Path(source))
        net = build_meta_model(cfg, compute)
        drop_foreign_auto_map(net, source, trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise UserError(f"could not load the tokenizer of {source!r}: {exc}") from None
        self.compute, self.save_dtype = compute, source_dtype(net.config) or compute  # as in-memory jobs save
        return net, tokenizer

    def attach(self, job, kind: str, config, *, resume: bool) -> None:
        """Open the work folder of ``job.output`` (continued with ``resume`` when the run's settings are the same)
        and give the model its stream."""
        settings = {
            "kind": kind,
            "config": config.to_dict(),
            "storage": self.storage,
            "source": str(Path(job.source).resolve()),
            "source_files": self.shards.fingerprint(),
            "calibration": job.calib_info,
            "dtype": job.dtype,
            "device": job.device,
            "lmcompress_version": __version__,
        }
        blocks = len(get_blocks(job.model))
        # the stream checks the source against the model first: on a mismatch nothing is written
        self.stream = DiskStream(
            job.model, self.shards, None, compute_dtype=self.compute, save_dtype=self.save_dtype,
            storage=self.storage,
        )  # fmt: skip
        self.work = WorkFolder.open(job.output, settings, blocks, resume=resume, overwrite=job.overwrite)
        self.stream.work = self.work
        setattr(job.model, STREAM_ATTR, self.stream)

    def running(self):
        return contextlib.nullcontext()

    def recipe_fields(self) -> dict:
        return {}

    def save(self, job, recipe: dict, *, how: str, report, extra_files: Callable | None) -> None:
        """Write the output: the streamed blocks (stored as ``self.storage``; ``how`` is not used), config,
        generation config, tokenizer, recipe and ``extra_files(report)``, renamed into place; then drop the work
        folder."""
        del how
        net, tokenizer, stream, source = job.model, job.tokenizer, self.stream, job.source
        extras = extra_files(report) if extra_files is not None else {}

        def write(tmp: Path) -> None:
            index = stream.write_output(tmp)
            net.config.save_pretrained(tmp)
            cfg_json = json.loads((tmp / "config.json").read_text())
            cfg_json["dtype"] = str(self.save_dtype).removeprefix("torch.")
            full = recipe
            if index is not None:
                cfg_json["quantization_config"] = {"quant_method": MARKER}
                full = {**recipe, "storage": "packed", "packed": index}
            (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
            with contextlib.suppress(Exception):  # as from_pretrained would have read it; not worth failing the save
                from transformers import GenerationConfig

                generation = (
                    GenerationConfig.from_pretrained(source)
                    if (Path(source) / "generation_config.json").is_file()
                    else net.generation_config
                )
                generation.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / RECIPE_FILE).write_text(json_text(full) + "\n")
            for name, text in extras.items():
                (tmp / name).write_text(text)

        save_atomic(job.output, write, overwrite=job.overwrite)
        self.work.remove()
