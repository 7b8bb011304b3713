"""Compact layouts for sparse and quantized tensors, each with an exact inverse.

Pure tensor functions; :mod:`lmcompress.checkpoint.packed` puts their output in safetensors files.

Layouts of one tensor (all work on the *logical* matrix ``[out, in]``, N:M groups run along ``in``):

``dense``
    the values as they are (floats) or the integer codes bit-packed (quantized).
``bitmask``
    one bit per element, set where the element is kept (packed 8 per byte, little-endian bit order),
    plus the kept elements in row-major order.
``nm``
    every group of ``M`` consecutive inputs keeps at most ``N`` elements: the kept values
    ``[rows, in / M · N]`` plus, per group, *which* ``N`` of the ``M`` positions were kept, stored as the
    rank of that combination in ``ceil(log2 C(M, N))`` bits (2:4 → 3 bits per group, 4:8 → 7 bits).

For floats an element is "kept" when it is non-zero. For quantized tensors (integer codes plus scales and
zero points) it is kept when its code differs from its group's zero point, i.e. when it dequantizes to a
non-zero weight; dropped codes come back as the zero point, so the codes round-trip exactly.

Integer codes of 1 to 16 bits are packed densely across byte boundaries (two 4-bit codes per byte; eight
3-bit codes in three bytes). :func:`pack_tensor` and :func:`pack_quantized` pick the smallest layout.

Grids are stored as their format holds them: a K-quant grid (``q2_k`` … ``q6_k``) as its fp16 super-block ``d``
(and ``dmin``) and int8 sub-block scales (and minimums), from which the per-sub-block scale and zero point are
recomputed bit for bit; a ``q4_1`` / ``q5_1`` grid's zero point as the fp16 minimum ``m`` it comes from
(``z = −m / s``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from lmcompress.algorithms.kquants import KTYPES, KGrid
from lmcompress.algorithms.quant import QuantizedTensor, QuantSpec, kquant_grid_of, scale_storage_dtype

NM_GROUP_SIZES = (4, 8, 16)  # M values tried when looking for an N:M structure
_CHUNK = 1 << 20  # elements bit-packed at a time (bounds temporary memory); a multiple of 8


# ----------------------------------------------------------------------------------------------------------
# integer bit-packing


def packed_nbytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**bits`` (any shape, row-major) into ``ceil(n·bits/8)`` uint8 bytes.

    Element ``i`` occupies bits ``[i·bits, (i+1)·bits)`` of the little-endian bit stream.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    flat = values.detach().reshape(-1).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values do not fit in {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, shifted into place
        per = 8 // bits
        arr = np.zeros(-(-flat.numel() // per) * per, np.uint8)
        arr[: flat.numel()] = flat.to(torch.uint8).numpy()
        shifts = (np.arange(per) * bits).astype(np.uint8)
        return torch.from_numpy(np.bitwise_or.reduce(arr.reshape(-1, per) << shifts, axis=1).astype(np.uint8))
    wide = np.uint8 if bits < 8 else np.dtype("<u2")  # unpack only the bytes that hold the value
    arr = flat.to(torch.int32).numpy().astype(wide)
    width = arr.itemsize
    out = []
    for start in range(0, arr.size, _CHUNK):
        chunk = arr[start : start + _CHUNK]
        planes = np.unpackbits(chunk.view(np.uint8).reshape(-1, width), axis=1, bitorder="little")[:, :bits]
        out.append(np.packbits(planes.reshape(-1), bitorder="little"))
    packed = np.concatenate(out) if out else np.zeros(0, np.uint8)
    return torch.from_numpy(packed)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` integers (uint8 when ``bits <= 8``, else int32)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a 1-D uint8 tensor")
    if packed.numel() != packed_nbytes(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {count} values of {bits} bits")
    if bits == 8:
        return packed.clone()
    data = packed.numpy()
    if 8 % bits == 0:
        per = 8 // bits
        shifts = (np.arange(per) * bits).astype(np.uint8)
        values = ((data[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:count]
        return torch.from_numpy(np.ascontiguousarray(values))
    width = 8 if bits < 8 else 16
    chunk_bytes = _CHUNK * bits // 8
    out = []
    for start in range(0, data.size, chunk_bytes):
        stream = np.unpackbits(data[start : start + chunk_bytes], bitorder="little")
        n = min(_CHUNK, count - (start * 8 // bits))
        planes = np.zeros((n, width), np.uint8)
        planes[:, :bits] = stream[: n * bits].reshape(n, bits)
        out.append(np.packbits(planes, axis=1, bitorder="little").view("<u2" if width == 16 else np.uint8).reshape(-1))
    values = np.concatenate(out) if out else np.zeros(0, np.uint8 if bits < 8 else "<u2")
    return torch.from_numpy(values.astype(np.uint8 if bits < 8 else np.int32))


# ----------------------------------------------------------------------------------------------------------
# bitmask


def pack_bitmask(keep: torch.Tensor) -> torch.Tensor:
    """A bool tensor as ``ceil(n/8)`` uint8 bytes (row-major, little-endian bit order)."""
    return torch.from_numpy(np.packbits(keep.detach().reshape(-1).cpu().numpy(), bitorder="little"))


def unpack_bitmask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != -(-count // 8):
        raise ValueError(f"a bitmask of {tuple(shape)} needs {-(-count // 8)} bytes, got {packed.numel()}")
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# N:M: which N of every M positions are kept, as the rank of the combination


@lru_cache(maxsize=32)
def _combinations(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lookup tables for N:M groups, built once per pattern.

    ``combos [C, n]``: every n-subset of range(m) in lexicographic order (its row is its rank);
    ``fill [2**m, n]``: for each bitset of kept positions (at most n), the n positions that store it
    (the kept ones, then the first dropped ones, ascending); ``rank [2**m]``: the rank of those positions
    (-1 for bitsets with more than n kept).
    """
    combos = torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.int64).reshape(-1, n)
    rank_of = {tuple(c): r for r, c in enumerate(combos.tolist())}
    fill = torch.zeros((1 << m, n), dtype=torch.int64)
    rank = torch.full((1 << m,), -1, dtype=torch.int64)
    for bitset in range(1 << m):
        kept = [i for i in range(m) if bitset >> i & 1]
        if len(kept) > n:
            continue
        chosen = tuple(sorted(kept + [i for i in range(m) if not bitset >> i & 1][: n - len(kept)]))
        fill[bitset] = torch.tensor(chosen)
        rank[bitset] = rank_of[chosen]
    return combos, fill, rank


def _bitsets(groups: torch.Tensor) -> torch.Tensor:
    """Each row of a bool ``[G, m]`` as the integer with bit i set where column i is set."""
    weights = 2.0 ** torch.arange(groups.shape[1], dtype=torch.float32)  # exact in float32 for m <= 16
    return (groups.to(torch.float32) @ weights).long()  # a matmul: far faster than a sum over a short dim


def nm_index_bits(n: int, m: int) -> int:
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def _check_nm(n: int, m: int) -> None:
    if not (0 < n < m <= 16):
        raise ValueError(f"N:M layout needs 0 < N < M <= 16, got {n}:{m}")


def nm_max_kept(keep: torch.Tensor, m: int) -> int | None:
    """Most kept elements in any group of ``m`` consecutive entries of the last dim (None if it does not split)."""
    if keep.dim() == 0 or keep.shape[-1] % m:
        return None
    if keep.numel() == 0:
        return 0
    return int((keep.reshape(-1, m).to(torch.float32) @ torch.ones(m)).max())


def nm_select(keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``m`` (along the last dim): the ``n`` ascending positions that store it, covering every
    kept element (groups with fewer kept are filled up with their first dropped positions), and the rank
    of that combination."""
    _check_nm(n, m)
    if keep.dim() == 0 or keep.shape[-1] % m:
        raise ValueError(f"cannot store {tuple(keep.shape)} as {n}:{m}: last dim not a multiple of {m}")
    _, fill, rank = _combinations(n, m)
    bitsets = _bitsets(keep.reshape(-1, m))
    ranks = rank[bitsets]
    if ranks.numel() and bool((ranks < 0).any()):
        raise ValueError(f"some groups of {m} keep more than {n} elements: not an {n}:{m} tensor")
    return fill[bitsets], ranks


def unpack_nm_index(packed: torch.Tensor, n: int, m: int, groups: int) -> torch.Tensor:
    _check_nm(n, m)
    combos, _, _ = _combinations(n, m)
    ranks = unpack_bits(packed, nm_index_bits(n, m), groups).to(torch.int64)
    if ranks.numel() and int(ranks.max()) >= combos.shape[0]:
        raise ValueError(f"corrupted N:M index: rank {int(ranks.max())} is not a {n}:{m} combination")
    return combos[ranks]


def nm_gather(t: torch.Tensor, positions: torch.Tensor, m: int) -> torch.Tensor:
    """The entries of ``t`` at ``positions``, as ``[*t.shape[:-1], t.shape[-1] / m · n]``."""
    n = positions.shape[1]
    kept = t.reshape(-1, m).gather(1, positions)
    return kept.reshape(*t.shape[:-1], t.shape[-1] // m * n)


def nm_scatter(values: torch.Tensor, positions: torch.Tensor, m: int, fill: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`nm_gather`: ``fill`` (full shape) with ``values`` written at ``positions``."""
    n = positions.shape[1]
    out = fill.clone().reshape(-1, m)
    out.scatter_(1, positions, values.reshape(-1, n).to(out.dtype))
    return out.reshape(fill.shape)


# ----------------------------------------------------------------------------------------------------------
# whole tensors: choose a layout, pack, unpack


@dataclass
class Packed:
    """A tensor in one layout: named parts (tensors to store) and JSON-able metadata to rebuild it."""

    layout: str  # dense | bitmask | nm
    parts: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())


def _layout_costs(keep: torch.Tensor, elem_bits: int) -> dict[tuple, int]:
    """Bytes of each applicable layout for elements of ``elem_bits`` bits (values/codes only)."""
    numel = keep.numel()
    nnz = int(keep.sum())
    round_up = elem_bits % 8 != 0  # bit-packed streams are stored whole bytes per part
    costs = {("dense",): packed_nbytes(numel, elem_bits) if round_up else numel * elem_bits // 8}
    costs[("bitmask",)] = -(-numel // 8) + packed_nbytes(nnz, elem_bits)
    if keep.dim() >= 1 and numel:
        for m in NM_GROUP_SIZES:
            n = nm_max_kept(keep, m)
            if n is None or not 0 < n < m:
                continue
            groups = numel // m
            costs[("nm", n, m)] = packed_nbytes(groups * n, elem_bits) + packed_nbytes(groups, nm_index_bits(n, m))
    return costs


def choose_layout(keep: torch.Tensor, elem_bits: int) -> tuple:
    """The smallest layout for a tensor whose kept elements are ``keep``; ties go to the simpler one."""
    costs = _layout_costs(keep, elem_bits)
    return min(costs, key=lambda k: (costs[k], len(k)))


def _parse_layout(layout: str | tuple, keep: torch.Tensor, elem_bits: int) -> tuple:
    if isinstance(layout, tuple):
        return layout
    if layout == "auto":
        return choose_layout(keep, elem_bits)
    if layout in ("dense", "bitmask"):
        return (layout,)
    if ":" in layout:
        n, m = (int(x) for x in layout.split(":"))
        return ("nm", n, m)
    raise ValueError(f"unknown layout {layout!r}: use auto, dense, bitmask or N:M")


def pack_tensor(t: torch.Tensor, layout: str | tuple = "auto") -> Packed:
    """Pack a float (or any) tensor; zeros are the dropped elements. ``layout``: auto | dense | bitmask | N:M."""
    t = t.detach().cpu().contiguous()
    meta = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.dtype == torch.bool or t.dim() == 0:
        return Packed("dense", {"values": t}, meta)
    keep = t != 0
    choice = _parse_layout(layout, keep, t.element_size() * 8)
    meta["nnz"] = int(keep.sum())
    if choice[0] == "dense":
        return Packed("dense", {"values": t}, meta)
    if choice[0] == "bitmask":
        return Packed("bitmask", {"mask": pack_bitmask(keep), "values": t[keep]}, meta)
    _, n, m = choice
    positions, ranks = nm_select(keep, n, m)
    parts = {"values": nm_gather(t, positions, m).contiguous(), "index": pack_bits(ranks, nm_index_bits(n, m))}
    return Packed("nm", parts, {**meta, "n": n, "m": m})


def _need(parts: dict, *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise ValueError(f"missing part(s) {', '.join(missing)}")
    return [parts[n] for n in names]


def unpack_tensor(p: Packed) -> torch.Tensor:
    """Inverse of :func:`pack_tensor` (raises ValueError when parts and metadata do not fit together)."""
    shape = tuple(p.meta["shape"])
    dtype = getattr(torch, p.meta["dtype"])
    if p.layout == "dense":
        (values,) = _need(p.parts, "values")
        if tuple(values.shape) != shape or values.dtype != dtype:
            raise ValueError(f"dense values are {tuple(values.shape)} {values.dtype}, expected {shape} {dtype}")
        return values
    if p.layout == "bitmask":
        mask, values = _need(p.parts, "mask", "values")
        keep = unpack_bitmask(mask, shape)
        nnz = int(keep.sum())
        if values.dtype != dtype or values.dim() != 1 or values.numel() != nnz:
            raise ValueError(f"bitmask keeps {nnz} elements but {values.numel()} {values.dtype} values are stored")
        out = torch.zeros(shape, dtype=dtype)
        out[keep] = values
        return out
    if p.layout == "nm":
        values, index = _need(p.parts, "values", "index")
        n, m = p.meta["n"], p.meta["m"]
        groups = math.prod(shape) // m
        expect = (*shape[:-1], shape[-1] // m * n)
        if values.dtype != dtype or tuple(values.shape) != expect:
            raise ValueError(f"{n}:{m} values are {tuple(values.shape)} {values.dtype}, expected {expect} {dtype}")
        positions = unpack_nm_index(index, n, m, groups)
        return nm_scatter(values, positions, m, torch.zeros(shape, dtype=dtype))
    raise ValueError(f"unknown layout {p.layout!r}")


def _default_g_idx(spec: QuantSpec, cols: int) -> torch.Tensor:
    return torch.arange(cols) // spec.width(cols)


def expand_groups(per_group: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``[rows, groups]`` → ``[rows, cols]``: column ``c`` gets its group's value ``per_group[:, g_idx[c]]``."""
    return per_group[:, g_idx.long()]


def pack_quantized(q: QuantizedTensor, layout: str | tuple = "auto") -> Packed:
    """Pack a :class:`QuantizedTensor`: bit-packed codes (all, or the kept ones plus a mask / N:M index),
    scales in the narrowest exact float dtype, zero points bit-packed (or implied when symmetric)."""
    codes = q.codes.detach().cpu()
    spec = q.spec
    if codes.dim() != 2:
        raise ValueError(f"quantized codes must be 2-D [out, in], got {tuple(codes.shape)}")
    rows, cols = codes.shape
    scale, zero = q.scale.detach().cpu(), q.zero.detach().cpu()
    groups = spec.groups(cols)
    if tuple(scale.shape) != (rows, groups) or tuple(zero.shape) != (rows, groups):
        raise ValueError(f"scale/zero must be [{rows}, {groups}] for {tuple(codes.shape)} codes with {spec}")
    meta = {
        "shape": [rows, cols],
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "scale_dtype": str(scale.dtype).removeprefix("torch."),
    }
    if spec.grid != "minmax":
        meta["grid"] = spec.grid  # absent: minmax (files written before grids had names)
    parts = {"scale": scale.to(scale_storage_dtype(scale)).contiguous()}
    zero_int = torch.round(zero)
    integral = torch.equal(zero_int, zero) and bool(((zero >= 0) & (zero <= spec.maxq)).all())
    kgrid = _kquant_grid(q)
    q5_1_min = _q5_1_min(scale, zero) if spec.grid in ("q4_1", "q5_1") else None
    if kgrid is not None:  # fp16 d / dmin per super-block, int8 integers per sub-block
        meta["zero"] = "kquant"
        parts = {"d": kgrid.d.contiguous(), "sub_scale": kgrid.scales.to(torch.int8).contiguous()}
        if kgrid.kind.has_min:
            parts |= {"dmin": kgrid.dmin.contiguous(), "sub_min": kgrid.mins.to(torch.int8).contiguous()}
    elif q5_1_min is not None:
        meta["zero"] = "q5_1_min"
        parts["zero"] = q5_1_min
    elif spec.sym and bool((zero == (spec.maxq + 1) // 2).all()):
        meta["zero"] = "mid"
    elif integral:
        meta["zero"] = "packed"
        parts["zero"] = pack_bits(zero_int.to(torch.int32), spec.bits)
    else:
        meta["zero"] = "float"
        parts["zero"] = zero.float().contiguous()
    g_idx = _default_g_idx(spec, cols)
    if q.g_idx is not None and not torch.equal(q.g_idx.detach().cpu().long(), g_idx):  # act-order groups
        g_idx = q.g_idx.detach().cpu().long()
        if g_idx.shape != (cols,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ValueError(f"g_idx must give a group in [0, {groups}) for each of the {cols} inputs")
        meta["g_idx"] = str(q.g_idx.dtype).removeprefix("torch.")
        parts["g_idx"] = pack_bits(g_idx, max(1, math.ceil(math.log2(groups))))
    elif q.g_idx is not None:
        meta["g_idx_default"] = str(q.g_idx.dtype).removeprefix("torch.")  # given, but the plain one
    keep = codes.to(torch.int32) != expand_groups(zero, g_idx)  # codes that dequantize to non-zero
    meta["nnz"] = int(keep.sum())
    choice = _parse_layout(layout, keep, spec.bits) if integral else ("dense",)
    if choice[0] == "dense":
        layout_name = "dense"
        parts["codes"] = pack_bits(codes, spec.bits)
    elif choice[0] == "bitmask":
        layout_name = "bitmask"
        parts["mask"] = pack_bitmask(keep)
        parts["codes"] = pack_bits(codes[keep], spec.bits)
    else:
        _, n, m = choice
        layout_name = "nm"
        positions, ranks = nm_select(keep, n, m)
        parts["codes"] = pack_bits(nm_gather(codes, positions, m), spec.bits)
        parts["index"] = pack_bits(ranks, nm_index_bits(n, m))
        meta.update(n=n, m=m)
    return Packed(layout_name, parts, meta)


def _kquant_grid(q: QuantizedTensor) -> KGrid | None:
    """The integer grid of a K-quant ``q`` in natural column order (None otherwise, or when it is not exact)."""
    if not q.spec.kquant:
        return None
    try:
        return kquant_grid_of(q.to("cpu"))
    except ValueError:
        return None


def _q5_1_min(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
    """The fp16 minimum ``m`` with ``zero = −m / scale`` (0 where ``scale = 0``) exactly, or None."""
    m = (-zero.float() * scale.float()).half()
    if not (torch.isfinite(m).all() and torch.equal(_q5_1_zero(scale.float(), m), zero.float())):
        return None
    return m.contiguous()


def _q5_1_zero(scale: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``−m / scale`` (0 where ``scale = 0``), as :func:`~lmcompress.algorithms.quant.grid_params` computes it."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, torch.zeros_like(scale), -m.float() / safe)


def unpack_quantized(p: Packed) -> QuantizedTensor:
    """Inverse of :func:`pack_quantized`: the exact codes, scales and zero points."""
    rows, cols = p.meta["shape"]
    spec = QuantSpec(
        bits=p.meta["bits"], group_size=p.meta["group_size"], sym=p.meta["sym"], grid=p.meta.get("grid", "minmax")
    )
    groups = spec.groups(cols)
    if p.meta["zero"] == "kquant":
        kind = KTYPES[spec.grid]
        d, sc = _need(p.parts, "d", "sub_scale")
        dmin, mn = _need(p.parts, "dmin", "sub_min") if kind.has_min else (torch.zeros_like(d), torch.zeros_like(sc))
        if tuple(sc.shape) != (rows, groups) or tuple(d.shape) != (rows, groups // kind.nsub):
            raise ValueError(f"K-quant grid {tuple(sc.shape)} / {tuple(d.shape)} does not fit {(rows, cols)}")
        grid = KGrid(kind, sc.to(torch.int16), mn.to(torch.int16), d.half(), dmin.half())
        scale, zero = grid.step().to(getattr(torch, p.meta["scale_dtype"])), grid.zero()
    else:
        (scale,) = _need(p.parts, "scale")
        if tuple(scale.shape) != (rows, groups):
            raise ValueError(f"scale is {tuple(scale.shape)}, expected {(rows, groups)}")
        scale = scale.to(getattr(torch, p.meta["scale_dtype"]))
    if p.meta["zero"] == "kquant":
        pass
    elif p.meta["zero"] == "q5_1_min":
        zero = _q5_1_zero(scale.float(), _need(p.parts, "zero")[0])
    elif p.meta["zero"] == "mid":
        zero = torch.full((rows, groups), float((spec.maxq + 1) // 2), dtype=torch.float32)
    elif p.meta["zero"] == "packed":
        zero = unpack_bits(_need(p.parts, "zero")[0], spec.bits, rows * groups).reshape(rows, groups).float()
    else:
        zero = _need(p.parts, "zero")[0].float()
        if tuple(zero.shape) != (rows, groups):
            raise ValueError(f"zero is {tuple(zero.shape)}, expected {(rows, groups)}")
    g_idx, stored_g_idx = _default_g_idx(spec, cols), None
    if "g_idx" in p.meta:
        packed_g = _need(p.parts, "g_idx")[0]
        g_idx = unpack_bits(packed_g, max(1, math.ceil(math.log2(groups))), cols).long()
        if cols and int(g_idx.max()) >= groups:
            raise ValueError(f"corrupted g_idx: group {int(g_idx.max())} of {groups}")
        stored_g_idx = g_idx.to(getattr(torch, p.meta["g_idx"]))
    elif "g_idx_default" in p.meta:
        stored_g_idx = g_idx.to(getattr(torch, p.meta["g_idx_default"]))
    (packed_codes,) = _need(p.parts, "codes")
    if p.layout == "dense":
        codes = unpack_bits(packed_codes, spec.bits, rows * cols).reshape(rows, cols)
    else:
        fill = expand_groups(zero, g_idx).to(torch.uint8)
        if p.layout == "bitmask":
            keep = unpack_bitmask(_need(p.parts, "mask")[0], (rows, cols))
            nnz = int(keep.sum())
            codes = fill.clone()
            codes[keep] = unpack_bits(packed_codes, spec.bits, nnz)
        elif p.layout == "nm":
            n, m = p.meta["n"], p.meta["m"]
            positions = unpack_nm_index(_need(p.parts, "index")[0], n, m, rows * cols // m)
            kept = unpack_bits(packed_codes, spec.bits, rows * cols // m * n)
            codes = nm_scatter(kept, positions, m, fill)
        else:
            raise ValueError(f"unknown layout {p.layout!r}")
    return QuantizedTensor(codes.to(torch.uint8), scale, zero, spec, stored_g_idx)
