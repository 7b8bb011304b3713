"""What every whole-model job shares: check the inputs, load the source, draw calibration windows, describe it.

``prune_pretrained``, ``quantize_pretrained``, ``structured_prune_pretrained``, ``drop_experts_pretrained`` and
``factorize_pretrained`` are each: :func:`open_job` → one in-place transformation → ``job.recipe(...)`` → save.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmcompress.data import calibration_windows, load_text, windows_hash
from lmcompress.errors import UserError
from lmcompress.families import context_length
from lmcompress.io import check_output, load_config, load_model, read_recipe, resolve_source


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

    import lmcompress

    return {
        "lmcompress": lmcompress.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def check_device(device: str) -> None:
    """A clear error for a device string torch does not know, or CUDA asked for where there is none."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")


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
        import lmcompress

        surgery = self.source_surgery + list(fields.get("surgery") or [])  # the source's records rebuild first
        recipe = {
            "lmcompress_version": lmcompress.__version__,
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
        calib, calib_info = calibration(tokenizer, calib_data, nsamples=nsamples, seqlen=length, seed=seed)
    surgery = list((recipe_of_source or {}).get("surgery") or [])
    return Job(str(resolved), net, tokenizer, calib, calib_info, device, dtype, surgery, start)
