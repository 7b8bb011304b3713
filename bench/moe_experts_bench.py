"""Routed experts pruned and quantized on the bench's trained tiny Mixtral (``bench.moe_bench``'s model).

Rows: dense; RTN vs GPTQ of every routed expert (and attention) at 4, 3 and 2 bits; SparseGPT, Wanda and magnitude
at 50 % of every expert. Perplexity on WikiText-2 ``test.txt`` (seqlen 256; calibration: 32 windows of
``valid.txt``). Each quantized model is saved packed: the weights file's size against the same tensors in fp16,
the routed experts' own bytes against theirs in fp16 (grids included), and the reloaded model's largest logit
difference from the in-memory one (whose float tensors are first rounded to fp16, as the file stores them).

    python -m bench.moe_experts_bench [--max-eval-windows N] [--group-size 128]
    python -m bench.moe_bench --compress        # the same, from the MoE bench
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine_info, print_table, save_results, wikitext
from bench.moe_bench import MOE, ensure_moe_model
from lmcompress.calibration.data import draw


def _expert_bytes(folder: Path) -> tuple[int, int]:
    """(bytes the routed experts' tensors take in the packed file, their element count)."""
    index = json.loads((folder / "lmcompress.json").read_text())["packed"]["tensors"]
    nbytes = numel = 0
    for name, entry in index.items():
        if ".experts." in name and entry.get("layout") != "alias":
            for part in entry["parts"].values():
                nbytes += math.prod(part["shape"]) * torch.empty(0, dtype=getattr(torch, part["dtype"])).element_size()
            numel += math.prod(entry.get("stacked", entry["shape"]))
    return nbytes, numel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (seqlen 256) from valid.txt")
    parser.add_argument("--max-eval-windows", type=int, default=None, help="evaluate on the first N test windows")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmcompress.calibration.data import eval_windows
    from lmcompress.checkpoint.load import load, load_model
    from lmcompress.checkpoint.packed import save_packed
    from lmcompress.checkpoint.save import save_quantized
    from lmcompress.measure.perplexity import perplexity
    from lmcompress.transforms.prune import PruneConfig, prune
    from lmcompress.transforms.quantize import QuantConfig, quantize

    folder = ensure_moe_model()
    _, tokenizer = load_model(folder)
    test = eval_windows(tokenizer, wikitext("test").read_text(encoding="utf-8"), 256)
    if args.max_eval_windows:
        test = test[: args.max_eval_windows]
    calib, _ = draw(tokenizer, str(wikitext("valid")), nsamples=args.nsamples, seqlen=256, seed=0)
    probe = test[:2]

    def ppl(model) -> float:
        return perplexity(model, test, progress=False).perplexity

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(probe).logits

    dense, _ = load_model(folder)
    fp16_bytes = sum(p.numel() * 2 for p in dense.state_dict().values())
    experts_fp16 = sum(p.numel() * 2 for n, p in dense.state_dict().items() if ".experts." in n)
    rows = [
        dict(method="dense", bits="-", sparsity=0.0, ppl=ppl(dense), file_vs_fp16=1.0, experts_vs_fp16=1.0,
             few_token_experts=0, reload_max_diff=0.0, time_s=0.0)
    ]  # fmt: skip
    print_table(rows, "dense")
    work = Path(tempfile.mkdtemp(prefix="moe-experts-bench-"))

    def saved_row(model, method: str, bits, sparsity: float, report, quantized, seconds: float) -> dict:
        out = work / f"{method}-{bits}-{sparsity}".replace(" ", "_")
        with torch.no_grad():  # the tensors not stored as codes held as the fp16 file holds them: reload is exact
            for name, t in model.state_dict().items():
                if t.is_floating_point() and name not in (quantized or {}):
                    t.copy_(t.half().float())
        if quantized:
            save_quantized(model, tokenizer, out, {"kind": "bench"}, quantized, dtype=torch.float16)
        else:
            save_packed(model, tokenizer, out, {"kind": "bench"}, dtype=torch.float16)
        reloaded, _ = load(out)
        diff = (logits(reloaded) - logits(model)).abs().max().item()
        nbytes, _ = _expert_bytes(out)
        return dict(
            method=method,
            bits=bits,
            sparsity=sparsity,
            ppl=ppl(model),
            file_vs_fp16=(out / "model.packed.safetensors").stat().st_size / fp16_bytes,
            experts_vs_fp16=nbytes / experts_fp16,
            few_token_experts=len(report.experts_few_tokens),
            reload_max_diff=diff,
            time_s=seconds,
        )

    for bits in (4, 3, 2):
        for method in ("rtn", "gptq"):
            model, _ = load_model(folder)
            start = time.perf_counter()
            report = quantize(
                model,
                QuantConfig(method=method, bits=bits, group_size=args.group_size),
                calib if method == "gptq" else None,
                progress=False,
            )
            seconds = time.perf_counter() - start
            rows.append(saved_row(model, method, bits, 0.0, report, report.quantized, seconds))
            print_table(rows[-1:], f"{method} {bits}-bit g{args.group_size}")
    for method in ("magnitude", "wanda", "sparsegpt"):
        model, _ = load_model(folder)
        start = time.perf_counter()
        report = prune(model, PruneConfig(method=method, sparsity=0.5), calib, progress=False)
        seconds = time.perf_counter() - start
        rows.append(saved_row(model, method, "-", report.sparsity, report, None, seconds))
        print_table(rows[-1:], f"{method} 50%")
    print_table(
        rows,
        f"tiny Mixtral ({MOE['num_local_experts']} experts, top-{MOE['num_experts_per_tok']}, "
        f"{MOE['num_hidden_layers']} layers): every routed expert compressed; WikiText-2 test perplexity "
        f"(seqlen 256, {test.shape[0]} windows); sizes: packed file (fp16 where not quantized) / all tensors "
        "in fp16",
    )
    print(machine_info())
    recipe = json.loads((folder / "DONE").read_text())
    payload = {"model": recipe, "eval_windows": int(test.shape[0]), "group_size": args.group_size, "rows": rows}
    path = save_results("moe_experts_bench", payload)
    print(f"results → {path}")


if __name__ == "__main__":
    main()
