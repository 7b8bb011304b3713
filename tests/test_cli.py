"""The command line end to end on tiny saved models: outputs, recipes, round trips and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run
from transformers import AutoModelForCausalLM

from lmcompress.checkpoint.load import load_model


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


PRUNE = ["--nsamples", "4", "--seqlen", "64", "-q"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prune_then_eval(tmp_path, tiny_folder, calib_file, family, capsys):
    src = tiny_folder(family)
    before = digest(src)
    out = tmp_path / "out"
    code = run(
        [
            "prune",
            str(src),
            "--method",
            "sparsegpt",
            "--sparsity",
            "0.5",
            "--calib-data",
            str(calib_file),
            "-o",
            str(out),
            *PRUNE,
        ]
    )
    assert code == 0
    assert digest(src) == before, "the source model was modified"
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["method"] == "sparsegpt" and recipe["sparsity"] == 0.5
    assert recipe["calibration"]["nsamples"] == 4 and len(recipe["calibration"]["sha256"]) == 64
    assert recipe["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert set(recipe["versions"]) >= {"torch", "transformers", "lmcompress"}
    assert recipe["wall_time_s"] > 0 and recipe["layer_sparsity"]
    assert (out / "tokenizer.json").exists() and list(out.glob("*.safetensors"))
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary folder left behind"
    capsys.readouterr()

    assert run(["eval", str(out), "--ppl-data", str(calib_file), "--seqlen", "64", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result["seqlen"] == 64 and result["tokens"] > 0 and result["perplexity"] > 1
    assert all(0.45 < v < 0.55 for v in result["layer_sparsity"].values())


def test_save_load_round_trip_gives_identical_logits(tmp_path, tiny_folder, calib, calib_file):
    from lmcompress import PruneConfig, load_model, prune, save_model

    model, tok = load_model(tiny_folder("mistral"))
    prune(model, PruneConfig(method="wanda", sparsity=None, pattern="2:4"), calib, progress=False)
    save_model(model, tok, tmp_path / "saved", {"kind": "test"})
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(model(calib[:2]).logits, again(calib[:2]).logits)


def test_owl_and_nm_from_cli(tmp_path, tiny_folder, calib_file):
    src = str(tiny_folder("qwen2"))
    out = tmp_path / "owl"
    assert (
        run(
            [
                "prune",
                src,
                "--method",
                "wanda",
                "--sparsity",
                "0.7",
                "--allocation",
                "owl",
                "--calib-data",
                str(calib_file),
                "-o",
                str(out),
                *PRUNE,
            ]
        )
        == 0
    )
    recipe = json.loads((out / "lmcompress.json").read_text())
    assert recipe["allocation"] == "owl" and len(recipe["outlier_ratios"]) == 2
    assert sum(recipe["block_targets"]) / 2 == pytest.approx(0.7)
    out = tmp_path / "nm"
    assert run(["prune", src, "--method", "magnitude", "--pattern", "4:8", "-o", str(out), "-q"]) == 0
    assert json.loads((out / "lmcompress.json").read_text())["sparsity"] == 0.5


def test_overwrite_replaces_output(tmp_path, tiny_folder, calib_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = ["prune", str(tiny_folder("llama")), "--method", "magnitude", "--sparsity", "0.3", "-o", str(out), "-q"]
    assert run(args) == 2
    assert (out / "old.txt").exists()
    assert run([*args, "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "lmcompress.json").exists()


def bad_cases(src: str, tmp: Path, calib_file: Path) -> list[tuple[list[str], str]]:
    empty = tmp / "empty.txt"
    empty.write_text("   \n")
    exists = tmp / "exists"
    exists.mkdir()
    out = str(tmp / "never")
    base = ["--calib-data", str(calib_file), "--nsamples", "2", "--seqlen", "32", "-q"]
    return [
        (["prune", str(tmp / "no-such-model"), "-o", out, *base], "does not exist"),
        (["prune", src, "--sparsity", "1.0", "-o", out, *base], "sparsity must be a fraction in [0, 1)"),
        (["prune", src, "--sparsity", "-0.1", "-o", out, *base], "sparsity must be a fraction in [0, 1)"),
        (["prune", src, "--pattern", "4:2", "-o", out, *base], "malformed N:M pattern"),
        (["prune", src, "--pattern", "2-4", "-o", out, *base], "malformed sparsity pattern"),
        (["prune", src, "--pattern", "2:4", "--sparsity", "0.7", "-o", out, *base], "contradicts pattern"),
        (
            ["prune", src, "--method", "obs", "-o", out, *base],
            "--method 'obs' is unknown: choose one of the pruning methods",
        ),
        (["prune", src, "--allocation", "owl", "--pattern", "2:4", "-o", out, *base], "use it with --pattern"),
        (["prune", src, "--in-block", "both", "-o", out, *base], "must be one of sequential, parallel"),
        (["prune", src, "--method", "magnitude", "--in-block", "parallel", "-o", out, "-q"], "reads no calibration"),
        (["quantize", src, "--method", "rtn", "--in-block", "parallel", "-o", out, "-q"], "GPTQ options"),
        (["prune", src, "-o", out, "--calib-data", str(empty), "-q"], "is empty"),
        (["prune", src, "-o", out, "--calib-data", str(tmp / "missing.txt"), "-q"], "neither an existing file"),
        (["prune", src, "-o", out, "--calib-data", str(calib_file), "--seqlen", "100000", "-q"], "longer than"),
        (["prune", src, "-o", str(exists), *base], "already exists"),
        (["prune", src, "-o", src, *base], "source model folder"),
        (["prune", src, "-o", out, "--device", "cuda:0" if not torch.cuda.is_available() else "tpu", *base], "device"),
        (["eval", str(tmp / "nope"), "--ppl-data", str(calib_file)], "does not exist"),
        (["eval", src, "--ppl-data", str(empty)], "is empty"),
    ]


def test_in_block_order_from_the_cli_is_recorded_and_changes_the_result(tmp_path, tiny_folder, calib_file):
    src = tiny_folder("llama")
    base = ["--calib-data", str(calib_file), "--nsamples", "4", "--seqlen", "32", "-q"]
    weights = {}
    for verb, method in (("prune", "sparsegpt"), ("quantize", "gptq")):
        for order in ("sequential", "parallel"):
            out = tmp_path / f"{verb}-{order}"
            assert run([verb, str(src), "--method", method, "--in-block", order, "-o", str(out), *base]) == 0
            recipe = json.loads((out / "lmcompress.json").read_text())
            settings = recipe["quantization"] if verb == "quantize" else recipe
            assert settings["in_block"] == order and recipe["in_block_fallback"] == {}
            weights[verb, order] = load_model(str(out))[0].model.layers[0].mlp.down_proj.weight
        # down_proj reads what gate/up give: their compression changes its inputs in the sequential order only
        assert not torch.equal(weights[verb, "sequential"], weights[verb, "parallel"])


def test_bad_input_gives_clear_error_and_writes_nothing(tmp_path, tiny_folder, calib_file, capsys):
    src = tiny_folder("llama")
    before = digest(src)
    for argv, message in bad_cases(str(src), tmp_path, calib_file):
        listing = sorted(p.name for p in tmp_path.iterdir())
        code = run(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert err.startswith("error: "), err
        assert sorted(p.name for p in tmp_path.iterdir()) == listing, f"{argv} wrote something"
    assert digest(src) == before


def test_a_missing_calibration_file_is_refused_before_the_model_loads(tmp_path, tiny_folder, capsys, monkeypatch):
    import lmcompress.jobs

    def no_loading(*_a, **_k):
        raise AssertionError("the model was loaded before the calibration source was checked")

    monkeypatch.setattr(lmcompress.jobs, "load_model", no_loading)
    argv = ["prune", str(tiny_folder("llama")), "-o", str(tmp_path / "o"), "--calib-data", str(tmp_path / "x.txt")]
    assert run([*argv, "-q"]) == 2
    assert "neither an existing file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pickle_checkpoints_are_refused(tmp_path, tiny_folder, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in tiny_folder("llama").iterdir():
        if not f.name.endswith(".safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    assert run(["eval", str(folder), "--ppl-data", "bundled:wikitext2-test"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


def test_unsupported_architecture_names_supported_ones(tmp_path, capsys):
    from transformers import AutoConfig

    config = AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    folder = tmp_path / "vit"
    folder.mkdir()
    config.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    assert run(["eval", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'vit'" in err and "llama" in err


def test_help_teaches():
    from lmcompress.cli import VERBS

    assert run(["--help"]) == 0
    for verb in VERBS:
        assert run([verb, "--help"]) == 0, verb


def test_help_needs_no_torch():
    """`lmcompress VERB --help` answers without importing torch or transformers (a quarter second, not three)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom lmcompress.cli import main\n"
        "try:\n    main(['prune', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_process_entry_exits_quickly_but_completely(tmp_path):
    """``python -m lmcompress`` skips the interpreter's teardown, yet keeps the exit status, what was printed
    (to a pipe, so buffered) and what exit handlers do (the torch.distributed process group is closed in one)."""
    import subprocess
    import sys

    def entry(body: str) -> subprocess.CompletedProcess:
        code = f"import atexit, sys\nimport lmcompress.cli as cli\n{body}\ncli.run()\nprint('not reached')"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    done = entry("atexit.register(lambda: print('handler ran'))\ncli.main = lambda: print('x' * 100_000, end='')")
    assert done.returncode == 0 and done.stdout == "x" * 100_000 + "handler ran\n"
    message = entry("cli.main = lambda: sys.exit('stopped: why')")
    assert message.returncode == 1 and message.stderr.strip() == "stopped: why" and message.stdout == ""
    bad = subprocess.run(
        [sys.executable, "-m", "lmcompress", "info", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "error:" in bad.stderr and "missing" in bad.stderr


def test_help_lists_the_choices_the_code_accepts():
    """The choice lists written out in the shrink and drop-experts help are the algorithms' own."""
    import typer

    from lmcompress.algorithms.routing import CRITERIA as EXPERT_CRITERIA
    from lmcompress.algorithms.units import CORRECTIONS, CRITERIA
    from lmcompress.cli import app

    group = typer.main.get_command(app)

    def option_help(verb: str, name: str) -> str:
        return next(p.help for p in group.commands[verb].params if p.name == name)

    assert " | ".join(CRITERIA) in option_help("shrink", "criterion")
    assert " | ".join(CORRECTIONS) in option_help("shrink", "correction")
    assert " | ".join(EXPERT_CRITERIA) in option_help("drop-experts", "criterion")
