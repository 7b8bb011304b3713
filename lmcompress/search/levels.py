"""The level grids a search chooses from: sparsities in [0, 1), bit widths from 2 to 8, or joint levels (a
sparsity and a bit width per layer, for a size budget)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmcompress.algorithms.masks import Pattern
from lmcompress.errors import UserError

KINDS = ("sparsity", "bits", "size")
DEFAULT_LEVELS = {"sparsity": "0.3:0.95:0.05", "bits": "2,3,4,8", "size": "auto"}
# size: SparseGPT with GPTQ's grid in the same pass (transforms.prune's joint mode); GPTQ alone at sparsity 0
METHODS = {"sparsity": ("sparsegpt", "wanda", "magnitude"), "bits": ("gptq", "rtn"), "size": ("sparsegpt",)}
GRANULARITIES = ("layer", "block")
DATABASE_INPUTS = ("sequential", "dense")
MAX_LEVELS = 100  # every layer is compressed and stored at every level: more would take hours and the disk


def parse_levels(text: str, kind: str = "sparsity") -> list[float]:
    """``"0.3:0.95:0.05"`` (start:stop:step, both ends included) or ``"0.3,0.5,0.7"``, sorted ascending.

    Sparsities must lie in [0, 1); bit widths are integers from 2 to 8.
    """
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = round((stop - start) / step)
            values = [round(start + k * step, 6) for k in range(min(n, MAX_LEVELS) + 1)]
        else:
            n, values = 0, [float(x) for x in text.split(",") if x.strip()]
    except (ValueError, OverflowError):
        raise UserError(f"levels {text!r} must look like 0.3:0.95:0.05 or 0.3,0.5,0.7") from None
    if max(n + 1, len(values)) > MAX_LEVELS:
        raise UserError(f"levels {text!r} give {max(n + 1, len(values))} levels; at most {MAX_LEVELS}: use fewer")
    values = sorted(set(values))
    if kind == "bits":
        if len(values) < 2 or not all(v == int(v) and 2 <= v <= 8 for v in values):
            raise UserError(f"levels {text!r} need at least two integer bit widths from 2 to 8, e.g. 2,3,4,8")
        return [float(v) for v in values]
    if len(values) < 2 or not all(0.0 <= v < 1.0 for v in values):
        raise UserError(f"levels {text!r} need at least two sparsities in [0, 1)")
    return values


# ------------------------------------------------------------------------------------------------------------
# joint levels: a sparsity and a bit width per layer (budget size=...)

FLOAT_BITS = 16  # the "bits" of a level whose weights stay floats (stored in the checkpoint's 16-bit dtype)
JOINT_BITS = (2, 3, 4, 5, 6, 8, FLOAT_BITS)
AUTO_JOINT = "0/16,0/8,0/4,0/3,2:4/4,2:4/3,0/2"  # what --levels auto means for a size budget
DROP = "drop"  # the joint level of a block removed (per-block searches only)


@dataclass(frozen=True)
class JointLevel:
    """One joint level: ``sparsity`` (a fraction, or an N:M ``pattern``) and ``bits`` (16: floats, not quantized),
    or ``drop``: the whole block removed."""

    sparsity: float
    bits: int
    pattern: str = "unstructured"
    drop: bool = False

    @property
    def label(self) -> str:
        """The level as the grammar writes it: ``0/4``, ``2:4/3``, ``0.5/16``, ``drop``."""
        if self.drop:
            return DROP
        return f"{self.pattern if self.pattern != 'unstructured' else f'{self.sparsity:g}'}/{self.bits}"

    @property
    def quantized(self) -> bool:
        return not self.drop and self.bits != FLOAT_BITS

    def nominal_bits(self, group_size: int = 128, float_bits: int = FLOAT_BITS) -> float:
        """Bits per weight as packed storage would take them on a wide layer: kept codes (or floats), an N:M
        index (``ceil(log2 C(M, N))`` bits per group of M) or a bitmask (1 bit per weight), a 32-bit scale per
        grid group; 0 for ``drop``. Orders the levels and places uniform starts; the budget uses exact bytes."""
        if self.drop:
            return 0.0
        width = float_bits if not self.quantized else self.bits
        kept = (1.0 - self.sparsity) * width
        if self.pattern != "unstructured":
            n, m = (int(x) for x in self.pattern.split(":"))
            kept += math.ceil(math.log2(math.comb(m, n))) / m
        elif self.sparsity > 0:
            kept += 1.0
        grid = 32 / group_size if self.quantized and group_size > 0 else 0.0
        return kept + grid


def parse_joint_levels(text: str, group_size: int = 128) -> list[JointLevel]:
    """``"auto"`` (also as an item: ``auto,drop``) or comma-separated ``SPARSITY/BITS`` items, most expensive
    first (by :meth:`JointLevel.nominal_bits`). SPARSITY is 0, a fraction in (0, 1) (unstructured) or ``N:M``;
    BITS is one of 2, 3, 4, 5, 6, 8 or 16 (16: the weights stay floats); ``drop`` (always last) removes the
    whole block. E.g. ``0/16,0/8,0/4,2:4/4,0.5/3,0/2,drop``."""
    source = ",".join(AUTO_JOINT if x.strip().lower() == "auto" else x for x in text.split(","))
    out: dict[str, JointLevel] = {}
    for item in (x.strip() for x in source.split(",")):
        level = _joint_item(item, text)
        out.setdefault(level.label, level)
    levels = sorted(out.values(), key=lambda lv: (-lv.nominal_bits(group_size), lv.label))
    if len(levels) < 2:
        raise UserError(f"levels {text!r} need at least two different SPARSITY/BITS levels, e.g. 0/8,0/4,0/3")
    if len(levels) > MAX_LEVELS:
        raise UserError(f"levels {text!r} give {len(levels)} levels; at most {MAX_LEVELS}: use fewer")
    return levels


def _joint_item(item: str, text: str) -> JointLevel:
    if item.lower() == DROP:
        return JointLevel(1.0, 0, drop=True)
    hint = "each level is SPARSITY/BITS: SPARSITY 0, a fraction below 1 or N:M; BITS one of 2,3,4,5,6,8,16"
    if item.count("/") != 1:
        raise UserError(f"levels {text!r}: {item!r} is not SPARSITY/BITS ({hint}), e.g. 0/16,0/4,2:4/4,0.5/3")
    left, right = (x.strip() for x in item.split("/"))
    try:
        bits = int(right)
    except ValueError:
        raise UserError(f"levels {text!r}: {right!r} in {item!r} is not a bit width ({hint})") from None
    if bits not in JOINT_BITS:
        raise UserError(f"levels {text!r}: {bits} bits in {item!r} is not one of 2,3,4,5,6,8,16")
    if ":" in left:
        try:
            pattern = Pattern.parse(left)
        except ValueError as exc:
            raise UserError(f"levels {text!r}: {exc}") from None
        return JointLevel(float(pattern.sparsity), bits, str(pattern))
    try:
        sparsity = float(left)
    except ValueError:
        raise UserError(f"levels {text!r}: {left!r} in {item!r} is not a sparsity ({hint})") from None
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"levels {text!r}: sparsity {left} in {item!r} must be in [0, 1)")
    return JointLevel(round(sparsity, 6), bits)


def find_joint(levels: list[JointLevel], label: str) -> int:
    """The index of the level written ``label``."""
    for k, level in enumerate(levels):
        if level.label == label:
            return k
    raise KeyError(label)
