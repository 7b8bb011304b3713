"""Shared fixtures: a small tokenizer, tiny models of every family, calibration windows. All offline."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no busy-waiting threads when processes share the cores
os.environ.setdefault("LMCOMPRESS_OFFLINE", "1")  # no test fetches the reference model; tests that mock it unset this

import pytest
import torch
from transformers.utils import logging as hf_logging

from lmcompress.calibration.data import calibration_windows, load_text
from lmcompress.checkpoint.save import save_model
from lmcompress.models.tiny import TINY_CONFIGS, build_tiny_model, build_tokenizer

FAMILIES = sorted(TINY_CONFIGS)
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
torch.set_num_threads(int(os.environ.get("LMCOMPRESS_TEST_THREADS", "1")))  # tiny models: threads only contend


@pytest.fixture(scope="session")
def calib_text() -> str:
    return load_text("bundled:wikitext2-valid").text


@pytest.fixture(scope="session")
def eval_text() -> str:
    return load_text("bundled:wikitext2-test").text


@pytest.fixture(scope="session")
def tokenizer(calib_text):
    return build_tokenizer(calib_text, vocab_size=320)


@pytest.fixture(scope="session")
def calib(tokenizer, calib_text) -> torch.Tensor:
    return calibration_windows(tokenizer, calib_text, nsamples=8, seqlen=64, seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer):
    """Factory: a saved tiny model folder of a family (built once per family per session)."""
    cache: dict[str, object] = {}

    def make(family: str = "llama"):
        if family not in cache:
            model = build_tiny_model(family, tokenizer.vocab_size, max_positions=256)
            folder = tmp_path_factory.mktemp(f"tiny-{family}") / "model"
            save_model(model, tokenizer, folder, {"kind": "test-model"})
            cache[family] = folder
        return cache[family]

    return make


def run_cli(argv: list[str]) -> int:
    """Run the CLI in-process; its exit status."""
    from lmcompress.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def calib_file(tmp_path, calib_text) -> Path:
    """A calibration text file: the first 20,000 characters of the bundled WikiText-2 validation slice."""
    path = tmp_path / "calib.txt"
    path.write_text(calib_text[:20000])
    return path


def random_ids(vocab: int) -> torch.Tensor:
    """Two fixed windows of 24 random token ids."""
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits
