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


def tiny_deepseek_v3(vocab: int):
    """A tiny DeepSeek-V3 (MLA attention, a dense first block, 8 routed experts top-2 with group-limited routing
    and a scaling factor, one shared expert): not in models.tiny, the fused experts are found all the same."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, vocab_size=vocab, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def run_cli(argv: list[str]) -> int:
    """Run the CLI in-process; its exit status."""
    from lmcompress.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="session")
def tied_folder(tmp_path_factory, tokenizer):
    """A tiny llama whose head is its input embedding (as SmolLM2's), stored in float32."""
    model = build_tiny_model("llama", tokenizer.vocab_size, max_positions=256, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tied") / "model"
    save_model(model, tokenizer, folder, {"kind": "test-model"})
    return folder


def search_args(src, out, data, budget: str, *extra: str) -> list[str]:
    """``lmcompress search`` argv with a budget and the smallest evolution that still runs every stage."""
    return ["search", str(src), "--budget", budget, "--group-size", "32", "--generations", "2", "--offspring", "3",
            "--survivors", "2,1", "--stage-windows", "1,2", "--fitness-windows", "2", "--calib-data", str(data),
            "--nsamples", "4", "--seqlen", "32", "-q", "--json", "-o", str(out), *extra]  # fmt: skip


def check_matmul(layer: torch.nn.Module, w: torch.Tensor, rows: int, tol: float = 1e-5) -> None:
    """``layer(x)`` equals ``x · wᵀ`` on ``rows`` random rows, relative to ``|x| · |w|ᵀ`` (summation order aside)."""
    x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(rows))
    ref = x @ w.T
    bound = x.abs() @ w.abs().T + 1e-6
    y = layer(x)
    assert y.shape == ref.shape
    assert float(((y - ref).abs() / bound).max()) <= tol


@pytest.fixture
def opts(tmp_path, calib_text) -> dict:
    """Job options of a small streamed or in-memory run: 4 windows of 32 tokens, no progress bars."""
    path = tmp_path / "calib.txt"
    path.write_text(calib_text[:20000])
    return {"calib_data": str(path), "nsamples": 4, "seqlen": 32, "progress": False}


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
