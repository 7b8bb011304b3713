"""The report of a search: fitness per generation against the baselines, and the chosen level of every unit."""

from __future__ import annotations

import json
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


def plot_allocation(report: dict) -> bytes:
    """Level of each unit: the search's choice as bars, OWL's and uniform's allocation as lines."""
    from matplotlib.figure import Figure

    from lmcompress.measure.render import png

    alloc = report["allocation"]
    xs = list(range(len(alloc)))
    fig = Figure(figsize=(max(6.4, 0.18 * len(alloc)), 4.0))
    ax = fig.subplots()
    ax.bar(xs, alloc, color="tab:blue", alpha=0.8, label="search")
    for name, style in (("owl", "tab:orange"), ("additive", "tab:green"), ("uniform", "black")):
        values = report.get("baseline_allocations", {}).get(name)
        if values:
            ax.step(xs, values, where="mid", color=style, linewidth=1.2, label=name)
    unit = "block" if report["config"]["granularity"] == "block" else "layer"
    ax.set_xlabel(f"{unit} (model order)")
    kind = report["config"].get("kind", "sparsity")
    ax.set_ylabel("sparsity" if kind == "sparsity" else "bits per weight")
    if kind == "sparsity":
        ax.set_ylim(0, 1)
    ax.set_title(
        f"chosen {'sparsity' if kind == 'sparsity' else 'bit width'} per {unit} (average {report['achieved']:.3f})"
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def write_search_report(folder: str | Path) -> dict:
    """report.md, report.html and two plots for a folder written by ``lmcompress search``."""
    from lmcompress.checkpoint.folder import write_file_atomic
    from lmcompress.measure.render import render_html, render_md

    out = Path(folder).expanduser()
    try:
        report = json.loads((out / SEARCH_FILE).read_text())
        history, baselines = report["history"], report["baselines"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{out / SEARCH_FILE} is not a search result ({exc}); rerun `lmcompress search`") from None
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    images = [
        ("search-fitness.png", "fitness per generation", plot_history(report)),
        ("search-allocation.png", "chosen sparsity per unit", plot_allocation(report)),
    ]
    rules = {k: v for k, v in baselines.items() if k != "additive"} or baselines  # the hand-set rules
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
