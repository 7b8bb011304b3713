"""Checks on a checkpoint before and after loading it: paths, weight-file headers, sizes against the machine,
tensor names and dtypes, finite weights. Each failure is a :class:`UserError` naming the file and what is wrong."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import torch
from torch import nn

from lmcompress.errors import UserError

log = logging.getLogger(__name__)

MAX_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header
_INTEGER = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


# ------------------------------------------------------------------------------------------------------------
# paths


def expand(path: str | Path) -> Path:
    """``path`` with ``~`` / ``~user`` expanded; an unknown user is a :class:`UserError`, not a RuntimeError."""
    try:
        return Path(str(path)).expanduser()
    except RuntimeError:
        raise UserError(f"cannot expand {path}: no such user's home folder; give the full path") from None


def path_exists(path: Path) -> bool:
    """Whether ``path`` exists (a link to nothing does not); a name the file system refuses (too long...) is a
    :class:`UserError`, not an OSError."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return False
        raise UserError(f"cannot use the path {path}: {exc.strerror or exc}; choose a shorter or valid path") from None
    return True


def regular_file(path: Path, what: str = "file") -> os.stat_result:
    """``os.stat`` of ``path``, which must be a regular file: a FIFO or a device would block or never end when
    read, a symlink loop has no target."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc}); is it a broken link?") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {path} is not a regular file (a folder, FIFO or device): lmcompress reads only files")
    return st


# ------------------------------------------------------------------------------------------------------------
# safetensors headers


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of the safetensors file ``path`` and the offset its data starts at, read without trusting
    it: a regular file, a header length that fits in the file (and in the format's limit), a JSON object whose
    tensors' data lie inside the file."""
    size = regular_file(path, "weight file").st_size
    damaged = f"{path} is not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{damaged} (shorter than 8 bytes); it is truncated or corrupted")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER or 8 + length > size:
            raise UserError(
                f"{damaged}: its header claims {length} bytes but the file has {size}; it is truncated or corrupted"
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{damaged}: its header is not JSON; it is truncated or corrupted") from None
    if not isinstance(header, dict):
        raise UserError(f"{damaged}: its header is not a JSON object; it is truncated or corrupted")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            ok = 0 <= start <= end <= size - 8 - length and isinstance(info["dtype"], str)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(
                f"{damaged}: the entry of tensor {key!r} is malformed or lies outside the file; it is truncated or "
                "corrupted"
            )
    return header, 8 + length


def weight_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of ``folder``, every header checked (:func:`safetensors_header`)."""
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        safetensors_header(f)
    return files


def check_integer_weights(model: nn.Module, files: list[Path]) -> None:
    """Refuse a checkpoint that stores a float parameter of ``model`` as integers: loading would cast the integer
    bit patterns into weights (a float32 1.0 read as I32 is 1065353216) without a word."""
    floats = [n for n, p in model.named_parameters() if p.is_floating_point()]
    bad = []
    for f in files:
        header, _ = safetensors_header(f)
        for key, info in header.items():
            if key == "__metadata__" or info["dtype"] not in _INTEGER:
                continue
            if any(n == key or n.endswith("." + key) for n in floats):
                bad.append(f"{key} ({info['dtype']})")
    if bad:
        raise UserError(
            f"{files[0].parent} stores float weights as integers: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; the checkpoint is damaged or not a plain float model"
        )


def check_state_dtypes(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """The same refusal for a state dict about to be loaded into ``model``."""
    params = dict(model.named_parameters())
    bad = [
        f"{k} ({str(v.dtype).removeprefix('torch.')})"
        for k, v in state.items()
        if k in params and params[k].is_floating_point() and not v.is_floating_point()
    ]
    if bad:
        raise UserError(
            f"{where} stores float weights as integers: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "the folder is damaged"
        )


# ------------------------------------------------------------------------------------------------------------
# sizes against the machine


def _first_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def estimate_params(config) -> tuple[int, int]:
    """``(per_block, total)``: a lower bound on the parameters a config describes (query and output
    projections, two FFN matrices per expert, embeddings), from its sizes alone, before anything is built."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first_int(text, "hidden_size", "n_embd", "d_model", "dim") or 0
    layers = _first_int(text, "num_hidden_layers", "n_layer", "num_layers") or 0
    ffn = _first_int(text, "intermediate_size", "ffn_dim", "n_inner", "d_ff") or 4 * hidden
    experts = _first_int(text, "num_local_experts", "num_experts", "n_routed_experts") or 0
    expert_ffn = _first_int(text, "moe_intermediate_size") or ffn
    vocab = _first_int(text, "vocab_size") or 0
    per_block = 2 * hidden * hidden + 2 * hidden * (expert_ffn * experts if experts else ffn)
    return per_block, max(layers, 0) * per_block + vocab * hidden


def physical_memory() -> int:
    """Bytes of RAM of this machine (a huge number when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _stored_bytes(source: str | Path) -> int | None:
    """Bytes of the weight files of a local source (a folder's ``*.safetensors`` and pickles, or a ``.gguf``
    file); None for a hub id."""
    path = Path(str(source))
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    suffixes = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in suffixes and f.is_file())


MIN_BITS_PER_WEIGHT = 0.5  # fewer than any lmcompress layout stores (a 2-bit 1:16 N:M weight takes ~0.4 + 0.1)


def check_config_sizes(config, source: str | Path, *, itemsize: int = 2) -> None:
    """Refuse a config that cannot describe this checkpoint on this machine, before anything is built from it:
    one block (``itemsize`` bytes per weight) larger than the machine's memory, or more weights than the
    weight files could hold at 1/16 byte each (a hub model: more than memory and free disk together). A config
    with 10⁷ layers or a hidden size of 10⁶ is damaged; building it would never end."""
    per_block, total = estimate_params(config)
    ram = physical_memory()
    what = f"the config of {source} describes"
    if per_block * itemsize > ram:
        raise UserError(
            f"{what} blocks of at least {per_block:,} weights ({_gib(per_block * itemsize)} each), more than this "
            f"machine's memory ({_gib(ram)}); check its sizes (hidden_size, intermediate_size): it is damaged"
        )
    stored = _stored_bytes(source)
    if stored is not None and total * MIN_BITS_PER_WEIGHT / 8 > max(stored, 1 << 20):
        raise UserError(
            f"{what} at least {total:,} weights, but its weight files hold only {stored:,} bytes (under "
            f"{MIN_BITS_PER_WEIGHT} bit per weight); check its sizes (num_hidden_layers, hidden_size): the config "
            "does not belong to these weights or is damaged"
        )
    if stored is None:
        try:
            disk = shutil.disk_usage(Path.cwd()).free
        except OSError:
            disk = 0
        if total * itemsize > ram + disk:
            raise UserError(
                f"{what} at least {total:,} weights ({_gib(total * itemsize)}), more than this machine's memory "
                f"and free disk together ({_gib(ram + disk)}): it cannot be downloaded and loaded here"
            )


def check_fits_in_memory(config, source: str | Path, dtype: torch.dtype) -> None:
    """Refuse to build a whole model that would not fit in this machine's memory (``dtype`` weights)."""
    _, total = estimate_params(config)
    ram = physical_memory()
    if total * dtype.itemsize > ram:
        raise UserError(
            f"{source} has at least {total:,} weights ({_gib(total * dtype.itemsize)} in "
            f"{str(dtype).removeprefix('torch.')}), more than this machine's memory ({_gib(ram)}): check its "
            "config.json, use a smaller dtype, or stream it (prune and quantize take offload disk)"
        )


# ------------------------------------------------------------------------------------------------------------
# after loading


def check_loading_info(info: dict, source: str, *, bare: bool = False) -> None:
    """Refuse a checkpoint whose tensors do not match its model class: transformers fills missing tensors with
    random values and drops unexpected ones with a mere log line. Tied weights are not reported missing.

    ``bare``: the encoder was loaded without its head (no Auto class for it), so the head's tensors are
    unexpected by design and only logged.
    """
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    if bare and unexpected:
        log.info("not loaded with the bare encoder: %s", ", ".join(unexpected[:5]))
        unexpected = []
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise UserError(
            f"the weights of {source} do not match its config: {'; '.join(parts)}. transformers would "
            "fill missing tensors with random values; the checkpoint is incomplete or does not belong to this config"
        )


def check_finite(model: nn.Module, source: str | Path) -> None:
    """Refuse a model with NaN or infinite parameters (naming them): every method and metric would be garbage.

    A sum is NaN or infinite whenever one of its terms is, so one float32 reduction per tensor clears it; only
    a tensor whose sum is not finite (a bad weight, or a float32 overflow) is checked element by element."""
    bad = []
    for name, p in model.named_parameters():
        if not p.is_floating_point() or not p.numel() or bool(torch.isfinite(p.sum(dtype=torch.float32))):
            continue
        if not bool(torch.isfinite(p).all()):
            bad.append(f"{name} ({int((~torch.isfinite(p)).sum())} of {p.numel()})")
    if bad:
        raise UserError(
            f"{source} has NaN or infinite weights in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "the checkpoint is damaged (or overflowed when converted: try dtype float32)"
        )


def check_finite_state(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """:func:`check_finite` for a state dict (a packed folder read without building its model)."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(
            f"{source} has NaN or infinite weights in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "the checkpoint is damaged"
        )


def tokenizer_error(source: str | Path, exc: Exception) -> UserError:
    """The error for a tokenizer that does not load: missing files are named as such, not as missing packages."""
    folder = Path(str(source))
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return UserError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): copy them from the model it "
            "came from"
        )
    return UserError(f"could not load the tokenizer of {source}: {exc}")
