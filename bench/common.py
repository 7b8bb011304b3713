"""Helpers shared by the benchmarks: where the data is, what machine ran them, peak memory, tables."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from lmcompress.runtime import cpu_name

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache"
RESULTS = ROOT / "results"
MODEL_HELP = "smollm2 (default: SmolLM2-135M-Instruct), qwen1.5b (Qwen2.5-Coder-1.5B-Instruct) or a local HF folder"


def _find_wikitext() -> Path:
    """``$LMCOMPRESS_WIKITEXT``, else the first ``shared/data/wikitext-2`` beside the checkout or above it."""
    if os.environ.get("LMCOMPRESS_WIKITEXT"):
        return Path(os.environ["LMCOMPRESS_WIKITEXT"])
    for parent in ROOT.parents:
        candidate = parent / "shared" / "data" / "wikitext-2"
        if candidate.is_dir():
            return candidate
    return ROOT.parent.parent / "shared" / "data" / "wikitext-2"


WIKITEXT_DIR = _find_wikitext()


def wikitext(split: str) -> Path:
    """Path of WikiText-2 ``valid`` or ``test`` raw text; a clear message if it is not there."""
    path = WIKITEXT_DIR / f"{split}.txt"
    if not path.is_file():
        sys.exit(f"benchmark data {path} not found; set LMCOMPRESS_WIKITEXT to a folder with valid.txt and test.txt")
    return path


def machine_info() -> dict:
    """CPU model, cores, memory, torch threads and versions: printed next to every measured number."""
    cpu = cpu_name()
    mem_gib = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def print_table(rows: list[dict], title: str = "") -> None:
    """A Markdown table of ``rows`` (columns from the first row); floats with 3-4 significant digits."""
    if not rows:
        print(f"{title}: no rows")
        return
    cols = list(rows[0])

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "-" if v is None else str(v)

    if title:
        print(f"\n### {title}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    print()


def results_name(base: str, model: str | Path) -> str:
    """``base`` for the default SmolLM2 folder, else ``base-FOLDER`` (``prune_bench-qwen1.5b``): one file per model."""
    folder = Path(model).name
    return base if folder == "smollm2" else f"{base}-{folder}"


def save_results(name: str, payload: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the machine description; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2, default=str) + "\n")
    return path
