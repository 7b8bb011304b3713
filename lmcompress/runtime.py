"""What every job and measurement checks about where it runs: the device, the window length the model allows,
and the library versions a recipe records."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import nn

from lmcompress import __version__
from lmcompress.errors import UserError
from lmcompress.models.families import context_length


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


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one, else what :mod:`platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """The versions of lmcompress, torch, transformers and Python, as a recipe records them."""
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
