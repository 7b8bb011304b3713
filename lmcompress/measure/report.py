"""The report of a sweep: where each metric stops being safe, where it falls off, and plots that show it.

For every series (method × allocation × pattern) and every headline metric:

- **essential sparsity**: the largest tested sparsity up to which *every* tested point stays within
  ``tolerance`` (relative) of the dense model, in the metric's own direction (perplexity: lower is better);
- **knee**: the tested sparsity where the curve bends down fastest, i.e. the most negative change of slope of
  the quality relative to dense (``value / dense`` for higher-is-better metrics, ``dense / value`` for
  perplexity), with the dense model as the point at sparsity 0.

Writes ``report.md``, one self-contained ``report.html`` (plots embedded as base64 PNG) and the PNG files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from lmcompress.checkpoint.folder import json_text, write_file_atomic
from lmcompress.errors import UserError
from lmcompress.measure.render import png, render_html, render_md
from lmcompress.measure.sweep import DENSE_ID, POINTS, SWEEP_FILE, load_points, read_sweep_file

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
    series: str  # e.g. "wanda (uniform)" or "sparsegpt (uniform, 2:4)"
    key: str  # flat metric key, e.g. "ppl:test/perplexity"
    label: str  # words for it, e.g. "perplexity"
    xs: list[float]
    ys: list[float]
    dense: float
    higher_is_better: bool
    owl: bool


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


def _series_name(p: dict) -> str:
    extra = "" if p["pattern"] == "unstructured" else f", {p['pattern']}"
    return f"{p['method']} ({p['allocation']}{extra})"


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
    return sweep, dense, sorted(points.values(), key=lambda p: (_series_name(p), p["sparsity"]))


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
            out.append(
                Curve(
                    name,
                    key,
                    dense.get("labels", {}).get(key, key),
                    [p["sparsity"] for p in have],
                    [p["metrics"][key] for p in have],
                    dense["metrics"][key],
                    dense["higher_is_better"][key],
                    have[0]["allocation"] == "owl",
                )
            )
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


# ---------------------------------------------------------------------------------------------- plots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def plot_metric(key: str, label: str, cs: list[Curve], tolerance: float) -> bytes:
    """Metric vs sparsity, one line per series, the dense value as a dashed line with the tolerance band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    dense, higher = cs[0].dense, cs[0].higher_is_better
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.4g})")
    bound = dense * (1 - tolerance) if higher else dense * (1 + tolerance)
    ax.axhspan(min(dense, bound), max(dense, bound), color="grey", alpha=0.2, label=f"within {_pct(tolerance)}")
    for c in cs:
        order = sorted(range(len(c.xs)), key=lambda i: c.xs[i])
        xs, ys = [c.xs[i] for i in order], [c.ys[i] for i in order]
        if len(xs) == 1:
            ax.plot(xs, ys, marker="D", linestyle="none", label=c.series)
        else:
            ax.plot(xs, ys, marker="o", label=c.series)
    if not higher:
        from matplotlib.ticker import FuncFormatter, LogFormatter

        ax.set_yscale("log")  # plain numbers (60, 100, 1000), not 6×10^1; minor ticks labelled on short ranges
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("sparsity (target fraction of weights removed)")
    ax.set_ylabel(label + (" (lower is better)" if not higher else " (higher is better)"))
    ax.set_title(f"{label} vs sparsity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
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
        raise UserError(f"{out} has only the dense baseline; rerun the sweep to add pruned points")
    headline = [k for k in dense.get("headline", list(dense["metrics"])) if k in dense["metrics"]]
    judged = _judged_metrics(dense, headline)
    all_curves = curves(dense, points)
    series = list(dict.fromkeys(c.series for c in all_curves))
    sentences = [summarize([c for c in all_curves if c.series == s and c.key in judged], tolerance) for s in series]

    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    images: list[tuple[str, str, bytes]] = []  # (file name, caption, png)
    for key in dict.fromkeys(c.key for c in all_curves):
        cs = [c for c in all_curves if c.key == key]
        images.append((f"{_slug(key)}.png", f"{cs[0].label} vs sparsity", plot_metric(key, cs[0].label, cs, tolerance)))
    for s in series:
        owl_pts = [p for p in points if _series_name(p) == s and p["allocation"] == "owl" and p.get("prune")]
        if owl_pts:
            images.append((f"owl-{_slug(s)}.png", f"{s}: per-layer sparsity", plot_owl(s, owl_pts)))
    for name, _, data in images:
        write_file_atomic(plots_dir / name, data)

    st = sweep["settings"]
    blocks: list[tuple] = [("h1", "lmcompress sweep report")]
    blocks.append(
        (
            "p",
            f"Model {st['model']}; tasks {st['tasks']}"
            + (f", harness {st['harness']}" if st.get("harness") else "")
            + f"; limit {st['limit']}; calibration {st['calib_data']} "
            f"({st['nsamples']} × {dense.get('seqlen')} tokens, "
            f"seed {st['seed']}). {len(points)} pruned points. Tolerance {_pct(tolerance)} relative to dense.",
        )
    )
    blocks.append(("h2", "Summary"))
    blocks.extend(("li", s) for s in sentences)
    blocks.append(
        (
            "p",
            "Essential sparsity: the largest tested sparsity up to which every point stays within the tolerance "
            "of dense. Knee: where the quality relative to dense bends down fastest. Small limit values make "
            "task metrics noisy: a 1% tolerance on 50 examples is below one example's worth.",
        )
    )
    rows = []
    for c in all_curves:
        es = essential_sparsity(c.xs, c.ys, c.dense, c.higher_is_better, tolerance)
        kn = knee(c.xs, c.ys, c.dense, c.higher_is_better, tolerance)
        at_knee = c.ys[c.xs.index(kn)] if kn is not None else None
        if c.higher_is_better and c.dense == 0:  # nothing to lose: "safe everywhere" would be a false claim
            es_text = "n/a (0 for dense)"
        else:
            es_text = _pct(es) if es is not None else "none"
        rows.append(
            [
                c.series,
                c.label,
                _fmt(c.dense),
                es_text,
                _pct(kn) if kn is not None else "–",
                _fmt(at_knee),
            ]
        )
    blocks.append(("h2", "Essential sparsity and knee"))
    blocks.append(("table", ["series", "metric", "dense", "essential sparsity", "knee", "value at knee"], rows))

    blocks.append(("h2", "Results"))
    cols = headline
    for s in series:
        pts = [p for p in points if _series_name(p) == s]
        table = [["0 (dense)", "0", *(_fmt(dense["metrics"][k]) for k in cols)]]
        for p in pts:
            cells = []
            for k in cols:
                v, base = p["metrics"].get(k), dense["metrics"][k]
                d = degradation(v, base, dense["higher_is_better"][k]) if v is not None and base != 0 else None
                cells.append(_fmt(v) + (f" ({-round(d, 3) + 0.0:+.1%})" if d is not None and math.isfinite(d) else ""))
            achieved = p.get("prune", {}).get("achieved_sparsity")
            table.append([_pct(p["sparsity"]), _fmt(achieved), *cells])
        blocks.append(("h3", s))
        labels = [dense.get("labels", {}).get(k, k) for k in cols]
        blocks.append(("table", ["target sparsity", "achieved", *labels], table))
    blocks.append(("p", "In parentheses: relative change against dense, signed so that negative is worse."))
    blocks.append(("h2", "Plots"))
    blocks.extend(("img", f"plots/{name}", caption, data) for name, caption, data in images)

    md, page = render_md(blocks), render_html(blocks)
    write_file_atomic(out / "report.md", md.encode())
    write_file_atomic(out / "report.html", page.encode())
    summary = {"tolerance": tolerance, "sentences": sentences, "rows": rows}
    write_file_atomic(out / "summary.json", json_text(summary) + "\n")
    return {
        "markdown": str(out / "report.md"),
        "html": str(out / "report.html"),
        "plots": [str(plots_dir / n) for n, _, _ in images],
        "sentences": sentences,
    }
