"""File size of every deploy format of SmolLM2-135M against the dense fp16 folder (issue 11).

    python -m bench.formats_bench [--model DIR]       # needs compressed-tensors (pip install -e ".[export,gguf]")

Writes, in ``bench/cache/formats``: the dense model as fp16 safetensors (the reference) and as float32 (what the
source folder holds); packed RTN folders (8-bit per channel, 4-bit g32, 4-bit g128, each also with the output head
at 8 bits per channel) and 4-bit g64; the compressed-tensors export of 4-bit g64 (what vLLM loads; its format needs
whole groups, and SmolLM2's 576 inputs are not whole groups of 128); GGUF files: f16, q8_0
(llama.cpp's round-to-nearest of the dense weights), Q4_0 from lmcompress's own 4-bit g32 codes (``--grid q4_0``).
Prints bytes on disk, MiB and the ratio to dense fp16 for each (a folder counts every file in it).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, save_results

OUT = CACHE / "formats"


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    args = parser.parse_args(argv)

    from bench.reference import resolve_model
    from lmcompress.checkpoint.export import export_compressed_tensors
    from lmcompress.checkpoint.gguf_export import export_gguf
    from lmcompress.checkpoint.load import load_model
    from lmcompress.checkpoint.save import save_model
    from lmcompress.jobs import quantize_pretrained
    from lmcompress.transforms.quantize import QuantConfig

    dense = resolve_model(args.model)
    OUT.mkdir(parents=True, exist_ok=True)  # a rerun reuses the folders already written (their sizes are the same)
    files: dict[str, Path] = {}
    for dtype in ("float16", "float32"):
        if not (OUT / dtype).exists():
            model, tokenizer = load_model(str(dense), dtype=dtype)
            save_model(model, tokenizer, OUT / dtype, {"kind": "dense"})
        files[f"dense {dtype} (safetensors folder)"] = OUT / dtype
    grids = {
        "RTN int8 per-channel": QuantConfig("rtn", 8, -1),
        "RTN int4 g32": QuantConfig("rtn", 4, 32),
        "RTN int4 g128": QuantConfig("rtn", 4, 128),
        "RTN int4 g64": QuantConfig("rtn", 4, 64),
        "RTN int8 per-channel + int8 head": QuantConfig("rtn", 8, -1, include_head=True),
        "RTN int4 g32 + int8 head": QuantConfig("rtn", 4, 32, include_head=True),
        "RTN int4 g32 q4_0 grid": QuantConfig("rtn", 4, 32, grid="q4_0"),
    }
    for name, config in grids.items():
        folder = OUT / name.replace(" ", "-")
        if not folder.exists():
            quantize_pretrained(dense, config, folder, progress=False)
        files[f"{name} (packed folder)"] = folder
    ct = OUT / "ct-int4-g64"  # compressed-tensors needs whole groups: 576 inputs are 9 groups of 64, not of 128
    shutil.rmtree(ct, ignore_errors=True)
    export_compressed_tensors(OUT / "RTN-int4-g64", ct)
    files["RTN int4 g64, compressed-tensors export (vLLM)"] = ct
    for qtype in ("f16", "q8_0"):
        export_gguf(dense, OUT / f"dense-{qtype}.gguf", qtype=qtype, overwrite=True)
        files[f"GGUF {qtype}"] = OUT / f"dense-{qtype}.gguf"
    export_gguf(OUT / "RTN-int4-g32-q4_0-grid", OUT / "q4_0.gguf", embed_type="q8_0", overwrite=True)
    files["GGUF Q4_0 from lmcompress codes (Q8_0 embeddings)"] = OUT / "q4_0.gguf"

    reference = size(files["dense float16 (safetensors folder)"])
    rows = [{"format": k, "bytes": size(v), "MiB": size(v) / 2**20, "× dense fp16": size(v) / reference}
            for k, v in files.items()]  # fmt: skip
    info = machine_info()
    print_table(rows, f"deploy formats of {dense.name}, on disk ({info['date']})")
    print(f"results: {save_results('formats', {'model': str(dense), 'rows': rows})}")


if __name__ == "__main__":
    main()
