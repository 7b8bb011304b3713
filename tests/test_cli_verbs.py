"""One verb per kind of work: every verb runs, options a mode does not use are refused, library errors read as flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli as run
from typer.testing import CliRunner

from lmcompress.cli import VERBS, app
from lmcompress.errors import UserError
from lmcompress.transforms.experts import ExpertConfig
from lmcompress.transforms.factorize import FactorizeConfig
from lmcompress.transforms.prune import PruneConfig
from lmcompress.transforms.quantize import QuantConfig
from lmcompress.transforms.shrink import StructureConfig

FAST = ["--nsamples", "2", "--seqlen", "32", "-q"]


def recipe(folder: Path) -> dict:
    return json.loads((folder / "lmcompress.json").read_text())


# ------------------------------------------------------------------------------------------------------- help


def test_top_level_help_lists_every_verb_in_order_with_one_line():
    out = CliRunner().invoke(app, ["--help"]).output  # 80 columns
    panel = [ln.strip("│ ") for ln in out.split("Commands")[1].splitlines()]
    rows = [ln.split(None, 1) for ln in panel if ln and ln[0].isalpha()]
    assert [r[0] for r in rows] == list(VERBS), out
    for verb, line in rows:
        assert line.strip() == VERBS[verb], (verb, line)  # the whole one-liner on one line


@pytest.mark.parametrize("verb", ["prune", "quantize", "shrink", "drop-experts", "factorize", "eval", "sweep", "info"])
def test_verb_help_has_a_description_and_examples(verb):
    out = CliRunner().invoke(app, [verb, "--help"], terminal_width=200).output
    head = out.split("Examples:")[0]
    assert "Examples:" in out and len(head.split()) > 25, out  # a paragraph before the examples
    examples = [ln for ln in out.split("Examples:")[1].splitlines() if ln.strip().startswith(f"lmcompress {verb} ")]
    assert 2 <= len(examples) <= 3, out


def test_shrink_and_drop_experts_list_their_own_criteria():
    from lmcompress.algorithms.units import CRITERIA as UNIT_CRITERIA
    from lmcompress.transforms.experts import CRITERIA as EXPERT_CRITERIA

    shrink = CliRunner().invoke(app, ["shrink", "--help"], terminal_width=200).output
    experts = CliRunner().invoke(app, ["drop-experts", "--help"], terminal_width=200).output
    assert all(c in shrink for c in UNIT_CRITERIA) and not any(c in shrink for c in ("router-weight", "frequency"))
    assert all(c in experts for c in EXPERT_CRITERIA) and "fluctuation" not in experts
    assert "--criterion" not in CliRunner().invoke(app, ["prune", "--help"], terminal_width=200).output


# ------------------------------------------------------------------------------------------------ happy paths


def test_weight_verbs_and_folder_verbs(tmp_path, tiny_folder, calib_file, capsys):
    src = str(tiny_folder("llama"))
    calib = ["--calib-data", str(calib_file), *FAST]
    pruned, quant, unpacked = tmp_path / "pruned", tmp_path / "q", tmp_path / "plain"
    assert run(["prune", src, "--method", "wanda", "--sparsity", "0.4", "-o", str(pruned), *calib]) == 0
    assert recipe(pruned)["achieved_sparsity"] == pytest.approx(0.4, abs=0.01)
    assert run(["quantize", src, "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", str(quant), "-q"]) == 0
    assert recipe(quant)["quantization"]["bits"] == 4
    capsys.readouterr()
    assert run(["info", str(quant), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["storage"] == "packed"
    assert run(["unpack", str(quant), "-o", str(unpacked)]) == 0
    assert list(unpacked.glob("*.safetensors")) and "unpacked" in capsys.readouterr().out
    assert (
        run(["eval", str(pruned), "--ppl-data", str(calib_file), "--seqlen", "32", "--limit", "2", "--json", "-q"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.4, abs=0.01)


def test_shape_verbs(tmp_path, tiny_folder, calib_file):
    from transformers import AutoConfig

    src = tiny_folder("llama")
    width = AutoConfig.from_pretrained(src).intermediate_size
    ffn, lowrank = tmp_path / "ffn", tmp_path / "lr"
    assert run(["shrink", "ffn", str(src), "--ratio", "0.25", "--criterion", "magnitude", "-o", str(ffn), "-q"]) == 0
    assert recipe(ffn)["kind"] == "structured" and recipe(ffn)["criterion"] == "magnitude"
    assert AutoConfig.from_pretrained(ffn).intermediate_size == round(width * 0.75)
    assert run(["factorize", str(src), "--rank-policy", "rank:4", "-o", str(lowrank), "-q"]) == 0
    assert recipe(lowrank)["kind"] == "factorize"


def test_drop_experts_verb(tmp_path, tiny_folder, calib_file, capsys):
    src = tiny_folder("mixtral")
    out = tmp_path / "moe"
    args = ["drop-experts", str(src), "--keep", "4", "--criterion", "frequency", "--iterative", "--step", "2"]
    assert run([*args, "--calib-data", str(calib_file), *FAST, "-o", str(out)]) == 0
    assert "kept 4 of" in capsys.readouterr().out
    assert recipe(out)["kind"] == "experts" and recipe(out)["step"] == 2 and recipe(out)["iterative"] is True


def test_sweep_then_report(tmp_path, tiny_folder, calib_file, capsys):
    out = tmp_path / "res"
    argv = ["sweep", str(tiny_folder("llama")), "-o", str(out), "--methods", "magnitude", "--sparsities", "0.5"]
    argv += ["--tasks", f"ppl:{calib_file}", "--limit", "2", "--calib-data", str(calib_file), *FAST]
    assert run(argv) == 0
    assert run(["report", str(out)]) == 0
    assert (out / "report.md").exists() and "wrote" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ options that do not apply


def refused(src: str, moe: str, out: str, calib: str) -> list[tuple[list[str], list[str]]]:
    """(argv, the flags its error must name): each option is explicit and useless in the chosen mode."""
    c = ["--calib-data", calib, *FAST]
    return [
        (["prune", src, "--ratio", "0.3", "--keep", "4", "-o", out, *c], ["--ratio", "--keep"]),
        (["prune", src, "--criterion", "wanda", "-o", out, *c], ["--criterion"]),
        (["prune", src, "--correction", "lstsq", "--iterative", "-o", out, *c], ["--correction", "--iterative"]),
        (["prune", src, "--owl-m", "3", "-o", out, *c], ["--owl-m"]),
        (["prune", src, "--method", "wanda", "--percdamp", "0.1", "--blocksize", "64", "-o", out, *c], ["--percdamp"]),
        (["prune", src, "--group-size", "64", "--asym", "-o", out, *c], ["--group-size", "--sym"]),
        (["prune", src, "--method", "sparsegpt", "--bits", "4", "--save-format", "dense", "-o", out, *c], ["--save"]),
        (["prune", src, "--method", "magnitude", "--sparsity", "0.5", "--nsamples", "4", "-o", out], ["--nsamples"]),
        (["prune", src, "--structure", "ffn", "--bits", "4", "--save-format", "packed", "-o", out, *c], ["--bits"]),
        (["prune", src, "--structure", "heads", "--sparsity", "0.5", "-o", out, *c], ["--sparsity"]),
        (["prune", src, "--structure", "ffn", "--keep", "2", "-o", out, *c], ["--keep"]),
        (["prune", moe, "--structure", "experts", "--keep", "4", "--ratio", "0.5", "-o", out, *c], ["--ratio"]),
        (["prune", moe, "--structure", "experts", "--keep", "4", "--correction", "bias", "-o", out], ["--correction"]),
        (["prune", moe, "--structure", "experts", "--keep", "4", "--method", "sparsegpt", "-o", out], ["--method"]),
        (["quantize", src, "--method", "rtn", "--calib-data", calib, "-o", out, "-q"], ["--calib-data"]),
        (["quantize", src, "--method", "rtn", "--act-order", "--percdamp", "0.1", "-o", out], ["--act-order"]),
        (["shrink", "ffn", src, "--owl-lambda", "0.1", "-o", out, *c], ["--owl-lambda"]),
        (["shrink", "ffn", src, "--criterion", "magnitude", "--seed", "3", "-o", out], ["--seed"]),
        (["drop-experts", moe, "--keep", "4", "--step", "2", "-o", out, *c], ["--step"]),
        (["factorize", src, "--whitening", "diag", "--nsamples", "8", "-o", out], ["--whitening", "--nsamples"]),
        (["factorize", src, "--activation-aware", "--whitening", "diag", "--damp", "0.1", "-o", out, *c], ["--damp"]),
        (["sweep", src, "--methods", "wanda", "--owl-m", "3", "-o", out], ["--owl-m"]),
        (["sweep", src, "--methods", "wanda", "--percdamp", "0.1", "-o", out], ["--percdamp"]),
        (["eval", src, "--ppl-data", calib, "--retrieval-lengths", "64"], ["--retrieval-lengths"]),
        (["info", src, "--seqlen", "64"], ["--seqlen"]),
    ]


def test_options_a_mode_does_not_use_are_errors_and_nothing_is_written(tmp_path, tiny_folder, calib_file, capsys):
    src, moe = str(tiny_folder("llama")), str(tiny_folder("mixtral"))
    listing = sorted(p.name for p in tmp_path.iterdir())
    for argv, flags in refused(src, moe, str(tmp_path / "never"), str(calib_file)):
        code = run(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert "not apply" in err and all(f in err for f in flags), (argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == listing, f"{argv} wrote something"


@pytest.mark.parametrize(
    "argv",
    [
        ["shrink", "ffn", "M", "--sparsity", "0.5"],  # weight pruning's options are not shrink's
        ["shrink", "ffn", "M", "--keep", "2"],
        ["drop-experts", "M", "--keep", "2", "--ratio", "0.5"],
        ["quantize", "M", "--sparsity", "0.5"],
        ["drop-experts", "M"],  # --keep is required
    ],
)
def test_a_verb_has_only_its_own_options(argv, tmp_path):
    result = CliRunner().invoke(app, [*argv, "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and not (tmp_path / "x").exists()


def test_the_defaults_of_unused_options_are_silently_fine(tmp_path, tiny_folder):
    """Only explicit options are refused: magnitude pruning with every default (calibration ones included) runs."""
    out = tmp_path / "m"
    assert run(["prune", str(tiny_folder("llama")), "--method", "magnitude", "-o", str(out), "-q"]) == 0
    assert recipe(out)["calibration"] is None


# ----------------------------------------------------------------------------------------- deprecated aliases


def test_prune_structure_ffn_warns_and_runs_shrink(tmp_path, tiny_folder, capsys):
    out = tmp_path / "ffn"
    args = ["prune", str(tiny_folder("qwen2")), "--structure", "ffn", "--ratio", "0.25", "--criterion", "magnitude"]
    assert run([*args, "-o", str(out), "-q"]) == 0
    captured = capsys.readouterr()
    assert "deprecated" in captured.err and "lmcompress shrink ffn" in captured.err
    assert recipe(out)["kind"] == "structured" and recipe(out)["ratio"] == 0.25
    assert run([*args, "--method", "sparsegpt", "-o", str(tmp_path / "bad"), "-q"]) == 2
    assert "--method" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_prune_structure_experts_warns_and_runs_drop_experts(tmp_path, tiny_folder, calib_file, capsys):
    out = tmp_path / "moe"
    args = ["prune", str(tiny_folder("mixtral")), "--structure", "experts", "--keep", "4", "--criterion", "frequency"]
    assert run([*args, "--calib-data", str(calib_file), *FAST, "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "deprecated" in captured.err and "lmcompress drop-experts" in captured.err
    assert "kept 4 of" in captured.out and recipe(out)["criterion"] == "frequency"
    assert run([*args[:4], "-o", str(tmp_path / "nokeep"), "-q"]) == 2
    assert "--keep" in capsys.readouterr().err and not (tmp_path / "nokeep").exists()


# ---------------------------------------------------------------------------- library errors: names vs flags


@pytest.mark.parametrize(
    "config,kwargs,param",
    [
        (PruneConfig, dict(sparsity=1.5), "sparsity"),
        (PruneConfig, dict(method="wanda", bits=4), "bits"),
        (QuantConfig, dict(group_size=0), "group_size"),
        (QuantConfig, dict(method="rtn", act_order=True), "act_order"),
        (StructureConfig, dict(owl_m=-1.0), "owl_m"),
        (ExpertConfig, dict(keep=0), "keep"),
        (FactorizeConfig, dict(rank_policy="energy:2"), "rank_policy"),
    ],
)
def test_library_errors_name_the_parameter_not_a_flag(config, kwargs, param):
    with pytest.raises(UserError) as info:
        config(**kwargs)
    assert info.value.param == param and param in str(info.value)
    assert "--" not in str(info.value)


@pytest.mark.parametrize(
    "argv,flag,api_name",
    [
        (["prune", "{src}", "--sparsity", "1.5"], "--sparsity", "sparsity"),
        (["quantize", "{src}", "--method", "rtn", "--group-size", "0"], "--group-size", "group_size"),
        (["shrink", "ffn", "{src}", "--ratio", "1.5"], "--ratio", "ratio"),
        (["factorize", "{src}", "--rank-policy", "energy:2"], "--rank-policy", "rank_policy"),
        (["sweep", "{src}", "--allocation", "global"], "--allocation", "allocations"),
        (["prune", "{src}", "--seqlen", "100000", "--calib-data", "bundled:wikitext2-valid"], "--seqlen", "seqlen"),
    ],
)
def test_the_cli_shows_library_errors_with_its_flags(argv, flag, api_name, tmp_path, tiny_folder, capsys):
    argv = [a.replace("{src}", str(tiny_folder("llama"))) for a in argv]
    assert run([*argv, "-o", str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert flag in err, err
    assert f" {api_name} " not in f" {err} ".replace(flag, ""), err  # no API spelling left over
    assert not (tmp_path / "x").exists()


def test_renaming_touches_only_the_parameter_words():
    exc = UserError("output /data/output exists; choose another output or pass overwrite ('output')", param="output")
    shown = str(exc.renamed({"output": "--output", "overwrite": "--overwrite"}))
    assert shown == "--output /data/output exists; choose another --output or pass overwrite ('output')"
    assert str(exc).startswith("output ") and exc.params == ("output",)
