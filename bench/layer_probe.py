"""Layer-wise probe of GPTQ vs RTN on the first blocks of a Qwen2 model, on held-out tokens (issue 31).

    python -m bench.layer_probe --blocks 2 --groups qkv,o --calib 16      # Qwen2.5-Coder-1.5B's block 2
    python -m bench.layer_probe --blocks 1,2 --groups down --damps 0.01,0.03,0.1,0.3,auto   # dampening sweep
    python -m bench.layer_probe --diag-stats --model smollm2 --blocks all --calib 32 --seqlen 256   # every layer

Builds only the first ``max(blocks) + 1`` blocks of the converted model (``bench/cache/qwen1.5b``; about 1–3 GB, not
the whole 7 GB), runs ``--calib`` windows × 512 tokens of WikiText-2 ``valid.txt`` (seed 0) and the first 4 windows
× 512 of ``test.txt`` through them with the model's own forward, and for each layer group that reads one input
(q/k/v, o, gate/up, down) of the chosen blocks quantizes the stacked weight ``W`` to ``--bits`` with group 128
(``--group-size``; symmetric, minmax) by RTN and by GPTQ from Hessians ``H = 2XXᵀ/n`` of: the first 8 windows; all
windows; all windows with each dampening of ``--damps`` (default 0.1; ``auto``: the adaptive rule of
:func:`lmcompress.algorithms.obs.damping_fraction`) instead of 0.01; all windows without position 0 of each window
(the token that carries Qwen's massive activation); and, where the GGUF weights hold exact zeros, with them held at
zero (``keep_zeros``). Reported per variant: the relative output error ``‖(W − Ŵ)X‖² / ‖WX‖²`` on the test tokens
(all, without position 0, position 0 only) and on the calibration tokens (``tr(ΔHΔᵀ) / tr(WHWᵀ)``). Every layer sees
the dense model's inputs (no sequential error propagation), so this isolates the per-layer solve.

``--diag-stats`` instead runs the whole model (any family) on the calibration windows and prints, for every linear
layer of the ``--blocks`` (``all``: every block; each layer's ``H`` is held, so mind the memory on a large model),
how concentrated its Hessian is: ``diag H ∝ Σ x²`` (max / mean, max / median, the top channel's and top 8 channels'
share of the trace), its largest eigenvalue's share of the trace and ratio to the largest diagonal entry, and the
dampening fraction ``--percdamp auto`` gives it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import CACHE, machine_info, results_name, save_results, wikitext

GROUPS = {
    "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "o": ["self_attn.o_proj"],
    "gateup": ["mlp.gate_proj", "mlp.up_proj"],
    "down": ["mlp.down_proj"],
}


def load_first_blocks(folder: str, k: int):
    """The base model (``Qwen2Model``, ``LlamaModel``, ...) with the first ``k`` blocks of ``folder``'s weights (the
    rest is never read)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    cfg = AutoConfig.from_pretrained(folder)
    cfg.num_hidden_layers = k
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:k]
    model = AutoModel.from_config(cfg).eval()
    state = {}
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if key.startswith("model.") and (not key.startswith("model.layers.") or int(key.split(".")[2]) < k):
                state[key[len("model.") :]] = f.get_tensor(key)
    missing = model.load_state_dict(state, strict=False)
    if missing.missing_keys:
        raise SystemExit(f"weights missing from {folder}: {missing.missing_keys[:5]}")
    return model, AutoTokenizer.from_pretrained(folder)


def submodule(block: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        block = getattr(block, part)
    return block


def spectrum(H: torch.Tensor, iters: int = 60) -> dict:
    """The largest eigenvalue of ``H`` (power iteration) as a share of the trace and over the largest diagonal entry
    (about 1 when the dominant direction is one input channel, larger when it is spread over many)."""
    v = torch.diag(H).clone()
    for _ in range(iters):
        v = H @ v
        v /= v.norm()
    top = (v @ H @ v).item()
    return {"eig_share": round(top / H.trace().item(), 4), "eig_over_maxdiag": round(top / H.diag().max().item(), 2)}


def rel_err(X: torch.Tensor, D: torch.Tensor, Y: torch.Tensor, rows: torch.Tensor) -> float:
    """``‖X_r (W − Ŵ)ᵀ‖² / ‖X_r Wᵀ‖²`` over the token rows ``r`` (``D = W − Ŵ``, ``Y = X Wᵀ``)."""
    return round(((X[rows] @ D.t()) ** 2).sum().item() / (Y[rows] ** 2).sum().item(), 6)


def diag_stats(args) -> None:
    """Every block linear layer's diag H concentration and its ``auto`` dampening, on the dense model's inputs."""
    from bench.reference import resolve_model
    from lmcompress.algorithms.obs import damping_fraction
    from lmcompress.calibration.data import draw
    from lmcompress.checkpoint.load import load_model
    from lmcompress.models.families import find_prunable, get_blocks

    model, tok = load_model(str(resolve_model(args.model)))
    calib, _ = draw(tok, str(wikitext("valid")), nsamples=args.calib, seqlen=args.seqlen, seed=0)
    sums: dict[str, torch.Tensor] = {}
    wanted = None if args.blocks == "all" else {int(b) for b in args.blocks.split(",")}

    def hook_for(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.t() @ x  # X^T X (the Hessian up to 2/n)

        return hook

    for b, block in enumerate(get_blocks(model)):
        if wanted is not None and b not in wanted:
            continue
        seen: set[int] = set()
        for name, m in find_prunable(block).items():
            if id(m) not in seen:
                seen.add(id(m))
                m.register_forward_pre_hook(hook_for(f"{b}.{name}"))
    with torch.no_grad():
        for w in range(calib.shape[0]):
            model(calib[w : w + 1], use_cache=False)
    rows = []
    for name, h in sums.items():
        d = torch.diag(h)
        top = torch.sort(d, descending=True).values
        row = {
            "layer": name,
            "in": d.numel(),
            "max_over_mean": round((top[0] / d.mean()).item(), 1),
            "max_over_median": round((top[0] / d.median()).item(), 1),
            "top1_share": round((top[0] / d.sum()).item(), 4),
            "top8_share": round((top[:8].sum() / d.sum()).item(), 4),
            **spectrum(h),
            "auto": damping_fraction("auto", h.shape[0], args.calib * args.seqlen),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = save_results(results_name("layer_probe", args.model) + "-diag", {"args": vars(args), "rows": rows})
    print(f"results: {path} ({machine_info()['cpu']})")


def main() -> None:
    from lmcompress.algorithms.gptq import gptq_quantize
    from lmcompress.algorithms.obs import damping_fraction
    from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
    from lmcompress.calibration.data import draw, eval_windows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(CACHE / "qwen1.5b"), help="qwen1.5b (default), smollm2 or a folder")
    parser.add_argument("--blocks", default="2", help="comma-separated block indices")
    parser.add_argument("--groups", default="qkv,o,gateup,down")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens (at least 9)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128, help="64 for SmolLM2 (576 wide)")
    parser.add_argument("--damps", default="0.1", help="comma-separated dampening variants (floats or auto)")
    parser.add_argument("--only-damps", action="store_true", help="GPTQ only with the --damps variants")
    parser.add_argument("--diag-stats", action="store_true", help="every layer's diag H concentration (any model)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and test window")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.diag_stats:
        diag_stats(args)
        return
    from bench.reference import resolve_model

    args.model = str(resolve_model(args.model))
    blocks, groups = [int(b) for b in args.blocks.split(",")], args.groups.split(",")
    model, tok = load_first_blocks(args.model, max(blocks) + 1)
    calib, _ = draw(tok, str(wikitext("valid")), nsamples=args.calib, seqlen=args.seqlen, seed=0)
    test = eval_windows(tok, wikitext("test").read_text(encoding="utf-8"), args.seqlen)[:4]

    stats: dict[tuple[int, str], dict] = {}
    state = {"calib": True, "window": 0}

    def hook_for(b: int, g: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            s = stats.setdefault((b, g), {"n": 0, "test": []})
            if not state["calib"]:
                s["test"].append(x)
                return
            if "H" not in s:
                s["H"], s["P0"] = torch.zeros(x.shape[1], x.shape[1]), torch.zeros(x.shape[1], x.shape[1])
            s["H"].addmm_(x.t(), x)
            s["P0"].addr_(x[0], x[0])  # position 0 of the window
            s["n"] += x.shape[0]
            if state["window"] == 7:
                s["H8"], s["n8"] = s["H"].clone(), s["n"]

        return hook

    for b in blocks:
        for g in groups:
            submodule(model.layers[b], GROUPS[g][0]).register_forward_pre_hook(hook_for(b, g))
    start, peaks = time.time(), []
    with torch.no_grad():
        for w in range(calib.shape[0]):
            state["window"] = w
            model(calib[w : w + 1], use_cache=False)
        state["calib"] = False
        for w in range(test.shape[0]):
            out = model(test[w : w + 1], use_cache=False, output_hidden_states=True)
            if w == 0:  # largest |hidden state| entering each block (top 3 positions) on the first test window
                for h in out.hidden_states:
                    top = torch.topk(h[0].abs().amax(-1), 3)
                    peaks.append([[round(v, 1) for v in top.values.tolist()], top.indices.tolist()])
    print(f"forward {time.time() - start:.0f} s; largest |h| entering each block (values, positions): {peaks}")

    spec, rows = QuantSpec(args.bits, args.group_size, True, "minmax"), []
    for b in blocks:
        for g in groups:
            s = stats.pop((b, g))
            W = torch.cat([submodule(model.layers[b], name).weight.detach().float() for name in GROUPS[g]])
            X = torch.cat(s["test"])
            pos0 = torch.zeros(X.shape[0], dtype=torch.bool)
            pos0[:: args.seqlen] = True
            Y = X @ W.t()
            H_all = s["H"] / s["n"]
            hessians = {
                **({} if args.only_damps else {"gptq8": (2 * s["H8"] / s["n8"], 0.01), "gptqN": (2 * H_all, 0.01)}),
                **{f"gptqN_d{d}": (2 * H_all, damping_fraction(d, W.shape[1], s["n"])) for d in args.damps.split(",")},
            }
            if not args.only_damps:
                hessians["gptqN_nopos0"] = (2 * (s["H"] - s["P0"]) / (s["n"] - args.calib), 0.01)
            diag = torch.diag(H_all)
            row = {
                "block": b,
                "group": g,
                "in": W.shape[1],
                "diag_max_over_mean": round((diag.max() / diag.mean()).item(), 1),
                **spectrum(H_all),
                "auto": damping_fraction("auto", W.shape[1], s["n"]),
                "zero_frac": round((W == 0).float().mean().item(), 4),
            }
            variants: dict[str, tuple | None] = {"rtn": None, **{k: (*v, None) for k, v in hessians.items()}}
            if row["zero_frac"] > 1e-3:
                variants["gptqN_keepzeros"] = (2 * H_all, 0.01, W == 0)
            for name, v in variants.items():
                t = time.time()
                if v is None:
                    What = rtn_quantize(W, spec).dequantize()
                else:
                    What = gptq_quantize(W, v[0].clone(), spec, percdamp=v[1], mask=v[2]).weight
                D = W - What

                every = torch.ones_like(pos0)
                calib_err = ((D @ H_all) * D).sum().item() / ((W @ H_all) * W).sum().item()
                row[name] = {
                    "test": rel_err(X, D, Y, every),
                    "test_nopos0": rel_err(X, D, Y, ~pos0),
                    "test_pos0": rel_err(X, D, Y, pos0),
                    "calib": round(calib_err, 6),
                    "s": round(time.time() - t, 1),
                }
            print(json.dumps(row), flush=True)
            rows.append(row)
    info = {"args": vars(args), "peaks": peaks, "rows": rows}
    path = save_results(results_name("layer_probe", args.model) + f"-{args.bits}bit", info)
    print(f"results: {path} ({machine_info()['cpu']})")


if __name__ == "__main__":
    main()
