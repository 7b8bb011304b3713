"""The README's main job: `lmcompress demo` with no arguments (here with few training steps)."""

from __future__ import annotations

from lmcompress.cli import main


def test_demo_runs_and_prints_a_table(capsys, tmp_path):
    try:
        main(["demo", "--steps", "20", "--keep", str(tmp_path), "-q"])
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("dense", "magnitude", "wanda", "sparsegpt"))]
    assert len(lines) == 9
    assert "2:4" in out and "owl" in out
    assert (tmp_path / "dense" / "lmcompress.json").exists()
