"""Hostile input, second probe (issue 31, section 5): damaged GGUF files, integer or unreadable weight files,
recipes that point outside their folder, configs larger than the machine, full disks, odd paths. Every case
is a clear error (exit code 2, a message naming the problem) with nothing written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from safetensors.torch import load_file, save_file

from lmcompress.checkpoint.checks import check_config_sizes, estimate_params
from lmcompress.checkpoint.folder import RECIPE_FILE, check_output, save_atomic
from lmcompress.checkpoint.inspect import folder_info
from lmcompress.checkpoint.load import load, load_config, load_model
from lmcompress.checkpoint.packed import PACKED_FILE
from lmcompress.errors import UserError

MAGNITUDE = ["--method", "magnitude", "--sparsity", "0.5", "-q"]


def copy_model(tiny_folder, dest: Path) -> Path:
    shutil.copytree(tiny_folder("llama"), dest)
    return dest


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def packed_copy(tiny_folder, dest: Path) -> Path:
    assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "--save-format", "packed", "-o", str(dest)]) == 0
    return dest


def cli_in_subprocess(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """The CLI in its own process, killed after ``timeout`` s: a hang fails the test instead of blocking the run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lmcompress", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


# GGUF inputs go through the checkpoint checks ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tiny_folder, tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    from lmcompress.checkpoint.gguf_export import export_gguf

    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    export_gguf(tiny_folder("llama"), path, qtype="f32")
    return path


def rewrite_gguf(src: Path, dst: Path, *, drop: str | None = None, nan_in: str | None = None) -> Path:
    """A copy of the GGUF file ``src`` (every field and tensor) without the tensor ``drop``, or with a NaN in
    the tensor ``nan_in``."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    names = [t.name for t in reader.tensors]
    assert drop is None or drop in names
    assert nan_in is None or nan_in in names
    for t in reader.tensors:
        if t.name == drop:
            continue
        data = np.array(t.data)
        if t.name == nan_in:
            data.reshape(-1)[3] = np.nan
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def lying_count(src: Path, dst: Path, delta: int) -> Path:
    """``src`` with the tensor count of its header changed by ``delta`` (bytes 8..16 after magic and version)."""
    data = bytearray(src.read_bytes())
    (count,) = struct.unpack_from("<Q", data, 8)
    struct.pack_into("<Q", data, 8, count + delta)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", "missing model.layers.1.mlp.up_proj.weight"),
        ("nan", "NaN or infinite weights in model.layers.0.self_attn.q_proj.weight"),
        ("fewer", "tensor count in its header does not match"),
        ("more", "not a readable GGUF file"),
        ("truncated", "not a readable GGUF file"),
    ],
)
def test_damaged_gguf_is_refused_by_every_verb(gguf_file, tmp_path, capsys, damage, expected):
    bad = tmp_path / f"{damage}.gguf"
    if damage == "missing":
        rewrite_gguf(gguf_file, bad, drop="blk.1.ffn_up.weight")
    elif damage == "nan":
        rewrite_gguf(gguf_file, bad, nan_in="blk.0.attn_q.weight")
    elif damage == "truncated":
        bad.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    else:
        lying_count(gguf_file, bad, -2 if damage == "fewer" else 3)
    for argv in (
        ["unpack", str(bad), "-o", str(tmp_path / "out")],
        ["prune", str(bad), *MAGNITUDE, "-o", str(tmp_path / "out")],
        ["quantize", str(bad), "--method", "rtn", "--bits", "4", "-q", "-o", str(tmp_path / "out")],
        ["export", str(bad), "--format", "gguf", "--type", "f32", "-o", str(tmp_path / "out.gguf")],
    ):
        assert run(argv) == 2, argv
        assert expected in capsys.readouterr().err, argv
    if damage not in ("missing", "nan"):  # info reads the file's layout only
        assert run(["info", str(bad)]) == 2
        assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


def test_sound_gguf_still_loads_and_reports(gguf_file, tmp_path, capsys):
    copy = rewrite_gguf(gguf_file, tmp_path / "copy.gguf")
    assert run(["info", str(copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] > 0
    model, _ = load_model(copy)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# weight files: integer tensors, FIFOs, lying header lengths ---------------------------------------------------


def test_integer_tensors_for_float_weights_are_refused(tmp_path, tiny_folder, capsys):
    src = copy_model(tiny_folder, tmp_path / "model")
    state = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name].view(torch.int32)  # the float bytes, read as I32
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    for offload in ("none", "auto", "disk"):
        assert run(["prune", str(src), *MAGNITUDE, "--offload", offload, "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "float weights as integers" in err and name in err
    with pytest.raises(UserError, match="float weights as integers"):
        load(src)
    assert not (tmp_path / "out").exists()


def test_integer_dense_part_of_a_packed_folder_is_refused(tmp_path, tiny_folder, capsys):
    packed = packed_copy(tiny_folder, tmp_path / "packed")
    recipe = json.loads((packed / RECIPE_FILE).read_text())
    tensors = load_file(packed / PACKED_FILE)
    name = "model.norm.weight"
    tensors[name] = tensors[name].view(torch.int32)
    entry = recipe["packed"]["tensors"][name]
    assert entry["layout"] == "dense"
    from lmcompress.checkpoint.packed import _digest

    entry["dtype"] = entry["parts"]["values"]["dtype"] = "int32"  # a consistent lie: index and file agree
    entry["parts"]["values"]["sha256"] = _digest(tensors[name])
    save_file(tensors, packed / PACKED_FILE, metadata={"format": "pt"})
    (packed / RECIPE_FILE).write_text(json.dumps(recipe))
    assert run(["unpack", str(packed), "-o", str(tmp_path / "plain")]) == 2
    assert "float weights as integers" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()


def test_nan_in_a_packed_folder_is_refused_by_unpack_and_export(tmp_path, tiny_folder, capsys):
    from lmcompress.checkpoint.packed import _digest

    packed = packed_copy(tiny_folder, tmp_path / "packed")
    recipe = json.loads((packed / RECIPE_FILE).read_text())
    tensors = load_file(packed / PACKED_FILE)
    name = "model.norm.weight"
    tensors[name][3] = float("nan")
    recipe["packed"]["tensors"][name]["parts"]["values"]["sha256"] = _digest(tensors[name])  # checksums agree
    save_file(tensors, packed / PACKED_FILE, metadata={"format": "pt"})
    (packed / RECIPE_FILE).write_text(json.dumps(recipe))
    for argv in (
        ["unpack", str(packed), "-o", str(tmp_path / "plain")],
        ["export", str(packed), "--format", "gguf", "--type", "f32", "-o", str(tmp_path / "m.gguf")],
    ):
        assert run(argv) == 2, argv
        assert f"NaN or infinite weights in {name}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_fifo_in_a_model_folder_is_refused_without_blocking(tmp_path, tiny_folder, name):
    src = copy_model(tiny_folder, tmp_path / "model")
    (src / name).unlink()
    os.mkfifo(src / name)
    done = cli_in_subprocess(["prune", str(src), *MAGNITUDE, "-o", str(tmp_path / "out")])  # killed if it hangs
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not a regular file" in done.stderr
    if name == "model.safetensors":  # info reads the weights' headers (not the tokenizer)
        with pytest.raises(UserError, match="not a regular file"):
            folder_info(src)
    assert not (tmp_path / "out").exists()


def test_header_length_beyond_the_file_is_refused(tmp_path, tiny_folder, capsys):
    src = copy_model(tiny_folder, tmp_path / "model")
    data = bytearray((src / "model.safetensors").read_bytes())
    struct.pack_into("<Q", data, 0, 2**60)
    (src / "model.safetensors").write_bytes(bytes(data))
    for argv in (
        ["prune", str(src), *MAGNITUDE, "--offload", "disk", "-o", str(tmp_path / "out")],
        ["prune", str(src), *MAGNITUDE, "--offload", "none", "-o", str(tmp_path / "out")],
        ["info", str(src)],
    ):
        assert run(argv) == 2, argv
        assert "header claims 1152921504606846976 bytes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# configs larger than the machine ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_hidden_layers": 10**7}, "weight files hold only"),
        ({"hidden_size": 10**6, "intermediate_size": 4 * 10**6}, "blocks of at least"),
    ],
)
def test_config_sizes_beyond_the_machine_are_refused_before_building(tmp_path, tiny_folder, capsys, changes, expected):
    src = copy_model(tiny_folder, tmp_path / "model")
    edit_config(src, **changes)
    with pytest.raises(UserError, match=expected):
        load_config(str(src))
    for offload in ("disk", "none"):  # in process: the check above failing would have stopped the test first
        assert run(["prune", str(src), *MAGNITUDE, "--offload", offload, "-o", str(tmp_path / "out")]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_parameter_estimate_is_a_lower_bound(tiny_folder):
    from lmcompress.checkpoint.load import load_model

    model, _ = load_model(tiny_folder("llama"))
    config = model.config
    per_block, total = estimate_params(config)
    assert 0 < per_block * config.num_hidden_layers < total <= sum(p.numel() for p in model.parameters())
    check_config_sizes(config, tiny_folder("llama"))  # a real model passes


# packed index: the file it names, damaged shapes -------------------------------------------------------------


@pytest.mark.parametrize("name", ["absolute", "dotdot", "link-out", "fifo", "missing"])
def test_packed_file_must_be_a_plain_file_inside_the_folder(tmp_path, tiny_folder, capsys, name):
    packed = packed_copy(tiny_folder, tmp_path / "packed")
    other = packed_copy(tiny_folder, tmp_path / "other")
    recipe = json.loads((packed / RECIPE_FILE).read_text())
    target = {
        "absolute": str(other / PACKED_FILE),
        "dotdot": f"../other/{PACKED_FILE}",
        "link-out": "link.safetensors",
        "fifo": "pipe.safetensors",
        "missing": PACKED_FILE,
    }[name]
    if name == "link-out":
        (packed / target).symlink_to(other / PACKED_FILE)
    elif name == "fifo":
        os.mkfifo(packed / target)
    elif name == "missing":
        (packed / PACKED_FILE).unlink()
    recipe["packed"]["file"] = target
    (packed / RECIPE_FILE).write_text(json.dumps(recipe))
    expected = {"link-out": "link out of", "fifo": "not a regular file", "missing": "is missing"}.get(
        name, "not a file name inside the folder"
    )
    for argv in (["info", str(packed)], ["unpack", str(packed), "-o", str(tmp_path / "plain")]):
        assert run(argv) == 2, argv
        assert expected in capsys.readouterr().err
    with pytest.raises(UserError, match=expected):
        load(packed)
    assert not (tmp_path / "plain").exists()


def test_info_refuses_a_damaged_shape_as_loading_does(tmp_path, tiny_folder, capsys):
    packed = packed_copy(tiny_folder, tmp_path / "packed")
    recipe = json.loads((packed / RECIPE_FILE).read_text())
    recipe["packed"]["tensors"]["model.layers.0.mlp.up_proj.weight"]["shape"] = [10**9, 10**9]
    (packed / RECIPE_FILE).write_text(json.dumps(recipe))
    assert run(["info", str(packed)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "model.layers.0.mlp.up_proj.weight" in err
    assert run(["unpack", str(packed), "-o", str(tmp_path / "plain")]) == 2


# writing: full disks, symbolic links, odd output names ---------------------------------------------------------


def test_safetensors_error_on_a_full_disk_is_the_disk_full_error(tmp_path):
    from safetensors import SafetensorError

    def full(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    with pytest.raises(UserError, match=r"disk is full.*nothing was written"):
        save_atomic(tmp_path / "out", full, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_prune_leaves_nothing(tmp_path, tiny_folder, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    argv = ["prune", str(tiny_folder("llama")), *MAGNITUDE, "--save-format", "packed", "-o", str(tmp_path / "o")]
    assert run(argv) == 2
    assert "disk is full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_overwrite_through_a_symlink_leaves_no_dangling_link(tmp_path):
    real = tmp_path / "real"
    save_atomic(real, lambda tmp: (tmp / "x").write_text("old"), overwrite=False)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    save_atomic(tmp_path / "link", lambda tmp: (tmp / "x").write_text("new"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / "x").read_text() == "new"
    assert (real / "x").read_text() == "old", "the link's target was changed"


def test_overwriting_the_current_folder_is_refused_up_front(tmp_path, tiny_folder, capsys, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep")
    for cwd, output in ((work, "."), (work / "sub", str(work))):
        monkeypatch.chdir(cwd)
        assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "-o", output, "--overwrite"]) == 2
        assert "current folder" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("output", ["x" * 300, "deep/" * 900 + "x", "~nouser-lmcompress-test/x"])
def test_odd_output_paths_are_user_errors(tmp_path, tiny_folder, capsys, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    assert run(["prune", str(tiny_folder("llama")), *MAGNITUDE, "-o", output]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(UserError):
        check_output(output, False)
    assert list(tmp_path.iterdir()) == []


# misleading messages ---------------------------------------------------------------------------------------------


def test_missing_local_paths_are_not_reported_as_hub_failures(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for source, expected in (("work/dense", "does not exist"), ("loop", "symbolic link"), ("~nouser-x/m", "no such")):
        assert run(["prune", source, *MAGNITUDE, "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert expected in err and "hub" not in err.replace("hub id", ""), err


def test_missing_tokenizer_files_are_named(tmp_path, tiny_folder):
    src = copy_model(tiny_folder, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    with pytest.raises(UserError, match="has no tokenizer files"):
        load_model(src)


def test_full_disk_errno_from_the_os_still_maps(tmp_path):
    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="disk is full"):
        save_atomic(tmp_path / "out", full, overwrite=False)


# generate ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--threads", "100000"], "CPU cores"),
        (["--threads", "0"], "CPU cores"),
        (["--device", "meta"], "unsupported --device 'meta'"),
        (["--seed", str(2**64)], "--seed"),
        (["--max-new-tokens", "300"], "exceeds the model's context of"),
    ],
)
def test_generate_refuses_bad_options(tiny_folder, capsys, extra, expected):
    assert run(["generate", str(tiny_folder("llama")), "-p", "the cat sat", *extra]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err + captured.out


def test_generate_refuses_a_prompt_longer_than_the_context(tiny_folder, capsys):
    prompt = "the cat sat on the mat " * 60
    assert run(["generate", str(tiny_folder("llama")), "-p", prompt, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the model's context" in err and "--max-new-tokens" in err


def test_generate_refuses_a_prompt_of_invalid_utf8(tiny_folder, capsys):
    prompt = b"\xff\xfe abc".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    assert run(["generate", str(tiny_folder("llama")), "-p", prompt, "--max-new-tokens", "2"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


def test_hostile_chat_template_is_a_clear_error(tmp_path, tiny_folder, capsys):
    src = copy_model(tiny_folder, tmp_path / "model")
    config = json.loads((src / "tokenizer_config.json").read_text())
    marker = tmp_path / "ran"
    config["chat_template"] = (
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ cycler.__init__.__globals__.os.system('touch "
        + str(marker)
        + "') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    assert run(["generate", str(src), "-p", "hi", "--chat", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "chat_template cannot be applied" in err and "SecurityError" in err
    assert not marker.exists()


def test_generate_and_export_take_the_flags_their_messages_name(tmp_path, tiny_folder, capsys):
    src = copy_model(tiny_folder, tmp_path / "model")
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    for argv in (
        ["generate", str(src), "-p", "hi", "--max-new-tokens", "2"],
        ["export", str(src), "--format", "gguf", "--type", "f32", "-o", str(tmp_path / "m.gguf")],
    ):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert "--allow-pickle" in err and "allow_pickle" not in err, err
    assert run(["info", str(src), "--profile"]) == 2
    err = capsys.readouterr().err
    assert "only pickle checkpoints" in err and "allow_pickle" not in err
    assert run(["generate", str(src), "-p", "hi", "--max-new-tokens", "2", "--allow-pickle"]) == 0
    argv = ["export", str(src), "--format", "gguf", "--type", "f32", "-o", str(tmp_path / "m.gguf")]
    assert run([*argv, "--allow-pickle"]) == 0
    assert run(["info", str(src), "--allow-pickle"]) == 2  # only with --profile
    assert "--allow-pickle does not apply without --profile" in capsys.readouterr().err


def test_package_extras_in_messages_are_not_renamed_as_flags():
    error = UserError('harness needs lm-eval: pip install -e ".[harness]"', param="harness")
    assert str(error.renamed({"harness": "--harness"})) == '--harness needs lm-eval: pip install -e ".[harness]"'


def test_full_disk_while_streaming_names_the_kept_work_folder(tmp_path, tiny_folder, capsys, monkeypatch):
    import lmcompress.checkpoint.stream as stream

    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream, "write_safetensors", full)
    argv = ["prune", str(tiny_folder("llama")), *MAGNITUDE, "--offload", "disk", "-o", str(tmp_path / "out")]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and ".out.partial" in err and "--resume" in err
    assert "nothing was written" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial"]
    assert not [p for p in (tmp_path / ".out.partial").iterdir() if ".tmp-" in p.name], "a half-written block is left"
    monkeypatch.undo()
    assert run([*argv, "--resume"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("verb", ["prune", "quantize", "unpack", "factorize", "shrink"])
def test_safetensors_full_disk_error_in_every_saving_verb(tmp_path, tiny_folder, capsys, monkeypatch, verb):
    import safetensors.torch
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    src = tiny_folder("llama")
    if verb == "unpack":
        src = packed_copy(tiny_folder, tmp_path / "packed")

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)  # packed folders
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)  # dense folders
    out = str(tmp_path / "out")
    argv = {
        "prune": ["prune", str(src), *MAGNITUDE, "-o", out],
        "quantize": ["quantize", str(src), "--method", "rtn", "--bits", "4", "-q", "-o", out],
        "unpack": ["unpack", str(src), "-o", out],
        "factorize": ["factorize", str(src), "--rank-policy", "rank:8", "-o", out],
        "shrink": ["shrink", "ffn", str(src), "--criterion", "magnitude", "-o", out],
    }[verb]
    assert run(argv) == 2
    assert "disk is full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["packed"] if verb == "unpack" else [])


@pytest.mark.parametrize("name", ["x" * 300, "~nouser-lmcompress-test/x"])
def test_odd_paths_in_every_reading_verb_are_user_errors(tmp_path, tiny_folder, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    src = str(tiny_folder("llama"))
    for argv in (
        ["info", name],
        ["info", f"{name}.gguf"],
        ["unpack", f"{name}.gguf", "-o", "out"],
        ["generate", name, "-p", "hi"],
        ["export", src, "--format", "gguf", "-o", f"{name}.gguf"],
        ["export", src, "-o", name],
    ):
        assert run(argv) == 2, argv
        assert "error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
