"""GGUF files (llama.cpp) as a model source: loaded dequantized, or unpacked into a plain Hugging Face folder.

transformers reads a ``.gguf`` file and dequantizes every tensor to float (``from_pretrained(dir,
gguf_file=name)``, which needs the ``gguf`` and ``accelerate`` packages). The model it returns carries a
``quantization_config`` naming the GGUF file; lmcompress rebuilds the model from that config *without* it and
loads the dequantized state dict, so that what it saves is a normal folder that plain ``from_pretrained`` loads.

A dequantized weight is exactly representable on the file's grid: for ``Q4_1`` every block of 32 consecutive
inputs of a row holds ``w = d·q + m`` with ``q ∈ {0..15}`` and one scale ``d`` and minimum ``m`` per block.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import struct
from pathlib import Path

import torch
from torch import nn

from lmcompress.checkpoint.checks import (
    check_config_sizes,
    check_finite,
    check_loading_info,
    expand,
    path_exists,
    regular_file,
)
from lmcompress.errors import UserError

GGUF_SUFFIX = ".gguf"
INSTALL_HINT = "pip install gguf accelerate"  # core dependencies: missing only in a broken environment


def is_gguf(source: str | Path) -> bool:
    """True when ``source`` names a ``.gguf`` file (existing or not)."""
    return str(source).lower().endswith(GGUF_SUFFIX)


def check_gguf(path: str | Path) -> Path:
    """``path`` as an existing GGUF file; clear errors for a missing file, a wrong magic or missing packages."""
    file = expand(path)
    if not path_exists(file):
        raise UserError(f"GGUF file {file} does not exist; give the path of a .gguf model file")
    regular_file(file, "GGUF file")
    with file.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise UserError(f"{file} does not start with the GGUF magic bytes: it is not a GGUF model file")
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(
            f"loading the GGUF file {file.name} needs the {' and '.join(missing)} package(s): {INSTALL_HINT}"
        )
    st = file.stat()
    check_gguf_layout(str(file.resolve()), st.st_size, st.st_mtime_ns)
    return file


@functools.lru_cache(maxsize=8)
def check_gguf_layout(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, str, int, int, int], ...]:
    """``(name, type, elements, bytes, dimensions)`` of every tensor of the GGUF file ``path``, after checking that
    its header parses and that the tensors' data fill the file exactly: they lie inside it, do not overlap, and
    end where it ends (up to the alignment padding). A truncated file, or a header whose tensor count lies (the
    data would then be read from the wrong offsets, as garbage), is a :class:`UserError`. ``size`` and
    ``mtime_ns`` key the cache."""
    damaged = f"{path} is not a readable GGUF file"
    try:
        infos, alignment = _tensor_infos(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise UserError(f"{damaged} ({exc}); it is truncated or corrupted") from None
    spans = sorted((offset, offset + nbytes, name) for name, _, _, nbytes, _, offset in infos)
    tensors = tuple(info[:5] for info in infos)
    if not spans:
        raise UserError(f"{damaged}: it holds no tensors")
    for (_, end, name), (start, _, _) in itertools.pairwise(spans):
        if end > start:
            raise UserError(f"{damaged}: the data of tensor {name} overlaps the next one; the file is corrupted")
    end, last = spans[-1][1], spans[-1][2]
    if end > size:
        raise UserError(f"{damaged}: tensor {last} ends at byte {end} but the file has {size}; it is truncated")
    if size - end >= max(alignment, 1):
        raise UserError(
            f"{damaged}: its {len(spans)} tensors end at byte {end} but the file has {size} bytes; the tensor count "
            "in its header does not match its contents (corrupted)"
        )
    return tensors


# value types of GGUF metadata: struct format of the fixed-size ones (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_MAX_DIMS = 4


class _Cursor:
    """Little-endian reads from a byte buffer that fail (ValueError) past its end."""

    def __init__(self, data) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise ValueError(f"the header runs past the end of the file at byte {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"the header runs past the end of the file at byte {self.pos}")
        self.pos += n

    def string(self) -> str:
        n = self.take("Q")
        start = self.pos
        self.skip(n)
        return bytes(self.data[start : self.pos]).decode("utf-8")

    def value(self, kind: int):
        """One metadata value (arrays are skipped: None)."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind != 9:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self.take("I"), self.take("Q")
        if item in _SCALARS:
            self.skip(count * struct.calcsize("<" + _SCALARS[item]))
        else:
            for _ in range(count):
                self.value(item)
        return None


def _tensor_infos(path: str) -> tuple[list[tuple[str, str, int, int, int, int]], int]:
    """``([(name, type, elements, bytes, dimensions, absolute data offset)], alignment)`` of a GGUF file, read
    from its header alone (the ``gguf`` package's reader also maps every metadata array, seconds on a large
    vocabulary). Raises ValueError on anything that does not parse."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cur = _Cursor(data)
        cur.skip(4)  # the magic, checked by check_gguf
        version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        alignment = 32
        for _ in range(n_kv):
            key, kind = cur.string(), cur.take("I")
            value = cur.value(kind)
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        raw = []
        for _ in range(n_tensors):
            name, ndim = cur.string(), cur.take("I")
            if ndim > _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {ndim} dimensions")
            dims = [cur.take("Q") for _ in range(ndim)]
            kind = GGMLQuantizationType(cur.take("I"))
            raw.append((name, kind, dims, cur.take("Q")))
        start = -(-cur.pos // alignment) * alignment
    infos = []
    for name, kind, dims, offset in raw:
        block, type_size = GGML_QUANT_SIZES[kind]
        numel = math.prod(dims)
        if numel % block:
            raise ValueError(f"tensor {name!r} of {numel} elements does not split into {kind.name} blocks")
        infos.append((name, kind.name, numel, numel // block * type_size, len(dims), start + offset))
    return infos, alignment


def gguf_config(path: str | Path):
    """The transformers config of a GGUF file, without the ``quantization_config`` that names the file."""
    from transformers import AutoConfig

    file = check_gguf(path)
    try:
        config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as exc:
        raise UserError(f"could not read the model config from {file}: {exc}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    check_config_sizes(config, file)
    return config


def load_gguf(
    path: str | Path, *, dtype: torch.dtype = torch.float32, progress: bool = False
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` of a GGUF file: every tensor dequantized to ``dtype``, a plain (unquantized) model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    file = check_gguf(path)
    config = gguf_config(file)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        loaded, loading = AutoModelForCausalLM.from_pretrained(
            str(file.parent), gguf_file=file.name, dtype=dtype, output_loading_info=True
        )
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"could not load the GGUF model {file}: {exc}") from None
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
    check_loading_info(loading, str(file))  # transformers fills a tensor the file lacks with random values
    check_finite(loaded, file)
    state = loaded.state_dict()
    del loaded
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise UserError(
            f"the tensors of {file} do not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), tokenizer


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of the GGUF file are stored in each type (``{"Q4_1": 210, "F32": 61, ...}``)."""
    file = check_gguf(path)
    counts: dict[str, int] = {}
    for _, kind, *_ in _layout(file):
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _layout(file: Path) -> tuple[tuple[str, str, int, int, int], ...]:
    st = file.stat()
    return check_gguf_layout(str(file.resolve()), st.st_size, st.st_mtime_ns)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_recipe(path: str | Path) -> dict:
    """The ``lmcompress.json`` of a folder unpacked from a GGUF file: where it came from and on what grid it lies."""
    file = Path(str(path)).expanduser().resolve()
    types = tensor_types(file)
    quantized = sorted(t for t in types if t not in ("F32", "F16", "BF16"))
    return {
        "kind": "unpacked-gguf",
        "source_gguf": str(file),
        "source_gguf_bytes": file.stat().st_size,
        "source_gguf_sha256": _sha256(file),
        "gguf_tensor_types": types,
        "weights": (
            f"dequantized from GGUF {', '.join(quantized) or 'float'} tensors: every weight stored in a quantized "
            "type lies exactly on that type's grid (Q4_1: blocks of 32 inputs, w = d*q + m, q in 0..15, i.e. "
            "4-bit); re-quantizing to 4 bits with the same blocks is lossless, other grids are not"
            if quantized
            else "float tensors copied unchanged"
        ),
    }


_FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_info(path: str | Path) -> dict:
    """What ``lmcompress info`` reports for a folder, for a GGUF file: bytes by kind, bits per weight, types.

    ``linear`` covers the 2-D weights of the blocks (``blk.*``); ``embeddings`` the token table and output head;
    quantized types are counted with their block scales and minimums (as stored).
    """
    file = check_gguf(path)
    by_kind = {"values": 0, "masks": 0, "indices": 0, "codes": 0, "scales": 0, "embeddings": 0, "other": 0}
    layouts: dict[str, int] = {}
    params = lin_params = lin_bytes = dense_equiv = 0
    for name, kind_name, numel, nbytes, ndim in _layout(file):
        params += numel
        dense_equiv += 4 * numel
        if name.startswith(("token_embd", "output.")):
            by_kind["embeddings"] += nbytes
        elif name.startswith("blk.") and ndim == 2:
            lin_params += numel
            lin_bytes += nbytes
            by_kind["values" if kind_name in _FLOAT_TYPES else "codes"] += nbytes
            layouts[f"gguf {kind_name}"] = layouts.get(f"gguf {kind_name}", 0) + 1
        else:
            by_kind["other"] += nbytes
    size = file.stat().st_size
    by_kind["header"] = size - sum(by_kind.values())
    return {
        "folder": str(file),
        "storage": "gguf",
        "files": {file.name: size},
        "total_bytes": size,
        "weights_bytes": size,
        "by_kind": by_kind,
        "params": params,
        "dense_equivalent_bytes": dense_equiv,
        "ratio_to_dense": size / dense_equiv if dense_equiv else None,
        "bits_per_param": 8 * size / params if params else None,
        "linear": {
            "params": lin_params,
            "bytes": lin_bytes,
            "bits_per_weight": 8 * lin_bytes / lin_params if lin_params else None,
            "sparsity": None,
            "layouts": layouts,
        },
        "recipe": {"source_gguf": str(file.resolve()), "gguf_tensor_types": tensor_types(file)},
    }
