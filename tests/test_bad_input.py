"""Hostile input: every case is a clear error (exit code 2, a message naming the problem), nothing lost or
half-written. Each test is one finding of a probe of hostile commands."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run
from safetensors.torch import load_file, save_file

from lmcompress.algorithms.owl import owl_allocation
from lmcompress.checkpoint.folder import (
    RECIPE_FILE,
    check_output,
    clean_stale,
    json_text,
    save_atomic,
    write_file_atomic,
)
from lmcompress.checkpoint.load import load_model
from lmcompress.checkpoint.packed import PACKED_FILE
from lmcompress.errors import UserError
from lmcompress.jobs import check_device
from lmcompress.measure.perplexity import perplexity
from lmcompress.models.tiny import build_tiny_model

MAGNITUDE = ["--method", "magnitude", "--sparsity", "0.5", "-q"]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_model(tiny_folder, dest: Path, family: str = "llama") -> Path:
    shutil.copytree(tiny_folder(family), dest)
    return dest


def edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# 1. outputs that are, hold, or lie inside the source ----------------------------------------------------------


@pytest.mark.parametrize("where", ["parent", "inside", "same"])
def test_output_nested_with_source_is_refused(tmp_path, tiny_folder, capsys, where):
    nest = tmp_path / "nest"
    src = copy_model(tiny_folder, nest / "model")
    (nest / "sibling.txt").write_text("keep me")
    before = digest(nest)
    out = {"parent": nest, "inside": src / "sub", "same": src}[where]
    assert run(["prune", str(src), *MAGNITUDE, "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert {"parent": "contains the source", "inside": "inside the source", "same": "is the source"}[where] in err
    assert digest(nest) == before, "the source or its siblings were changed"


def test_unpack_into_a_folder_holding_the_source_is_refused(tmp_path, tiny_folder, capsys):
    packed = tmp_path / "nest" / "packed"
    packed.parent.mkdir()
    src = tiny_folder("llama")
    assert run(["prune", str(src), *MAGNITUDE, "--save-format", "packed", "-o", str(packed)]) == 0
    before = digest(packed.parent)
    assert run(["unpack", str(packed), "-o", str(packed.parent), "--overwrite"]) == 2
    assert "contains the source" in capsys.readouterr().err
    assert run(["unpack", str(packed), "-o", str(packed / "plain")]) == 2
    assert digest(packed.parent) == before


def test_export_and_sweep_outputs_inside_the_source_are_refused(tmp_path, tiny_folder, capsys):
    src = copy_model(tiny_folder, tmp_path / "model")
    with pytest.raises(UserError, match="contains the source"):
        check_output(tmp_path, True, source=src)  # what export checks first
    before = digest(src)
    argv = ["sweep", str(src), "--methods", "magnitude", "--sparsities", "0.5", "-o", str(src / "results"), "-q"]
    assert run(argv) == 2
    assert "inside the source" in capsys.readouterr().err
    assert digest(src) == before


# 2. NaN / inf ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_at_load(tmp_path, tiny_folder, capsys, value):
    src = copy_model(tiny_folder, tmp_path / "model")
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(state):
        state[name][3, 5] = value

    edit_weights(src, poison)
    for argv in (
        ["prune", str(src), "--method", "wanda", "--nsamples", "2", "--seqlen", "32", "-o", str(tmp_path / "o"), "-q"],
        ["eval", str(src), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "32", "--json", "-q"],
    ):
        assert run(argv) == 2
        captured = capsys.readouterr()
        assert name in captured.err and "NaN or infinite" in captured.err
        assert captured.out == ""
    assert not (tmp_path / "o").exists()


def test_non_finite_logits_are_an_error_not_a_nan_perplexity(tokenizer):
    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=64)
    with torch.no_grad():
        model.lm_head.weight[7] = 3e38  # finite weights whose logits overflow to inf
    windows = torch.randint(0, tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"NaN or infinite on windows 0\.\.1"):
        perplexity(model, windows, progress=False)


def test_json_output_is_always_strict_json():
    text = json_text({"ppl": float("nan"), "loss": [1.0, float("inf"), -float("inf")], "path": Path("x")})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")) == {
        "ppl": None,
        "loss": [1.0, None, None],
        "path": "x",
    }


def test_eval_json_parses_strictly(tiny_folder, capsys):
    src = tiny_folder("llama")
    assert run(["eval", str(src), "--ppl-data", "bundled:wikitext2-test", "--seqlen", "32", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert result["perplexity"] > 1


# 3. missing or unexpected tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda s: s.pop("model.layers.0.self_attn.q_proj.weight"), "missing model.layers.0.self_attn.q_proj.weight"),
        (lambda s: s.update({"model.layers.9.extra.weight": torch.zeros(3)}), "unexpected model.layers.9.extra"),
    ],
)
def test_checkpoint_not_matching_its_config_is_refused(tmp_path, tiny_folder, capsys, edit, expected):
    src = copy_model(tiny_folder, tmp_path / "model")
    edit_weights(src, edit)
    assert run(["prune", str(src), *MAGNITUDE, "-o", str(tmp_path / "out")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tied_head_is_not_reported_missing(tiny_folder):
    model, _ = load_model(tiny_folder("gpt2"))  # GPT-2 stores the head once, as the input embeddings
    assert model.lm_head.weight is model.transformer.wte.weight


# 5. sequence lengths ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["eval", "{src}", "--ppl-data", "bundled:wikitext2-test", "--seqlen", "1"], "at least 2"),
        (["eval", "{src}", "--ppl-data", "bundled:wikitext2-test", "--seqlen", "0"], "at least 2"),
        (["eval", "{src}", "--ppl-data", "bundled:wikitext2-test", "--seqlen", "100000"], "context of 256"),
        (["info", "{src}", "--profile", "--seqlen", "100000"], "context of 256"),
        (["info", "{src}", "--profile", "--seqlen", "0"], "at least 1"),
        (["prune", "{src}", "--method", "wanda", "--seqlen", "100000", "-o", "{out}"], "context of 256"),
        (
            ["sweep", "{src}", "--methods", "magnitude", "--sparsities", "0.5", "--seqlen", "1", "-o", "{out}"],
            "least 2",
        ),
        (["sweep", "{src}", "--methods", "magnitude", "--sparsities", "0.5", "--seqlen", "999", "-o", "{out}"], "256"),
    ],
)
def test_seqlen_is_checked_against_the_context(tmp_path, tiny_folder, capsys, argv, expected):
    src = tiny_folder("llama")
    start = time.perf_counter()
    assert run([a.format(src=src, out=tmp_path / "out") for a in argv] + ["-q"] * (argv[0] != "info")) == 2
    assert expected in capsys.readouterr().err
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "out" / "points").exists() or not any((tmp_path / "out" / "points").iterdir())


# 6. unwritable outputs --------------------------------------------------------------------------------------------


def test_output_under_a_file_fails_before_any_work(tmp_path, tiny_folder, capsys):
    (tmp_path / "afile").write_text("")
    assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "-o", str(tmp_path / "afile" / "out")]) == 2
    assert "--output" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_fails_before_any_work(tmp_path, tiny_folder, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "-o", str(parent / "out")]) == 2
        assert "cannot write to" in capsys.readouterr().err
    finally:
        parent.chmod(0o755)


def test_full_disk_during_save_is_a_clear_error_and_leaves_nothing(tmp_path, tiny_folder, capsys, monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "out"
    assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "-o", str(out)]) == 0
    before = digest(out)

    def full(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "-o", str(out), "--overwrite"]) == 2
    assert "disk is full" in capsys.readouterr().err
    assert digest(out) == before, "the previous output was damaged"
    assert hidden(tmp_path) == []
    assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "-o", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists() and hidden(tmp_path) == []


def test_write_file_atomic_turns_os_errors_into_user_errors(tmp_path):
    path = write_file_atomic(tmp_path / "a.json", "{}\n")
    assert path.read_text() == "{}\n" and hidden(tmp_path) == []
    with pytest.raises(UserError, match="could not write"):
        write_file_atomic(tmp_path / "missing" / "a.json", "{}")


# 7. OWL never empties a block ----------------------------------------------------------------------------------


def test_owl_caps_block_sparsity_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="lmcompress.algorithms.owl"):
        owl = owl_allocation([0.0, 0.0, 0.0, 1.0], 0.9, 0.4)
    assert max(owl.sparsities) <= 0.99 + 1e-12
    assert sum(owl.sparsities) / 4 == pytest.approx(0.9)
    assert owl.shrunk and owl.lam < 0.4
    assert "shrunk to λ" in caplog.text
    assert not owl_allocation([0.1, 0.2], 0.5, 0.08).shrunk


def test_owl_prune_records_the_shrunk_lambda(tmp_path, tiny_folder):
    out = tmp_path / "out"
    argv = ["prune", str(tiny_folder("llama")), "--method", "wanda", "--sparsity", "0.95", "--allocation", "owl"]
    assert (
        run(
            [
                *argv,
                "--owl-lambda",
                "0.4",
                "--calib-data",
                "bundled:wikitext2-valid",
                "--nsamples",
                "2",
                "--seqlen",
                "32",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert max(recipe["block_targets"]) <= 0.99 + 1e-9
    assert max(recipe["layer_sparsity"].values()) < 1.0
    if len(set(recipe["outlier_ratios"])) > 1:  # differing blocks: λ 0.4 at 95% cannot fit below 0.99
        assert recipe["owl_lambda_effective"] < 0.4


# 8. hostile metadata and devices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", ["not json {", "[1, 2]", '{"settings": 3, "grid": []}', '{"settings": {}, "grid": [{"x": 1}]}']
)
def test_garbage_sweep_file_is_a_clear_error(tmp_path, tiny_folder, capsys, content):
    results = tmp_path / "res"
    results.mkdir()
    (results / "sweep.json").write_text(content)
    argv = ["sweep", str(tiny_folder("llama")), "--methods", "magnitude", "--sparsities", "0.5", "-o", str(results)]
    assert run([*argv, "--tasks", "ppl:bundled:wikitext2-test", "--limit", "1", "--seqlen", "32", "-q"]) == 2
    assert "sweep.json" in capsys.readouterr().err
    assert run(["report", str(results)]) == 2
    assert "sweep.json" in capsys.readouterr().err
    assert (results / "sweep.json").read_text() == content


@pytest.mark.parametrize("content", ["[]", '"a string"', '{"surgery": 5}', '{"storage": ["packed"]}'])
def test_recipe_of_the_wrong_shape_is_a_clear_error(tmp_path, tiny_folder, capsys, content):
    src = copy_model(tiny_folder, tmp_path / "model")
    (src / RECIPE_FILE).write_text(content)
    assert run(["prune", str(src), *MAGNITUDE, "-o", str(tmp_path / "out")]) == 2
    assert RECIPE_FILE in capsys.readouterr().err
    assert run(["info", str(src)]) == 2
    assert RECIPE_FILE in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "cuda:99", "cuda:x", "cpu:0", ""])
def test_only_cpu_and_existing_cuda_devices_pass(device):
    with pytest.raises(UserError, match="device"):
        check_device(device)


def test_bad_device_fails_before_loading(tiny_folder, tmp_path, capsys):
    assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "--device", "meta", "-o", str(tmp_path / "o")]) == 2
    assert "unsupported --device 'meta'" in capsys.readouterr().err


# 9. info verifies checksums -------------------------------------------------------------------------------------


def test_info_reports_a_flipped_byte_as_damaged(tmp_path, tiny_folder, capsys):
    packed = tmp_path / "packed"
    assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "--save-format", "packed", "-o", str(packed)]) == 0
    assert run(["info", str(packed), "--json"]) == 0
    capsys.readouterr()
    data = bytearray((packed / PACKED_FILE).read_bytes())
    data[len(data) - 100] ^= 0x5A
    (packed / PACKED_FILE).write_bytes(bytes(data))
    assert run(["info", str(packed)]) == 2
    captured = capsys.readouterr()
    assert "damaged" in captured.err and "checksum" in captured.err


# 10. temporaries of killed runs ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, caplog):
    out = tmp_path / "out"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.tmp-{dead}-0123abcd"
    busy = tmp_path / f".out.tmp-{alive}-4567abcd"
    other = tmp_path / f".other.tmp-{dead}-89abcdef"
    stale_file = tmp_path / f".out.json.tmp-{dead}-00ff00ff"
    for folder in (stale, busy, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    stale_file.write_text("{")
    past = time.time() - 3600
    for p in (stale, busy, other, stale_file):
        os.utime(p, (past, past))
    with caplog.at_level(logging.INFO, logger="lmcompress.checkpoint.folder"):
        save_atomic(out, lambda tmp: (tmp / "x").write_text("done"), overwrite=False)
        write_file_atomic(tmp_path / "out.json", "{}")
    assert (out / "x").read_text() == "done"
    assert not stale.exists() and not stale_file.exists()
    assert busy.exists(), "the temporary of a running process was removed"
    assert other.exists(), "a temporary of another output was removed"
    assert f"left behind by a killed run (process {dead})" in caplog.text
    assert clean_stale(out) == []


def test_save_failure_leaves_no_temporary(tmp_path):
    def boom(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomic(tmp_path / "out", boom, overwrite=False)
    assert list(tmp_path.iterdir()) == []


# 11. auto_map of a known model_type -----------------------------------------------------------------------------


def test_auto_map_without_its_code_is_dropped_with_a_warning(tmp_path, tiny_folder, caplog):
    src = copy_model(tiny_folder, tmp_path / "model")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (src / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="lmcompress.checkpoint.load"):
        model, _ = load_model(src)
    assert "auto_map" in caplog.text and "trust_remote_code" in caplog.text
    assert not getattr(model.config, "auto_map", None)
    out = tmp_path / "out"
    assert run(["prune", str(src), *MAGNITUDE, "-o", str(out)]) == 0
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert run(["prune", str(src), *MAGNITUDE, "--save-format", "packed", "-o", str(tmp_path / "packed")]) == 0
    assert "auto_map" not in json.loads((tmp_path / "packed" / "config.json").read_text())
