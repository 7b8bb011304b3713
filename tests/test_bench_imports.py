"""Every benchmark module imports (they are not run by the tests, so a renamed import would go unnoticed)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHES = sorted(p.stem for p in (Path(__file__).parent.parent / "bench").glob("*.py") if p.stem != "__main__")


@pytest.mark.parametrize("name", BENCHES)
def test_benchmark_module_imports(name):
    module = importlib.import_module(f"bench.{name}")
    if name.endswith("_bench"):
        assert callable(module.main)
