"""Weights that stay on disk: a model on the meta device whose blocks are read, compressed and written one at a time.

:class:`SourceShards` reads named tensors out of a folder's (sharded) ``*.safetensors`` files with
``safe_open``, never the whole checkpoint. :class:`DiskStream` is the block source
(:class:`lmcompress.calibration.offload.BlockSource`) of such a model: the walkers ask it to read a block's
tensors into the meta model before the work, to write the finished block to the work folder (a dense shard, or
the block's packed parts) and to return its tensors to the meta device; it only reads and writes. Memory then
holds one block, one block of activations and, while the calibration inputs are captured, the embeddings,
whatever the model's size.

Checkpoints whose tensors transformers converts on load (its conversion mapping: the per-expert linears of
Mixtral's ``block_sparse_moe.experts.E.w1/w3/w2`` or Qwen-MoE's ``mlp.experts.E.gate_proj/up_proj/down_proj``
stacked into the fused ``experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``) are read through the same
conversion, one model tensor at a time (:func:`conversion_plan`); a dense output is written back in the source's
layout, as ``save_pretrained`` reverts it.

:class:`WorkFolder` is the hidden sibling ``.NAME.partial`` of the output. It holds the finished blocks, each
block's share of the report, the current block inputs and ``state.json`` (the run's settings and how many blocks
are done), so a killed run continues with ``resume`` from its last finished block; it becomes the output at the
end (the weights are moved or concatenated into the folder that :func:`~lmcompress.checkpoint.folder.save_atomic`
renames into place) and is then removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.checkpoint.checks import safetensors_header
from lmcompress.checkpoint.folder import json_text, write_file_atomic, write_path_atomic
from lmcompress.checkpoint.packed import FORMAT_VERSION, PACKED_FILE, _transposed_params, pack_named
from lmcompress.checkpoint.packing import Packed, unpack_quantized
from lmcompress.errors import UserError
from lmcompress.models.families import blocks_path, get_blocks

log = logging.getLogger(__name__)

SHARD_INDEX = "model.safetensors.index.json"
STATE_FILE = "state.json"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset its data starts at (8 + header length), checked
    (:func:`lmcompress.checkpoint.checks.safetensors_header`: a regular file, a length that fits in it)."""
    return safetensors_header(path)


def write_safetensors(
    path: Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    get: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file of the tensors ``specs`` (name, dtype, shape), each fetched with ``get(name)``
    only when its bytes are written: no copy of the whole file is ever built in memory."""
    names = {v: k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in specs:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key, dtype, shape in specs:
            t = get(key).detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{key} is {tuple(t.shape)}, not {shape}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def concat_safetensors(files: list[Path], out: Path, metadata: dict[str, str]) -> None:
    """Write one safetensors file holding every tensor of ``files``, copying their bytes a chunk at a time."""
    entries: list[tuple[str, dict, Path, int]] = []
    seen: set[str] = set()
    for f in files:
        header, base = read_header(f)
        header.pop("__metadata__", None)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if key in seen:
                raise ValueError(f"tensor {key} is in two of the files to join")
            seen.add(key)
            entries.append((key, info, f, base))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, info, _f, _base in entries:
        size = info["data_offsets"][1] - info["data_offsets"][0]
        header[key] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(out, "wb") as dst:
        dst.write(struct.pack("<Q", len(text)) + text)
        for _key, info, f, base in entries:
            start, stop = info["data_offsets"]
            with open(f, "rb") as src:
                src.seek(base + start)
                left = stop - start
                while left:
                    chunk = src.read(min(left, 64 << 20))
                    if not chunk:
                        raise UserError(f"{f} is shorter than its header says; the work folder is damaged")
                    dst.write(chunk)
                    left -= len(chunk)


class SourceShards:
    """The tensors of a folder's safetensors files by name, read on demand (the files are only ever read)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / SHARD_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index} is not a valid shard index; the folder is damaged") from None
            files = sorted({folder / name for name in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder} holds no *.safetensors weight files to stream")
        self.files = files
        self.where: dict[str, Path] = {}
        self.info: dict[str, dict] = {}
        for f in files:
            if not f.is_file():
                raise UserError(f"{f} (named by {SHARD_INDEX}) is missing; the folder is incomplete")
            header, _ = read_header(f)
            header.pop("__metadata__", None)
            for key, info in header.items():
                self.where[key] = f
                self.info[key] = info

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of all tensors with the float ones in ``dtype`` (what loading them all would take)."""
        total = 0
        for info in self.info.values():
            stored = _DTYPES.get(info["dtype"], torch.uint8)
            itemsize = dtype.itemsize if stored.is_floating_point else stored.itemsize
            total += math.prod(info["shape"]) * itemsize
        return total

    def fingerprint(self) -> dict[str, list[int]]:
        """Size and modification time of every weight file: a changed source is not resumed."""
        return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in self.files}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` (as stored), each file opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for f, names in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for k in names:
                        out[k] = handle.get_tensor(k)
            except UserError:
                raise
            except Exception as exc:
                raise UserError(f"cannot read {f}: {exc}; the file may be truncated or corrupted") from None
        return {k: out[k] for k in keys}


class Conversion:
    """How one model tensor is read: the stored tensors it comes from, and transformers' converter that makes it
    from them (``None``: the one stored tensor as it is, perhaps under another name)."""

    def __init__(self, sources: list[str], converter=None) -> None:
        self.sources, self.converter = sources, converter
        self.patterns: list[str] = []  # the converter's source pattern each stored tensor matched

    def build(self, name: str, model: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensor ``name`` from its stored ``tensors`` (read by the caller)."""
        if self.converter is None:
            return tensors[self.sources[0]]
        import copy

        converter = copy.deepcopy(self.converter)  # it collects the tensors it converts: one instance per use
        for key, pattern in zip(self.sources, self.patterns, strict=True):
            converter.add_tensor(name, key, pattern, tensors[key])
        why = None
        try:
            out = converter.convert(name, model=model, config=model.config)
        except Exception as exc:  # stored tensors that do not fit together (shapes, counts)
            out, why = {}, f"transformers cannot build {name} from {self.sources[0]} ... {self.sources[-1]}: {exc}"
        value = out.get(name)
        value = value[0] if isinstance(value, list) else value
        shape = tuple(_lookup(model, name).shape)
        if why is None and (len(out) != 1 or value is None):
            why = f"transformers converts {self.sources[0]} ... into {sorted(out)}, not one tensor {name}"
        elif why is None and tuple(value.shape) != shape:
            why = f"{name} built from {self.sources[0]} ... is {tuple(value.shape)}, the config says {shape}"
        if why is not None:
            raise UserError(
                f"{why}: streaming cannot read this checkpoint layout; check the folder matches its config.json, "
                "or use offload none to load it whole",
                param="offload",
            )
        return value


def conversion_plan(model: nn.Module, stored: list[str]) -> dict[str, Conversion]:
    """Model tensor name → how it is read from the ``stored`` tensor names, through the conversion transformers
    applies in ``from_pretrained`` (renamings, then at most one converter per stored tensor). Stored names that
    map to no model tensor are planned under the name they map to (the caller reports them). Without that
    machinery (transformers < 5) every tensor is read under its own name."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:
        return {k: Conversion([k]) for k in stored}
    wanted = set(model.state_dict())
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    plan: dict[str, Conversion] = {}
    for key in sorted(stored, key=dot_natural_key):  # experts in numeric order, as from_pretrained stacks them
        name, pattern = rename_source_key(key, renamings, converters)
        if name not in wanted and key in wanted:  # as from_pretrained: a name that needs no renaming
            name, pattern = key, None
        if pattern is None:
            if name in plan:
                raise UserError(
                    f"{plan[name].sources[0]} and {key} are both stored tensors of {name} (two layouts of one "
                    "checkpoint in the folder?): keep the files of one, or use offload none",
                    param="offload",
                )
            plan[name] = Conversion([key])
            continue
        entry = plan.setdefault(name, Conversion([], by_pattern[pattern]))
        entry.sources.append(key)
        entry.patterns.append(pattern)
    return plan


class WorkFolder:
    """``.NAME.partial`` beside the output: finished blocks, their report shares, block inputs and ``state.json``."""

    def __init__(self, path: Path, settings: dict, blocks: int) -> None:
        self.path = path
        self.settings = settings
        self.blocks = blocks
        self.done = 0

    @staticmethod
    def path_for(output: Path) -> Path:
        return output.parent / f".{output.name}.partial"

    @classmethod
    def open(cls, output: Path, settings: dict, blocks: int, *, resume: bool, overwrite: bool) -> WorkFolder:
        """The work folder of ``output``: continued (``resume``, same settings), or new.

        An existing one without ``resume`` is an error (``overwrite`` removes it and starts over); with
        ``resume`` and different settings it is refused, naming what differs.
        """
        path = cls.path_for(output)
        work = cls(path, json.loads(json_text(settings)), blocks)
        state_file = path / STATE_FILE
        if path.exists() and not resume:
            if not overwrite:
                raise UserError(
                    f"{path} holds an unfinished run for {output}: pass resume to continue it, or overwrite "
                    "(or delete the folder) to start over",
                    param=("resume", "overwrite"),
                )
            shutil.rmtree(path)
        if resume and state_file.is_file():
            try:
                state = json.loads(state_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{state_file} is damaged; delete {path} to start over") from None
            if state.get("settings") != work.settings:
                old = state.get("settings") or {}
                diff = sorted(k for k in set(old) | set(work.settings) if old.get(k) != work.settings.get(k))
                raise UserError(
                    f"cannot resume {path}: it was started with other settings ({', '.join(diff)} differ); run "
                    "with the same settings, or without resume (and with overwrite, or after deleting the folder) "
                    "to start over",
                    param="resume",
                )
            work.done = int(state.get("done", 0))
            log.info("resuming %s after %d of %d blocks", output, work.done, blocks)
        else:
            if resume:
                log.info("nothing to resume for %s: starting from the first block", output)
            path.mkdir(exist_ok=True)
            (path / "records").mkdir(exist_ok=True)
            work.write_state()
        return work

    def write_state(self) -> None:
        state = {"settings": self.settings, "done": self.done, "blocks": self.blocks}
        write_file_atomic(self.path / STATE_FILE, json_text(state) + "\n")

    def record_path(self, i: int) -> Path:
        return self.path / "records" / f"block-{i:05d}.json"

    def hidden_path(self, i: int) -> Path:
        return self.path / f"inputs-{i:05d}.safetensors"

    def read_record(self, i: int) -> dict:
        try:
            return json.loads(self.record_path(i).read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{self.record_path(i)} is missing or damaged; delete {self.path} to start over") from None

    def read_hidden(self, i: int, device: torch.device) -> torch.Tensor:
        from safetensors.torch import load_file

        path = self.hidden_path(i)
        if not path.is_file():
            raise UserError(f"{path} (the inputs of block {i}) is missing; delete {self.path} to start over")
        return load_file(str(path))["hidden"].to(device)

    def commit(self, i: int, record: dict, hidden: torch.Tensor | None) -> None:
        """Block ``i`` is finished: save its record and the next block's inputs, then mark it done."""
        from safetensors.torch import save_file

        write_file_atomic(self.record_path(i), json_text(record) + "\n")
        if hidden is not None:
            data = {"hidden": hidden.detach().to("cpu").contiguous()}
            write_path_atomic(self.hidden_path(i + 1), lambda tmp: save_file(data, str(tmp)))
        self.done = i + 1
        self.write_state()
        self.hidden_path(i).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _assign(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of parameter or buffer ``name`` of ``root`` (a meta tensor, or the reverse)."""
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _lookup(root: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def _meta_tensor(info: dict) -> torch.Tensor:
    """A meta tensor of a safetensors header entry's shape and dtype."""
    return torch.empty(info["shape"], dtype=_DTYPES.get(info["dtype"], torch.uint8), device="meta")


def _shape_only(q: QuantizedTensor) -> QuantizedTensor:
    """``q`` without its codes (on the meta device; the shape stays): the grids are all a report still needs."""
    return QuantizedTensor(
        torch.empty(q.codes.shape, dtype=q.codes.dtype, device="meta"), q.scale, q.zero, q.spec, q.g_idx
    )


def _all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """No NaN or infinity in ``t``, checked a million elements at a time (no full-size temporaries)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


class DiskStream:
    """The block stream of a model built on the meta device, reading ``source`` and writing to ``work``.

    ``storage`` is ``dense`` (one safetensors shard per block plus one for the rest, with a shard index) or
    ``packed`` (each block's packed parts, joined into the one ``model.packed.safetensors`` at the end).
    Float tensors are computed in ``compute_dtype`` and stored in ``save_dtype``.
    """

    def __init__(
        self,
        model: nn.Module,
        source: SourceShards,
        work: WorkFolder | None,  # set before the first block is read
        *,
        compute_dtype: torch.dtype,
        save_dtype: torch.dtype,
        storage: str,
    ) -> None:
        self.model, self.source, self.work = model, source, work
        self.compute_dtype, self.save_dtype, self.storage = compute_dtype, save_dtype, storage
        self.read_only = False
        self.io_phase = "shard I/O"  # the walkers time load and finish as this phase
        self.tracked: dict[str, dict] = {}
        self._written = False
        self._before: dict[str, set] = {}  # the tracked names before the block being worked on
        self.prefix = blocks_path(model)
        self.n = len(get_blocks(model))
        model.tie_weights()
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        persistent = set(model.state_dict())
        self.order = [k for k, _ in named if k in persistent]  # state_dict order (what in-memory saving follows)
        groups: dict[int, list[str]] = {}
        for k, t in named:
            if k in persistent:
                groups.setdefault(id(t), []).append(k)
        self.aliases = {k: g for g in groups.values() for k in g}  # tied names share one tensor
        self.block_keys = [[k for k in self.order if k.startswith(f"{self.prefix}.{i}.")] for i in range(self.n)]
        inside = {k for keys in self.block_keys for k in keys}
        self.rest_keys = [k for k in self.order if k not in inside]
        self.plan = conversion_plan(model, list(source.where))
        # read through transformers' conversion: a dense output goes back to the source's layout (as saved)
        self.converted = any(c.sources != [k] for k, c in self.plan.items())
        self._check_keys(inside)
        for name, c in self.plan.items():  # each converted tensor built once on the meta device: fails now, not later
            if c.converter is not None:
                c.build(name, model, {k: _meta_tensor(source.info[k]) for k in c.sources})
        self.transposed = _transposed_params(model)

    def _check_keys(self, inside: set[str]) -> None:
        stored = set(self.plan)
        wanted = set(self.order)
        unexpected = sorted(src for k, c in self.plan.items() if k not in wanted for src in c.sources)
        missing = sorted(k for k in wanted - stored if not any(a in stored for a in self.aliases[k]))
        if missing or unexpected:
            raise UserError(
                f"the tensors of {self.source.folder} do not match its config.json by name (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}): streaming reads them by the model's own names; "
                "use offload none to load it whole",
                param="offload",
            )
        floats = [n for n, p in self.model.named_parameters() if p.is_floating_point() and n in stored]
        ints = [n for n in floats if not _DTYPES.get(self._info(n)["dtype"], torch.uint8).is_floating_point]
        if ints:  # integer bit patterns would be cast into weights
            raise UserError(f"{self.source.folder} stores float weights as integers: {ints[:5]}; the file is damaged")

    def stored(self, key: str) -> str:
        """The name ``key`` (or a name tied to it) has in the source files."""
        return next(a for a in [key, *self.aliases[key]] if a in self.plan)

    def _info(self, name: str) -> dict:
        """The safetensors header entry (dtype, shape) of the (first) stored tensor model tensor ``name`` is
        read from."""
        return self.source.info[self.plan[name].sources[0]]

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The model tensors ``names`` as stored (dtype), each built from its stored tensors (:class:`Conversion`);
        a converted one (a block's fused experts) is read and built before the next one is read."""
        plain = [n for n in names if self.plan[n].converter is None]
        got = self.source.read([self.plan[n].sources[0] for n in plain])
        out = {n: got[self.plan[n].sources[0]] for n in plain}
        for n in names:
            if self.plan[n].converter is not None:
                out[n] = self.plan[n].build(n, self.model, self.source.read(self.plan[n].sources))
        return {n: out[n] for n in names}

    # -- reading and freeing ------------------------------------------------------------------------------

    def _load(self, keys: list[str], device: torch.device) -> None:
        names = list(dict.fromkeys(self.stored(k) for k in keys))
        for name, t in self._read(names).items():
            t = t.to(device=device, dtype=self.compute_dtype) if t.is_floating_point() else t.to(device)
            if t.is_floating_point() and not _all_finite(t):
                raise UserError(f"{self.source.folder} has NaN or infinite weights in {name}; the file is damaged")
            for alias in self.aliases[name]:
                _assign(self.model, alias, t)

    def _free(self, keys: list[str]) -> None:
        for k in keys:
            empty = torch.empty_like(_lookup(self.model, k), device="meta")
            for alias in self.aliases[k]:
                _assign(self.model, alias, empty)

    def _input_side_keys(self) -> list[str]:
        """The tensors outside the blocks that the forward up to block 0 reads: all but the head's own (a head
        tied to the embeddings is read with them)."""
        head = self.model.get_output_embeddings()
        name = next((n for n, m in self.model.named_modules() if m is head), None) if head is not None else None
        return [k for k in self.rest_keys if name is None or not k.startswith(f"{name}.")]

    # -- the block source the walkers use (calibration.offload.BlockSource) ----------------------------------------

    def track(self, **dicts: dict | None) -> None:
        self.tracked.update({k: v for k, v in dicts.items() if v is not None})

    def begin(self) -> int:
        """The first block this pass works on. A writing pass (one per model) restores the report shares of the
        blocks a killed run finished and starts after them; a read-only pass starts at block 0."""
        if self.read_only:
            return 0
        if self._written:
            raise RuntimeError("a streamed model is written by one pass over its blocks")
        self._written = True
        for i in range(self.work.done):
            self._restore(i, self.work.read_record(i))
        return self.work.done

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """The tensors outside the blocks that the forward up to block 0 reads, on the CPU while inside."""
        side = self._input_side_keys()
        self._load(side, torch.device("cpu"))
        try:
            yield
        finally:
            self._free(side)

    def resumed_inputs(self, i: int, device: torch.device) -> torch.Tensor:
        return self.work.read_hidden(i, device)

    def load(self, i: int, device: torch.device | None) -> None:
        """Read block ``i`` from the source shards onto ``device`` (the CPU for ``None``)."""
        self._before = self._snapshot()
        self._load(self.block_keys[i], device or torch.device("cpu"))

    def finish(self, i: int, hidden: torch.Tensor | None) -> None:
        """Write block ``i`` and the next block's inputs ``hidden`` to the work folder (not in a read-only pass)."""
        if not self.read_only:
            self._finish(i, self._before, hidden)

    def free(self, i: int) -> None:
        self._free(self.block_keys[i])

    # -- writing ----------------------------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, set]:
        return {name: set(d) for name, d in self.tracked.items()}

    def _state(self, keys: list[str]) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        return {k: state[k].detach().to("cpu") for k in keys}

    def _write_tensors(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        write_path_atomic(path, lambda tmp: write_safetensors(tmp, specs, tensors.__getitem__, metadata))

    def _dtype_of(self, key: str) -> torch.dtype:
        stored = _DTYPES[self._info(self.stored(key))["dtype"]]
        return self.save_dtype if stored.is_floating_point else stored

    def _store_dense(self, name: str, keys: list[str], *, lazy: bool) -> dict:
        """A dense shard of ``keys``; ``lazy``: each tensor read from the source only while it is written."""
        stored = [k for k in keys if self.stored(k) == k]  # a tied copy is not stored twice
        if self.converted and not (lazy and set(self._saved_names(stored)) == set(stored)):
            return self._store_reverted(name, stored, lazy=lazy)
        specs = [(k, self._dtype_of(k), tuple(self._info(k)["shape"])) for k in stored]
        if lazy:

            def get(k: str) -> torch.Tensor:
                t = self._read([k])[k]
                return t.to(self.compute_dtype).to(self.save_dtype) if t.is_floating_point() else t

        else:
            state = self.model.state_dict()
            get = state.__getitem__
        meta = {"format": "pt"}
        write_path_atomic(self.work.path / name, lambda tmp: write_safetensors(tmp, specs, get, meta))
        return {"file": name, "keys": stored, "bytes": sum(math.prod(s) * d.itemsize for _k, d, s in specs)}

    def _saved_names(self, keys: list[str]) -> list[str]:
        """The names ``save_pretrained`` gives the model tensors ``keys`` (worked out on the meta device)."""
        from transformers.core_model_loading import revert_weight_conversion

        meta = {k: torch.empty_like(_lookup(self.model, k), device="meta") for k in keys}
        return list(revert_weight_conversion(self.model, meta))

    def _store_reverted(self, name: str, keys: list[str], *, lazy: bool) -> dict:
        """A dense shard of ``keys`` under the names ``save_pretrained`` writes (transformers' conversion reverted:
        fused experts split back into the source's per-expert tensors); ``lazy``: read here, freed after."""
        from transformers.core_model_loading import revert_weight_conversion

        if lazy:
            self._load(keys, torch.device("cpu"))
        try:
            state = revert_weight_conversion(self.model, {k: _lookup(self.model, k).detach() for k in keys})
            dtypes = {k: self.save_dtype if v.is_floating_point() else v.dtype for k, v in state.items()}
            specs = [(k, dtypes[k], tuple(v.shape)) for k, v in state.items()]
            meta = {"format": "pt"}
            write_path_atomic(self.work.path / name, lambda tmp: write_safetensors(tmp, specs, state.__getitem__, meta))
        finally:
            if lazy:
                self._free(keys)
        return {"file": name, "keys": list(state), "bytes": sum(math.prod(s) * d.itemsize for _k, d, s in specs)}

    def _store(self, name: str, keys: list[str], *, lazy: bool = False) -> dict:
        """Write tensors ``keys`` as file ``name`` in the work folder; what the record says about them."""
        if self.storage == "dense":
            return self._store_dense(name, keys, lazy=lazy)
        state = self._state(keys)
        quantized = self.tracked.get("quantized", {})
        codes = {k: quantized[k] for k in keys if k in quantized}
        transposed = {k for k in keys if k in self.transposed}
        tensors, entries = pack_named(state, transposed, quantized=codes, dtype=self.save_dtype)
        self._write_tensors(self.work.path / name, tensors, {"format": "pt", "lmcompress_storage": "packed"})
        for k in codes:
            quantized[k] = _shape_only(codes[k])  # the codes are on disk now
        return {"file": name, "entries": entries}

    def _finish(self, i: int, before: dict[str, set], hidden: torch.Tensor | None) -> None:
        record = self._store(self.shard_name(i + 1), self.block_keys[i])
        tracked: dict[str, dict] = {}
        for name, d in self.tracked.items():
            new = [k for k in d if k not in before.get(name, set())]
            tracked[name] = new if name == "quantized" else {k: d[k] for k in new}
        record["tracked"] = tracked
        self.work.commit(i, record, hidden)

    def _restore(self, i: int, record: dict) -> None:
        for name, entries in record.get("tracked", {}).items():
            if name not in self.tracked:
                continue
            if name == "quantized":
                self.tracked[name].update(self._read_codes(record, entries))
            else:
                self.tracked[name].update(entries)

    def _read_codes(self, record: dict, names: list[str]) -> dict[str, QuantizedTensor]:
        from safetensors import safe_open

        out = {}
        with safe_open(str(self.work.path / record["file"]), framework="pt") as f:
            for name in names:
                entry = record["entries"][name]
                parts = {p: f.get_tensor(d["key"]) for p, d in entry["parts"].items()}
                meta = {k: v for k, v in entry.items() if k not in ("kind", "layout", "parts", "transposed")}
                out[name] = _shape_only(unpack_quantized(Packed(entry["layout"], parts, meta)))
        return out

    def shard_name(self, j: int) -> str:
        """File ``j`` of the output: 0 holds the tensors outside the blocks, ``i + 1`` block ``i``."""
        if self.storage == "dense":
            return f"model-{j + 1:05d}-of-{self.n + 1:05d}.safetensors"
        return f"part-{j:05d}.packed.safetensors"

    def write_output(self, folder: Path) -> dict | None:
        """Write the tensors outside the blocks, then put the weights into ``folder`` (the output being written):
        the dense shards and their index are moved there, packed parts joined into one file. Returns the packed
        index (``None`` for dense storage)."""
        if self.work.done < self.n:
            raise RuntimeError(f"only {self.work.done} of {self.n} blocks were written")
        if self.storage == "dense":  # one tensor at a time, straight from the source
            rest = self._store(self.shard_name(0), self.rest_keys, lazy=True)
        else:
            self._load(self.rest_keys, torch.device("cpu"))
            try:
                rest = self._store(self.shard_name(0), self.rest_keys)
            finally:
                self._free(self.rest_keys)
        records = [rest] + [self.work.read_record(i) for i in range(self.n)]
        if self.storage == "dense":
            weight_map = {k: r["file"] for r in records for k in r["keys"]}
            for r in records:
                os.replace(self.work.path / r["file"], folder / r["file"])
            index = {
                "metadata": {"total_size": sum(r["bytes"] for r in records)},
                "weight_map": {k: weight_map[k] for k in [*self.order, *weight_map] if k in weight_map},
            }
            (folder / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            return None
        files = [self.work.path / r["file"] for r in records]
        concat_safetensors(files, folder / PACKED_FILE, {"format": "pt", "lmcompress_storage": "packed"})
        entries = {k: e for r in records for k, e in r["entries"].items()}
        return {"format": FORMAT_VERSION, "file": PACKED_FILE, "tensors": {k: entries[k] for k in self.order}}
