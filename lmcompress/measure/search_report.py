"""The report of a search: fitness per generation against the baselines, and the chosen level of every unit."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from lmcompress.errors import UserError

SEARCH_FILE = "search.json"


def plot_history(report: dict) -> bytes:
    """Best fitness after each generation, with the starts' fitness at the same budget (uniform, OWL, the
    sensitivity pass's additive start) as lines."""
    from matplotlib.figure import Figure

    from lmcompress.measure.render import png

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    points = [(0, min(report["baselines"].values()))] + [(h["generation"], h["fitness"]) for h in report["history"]]
    for r in report.get("rounds", []):  # a new database round rescores the parent: a vertical step at its start
        at = next((i for i, (g, _) in enumerate(points) if g == r["generation"]), len(points) - 1)
        points.insert(at + 1, (r["generation"], r["fitness"]))
        ax.axvline(r["generation"], color="tab:gray", linewidth=0.8, alpha=0.6)
    ax.plot(*zip(*points, strict=True), marker=".", label="search (best so far)")
    for (name, value), style in zip(report["baselines"].items(), ("--", ":", "-."), strict=False):
        ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{name} ({value:.4g})")
    ax.set_xlabel("generation")
    ax.set_ylabel("KL divergence to the dense model (lower is better)")
    rounds = len(report.get("rounds", [])) + 1
    ax.set_title("search fitness per generation" + (f" ({rounds} database rounds, gray lines)" if rounds > 1 else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


_BLOCK_INDEX = re.compile(r"\.(\d+)\.(.+)$")


def layer_grid(report: dict) -> tuple[list[int], list[str], dict[tuple[int, str], float]] | None:
    """For a per-layer search, the chosen level of each (block index, layer name within the block), or ``None``
    when the units are not single layers named ``<blocks>.<index>.<name>`` (then the bar chart is drawn)."""
    if report["config"].get("granularity") != "layer":
        return None
    cells: dict[tuple[int, str], float] = {}
    for names, level in zip(report["units"], report["allocation"], strict=True):
        found = _BLOCK_INDEX.search(names[0]) if len(names) == 1 else None
        if found is None:
            return None
        cells[(int(found[1]), found[2])] = level
    blocks = sorted({b for b, _ in cells})
    kinds = list(dict.fromkeys(k for _, k in cells))  # model order of the first block that has each
    return blocks, kinds, cells


def plot_allocation(report: dict) -> bytes:
    """Level of each unit: per block as bars with OWL's, uniform's and the starts' allocations as lines; per
    layer as a map of blocks (columns) by layer names (rows), which stays readable for hundreds of layers."""
    from matplotlib.figure import Figure

    from lmcompress.measure.render import png

    kind = report["config"].get("kind", "sparsity")
    label = "sparsity" if kind == "sparsity" else "bits per weight"
    grid = layer_grid(report)
    if grid is not None:
        blocks, kinds, cells = grid
        values = [[cells.get((b, k), float("nan")) for b in blocks] for k in kinds]
        fig = Figure(figsize=(max(6.4, 0.32 * len(blocks) + 2.5), 1.2 + 0.4 * len(kinds)))
        ax = fig.subplots()
        image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
        for row, line in enumerate(values):  # the level in each cell, so no colour has to be read off the bar
            for col, value in enumerate(line):
                if not math.isnan(value):  # a layer name this block lacks
                    text = f"{value:.2f}".lstrip("0") if kind == "sparsity" else f"{value:g}"
                    r, g, b, _ = image.cmap(image.norm(value))
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # readable on its cell
                    ax.text(col, row, text, ha="center", va="center", fontsize=5.5, color=ink)
        fig.colorbar(image, ax=ax, label=label, fraction=0.03, pad=0.01)
        ax.set_xlabel("block")
        ax.set_title(
            f"chosen {label} per layer (average {report['achieved']:.3f}; target {report['config']['target']:g})"
        )
        return png(fig)

    alloc = report["allocation"]
    xs = list(range(len(alloc)))
    fig = Figure(figsize=(min(max(6.4, 0.18 * len(alloc)), 24.0), 4.0))
    ax = fig.subplots()
    ax.bar(xs, alloc, color="tab:blue", alpha=0.8, label="search")
    lines = (("owl", "tab:orange"), ("additive", "tab:green"), ("start", "tab:purple"), ("uniform", "black"))
    for name, style in lines:
        values = report.get("baseline_allocations", {}).get(name)
        if values:
            ax.step(xs, values, where="mid", color=style, linewidth=1.2, label=name)
    unit = "block" if report["config"]["granularity"] == "block" else "layer"
    ax.set_xlabel(f"{unit} (model order)")
    ax.set_ylabel(label)
    if kind == "sparsity":
        ax.set_ylim(0, 1)
    ax.set_title(f"chosen {label} per {unit} (average {report['achieved']:.3f})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def read_search_result(path: Path) -> dict:
    """A ``search.json``, checked to hold every field the report reads with the right types (a damaged file
    is a :class:`UserError` naming the first bad field, never a traceback from inside a plot)."""
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file; rerun `lmcompress search`")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is not a search result ({exc}); rerun `lmcompress search`") from None
    problem = _problem(_joint_as_bits(report))
    if problem:
        raise UserError(f"{path} is not a search result ({problem}); rerun `lmcompress search`")
    return _joint_as_bits(report)


def _joint_as_bits(report):
    """A size search's joint levels (``0/4``, ``2:4/3``) as their nominal bits per weight, so that it is drawn
    as a bit-width search is (its bytes are in ``size``)."""
    size = report.get("size") if isinstance(report, dict) else None
    if not isinstance(size, dict) or not isinstance(size.get("level_bits"), dict):
        return report
    bits = size["level_bits"]

    def as_bits(levels):
        return [bits.get(v, v) for v in levels] if isinstance(levels, list) else levels

    out = dict(report, allocation=as_bits(report.get("allocation")))
    out["achieved"] = size.get("nominal_bits_per_weight", report.get("achieved"))
    others = report.get("baseline_allocations", {})
    if isinstance(others, dict):
        out["baseline_allocations"] = {k: as_bits(v) for k, v in others.items()}
    if isinstance(report.get("config"), dict):
        out["config"] = {**report["config"], "kind": "bits"}
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(values) -> bool:
    return isinstance(values, list) and all(_number(v) for v in values)


def _problem(report) -> str | None:
    """What is wrong with a parsed ``search.json``, or None."""
    if not isinstance(report, dict):
        return f"a JSON {type(report).__name__}, not an object"
    config, baselines, units = report.get("config"), report.get("baselines"), report.get("units")
    if not isinstance(config, dict) or not _number(config.get("target")):
        return "'config' must be an object with a numeric 'target'"
    if config.get("granularity") not in ("layer", "block") or config.get("kind", "sparsity") not in (
        "sparsity",
        "bits",
    ):
        return "'config' must name its granularity (layer or block) and kind (sparsity or bits)"
    if not isinstance(baselines, dict) or not baselines or not all(_number(v) for v in baselines.values()):
        return "'baselines' must be an object of finite numbers"
    if not (_number(report.get("fitness")) and _number(report.get("achieved"))):
        return "'fitness' and 'achieved' must be numbers"
    if not _points(report.get("history")) or not _points(report.get("rounds", [])):
        return "'history' and 'rounds' must be lists of objects with numeric 'generation' and 'fitness'"
    if not _numbers(report.get("allocation")):
        return "'allocation' must be a list of numbers"
    names = isinstance(units, list) and all(
        isinstance(u, list) and u and all(isinstance(n, str) for n in u) for u in units
    )
    if not names or len(units) != len(report["allocation"]):
        return "'units' must hold one list of layer names per allocated unit"
    others = report.get("baseline_allocations", {})
    if not isinstance(others, dict) or not all(_numbers(v) for v in others.values()):
        return "'baseline_allocations' must map names to lists of numbers"
    return None


def _points(rows) -> bool:
    return isinstance(rows, list) and all(
        isinstance(r, dict) and _number(r.get("generation")) and _number(r.get("fitness")) for r in rows
    )


def write_search_report(folder: str | Path) -> dict:
    """report.md, report.html and two plots for a folder written by ``lmcompress search``."""
    from lmcompress.checkpoint.folder import write_file_atomic
    from lmcompress.measure.render import render_html, render_md

    out = Path(folder).expanduser()
    report = read_search_result(out / SEARCH_FILE)
    history, baselines = report["history"], report["baselines"]
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    images = [
        ("search-fitness.png", "fitness per generation", plot_history(report)),
        ("search-allocation.png", "chosen sparsity per unit", plot_allocation(report)),
    ]
    starts = ("additive", "start")  # found by the sensitivity pass or given by the user: not hand-set rules
    rules = {k: v for k, v in baselines.items() if k not in starts} or baselines
    best = min(rules, key=rules.get)
    gain = 1 - report["fitness"] / baselines[best] if baselines[best] > 0 else 0.0
    what = "average sparsity" if report["config"].get("kind", "sparsity") == "sparsity" else "bits per weight"
    sentence = (
        f"After {len(history)} generations the search's KL divergence is {report['fitness']:.4g}, "
        f"{gain:.1%} below the better hand-set rule ({best}, {baselines[best]:.4g}), at {what} "
        f"{report['achieved']:.4f}."
    )
    if "additive" in baselines:
        sentence += f" The sensitivity pass's additive start scored {baselines['additive']:.4g}."
    if "start" in baselines:
        sentence += f" The given start (`--start`) scored {baselines['start']:.4g}."
    rows = [[name, f"{value:.4g}"] for name, value in baselines.items()] + [["search", f"{report['fitness']:.4g}"]]
    blocks: list[tuple] = [("h1", "lmcompress search report"), ("p", sentence), ("table", ["allocation", "KL"], rows)]
    for name, caption, png in images:
        write_file_atomic(plots / name, png)
        blocks.append(("img", f"plots/{name}", caption, png))
    write_file_atomic(out / "report.md", render_md(blocks).encode())
    write_file_atomic(out / "report.html", render_html(blocks).encode())
    return {
        "markdown": str(out / "report.md"),
        "html": str(out / "report.html"),
        "plots": [str(plots / n) for n, _, _ in images],
        "sentences": [sentence],
    }
