"""Sweeps beyond pruning (bits and structured ratios as axes, size on disk, agreement with dense), the report's
size plot and noise statements, and the bad input of issue 31 (huge grids, early writes, ignored options, two
sweeps into one folder, damaged points)."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest

from lmcompress.checkpoint.inspect import folder_info
from lmcompress.errors import UserError
from lmcompress.measure import sweep as S
from lmcompress.measure.report import compare, paired_ratio, summarize_bits, write_report
from lmcompress.measure.sweep import SweepConfig, parse_sparsities, run_sweep, write_json_atomic
from tests.conftest import run_cli

PPL = "ppl:bundled:wikitext2-test"


@pytest.fixture
def calib_path(tmp_path, calib_text) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(calib_text[:20000])
    return path


def mixed(calib: Path, **kw) -> SweepConfig:
    base = dict(
        methods=["magnitude", "rtn", "ffn"],
        sparsities=[0.5],
        bits=[4],
        group_size=32,
        ratios=[0.5],
        tasks=PPL,
        limit=4,
        calib_data=str(calib),
        nsamples=4,
        seqlen=64,
    )
    base.update(kw)
    return SweepConfig(**base)


# ---------------------------------------------------------------------------------------------- the grid


def test_the_grid_has_one_axis_set_per_kind_and_is_counted_before_it_is_made():
    cfg = SweepConfig(methods=["wanda", "gptq", "heads"], sparsities=[0.3], bits=[8, 4], group_size=-1, ratios=[0.25])
    cfg.validate()
    ids = [p.id for p in cfg.points()]
    assert ids == ["wanda-uniform-unstructured-0.300", "gptq-8bit-channel", "gptq-4bit-channel", "heads-uniform-0.250"]
    assert cfg.count() == len(ids)
    assert {p.kind for p in cfg.points()} == {"prune", "quant", "shrink"}
    with pytest.raises(UserError, match="bits must be an integer from 2 to 8"):
        SweepConfig(methods=["rtn"], bits=[16]).validate()
    with pytest.raises(UserError, match="batch_size must be a positive integer, got 0"):
        SweepConfig(batch_size=0).validate()


def test_an_absurd_grid_is_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(UserError, match="800,001 sweep points"):
        parse_sparsities("0.1:0.9:0.000001")
    levels = parse_sparsities("0.001:0.999:0.001")  # 999 levels: allowed alone, too many for three methods
    with pytest.raises(UserError, match="2,997 sweep points"):
        SweepConfig(sparsities=levels).validate()
    assert time.perf_counter() - start < 5, "the size check must not build the grid"


# ---------------------------------------------------------------------------------------------- CLI rules


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--methods", "wanda", "--bits", "4"], "--bits does not apply without a quantization"),
        (["--methods", "wanda", "--group-size", "64"], "--group-size does not apply without a quantization"),
        (["--methods", "rtn", "--ratios", "0.2"], "--ratios does not apply without a structured"),
        (["--methods", "rtn", "--sparsities", "0.5"], "--sparsities does not apply without a pruning"),
        (["--methods", "rtn", "--allocation", "owl"], "--allocation does not apply to quantization"),
        (["--methods", "wanda", "--pattern", "2:4", "--sparsities", "0.5"], "an N:M pattern fixes its own sparsity"),
        (["--methods", "wanda", "--percdamp", "0.1"], "--percdamp does not apply without sparsegpt or gptq"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--sparsities", "0.1:0.9:0.000001"], "800,001 sweep points"),
        (["--methods", "wanda", "--scheme", "w8a8"], "--scheme does not apply without a quantization"),
        (["--methods", "rtn", "--scheme", "w8a8", "--bits", "4"], "--bits does not apply with --scheme w8a8 alone"),
        (["--methods", "rtn", "--scheme", "int4"], "schemes ['int4']: choose from none"),
        (["--methods", "rtn", "--scheme", "w8a8", "--dynamic"], "dynamic applies to scheme fp8"),
        (["--methods", "rtn", "--smoothquant", "0.5"], "smoothquant applies to the scheme points"),
        (["--methods", "rtn", "--scheme", "w8a8", "--smoothquant", "1.5"], "outside [0, 1]"),
        (["--methods", "rtn", "--scheme", "w8a8", "--smoothquant", "half"], "give α values in [0, 1]"),
    ],
)
def test_options_the_axes_would_not_use_are_errors(tmp_path, tiny_folder, capsys, extra, said):
    out = tmp_path / "res"
    assert run_cli(["sweep", str(tiny_folder("llama")), "-o", str(out), "--tasks", PPL, *extra]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not out.exists()


def test_help_teaches_the_three_kinds(capsys):
    assert run_cli(["sweep", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    quant = "--methods sparsegpt,gptq --sparsities 0.5,0.75 --bits 4,2"  # pruning against quantization
    for needle in (quant, "--methods ffn,heads --ratios", "size on disk", "is an error"):
        assert needle in text, needle


# ---------------------------------------------------------------------------------------------- nothing early


def test_nothing_is_written_before_the_model_loads_and_the_points_are_checked(tmp_path, tiny_folder, calib_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    out = tmp_path / "res"
    with pytest.raises(UserError):
        run_sweep(broken, mixed(calib_path), out, progress=False)
    assert not out.exists(), "sweep created its output before the model loaded"
    # a ratio that would remove every KV group of the tiny model's 2 is found once the model is loaded
    with pytest.raises(UserError, match="would remove all 2 KV groups"):
        run_sweep(tiny_folder("llama"), mixed(calib_path, methods=["heads"], ratios=[0.9]), out, progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- end to end


def test_a_mixed_sweep_records_sizes_as_info_measures_them_and_agreement(tmp_path, tiny_folder, calib_path):
    from lmcompress.checkpoint.inspect import folder_info
    from lmcompress.jobs import prune_pretrained, quantize_pretrained
    from lmcompress.transforms.prune import PruneConfig
    from lmcompress.transforms.quantize import QuantConfig

    src, out = tiny_folder("llama"), tmp_path / "res"
    result = run_sweep(src, mixed(calib_path), out, progress=False)
    assert sorted(result["ran"]) == [
        "dense",
        "ffn-uniform-0.500",
        "magnitude-uniform-unstructured-0.500",
        "rtn-4bit-g32",
    ]
    pts = {p.stem: json.loads(p.read_text()) for p in (out / "points").glob("*.json")}
    assert not (out / ".sizes").exists() and not (out / "sweep.lock").exists()

    quant = tmp_path / "q"
    quantize_pretrained(src, QuantConfig(method="rtn", bits=4, group_size=32), quant, progress=False)
    assert pts["rtn-4bit-g32"]["size"]["weights_bytes"] == folder_info(quant)["weights_bytes"]
    pruned = tmp_path / "p"
    prune_pretrained(src, PruneConfig(method="magnitude", sparsity=0.5), pruned, save_format="packed", progress=False)
    assert pts["magnitude-uniform-unstructured-0.500"]["size"]["weights_bytes"] == folder_info(pruned)["weights_bytes"]
    dense = pts["dense"]["size"]["weights_bytes"]
    assert all(pts[k]["size"]["weights_bytes"] < dense for k in pts if k != "dense")

    assert pts["dense"]["agreement"]["kl_mean"] == 0 and pts["dense"]["metrics"]["agreement/top1_agreement"] == 1
    for k in ("rtn-4bit-g32", "ffn-uniform-0.500", "magnitude-uniform-unstructured-0.500"):
        a = pts[k]["agreement"]
        assert a["kl_mean"] > 0 and 0 <= a["top1_agreement"] <= 1 and a["windows"] == 4
        assert a["kl_mean_ci"][0] <= a["kl_mean"] <= a["kl_mean_ci"][1]
        assert pts[k]["metrics"]["agreement/kl_mean"] == a["kl_mean"]
    assert pts["ffn-uniform-0.500"]["shrink"]["params_after"] < pts["ffn-uniform-0.500"]["shrink"]["params_before"]

    assert run_cli(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "![perplexity vs size on disk](plots/ppl-wikitext2-test-perplexity-size.png)" in md
    assert "| bits | bits per weight | size on disk | perplexity |" in md
    assert "## Within the noise?" in md and "rtn (group 32) at 4 bits vs dense: perplexity" in md
    assert "## Agreement with the dense model" in md
    assert (out / "plots" / "ppl-wikitext2-test-perplexity-size.png").read_bytes().startswith(b"\x89PNG")


def test_a_scheme_point_is_what_quantize_then_eval_measures(tmp_path, tiny_folder, calib_path, capsys):
    """W8A8 / FP8 points run their activations quantized as the saved folder does: the sweep's numbers are
    exactly those of `quantize --scheme` then `eval --reference`; the same int8 weights without the activation
    quantization (weight-only 8 bits per channel) measure otherwise."""
    src, out = tiny_folder("llama"), tmp_path / "res"
    config = mixed(calib_path, methods=["rtn", "gptq"], schemes=["none", "w8a8", "fp8"], bits=[8], group_size=-1,
                   smoothquant=[None, 0.5])  # fmt: skip
    ids = [p.id for p in config.points()]  # gptq with fp8: GPTQ on the FP8 grid
    assert ids == ["rtn-8bit-channel", "rtn-w8a8", "rtn-w8a8-sq0.5", "rtn-fp8", "rtn-fp8-sq0.5", "gptq-8bit-channel",
                   "gptq-w8a8", "gptq-w8a8-sq0.5", "gptq-fp8", "gptq-fp8-sq0.5"]  # fmt: skip
    assert config.count() == len(ids)
    config = mixed(calib_path, methods=["rtn"], schemes=["none", "w8a8", "fp8"], bits=[8], group_size=-1,
                   smoothquant=[None, 0.5])  # fmt: skip
    run_sweep(src, config, out, progress=False)
    pts = {p.stem: json.loads(p.read_text()) for p in (out / "points").glob("*.json")}
    assert pts["rtn-w8a8-sq0.5"]["quantize"]["smoothing"]["smoothquant"]["alpha"] == 0.5
    assert pts["rtn-fp8"]["scheme"] == "fp8"
    kl = "agreement/kl_mean"
    assert pts["rtn-w8a8"]["metrics"][kl] != pts["rtn-8bit-channel"]["metrics"][kl]  # activations quantized
    for pid, args in [
        ("rtn-w8a8-sq0.5", ["--scheme", "w8a8", "--method", "rtn", "--smoothquant", "0.5"]),
        ("rtn-fp8", ["--scheme", "fp8"]),  # static scales, calibrated on the same windows
    ]:
        folder = tmp_path / pid
        calib = ["--calib-data", str(calib_path), "--nsamples", "4", "--seqlen", "64"]
        assert run_cli(["quantize", str(src), "-o", str(folder), *args, *calib, "--quiet"]) == 0
        assert pts[pid]["size"]["weights_bytes"] == folder_info(folder)["weights_bytes"]
        capsys.readouterr()
        argv = ["eval", str(folder), "--tasks", PPL, "--seqlen", "64", "--limit", "4", "--reference", str(src)]
        assert run_cli([*argv, "--json"]) == 0
        evaluated = json.loads(capsys.readouterr().out)["metrics"]
        for key, value in pts[pid]["metrics"].items():
            assert evaluated[key] == value, (pid, key)
    assert run_cli(["report", str(out)]) == 0
    assert "rtn (w8a8, SmoothQuant 0.5)" in (out / "report.md").read_text()
    fresh = mixed(calib_path, methods=["rtn"], schemes=["w8a8"], smoothquant=[None])
    assert run_sweep(src, fresh, out, progress=False)["ran"] == []  # resumed: the point ids are stable


# ---------------------------------------------------------------------------------------------- two sweeps


def test_a_second_sweep_into_a_running_sweeps_folder_is_refused(tmp_path, tiny_folder, calib_path, monkeypatch):
    src, out = tiny_folder("llama"), tmp_path / "res"
    config = mixed(calib_path, methods=["magnitude"], sparsities=[0.3, 0.6])
    real, seen = S._evaluate, {}

    def second_sweep_meanwhile(*args, **kwargs):
        if not seen:
            try:  # as a second process would, while this sweep holds the lock
                run_sweep(src, mixed(calib_path, methods=["magnitude"], sparsities=[0.3, 0.6]), out, progress=False)
            except UserError as exc:
                seen["error"] = str(exc)
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "_evaluate", second_sweep_meanwhile)
    first = run_sweep(src, config, out, progress=False)
    assert "another sweep (PID" in seen["error"] and "Wait for it to finish" in seen["error"]
    assert len(first["ran"]) == 3 and not (out / "sweep.lock").exists()


def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path, tiny_folder, calib_path):
    import os
    import socket

    src, out = tiny_folder("llama"), tmp_path / "res"
    config = mixed(calib_path, methods=["magnitude"], sparsities=[0.5], limit=2)
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / "sweep.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert len(run_sweep(src, config, out, progress=False)["ran"]) == 2  # the killed sweep's lock is stale
    (out / "sweep.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(UserError, match=r"another sweep \(PID \d+ on .*delete .*sweep\.lock"):
        run_sweep(src, mixed(calib_path, methods=["magnitude"], sparsities=[0.5, 0.7], limit=2), out, progress=False)
    assert sorted(p.stem for p in (out / "points").glob("*.json")) == ["dense", "magnitude-uniform-unstructured-0.500"]


# ---------------------------------------------------------------------------------------------- damaged points


def _a_small_result(tmp_path, tiny_folder, calib_path) -> Path:
    out = tmp_path / "res"
    run_sweep(tiny_folder("llama"), mixed(calib_path, methods=["rtn"], limit=2), out, progress=False)
    return out


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda rec: "{not json", "is not valid JSON"),
        (lambda rec: {k: v for k, v in rec.items() if k != "metrics"}, "'metrics' is missing"),
        (lambda rec: {**rec, "metrics": {**rec["metrics"], "ppl:wikitext2-test/perplexity": "x"}}, "is not a number"),
        (
            lambda rec: {k: v for k, v in rec.items() if k != "bits"},
            "'bits' (the level of this quant point) is missing",
        ),
        (lambda rec: {**rec, "higher_is_better": {}}, "'higher_is_better' has no true/false"),
    ],
)
def test_report_on_a_damaged_point_names_the_file_and_what_is_wrong(
    tmp_path, tiny_folder, calib_path, capsys, damage, said
):
    out = _a_small_result(tmp_path, tiny_folder, calib_path)
    path = out / "points" / "rtn-4bit-g32.json"
    changed = damage(json.loads(path.read_text()))
    if isinstance(changed, str):
        path.write_text(changed)
    else:
        write_json_atomic(path, changed)
    assert run_cli(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err.replace("\n", "") and said in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- analysis


def test_paired_ratio_is_the_perplexity_ratio_with_its_interval():
    dense = [3.0, 3.2, 2.8, 3.1, 2.9]
    close = [d + e for d, e in zip(dense, [0.01, -0.012, 0.008, -0.01, 0.006], strict=True)]
    worse = [d + 0.2 + e for d, e in zip(dense, [0.01, -0.01, 0.02, 0.0, -0.02], strict=True)]
    ratio, (lo, hi) = paired_ratio(close, dense)
    assert ratio == pytest.approx(math.exp(sum(c - d for c, d in zip(close, dense, strict=True)) / 5))
    assert lo < 1 < hi
    ratio, (lo, hi) = paired_ratio(worse, dense)
    assert ratio == pytest.approx(math.exp(0.2)) and lo > 1
    assert paired_ratio(worse[:3], dense) is None  # not the same windows


def test_compare_says_within_or_beyond_the_noise():
    def rec(pid, windows, sparsity=0.5):
        nll = sum(windows) / len(windows)
        return {"id": pid, "method": "wanda", "allocation": "uniform", "pattern": "unstructured", "sparsity": sparsity,
                "metrics": {"ppl:t/perplexity": math.exp(nll)},
                "tasks": {"ppl:t": {"window_nll": windows}}}  # fmt: skip

    dense = rec("dense", [3.0, 3.2, 2.8, 3.1])
    same, text = compare(rec("a", [3.01, 3.19, 2.81, 3.09]), dense, "ppl:t/perplexity", "perplexity")
    assert same and "differ by less than the noise" in text and "over 4 shared windows" in text
    same, text = compare(rec("b", [3.3, 3.52, 3.09, 3.4]), dense, "ppl:t/perplexity", "perplexity")
    assert not same and text.startswith("wanda (uniform) at 50% vs dense")


def test_bits_summary_reads_from_the_widest_grid_down():
    from lmcompress.measure.report import Curve

    c = Curve("gptq (group 128)", "ppl:t/perplexity", "perplexity", [8, 4, 3, 2], [10.0, 10.05, 11.0, 40.0], 10.0,
              False, False, "bits")  # fmt: skip
    assert summarize_bits([c], 0.01) == (
        "gptq (group 128): perplexity stays within 1% down to 4 bits and is 10% worse at 3 bits."
    )
    assert summarize_bits([c], 0.001).endswith(
        "perplexity stays within 0.1% down to 8 bits and is 0.5% worse at 4 bits."
    )


def test_report_of_an_old_pruning_only_folder_still_works(tmp_path):
    from tests.test_sweep_report import synthetic_results

    synthetic_results(tmp_path)
    out = write_report(tmp_path)
    assert len(out["plots"]) == 3 and out["noise"] == []  # no sizes, no intervals: nothing more to say
