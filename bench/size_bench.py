"""File size of packed models relative to the dense fp16 files, on SmolLM2-135M-Instruct (``--model``: any).

``python -m bench.size_bench`` prunes / quantizes the model (weights cast to fp16 for storage),
saves each result with packed storage, and reports, from ``lmcompress info``'s numbers:

- the weight file size relative to the dense fp16 ``model.safetensors`` of the same model (whole file), and
- the bits per weight of the compressed linear layers alone (scales, zero points, masks and N:M indices
  included), relative to their 16 bits in fp16.

SmolLM2-135M is small (its tied 49152 × 576 embedding table / output head is 21% of its weights), so that
table, which is not compressed, is a large share of the file: the whole-file ratio is far from what the same
recipe gives on a large model, where the linear layers dominate. Both ratios are printed, and two extra rows
also store the embedding table and output head as int8 (RTN per row; not a recipe of the CLI) to show where the
whole-file ratio goes when they are compressed too. Perplexity on WikiText-2 test is
printed too, as a check that the saved folder is the working model (it is evaluated *from the packed folder*).
"""

from __future__ import annotations

import argparse
import re
import shutil
import time

import torch

from bench.common import CACHE, MODEL_HELP, machine_info, print_table, save_results, wikitext
from bench.reference import resolve_model
from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
from lmcompress.calibration.data import draw
from lmcompress.checkpoint.inspect import folder_info
from lmcompress.checkpoint.load import load_model
from lmcompress.checkpoint.packed import save_packed
from lmcompress.checkpoint.save import save_model
from lmcompress.measure.evaluate import evaluate_pretrained
from lmcompress.transforms.prune import PruneConfig, prune
from lmcompress.transforms.quantize import QuantConfig, quantize

TARGETS = {"50% unstructured fp16": 0.60, "2:4 + int4 g64 (joint)": 0.20, "int4 g64 (RTN)": 0.30}


def _recipes(calib):
    """(name, function that compresses a model in place and returns its QuantizedTensors or None)."""

    def unstructured(model):
        prune(model, PruneConfig(method="sparsegpt", sparsity=0.5), calib, progress=False)

    def nm24(model):
        prune(model, PruneConfig(method="sparsegpt", pattern="2:4"), calib, progress=False)

    def joint(model):
        cfg = PruneConfig(method="sparsegpt", pattern="2:4", bits=4, group_size=64, sym=True)
        return prune(model, cfg, calib, progress=False).quantized

    def int4(model):
        return quantize(model, QuantConfig(method="rtn", bits=4, group_size=64), progress=False).quantized

    def int8(model):
        return quantize(model, QuantConfig(method="rtn", bits=8, group_size=64), progress=False).quantized

    def int3(model):
        return quantize(model, QuantConfig(method="rtn", bits=3, group_size=64), progress=False).quantized

    def with_int8_embeddings(fn):
        """``fn``, then also RTN int8 (per channel) on the embedding table and output head."""

        def run(model):
            quantized = dict(fn(model) or {})
            tables = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
            for name, module in model.named_modules():
                if id(module) in tables and f"{name}.weight" not in quantized:
                    q = rtn_quantize(module.weight.data.float(), QuantSpec(bits=8, group_size=-1, sym=True))
                    module.weight.data.copy_(q.dequantize())
                    quantized[f"{name}.weight"] = q
            return quantized

        return run

    return [
        ("50% unstructured fp16", unstructured),
        ("2:4 fp16", nm24),
        ("2:4 + int4 g64 (joint)", joint),
        ("int4 g64 (RTN)", int4),
        ("int3 g64 (RTN)", int3),
        ("int8 g64 (RTN)", int8),
        ("2:4 + int4 g64 (joint), int8 emb/head", with_int8_embeddings(joint)),
        ("int4 g64 (RTN), int8 emb/head", with_int8_embeddings(int4)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--no-ppl", action="store_true", help="skip the perplexity check")
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = resolve_model(args.model)
    work = CACHE / "size_bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    test_txt = str(wikitext("test"))

    model, tokenizer = load_model(source)
    calib, _ = draw(tokenizer, str(wikitext("valid")), nsamples=args.nsamples, seqlen=args.seqlen)
    dense = save_model(model, tokenizer, work / "dense-fp16", {"kind": "bench"}, dtype=torch.float16)
    dense_info = folder_info(dense)
    dense_bytes = dense_info["weights_bytes"]
    rows = [
        {
            "recipe": "dense fp16",
            "file MiB": dense_bytes / 2**20,
            "× dense (file)": 1.0,
            "target": None,
            "bits/param (file)": dense_info["bits_per_param"],
            "bits/weight (linear)": dense_info["linear"]["bits_per_weight"],
            "× dense (linear)": 1.0,
            "sparsity": dense_info["linear"]["sparsity"],
            "ppl": None
            if args.no_ppl
            else evaluate_pretrained(dense, test_txt, seqlen=256, progress=False)["perplexity"],
        }
    ]
    details = {"dense fp16": dense_info}
    for name, fn in _recipes(calib):
        net, _ = load_model(source)
        start = time.perf_counter()
        quantized = fn(net)
        out = save_packed(
            net, tokenizer, work / re.sub(r"[^A-Za-z0-9]+", "_", name), {"kind": "bench", "recipe": name},
            quantized=quantized, dtype=torch.float16,
        )  # fmt: skip
        info = folder_info(out)
        details[name] = info
        lin = info["linear"]
        ppl = None if args.no_ppl else evaluate_pretrained(out, test_txt, seqlen=256, progress=False)["perplexity"]
        rows.append(
            {
                "recipe": name,
                "file MiB": info["weights_bytes"] / 2**20,
                "× dense (file)": info["weights_bytes"] / dense_bytes,
                "target": TARGETS.get(name),
                "bits/param (file)": info["bits_per_param"],
                "bits/weight (linear)": lin["bits_per_weight"],
                "× dense (linear)": lin["bits_per_weight"] / 16,
                "sparsity": lin["sparsity"],
                "ppl": ppl,
            }
        )
        print(f"{time.perf_counter() - start:.1f}s, layouts {lin['layouts']}: {rows[-1]}", flush=True)
    share = dense_info["by_kind"]["embeddings"] / dense_bytes
    print_table(rows, "Packed size vs dense fp16 (SmolLM2-135M-Instruct)")
    print(
        f"embeddings + output head are {share:.1%} of the dense fp16 file and stay fp16 except in the "
        "'int8 emb/head' rows; "
        f"'× dense (linear)' is the compressed linear layers alone (all scales, masks and indices included)."
    )
    print(machine_info())
    path = save_results("size_bench", {"rows": rows, "embedding_share": share, "details": details})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
