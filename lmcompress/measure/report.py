"""The report of a sweep: where each metric stops being safe, where it falls off, and plots that show it.

For every series (method × allocation × pattern) and every headline metric:

- **essential sparsity**: the largest tested sparsity up to which *every* tested point stays within
  ``tolerance`` (relative) of the dense model, in the metric's own direction (perplexity: lower is better);
- **knee**: the tested sparsity where the curve bends down fastest, i.e. the most negative change of slope of
  the quality relative to dense (``value / dense`` for higher-is-better metrics, ``dense / value`` for
  perplexity), with the dense model as the point at sparsity 0.

Structured series (``ffn`` / ``heads``) are judged the same way over the fraction of units removed;
quantization series over bit widths (the lowest width whose every point, from the widest down, stays within
``tolerance``). Every point's quality is also plotted against its size on disk (bytes of its saved weights),
so pruning, quantization and shrinking compare at equal size. Where the sweep recorded 95% intervals
(perplexity over windows, agreement with dense), the report shows them and says which differences are
within the noise: for perplexity by a paired interval over the shared windows, ``exp`` of the Student-t
interval of the mean per-window NLL difference (the ratio of the two perplexities), otherwise by overlap.

Writes ``report.md``, one self-contained ``report.html`` (plots embedded as base64 PNG) and the PNG files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmcompress.checkpoint.folder import json_text, write_file_atomic
from lmcompress.errors import UserError
from lmcompress.measure.intervals import exp_interval, mean_interval, overlap
from lmcompress.measure.render import png, render_html, render_md
from lmcompress.measure.sweep import (
    DENSE_ID,
    POINTS,
    QUANT_METHODS,
    SHRINK_METHODS,
    SWEEP_FILE,
    load_points,
    read_sweep_file,
)

SKIP_METRICS = ("/nll",)  # derived from another metric; not plotted or judged separately


# ---------------------------------------------------------------------------------------------- analysis


def degradation(value: float, dense: float, higher_is_better: bool) -> float:
    """Relative loss against dense: positive is worse (perplexity up, accuracy down), 0.05 = 5% worse."""
    scale = abs(dense) if dense != 0 else 1.0
    return (dense - value) / scale if higher_is_better else (value - dense) / scale


def quality(value: float, dense: float, higher_is_better: bool) -> float:
    """Quality relative to dense (1 = dense, 0 = nothing left): ``value/dense`` or ``dense/value``."""
    if higher_is_better:
        return value / dense if dense > 0 else value
    return dense / value if value > 0 else 0.0


def essential_sparsity(
    xs: list[float], ys: list[float], dense: float, higher_is_better: bool, tolerance: float = 0.01
) -> float | None:
    """Largest sparsity up to which every point degrades by at most ``tolerance``; ``None`` if even the first
    (sparsest-but-one) point is worse than that."""
    safe = None
    for x, y in sorted(zip(xs, ys, strict=True)):
        if degradation(y, dense, higher_is_better) > tolerance or not math.isfinite(y):
            break
        safe = x
    return safe


def first_failure(
    xs: list[float], ys: list[float], dense: float, higher_is_better: bool, tolerance: float = 0.01
) -> tuple[float, float] | None:
    """The first sparsity past the essential one and its degradation (``None`` when every point is safe)."""
    for x, y in sorted(zip(xs, ys, strict=True)):
        d = degradation(y, dense, higher_is_better) if math.isfinite(y) else math.inf
        if d > tolerance:
            return x, d
    return None


def knee(
    xs: list[float], ys: list[float], dense: float, higher_is_better: bool, tolerance: float = 0.01
) -> float | None:
    """Sparsity where the relative quality bends down fastest (most negative change of slope), dense at 0.

    ``None`` when the curve never bends down (fewer than two points, no negative change of slope) or never
    leaves the tolerance band at all (then any bend is noise).
    """
    if first_failure(xs, ys, dense, higher_is_better, tolerance) is None:
        return None
    pts = [(0.0, 1.0), *sorted((x, quality(y, dense, higher_is_better)) for x, y in zip(xs, ys, strict=True))]
    pts = [(x, q if math.isfinite(q) else 0.0) for x, q in pts]
    best, where = -1e-9, None
    for i in range(1, len(pts) - 1):
        (x0, q0), (x1, q1), (x2, q2) = pts[i - 1], pts[i], pts[i + 1]
        if x1 <= x0 or x2 <= x1:
            continue
        bend = (q2 - q1) / (x2 - x1) - (q1 - q0) / (x1 - x0)
        if bend < best:
            best, where = bend, x1
    return where


@dataclass
class Curve:
    series: str  # e.g. "wanda (uniform)", "sparsegpt (uniform, 2:4)", "gptq (group 128)", "shrink ffn (uniform)"
    key: str  # flat metric key, e.g. "ppl:test/perplexity"
    label: str  # words for it, e.g. "perplexity"
    xs: list[float]  # the level: sparsity, bits or ratio (see axis)
    ys: list[float]
    dense: float
    higher_is_better: bool
    owl: bool
    axis: str = "sparsity"  # "sparsity", "ratio" or "bits"
    cis: list = field(default_factory=list)  # 95% interval (low, high) of each point, or None
    sizes: list = field(default_factory=list)  # bytes of each point's saved weights, or None


def _judged_metrics(dense: dict, headline: list[str]) -> list[str]:
    """The metrics the summary speaks about: each task's headline, plus the task's other metrics when the
    headline is 0 for the dense model (e.g. retrieval accuracy of a small model: value_prob still moves)."""
    out = []
    for key in headline:
        out.append(key)
        if dense["higher_is_better"].get(key) and dense["metrics"][key] == 0:
            task = key.rsplit("/", 1)[0]
            out += [
                k for k in dense["metrics"] if k.startswith(task + "/") and k != key and not k.endswith(SKIP_METRICS)
            ]
    return out


AXES = {"prune": "sparsity", "shrink": "ratio", "quant": "bits"}
AXIS_WORDS = {
    "sparsity": "sparsity (target fraction of weights removed)",
    "ratio": "ratio (fraction of FFN channels / head groups removed)",
    "bits": "bits per weight (quantization grid)",
}


def kind_of(p: dict) -> str:
    """``prune``, ``quant`` or ``shrink`` (points written before quantization axes existed are pruning)."""
    m = p.get("method")
    return "quant" if m in QUANT_METHODS else "shrink" if m in SHRINK_METHODS else "prune"


def level(p: dict) -> float:
    """The point's place on its axis: sparsity, bit width or removal ratio."""
    return p[AXES[kind_of(p)]]


def _series_name(p: dict) -> str:
    kind = kind_of(p)
    if kind == "quant" and p.get("scheme"):  # a W8A8 / FP8 point: a series of its own, one point at 8 bits
        sq = p.get("smoothquant")
        extra = ("" if not p.get("dynamic") else ", dynamic") + ("" if sq is None else f", SmoothQuant {sq}")
        return f"{p['method']} ({p['scheme']}{extra})"
    if kind == "quant":
        gs = p.get("group_size")
        return f"{p['method']} ({'per channel' if gs == -1 else f'group {gs}'})"
    if kind == "shrink":
        return f"shrink {p['method']} ({p['allocation']})"
    extra = "" if p["pattern"] == "unstructured" else f", {p['pattern']}"
    return f"{p['method']} ({p['allocation']}{extra})"


def interval(record: dict, key: str) -> tuple[float, float] | None:
    """The 95% interval the sweep recorded for metric ``key`` of ``record`` (``task/metric`` looks for
    ``metric_ci`` in the task's result, ``agreement/...`` in the agreement), or ``None``."""
    task, _, metric = key.rpartition("/")
    source = record.get("agreement") if task == "agreement" else _task_result(record, task)
    ci = source.get(f"{metric}_ci") if isinstance(source, dict) else None
    ok = isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci)
    return (float(ci[0]), float(ci[1])) if ok else None


def size_of(record: dict) -> int | None:
    size = record.get("size")
    value = size.get("weights_bytes") if isinstance(size, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load_results(folder: str | Path) -> tuple[dict, dict, list[dict]]:
    """``(sweep.json, dense point, other points)`` of a results folder, with clear errors when incomplete."""
    out = Path(folder).expanduser()
    if not (out / SWEEP_FILE).is_file():
        raise UserError(f"{out} is not a sweep results folder (no {SWEEP_FILE}); run `lmcompress sweep` first")
    sweep = read_sweep_file(out / SWEEP_FILE)
    points = load_points(out, sweep.get("settings_hash"))
    if DENSE_ID not in points:
        raise UserError(f"{out} has no dense baseline ({POINTS}/{DENSE_ID}.json) yet; rerun the sweep to finish it")
    dense = points.pop(DENSE_ID)
    missing = [k for k in dense["metrics"] if k not in dense["higher_is_better"]]
    if missing:
        raise UserError(f"{out / POINTS / 'dense.json'}: no direction for metric {missing[0]!r}; rerun the sweep")
    return sweep, dense, sorted(points.values(), key=lambda p: (_series_name(p), level(p)))


def curves(dense: dict, points: list[dict], keys: list[str] | None = None) -> list[Curve]:
    """One curve per series and metric (metrics of the dense run, ``/nll`` left out)."""
    keys = keys or [k for k in dense["metrics"] if not k.endswith(SKIP_METRICS)]
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(_series_name(p), []).append(p)
    out = []
    for name, pts in groups.items():
        for key in keys:
            have = [p for p in pts if key in p.get("metrics", {})]
            if not have:
                continue
            c = Curve(
                name,
                key,
                dense.get("labels", {}).get(key, key),
                [level(p) for p in have],
                [p["metrics"][key] for p in have],
                dense["metrics"][key],
                dense["higher_is_better"][key],
                have[0].get("allocation") == "owl",
                AXES[kind_of(have[0])],
                [interval(p, key) for p in have],
                [size_of(p) for p in have],
            )
            out.append(c)
    return out


def _pct(x: float) -> str:
    return f"{x:.0%}" if abs(x * 100 - round(x * 100)) < 1e-6 else f"{x:.1%}"


def summarize(series_curves: list[Curve], tolerance: float) -> str:
    """One sentence for one series: what perplexity calls safe and where the other metrics already fail; then
    where each judged metric has its knee (when it has one)."""
    name = series_curves[0].series
    parts = []
    ppl = [c for c in series_curves if not c.higher_is_better]
    others = [c for c in series_curves if c.higher_is_better]
    tol = _pct(tolerance)
    safe_ppl = None
    for c in ppl:
        safe_ppl = essential_sparsity(c.xs, c.ys, c.dense, False, tolerance)
        if safe_ppl is None:
            parts.append(f"{c.label} is already more than {tol} worse at {_pct(min(c.xs))}")
        else:
            parts.append(f"{c.label} says {_pct(safe_ppl)} is safe")
    for c in others:
        if c.dense == 0:
            parts.append(f"{c.label} is 0 for the dense model, so it cannot show damage")
            continue
        safe = essential_sparsity(c.xs, c.ys, c.dense, True, tolerance)
        fail = first_failure(c.xs, c.ys, c.dense, True, tolerance)
        if fail is None:
            parts.append(f"{c.label} holds within {tol} up to {_pct(max(c.xs))}")
        elif ppl and (safe_ppl is None or fail[0] <= safe_ppl):
            parts.append(f"{c.label} drops {_pct(fail[1])} already at {_pct(fail[0])}")
        else:
            where = f"up to {_pct(safe)}" if safe is not None else "at no tested sparsity"
            parts.append(f"{c.label} stays within {tol} {where} and drops {_pct(fail[1])} at {_pct(fail[0])}")
    sentence = f"{name}: " + "; ".join(parts) + "."
    knees = [(c.label, knee(c.xs, c.ys, c.dense, c.higher_is_better, tolerance)) for c in [*ppl, *others]]
    knees = [(label, k) for label, k in knees if k is not None]
    if knees:
        sentence += " Knee (steepest fall): " + ", ".join(f"{label} at {_pct(k)}" for label, k in knees) + "."
    return sentence


def summarize_bits(series_curves: list[Curve], tolerance: float) -> str:
    """One sentence for a quantization series: for each judged metric, the lowest bit width down to which every
    point (from the widest grid down) stays within ``tolerance`` of dense, and the first width that does not."""
    name, tol, parts = series_curves[0].series, _pct(tolerance), []
    for c in series_curves:
        if c.higher_is_better and c.dense == 0:
            parts.append(f"{c.label} is 0 for the dense model, so it cannot show damage")
            continue
        pts = sorted(zip(c.xs, c.ys, strict=True), reverse=True)  # widest grid first
        safe, fail = None, None
        for b, y in pts:
            d = degradation(y, c.dense, c.higher_is_better) if math.isfinite(y) else math.inf
            if d > tolerance:
                fail = (b, d)
                break
            safe = b
        if fail is None:
            parts.append(f"{c.label} holds within {tol} down to {_bits(pts[-1][0])}")
        elif safe is None:
            parts.append(f"{c.label} is already {_pct(fail[1])} worse at {_bits(fail[0])}")
        else:
            parts.append(f"{c.label} stays within {tol} down to {_bits(safe)} and is {_pct(fail[1])} worse at "
                         f"{_bits(fail[0])}")  # fmt: skip
    return f"{name}: " + "; ".join(parts) + "."


def _bits(b: float) -> str:
    return f"{b:g} bits"


def essential_bits(c: Curve, tolerance: float) -> float | None:
    """The lowest bit width down to which every point of ``c`` (widest first) stays within ``tolerance``."""
    safe = None
    for b, y in sorted(zip(c.xs, c.ys, strict=True), reverse=True):
        if not math.isfinite(y) or degradation(y, c.dense, c.higher_is_better) > tolerance:
            break
        safe = b
    return safe


# ---------------------------------------------------------------------------------------------- noise


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, tuple[float, float] | None] | None:
    """Perplexity ratio ``ppl_a / ppl_b`` from the per-window mean NLLs of two models on the same windows, and
    its 95% interval: ``exp`` of the mean per-window difference and of its Student-t interval (the windows
    have equal length, so the mean of window means is the mean token NLL). ``None`` if the windows differ."""
    if not a or len(a) != len(b):
        return None
    diff = [x - y for x, y in zip(a, b, strict=True)]
    return math.exp(sum(diff) / len(diff)), exp_interval(mean_interval(diff))


def _task_result(record: dict, task: str) -> dict | None:
    tasks = record.get("tasks")
    result = tasks.get(task) if isinstance(tasks, dict) else None
    return result if isinstance(result, dict) else None


def _window_nll(record: dict, key: str) -> list[float] | None:
    values = (_task_result(record, key.rpartition("/")[0]) or {}).get("window_nll")
    return values if isinstance(values, list) and all(isinstance(v, int | float) for v in values) else None


def _name(p: dict) -> str:
    if p["id"] == DENSE_ID:
        return "dense"
    lv = level(p)
    return f"{_series_name(p)} at {_bits(lv) if kind_of(p) == 'quant' else _pct(lv)}"


def compare(a: dict, b: dict, key: str, label: str) -> tuple[bool, str] | None:
    """Whether points ``a`` and ``b`` differ by less than the noise on metric ``key``, and a sentence saying it;
    ``None`` when there is nothing to tell it by (no intervals)."""
    va, vb = a["metrics"].get(key), b["metrics"].get(key)
    if va is None or vb is None:
        return None
    wa, wb = _window_nll(a, key), _window_nll(b, key)
    paired = paired_ratio(wa, wb) if key.endswith("/perplexity") and wa and wb else None
    if paired is not None and paired[1] is not None:
        ratio, (lo, hi) = paired
        same = lo <= 1.0 <= hi
        how = f"ratio {ratio:.4f}, 95% interval [{lo:.4f}, {hi:.4f}] over {len(wa)} shared windows"
    else:
        ca, cb = interval(a, key), interval(b, key)
        if ca is None or cb is None:
            return None
        same = overlap(ca, cb)
        word = "overlap" if same else "do not overlap"
        how = f"95% intervals [{ca[0]:.4g}, {ca[1]:.4g}] and [{cb[0]:.4g}, {cb[1]:.4g}] {word}"
    verdict = "differ by less than the noise" if same else "differ by more than the noise"
    return same, f"{_name(a)} vs {_name(b)}: {label} {va:.4g} vs {vb:.4g} {verdict} ({how})."


def _similar_size(a: int | None, b: int | None, margin: float) -> bool:
    return bool(a and b) and abs(a - b) <= margin * max(a, b)


def noise_pairs(dense: dict, points: list[dict], size_margin: float = 0.1) -> list[tuple[dict, dict]]:
    """The pairs worth telling apart: each point and dense; points of two series at the same level (same kind);
    points of two kinds whose sizes on disk are within ``size_margin`` of each other (equal size)."""
    pairs = [(p, dense) for p in points]
    for i, a in enumerate(points):
        for b in points[i + 1 :]:
            if _series_name(a) == _series_name(b):
                continue
            if (kind_of(a) == kind_of(b) and level(a) == level(b)) or (
                kind_of(a) != kind_of(b) and _similar_size(size_of(a), size_of(b), size_margin)
            ):
                pairs.append((a, b))
    return pairs


def noise_sentences(dense: dict, points: list[dict], keys: list[str], labels: dict, limit: int = 40) -> list[str]:
    """What :func:`compare` says for the pairs of :func:`noise_pairs` on ``keys`` (at most ``limit``): first the
    pairs within the noise, then the rest."""
    found = []
    for a, b in noise_pairs(dense, points):
        for key in keys:
            res = compare(a, b, key, labels.get(key, key))
            if res is not None:
                found.append(res)
    found.sort(key=lambda r: not r[0])
    return [text for _, text in found[:limit]]


# ---------------------------------------------------------------------------------------------- plots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _yerr(ys: list[float], cis: list) -> list[list[float]] | None:
    """Matplotlib's asymmetric error bars from intervals (``None`` when no point has one)."""
    if not any(cis):
        return None
    lows = [y - ci[0] if ci else 0.0 for y, ci in zip(ys, cis, strict=True)]
    highs = [ci[1] - y if ci else 0.0 for y, ci in zip(ys, cis, strict=True)]
    return [[max(v, 0.0) for v in lows], [max(v, 0.0) for v in highs]]


def _finish_axes(ax, label: str, higher: bool, log_y: bool, xlabel: str, title: str) -> None:
    if log_y:
        from matplotlib.ticker import FuncFormatter, LogFormatter

        ax.set_yscale("log")  # plain numbers (60, 100, 1000), not 6×10^1; minor ticks labelled on short ranges
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label + (" (lower is better)" if not higher else " (higher is better)"))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _dense_band(ax, dense: float, higher: bool, tolerance: float) -> None:
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.4g})")
    bound = dense * (1 - tolerance) if higher else dense * (1 + tolerance)
    ax.axhspan(min(dense, bound), max(dense, bound), color="grey", alpha=0.2, label=f"within {_pct(tolerance)}")


def _log_safe(higher: bool, value: float) -> bool:
    return higher or value > 0  # a log axis cannot show 0 (a KL of exactly 0 for dense)


def plot_metric(key: str, label: str, cs: list[Curve], tolerance: float) -> bytes:
    """Metric vs the series' level (sparsity, ratio or bits), one line per series, 95% intervals as error bars,
    the dense value as a dashed line with the tolerance band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    dense, higher, axis = cs[0].dense, cs[0].higher_is_better, cs[0].axis
    log_y = _log_safe(higher, dense) and all(y > 0 for c in cs for y in c.ys)
    if log_y or higher:
        _dense_band(ax, dense, higher, tolerance)
    for c in cs:
        order = sorted(range(len(c.xs)), key=lambda i: c.xs[i])
        xs, ys = [c.xs[i] for i in order], [c.ys[i] for i in order]
        err = _yerr(ys, [c.cis[i] for i in order] if c.cis else [None] * len(xs))
        style = dict(marker="D", linestyle="none") if len(xs) == 1 else dict(marker="o")
        ax.errorbar(xs, ys, yerr=err, capsize=3, label=c.series, **style)
    if axis == "bits":
        ax.invert_xaxis()  # fewer bits (more compression) to the right, as sparsity grows to the right
    _finish_axes(ax, label, higher, log_y and not higher, AXIS_WORDS[axis], f"{label} vs {axis}")
    return png(fig)


def plot_size(key: str, label: str, cs: list[Curve], dense_size: int | None, dense_ci) -> bytes:
    """Metric vs bytes on disk of every point (MiB, log scale), one line per series, dense as a star: points
    from pruning, quantization and shrinking compared at equal size."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    dense, higher = cs[0].dense, cs[0].higher_is_better
    log_y = _log_safe(higher, dense) and all(y > 0 for c in cs for y in c.ys)
    if dense_size is not None:
        err = _yerr([dense], [dense_ci])
        ax.errorbar([dense_size / 2**20], [dense], yerr=err, marker="*", markersize=12, color="black",
                    linestyle="none", label=f"dense ({dense:.4g})")  # fmt: skip
    for c in cs:
        have = sorted((s, y, ci) for s, y, ci in zip(c.sizes, c.ys, c.cis or [None] * len(c.ys), strict=True) if s)
        if not have:
            continue
        xs, ys, cis = [h[0] / 2**20 for h in have], [h[1] for h in have], [h[2] for h in have]
        ax.errorbar(xs, ys, yerr=_yerr(ys, cis), marker="o", capsize=3, label=c.series)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    xlabel = "size on disk (MiB of weight files, log scale)"
    _finish_axes(ax, label, higher, log_y and not higher, xlabel, f"{label} vs size on disk")
    return png(fig)


def _block_of(layer: str) -> int | None:
    m = re.search(r"\.(\d+)\.", layer)
    return int(m.group(1)) if m else None


def plot_owl(series: str, pts: list[dict]) -> bytes:
    """Measured sparsity of each block (mean over its layers) for OWL runs, one bar group per block."""
    from matplotlib.figure import Figure

    pts = sorted(pts, key=lambda p: p["sparsity"])
    if len(pts) > 5:  # at most five levels, spread over the range
        pts = [pts[round(i * (len(pts) - 1) / 4)] for i in range(5)]
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.subplots()
    width = 0.8 / len(pts)
    for j, p in enumerate(pts):
        per_block: dict[int, list[float]] = {}
        for layer, s in p["prune"]["layer_sparsity"].items():
            b = _block_of(layer)
            if b is not None:
                per_block.setdefault(b, []).append(s)
        blocks = sorted(per_block)
        vals = [sum(per_block[b]) / len(per_block[b]) for b in blocks]
        bars = ax.bar(
            [b + (j - (len(pts) - 1) / 2) * width for b in blocks], vals, width, label=f"target {_pct(p['sparsity'])}"
        )
        ax.axhline(p["sparsity"], color=bars.patches[0].get_facecolor(), linestyle=":", linewidth=1)
    ax.set_xticks(sorted({b for p in pts for b in map(_block_of, p["prune"]["layer_sparsity"]) if b is not None}))
    ax.set_xlabel("block (layer) index")
    ax.set_ylabel("measured sparsity")
    ax.set_title(f"{series}: per-layer sparsity chosen by OWL")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return png(fig)


# ---------------------------------------------------------------------------------------------- writing


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _with_ci(v, ci) -> str:
    return _fmt(v) + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.3g} MiB"


def _level_text(p: dict) -> str:
    return _bits(level(p)) if kind_of(p) == "quant" else _pct(level(p))


def _achieved(p: dict) -> str:
    """What the point achieved: measured sparsity, nominal bits per weight, or parameters kept."""
    info = p.get({"prune": "prune", "shrink": "shrink", "quant": "quantize"}[kind_of(p)])
    if not isinstance(info, dict):
        return "–"
    if kind_of(p) == "quant":
        return _fmt(info.get("nominal_bits_per_weight"))
    if kind_of(p) == "shrink":
        before, after = info.get("params_before"), info.get("params_after")
        return f"{after / before:.1%} of params" if before and after else "–"
    return _fmt(info.get("achieved_sparsity"))


def _series_sentences(all_curves: list[Curve], series: list[str], judged: list[str], tolerance: float) -> list[str]:
    out = []
    for s in series:
        cs = [c for c in all_curves if c.series == s and c.key in judged]
        if cs:
            out.append(summarize_bits(cs, tolerance) if cs[0].axis == "bits" else summarize(cs, tolerance))
    return out


def _essential_rows(all_curves: list[Curve], tolerance: float) -> list[list[str]]:
    rows = []
    for c in all_curves:
        if c.key.startswith("agreement/"):  # 0 / 1 for dense by definition: its own table says more
            continue
        if c.higher_is_better and c.dense == 0:  # nothing to lose: "safe everywhere" would be a false claim
            rows.append([c.series, c.label, _fmt(c.dense), "n/a (0 for dense)", "–", "–"])
            continue
        if c.axis == "bits":
            es = essential_bits(c, tolerance)
            rows.append([c.series, c.label, _fmt(c.dense), _bits(es) if es is not None else "none", "–", "–"])
            continue
        es = essential_sparsity(c.xs, c.ys, c.dense, c.higher_is_better, tolerance)
        kn = knee(c.xs, c.ys, c.dense, c.higher_is_better, tolerance)
        at_knee = c.ys[c.xs.index(kn)] if kn is not None else None
        es_text = _pct(es) if es is not None else "none"
        rows.append([c.series, c.label, _fmt(c.dense), es_text, _pct(kn) if kn is not None else "–", _fmt(at_knee)])
    return rows


def _results_blocks(dense: dict, points: list[dict], series: list[str], cols: list[str]) -> list[tuple]:
    sized = any(size_of(p) is not None for p in [dense, *points])
    labels = [dense.get("labels", {}).get(k, k) for k in cols]
    blocks: list[tuple] = []
    for s in series:
        pts = [p for p in points if _series_name(p) == s]
        first = {"prune": "target sparsity", "shrink": "ratio removed", "quant": "bits"}[kind_of(pts[0])]
        second = {"prune": "achieved", "shrink": "params kept", "quant": "bits per weight"}[kind_of(pts[0])]
        dense_cells = [_with_ci(dense["metrics"][k], interval(dense, k)) for k in cols]
        prune = kind_of(pts[0]) == "prune"
        table = [["0 (dense)" if prune else "dense", "0" if prune else "–", *([_mib(size_of(dense))] * sized)]]
        table[0] += dense_cells
        for p in pts:
            cells = []
            for k in cols:
                v, base = p["metrics"].get(k), dense["metrics"][k]
                d = degradation(v, base, dense["higher_is_better"][k]) if v is not None and base != 0 else None
                rel = f" ({-round(d, 3) + 0.0:+.1%})" if d is not None and math.isfinite(d) else ""
                cells.append(_with_ci(v, interval(p, k)) + rel)
            table.append([_level_text(p), _achieved(p), *([_mib(size_of(p))] if sized else []), *cells])
        blocks.append(("h3", s))
        blocks.append(("table", [first, second, *(["size on disk"] if sized else []), *labels], table))
    note = "In parentheses: relative change against dense, signed so that negative is worse."
    if any(interval(p, k) for p in [dense, *points] for k in cols):
        note += (
            " In brackets (and as error bars in the plots): the 95% interval of each point on its own (perplexity: "
            "over windows). Two points on the same windows are told apart more finely by the paired comparison "
            "above."
        )
    blocks.append(("p", note))
    return blocks


def _agreement_blocks(points: list[dict]) -> list[tuple]:
    have = [p for p in points if isinstance(p.get("agreement"), dict)]
    if not have:
        return []
    rows = []
    for p in have:
        a = p["agreement"]
        rows.append(
            [
                _name(p),
                _with_ci(a.get("kl_mean"), interval(p, "agreement/kl_mean")),
                _fmt(a.get("kl_median")),
                _fmt(a.get("kl_p99")),
                _with_ci(a.get("top1_agreement"), interval(p, "agreement/top1_agreement")),
                _with_ci(a.get("delta_p_mean"), interval(p, "agreement/delta_p_mean")),
            ]
        )
    head = ["point", "KL mean (nats)", "KL median", "KL p99", "top-1 agreement", "Δp of the right token"]
    text = (
        "On the windows of the first perplexity task, against the dense model: KL divergence of the next-token "
        "distribution per position, the share of positions with the same most likely token, and the mean change "
        "in the probability of the token that follows. In brackets: 95% interval over windows."
    )
    return [("h2", "Agreement with the dense model"), ("p", text), ("table", head, rows)]


def _images(dense: dict, points: list[dict], all_curves: list[Curve], series: list[str], tolerance: float) -> list:
    images: list[tuple[str, str, bytes]] = []  # (file name, caption, png)
    for key in dict.fromkeys(c.key for c in all_curves):
        for axis in dict.fromkeys(c.axis for c in all_curves if c.key == key):
            cs = [c for c in all_curves if c.key == key and c.axis == axis]
            name = f"{_slug(key)}.png" if axis == "sparsity" else f"{_slug(key)}-{axis}.png"
            images.append((name, f"{cs[0].label} vs {axis}", plot_metric(key, cs[0].label, cs, tolerance)))
        cs = [c for c in all_curves if c.key == key]
        if any(s for c in cs for s in c.sizes):
            data = plot_size(key, cs[0].label, cs, size_of(dense), interval(dense, key))
            images.append((f"{_slug(key)}-size.png", f"{cs[0].label} vs size on disk", data))
    for s in series:
        owl_pts = [p for p in points if _series_name(p) == s and p.get("allocation") == "owl" and kind_of(p) == "prune"]
        owl_pts = [p for p in owl_pts if isinstance(p.get("prune", {}).get("layer_sparsity"), dict)]
        if owl_pts:
            images.append((f"owl-{_slug(s)}.png", f"{s}: per-layer sparsity", plot_owl(s, owl_pts)))
    return images


def write_report(folder: str | Path, *, tolerance: float = 0.01) -> dict:
    """Write report.md, report.html and the PNG plots into the results folder; returns paths and sentences."""
    if not 0 <= tolerance < 1:
        raise UserError(
            f"tolerance is a relative fraction in [0, 1), e.g. 0.01 for 1%; got {tolerance}", param="tolerance"
        )
    out = Path(folder).expanduser()
    if (out / "search.json").is_file() and not (out / SWEEP_FILE).is_file():
        from lmcompress.measure.search_report import write_search_report

        return write_search_report(out)
    sweep, dense, points = load_results(out)
    if not points:
        raise UserError(f"{out} has only the dense baseline; rerun the sweep to add compressed points")
    headline = [k for k in dense.get("headline", list(dense["metrics"])) if k in dense["metrics"]]
    judged = _judged_metrics(dense, headline)
    all_curves = curves(dense, points)
    series = list(dict.fromkeys(c.series for c in all_curves))
    sentences = _series_sentences(all_curves, series, judged, tolerance)
    noise_keys = headline + [k for k in ("agreement/kl_mean",) if k in dense["metrics"]]
    noise = noise_sentences(dense, points, noise_keys, dense.get("labels", {}))

    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    images = _images(dense, points, all_curves, series, tolerance)
    for name, _, data in images:
        write_file_atomic(plots_dir / name, data)

    rows = _essential_rows(all_curves, tolerance)
    blocks = _report_blocks(sweep["settings"], dense, points, tolerance, sentences, noise, rows)
    blocks += _results_blocks(dense, points, series, headline)
    blocks += _agreement_blocks(points)
    blocks.append(("h2", "Plots"))
    blocks.extend(("img", f"plots/{name}", caption, data) for name, caption, data in images)

    md, page = render_md(blocks), render_html(blocks)
    write_file_atomic(out / "report.md", md.encode())
    write_file_atomic(out / "report.html", page.encode())
    summary = {"tolerance": tolerance, "sentences": sentences, "noise": noise, "rows": rows}
    write_file_atomic(out / "summary.json", json_text(summary) + "\n")
    return {
        "markdown": str(out / "report.md"),
        "html": str(out / "report.html"),
        "plots": [str(plots_dir / n) for n, _, _ in images],
        "sentences": sentences,
        "noise": noise,
    }


def _report_blocks(st, dense, points, tolerance, sentences, noise, rows) -> list[tuple]:
    blocks: list[tuple] = [("h1", "lmcompress sweep report")]
    blocks.append(
        (
            "p",
            f"Model {st['model']}; tasks {st['tasks']}"
            + (f", harness {st['harness']}" if st.get("harness") else "")
            + f"; limit {st['limit']}; calibration {st['calib_data']} "
            f"({st['nsamples']} × {dense.get('seqlen')} tokens, "
            f"seed {st['seed']}). {len(points)} compressed points. Tolerance {_pct(tolerance)} relative to dense.",
        )
    )
    blocks.append(("h2", "Summary"))
    blocks.extend(("li", s) for s in sentences)
    blocks.append(
        (
            "p",
            "Essential sparsity: the largest tested sparsity (or ratio removed) up to which every point stays "
            "within the tolerance of dense; for quantization, the lowest bit width down to which every point "
            "does. Knee: where the quality relative to dense bends down fastest. Small limit values make "
            "task metrics noisy: a 1% tolerance on 50 examples is below one example's worth.",
        )
    )
    if noise:
        blocks.append(("h2", "Within the noise?"))
        blocks.append(
            (
                "p",
                "Each point against dense, points of two methods at the same level, and points of two kinds "
                "within 10% of each other's size on disk. Perplexity: paired over the shared windows (ratio of "
                "the perplexities and its 95% interval); otherwise whether the 95% intervals overlap.",
            )
        )
        blocks.extend(("li", s) for s in noise)
    blocks.append(("h2", "Essential level and knee"))
    head = ["series", "metric", "dense", "essential sparsity / ratio / bits", "knee", "value at knee"]
    blocks.append(("table", head, rows))
    blocks.append(("h2", "Results"))
    return blocks
