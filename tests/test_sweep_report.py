"""Sweeps (grid, resume after a kill, settings checks) and reports (files, PNGs, essential sparsity, knee)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from lmcompress.errors import UserError
from lmcompress.measure import sweep as S
from lmcompress.measure.report import degradation, essential_sparsity, first_failure, knee, write_report
from lmcompress.measure.sweep import SweepConfig, parse_sparsities, run_sweep, settings_hash, write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_parse_sparsities():
    assert parse_sparsities("0.1:0.9:0.1") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert parse_sparsities("0.5,0.3,0.5") == [0.3, 0.5]
    assert parse_sparsities("0.2:0.5:0.2") == [0.2, 0.4]
    for bad in ("0:1:0.5", "0.1:0.9:0", "a,b", "1.2"):
        with pytest.raises(UserError, match="sparsities"):
            parse_sparsities(bad)


def test_grid_skips_owl_with_nm_and_collapses_nm_sparsity():
    cfg = SweepConfig(
        methods=["wanda"], allocations=["uniform", "owl"], sparsities=[0.3, 0.6], patterns=["unstructured", "2:4"]
    )
    ids = [p.id for p in cfg.points()]
    assert ids == [
        "wanda-uniform-unstructured-0.300",
        "wanda-uniform-unstructured-0.600",
        "wanda-uniform-2of4-0.500",
        "wanda-owl-unstructured-0.300",
        "wanda-owl-unstructured-0.600",
    ]
    with pytest.raises(UserError, match="unknown method 'obs' in methods"):
        SweepConfig(methods=["obs"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("methods", ["obs"]),
        ("allocations", ["random"]),
        ("patterns", ["3:2"]),
        ("sparsities", [0.5, 1.2]),
        ("bits", [9]),
        ("ratios", [0.0]),
        ("nsamples", 0),
        ("seqlen", 1),
        ("batch_size", 0),
        ("limit", 0),
        ("shots", -1),
        ("dtype", "int8"),
    ],
)
def test_a_bad_sweep_config_is_refused_when_built_naming_its_field(field, value):
    """Built, not only run: each bad field raises a UserError whose parameter and message name it."""
    kw = {"methods": ["wanda", "gptq", "ffn"], field: value}
    with pytest.raises(UserError, match=field) as caught:
        SweepConfig(**kw)
    assert caught.value.params == (field,)
    SweepConfig(**{**kw, field: getattr(SweepConfig(), field)})  # the same config with the default is accepted


# ---------------------------------------------------------------------------------------------- resume


def small_config(calib_file: Path, **kw) -> SweepConfig:
    base = dict(
        methods=["magnitude", "wanda"],
        sparsities=[0.3, 0.6],
        tasks="ppl:bundled:wikitext2-test,mc:bundled:mc-demo",
        limit=3,
        calib_data=str(calib_file),
        nsamples=4,
        seqlen=64,
    )
    base.update(kw)
    return SweepConfig(**base)


def points_of(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((folder / "points").glob("*.json"))}


def test_a_killed_sweep_resumes_to_the_same_results(tmp_path, tiny_folder, calib_file, monkeypatch):
    src = tiny_folder("llama")
    before = digest(src)
    out = tmp_path / "res"
    real = S._evaluate
    calls = {"n": 0}

    def dies_after_three(*args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the fourth point
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "_evaluate", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(src, small_config(calib_file), out, progress=False)
    assert sorted(points_of(out)) == [
        "dense",
        "magnitude-uniform-unstructured-0.300",
        "magnitude-uniform-unstructured-0.600",
    ]
    assert not [p for p in (out / "points").iterdir() if p.name.startswith(".")], "temporary file left behind"

    monkeypatch.setattr(S, "_evaluate", real)
    resumed = run_sweep(src, small_config(calib_file), out, progress=False)
    assert resumed["ran"] == ["wanda-uniform-unstructured-0.300", "wanda-uniform-unstructured-0.600"]
    assert len(resumed["skipped"]) == 3
    again = run_sweep(src, small_config(calib_file), out, progress=False)
    assert again["ran"] == [] and len(again["skipped"]) == 5

    fresh = tmp_path / "fresh"
    run_sweep(src, small_config(calib_file), fresh, progress=False)
    got, want = points_of(out), points_of(fresh)
    assert sorted(got) == sorted(want) and len(got) == 5, "missing or duplicate points"
    for pid in want:
        assert got[pid]["metrics"] == pytest.approx(want[pid]["metrics"], rel=1e-5), pid
    assert got["wanda-uniform-unstructured-0.600"]["prune"]["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert got["dense"]["metrics"] != got["magnitude-uniform-unstructured-0.600"]["metrics"]
    assert digest(src) == before, "the source model was modified"


def test_changed_settings_are_refused_and_a_bigger_grid_reuses_points(tmp_path, tiny_folder, calib_file, monkeypatch):
    src = tiny_folder("llama")
    out = tmp_path / "res"
    run_sweep(src, small_config(calib_file, methods=["magnitude"], sparsities=[0.5]), out, progress=False)
    with pytest.raises(UserError, match=r"other settings \(limit: 3 → 2\)"):
        run_sweep(src, small_config(calib_file, methods=["magnitude"], sparsities=[0.5], limit=2), out, progress=False)
    more = run_sweep(src, small_config(calib_file, methods=["magnitude"], sparsities=[0.5, 0.7]), out, progress=False)
    assert more["ran"] == ["magnitude-uniform-unstructured-0.700"]
    assert {g["sparsity"] for g in json.loads((out / "sweep.json").read_text())["grid"]} == {0.5, 0.7}
    redone = run_sweep(
        src,
        small_config(calib_file, methods=["magnitude"], sparsities=[0.5], limit=2),
        out,
        overwrite=True,
        progress=False,
    )
    assert sorted(redone["ran"]) == ["dense", "magnitude-uniform-unstructured-0.500"]
    assert sorted(points_of(out)) == ["dense", "magnitude-uniform-unstructured-0.500"]
    assert [g["sparsity"] for g in json.loads((out / "sweep.json").read_text())["grid"]] == [0.5], "stale grid kept"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a sweep")
    with pytest.raises(UserError, match="holds no sweep"):
        run_sweep(src, small_config(calib_file), tmp_path / "other", progress=False)


def test_a_run_that_failed_before_its_first_point_does_not_block_the_corrected_rerun(
    tmp_path, tiny_folder, calib_file, monkeypatch
):
    src, out = tiny_folder("llama"), tmp_path / "res"
    typo = small_config(calib_file, methods=["magnitude"], sparsities=[0.5], tasks=f"ppl:{tmp_path / 'nope.txt'}")
    with pytest.raises(UserError, match=r"nope\.txt"):
        run_sweep(src, typo, out, progress=False)
    fixed = run_sweep(src, small_config(calib_file, methods=["magnitude"], sparsities=[0.5]), out, progress=False)
    assert sorted(fixed["ran"]) == ["dense", "magnitude-uniform-unstructured-0.500"]
    # without lm-eval, --harness stops before anything is loaded or written
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match="pip install lm-eval"):
        run_sweep(src, small_config(calib_file, harness="arc_easy"), tmp_path / "h", progress=False)
    assert not (tmp_path / "h").exists()


def test_sweep_and_report_cli(tmp_path, tiny_folder, calib_file, capsys):
    run = run_cli

    out = tmp_path / "res"
    argv = ["sweep", str(tiny_folder("gpt2")), "-o", str(out), "--methods", "wanda", "--allocation", "owl"]
    argv += ["--sparsities", "0.4,0.8", "--tasks", "ppl:bundled:wikitext2-test", "--limit", "2"]
    argv += ["--calib-data", str(calib_file), "--nsamples", "4", "--seqlen", "64", "-q"]
    assert run(argv) == 0
    assert "ran 3 points" in capsys.readouterr().out
    assert run(["report", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("wanda (owl): perplexity") and "report.html" in said
    assert (out / "plots" / "owl-wanda-owl.png").read_bytes().startswith(PNG_MAGIC)
    assert run(["report", str(tmp_path)]) == 2
    assert "not a sweep results folder" in capsys.readouterr().err
    assert run(["sweep", str(tiny_folder("gpt2")), "-o", str(out), "--sparsities", "0:2:1"]) == 2


# ---------------------------------------------------------------------------------------------- analysis


def test_degradation_respects_the_metric_direction():
    assert degradation(11.0, 10.0, higher_is_better=False) == pytest.approx(0.1)  # perplexity up 10%: worse
    assert degradation(9.0, 10.0, higher_is_better=False) == pytest.approx(-0.1)
    assert degradation(0.45, 0.5, higher_is_better=True) == pytest.approx(0.1)  # accuracy down 10%: worse


def test_essential_sparsity_and_knee_on_known_curves():
    xs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    # accuracy flat at dense until 50%, then a straight fall to 0 at 90%: the knee is at 50%
    acc = [0.8, 0.8, 0.8, 0.8, 0.8, 0.6, 0.4, 0.2, 0.0]
    assert knee(xs, acc, 0.8, True) == 0.5
    assert essential_sparsity(xs, acc, 0.8, True) == 0.5
    assert first_failure(xs, acc, 0.8, True) == (0.6, pytest.approx(0.25))
    # perplexity (lower is better): within 1% up to 40%, noise later does not make 60% "safe" again
    ppl = [10.0, 10.02, 10.05, 10.1, 10.4, 10.05, 14.0, 30.0, 200.0]
    assert essential_sparsity(xs, ppl, 10.0, False, tolerance=0.01) == 0.4
    assert essential_sparsity(xs, ppl, 10.0, False, tolerance=0.05) == 0.6
    assert essential_sparsity(xs, [11.0] * 9, 10.0, False) is None
    clean = [10.0, 10.0, 10.0, 10.0, 10.0, 10.2, 14.0, 30.0, 200.0]
    assert knee(xs, clean, 10.0, False) == 0.6  # dense/ppl bends down fastest after 60% (10.2 → 14 → 30)
    # a curve that never leaves the tolerance band has no knee
    assert knee(xs, [0.8, 0.801, 0.799, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], 0.8, True) is None


# ---------------------------------------------------------------------------------------------- report


def synthetic_results(folder: Path) -> None:
    """A results folder as `sweep` writes it, with curves whose answers are known."""
    settings = SweepConfig(tasks="ppl:test.txt,qa:trivia", limit=50).settings("some/model")
    h = settings_hash(settings)
    (folder / "points").mkdir(parents=True)
    write_json_atomic(folder / "sweep.json", {"settings": settings, "settings_hash": h, "grid": []})
    keys = {"ppl:test/perplexity": False, "qa:trivia/f1": True}
    labels = {"ppl:test/perplexity": "perplexity", "qa:trivia/f1": "factoid QA (trivia) F1"}
    common = {"higher_is_better": keys, "headline": list(keys), "labels": labels, "settings_hash": h, "seqlen": 256}

    def point(pid, method, allocation, s, ppl, f1, prune=None):
        rec = {"id": pid, "method": method, "allocation": allocation, "pattern": "unstructured", "sparsity": s}
        rec.update(common, metrics={"ppl:test/perplexity": ppl, "qa:trivia/f1": f1})
        if prune:
            rec["prune"] = prune
        write_json_atomic(folder / "points" / f"{pid}.json", rec)

    rec = {"id": "dense", "method": "dense", "allocation": None, "pattern": None, "sparsity": 0.0}
    write_json_atomic(
        folder / "points" / "dense.json",
        {**rec, **common, "metrics": {"ppl:test/perplexity": 10.0, "qa:trivia/f1": 0.5}},
    )
    xs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    ppl = [10.0, 10.02, 10.05, 10.08, 10.09, 10.1, 12.0, 25.0, 300.0]  # safe up to 60%
    f1 = [0.5, 0.5, 0.4, 0.35, 0.3, 0.2, 0.1, 0.05, 0.0]  # 20% worse already at 30%
    for s, p, f in zip(xs, ppl, f1, strict=True):
        point(f"wanda-uniform-unstructured-{s:.3f}", "wanda", "uniform", s, p, f)
    for s in (0.5, 0.7):
        layers = {f"model.layers.{b}.mlp.up_proj": s + (b - 1.5) * 0.04 for b in range(4)}
        prune = {"achieved_sparsity": s, "block_targets": [s] * 4, "layer_sparsity": layers}
        point(f"wanda-owl-unstructured-{s:.3f}", "wanda", "owl", s, 10.05 if s == 0.5 else 11.0, 0.45, prune)


def test_report_files_plots_and_sentences(tmp_path):
    synthetic_results(tmp_path)
    out = write_report(tmp_path)
    uniform = next(s for s in out["sentences"] if s.startswith("wanda (uniform)"))
    assert uniform == (
        "wanda (uniform): perplexity says 60% is safe; factoid QA (trivia) F1 drops 20% already at 30%. "
        "Knee (steepest fall): perplexity at 70%, factoid QA (trivia) F1 at 20%."
    )
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert uniform in md and "| wanda (uniform) | perplexity | 10 | 60% | 70% |" in md
    assert "| 10% | – | 10 (+0.0%) | 0.5 (+0.0%) |" in md and "-0.0%" not in md  # no negative zero
    assert "![perplexity vs sparsity](plots/ppl-test-perplexity.png)" in md
    assert page.count('src="data:image/png;base64,') == len(out["plots"]) == 3  # ppl, f1, OWL bars
    assert 'src="plots/' not in page and "<script" not in page  # one self-contained file
    from matplotlib.image import imread

    for path in map(Path, out["plots"]):
        assert path.read_bytes().startswith(PNG_MAGIC)
        img = imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert Path(tmp_path / "plots" / "owl-wanda-owl.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tolerance"] == 0.01 and summary["sentences"] == out["sentences"]
    loose = write_report(tmp_path, tolerance=0.25)
    assert (
        "perplexity says 70% is safe" in loose["sentences"][1] and "drops 30% already at 40%" in loose["sentences"][1]
    )
    with pytest.raises(UserError, match="tolerance"):
        write_report(tmp_path, tolerance=1.5)


def test_a_metric_that_is_zero_for_dense_gets_no_essential_sparsity_or_relative_change(tmp_path):
    synthetic_results(tmp_path)
    for path in (tmp_path / "points").glob("*.json"):  # the QA F1 of every point (and of dense) is 0
        rec = json.loads(path.read_text())
        rec["metrics"]["qa:trivia/f1"] = 0.0
        write_json_atomic(path, rec)
    out = write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| wanda (uniform) | factoid QA (trivia) F1 | 0 | n/a (0 for dense) | – | – |" in md
    assert "| 30% | – | 10.05 (-0.5%) | 0 |" in md  # no "(+0.0%)" against a dense value of 0
    assert all("F1 is 0 for the dense model, so it cannot show damage" in s for s in out["sentences"])


def test_a_headline_that_is_zero_for_dense_brings_its_siblings_into_the_summary():
    from lmcompress.measure.report import _judged_metrics

    dense = {
        "metrics": {"ppl:t/perplexity": 20.0, "ppl:t/nll": 3.0, "retrieval/acc": 0.0, "retrieval/value_prob": 0.01},
        "higher_is_better": {
            "ppl:t/perplexity": False,
            "ppl:t/nll": False,
            "retrieval/acc": True,
            "retrieval/value_prob": True,
        },
    }
    assert _judged_metrics(dense, ["ppl:t/perplexity", "retrieval/acc"]) == [
        "ppl:t/perplexity",
        "retrieval/acc",
        "retrieval/value_prob",
    ]
