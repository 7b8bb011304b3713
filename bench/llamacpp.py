"""llama.cpp's command-line tools for the benchmarks (a yardstick, never a dependency of lmcompress).

``tool("llama-perplexity")`` returns the path of a built tool. On first use the llama.cpp source that the
``llama-cpp-python`` sdist vendors is downloaded with pip (about 75 MB), unpacked and built with CMake into
``bench/cache/llama.cpp/`` (ignored by git): only the tools in :data:`TOOLS`, CPU only, two build jobs (the
cores are shared). A file lock makes a second process wait for the first one's build instead of starting its
own. ``$LLAMA_CPP_BIN`` may name a folder that already holds the tools.

``python -m bench.llamacpp`` builds them and prints their paths.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.common import CACHE

TOOLS = ("llama-perplexity", "llama-quantize", "llama-imatrix")
HOME = CACHE / "llama.cpp"
BUILD = HOME / "build"
SDIST = "llama-cpp-python"
JOBS = 2


def tool(name: str) -> Path:
    """Path of llama.cpp tool ``name`` (one of :data:`TOOLS`), built on first use (several minutes)."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; this module builds {', '.join(TOOLS)}")
    if os.environ.get("LLAMA_CPP_BIN"):
        path = Path(os.environ["LLAMA_CPP_BIN"]) / name
        if not path.is_file():
            sys.exit(f"$LLAMA_CPP_BIN is set but {path} does not exist")
        return path
    path = BUILD / "bin" / name
    if path.is_file():
        return path
    HOME.mkdir(parents=True, exist_ok=True)
    with open(HOME / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another bench may be building: wait for it, then reuse its result
        if not all((BUILD / "bin" / t).is_file() for t in TOOLS):
            build()
    return path


def source() -> Path:
    """The vendored llama.cpp source tree under ``HOME/src``, downloaded and unpacked on first use."""
    tree = HOME / "src"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    downloads = HOME / "sdist"
    downloads.mkdir(parents=True, exist_ok=True)
    if not list(downloads.glob("llama_cpp_python-*.tar.gz")):
        print(f"llama.cpp: downloading the {SDIST} sdist (its vendored llama.cpp source) with pip", flush=True)
        pip = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", downloads]
        subprocess.run([str(a) for a in pip], check=True)
    archive = sorted(downloads.glob("llama_cpp_python-*.tar.gz"))[-1]
    partial = HOME / "src.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(partial, members=[m for m in members if m.name], filter="data")
    partial.rename(tree)
    (tree / "VERSION-SOURCE").write_text(archive.name + "\n")
    return tree


def build() -> None:
    """Configure and build :data:`TOOLS` (CPU, native instructions, no curl) into :data:`BUILD`."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        sys.exit("building llama.cpp needs cmake and a C++ compiler: apt-get install cmake build-essential")
    tree = source()
    print(f"llama.cpp: building {', '.join(TOOLS)} from {tree} into {BUILD} with {JOBS} jobs (several minutes)")
    configure = ["cmake", "-S", tree, "-B", BUILD, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"]  # fmt: skip
    subprocess.run([str(a) for a in configure], check=True)
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(JOBS), "--target", *TOOLS], check=True)


def version() -> str:
    """Which llama.cpp the tools were built from (the sdist's file name), for result files."""
    stamp = HOME / "src" / "VERSION-SOURCE"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def main() -> None:
    for name in TOOLS:
        print(name, tool(name))
    print("source:", version())


if __name__ == "__main__":
    main()
