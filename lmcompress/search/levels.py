"""The level grids a search chooses from: sparsities in [0, 1) or bit widths from 2 to 8."""

from __future__ import annotations

from lmcompress.errors import UserError

KINDS = ("sparsity", "bits")
DEFAULT_LEVELS = {"sparsity": "0.3:0.95:0.05", "bits": "2,3,4,8"}
METHODS = {"sparsity": ("sparsegpt", "wanda", "magnitude"), "bits": ("gptq", "rtn")}
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
