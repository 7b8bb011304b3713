"""Layer-wise probe of GPTQ vs RTN on the first blocks of a Qwen2 model, on held-out tokens (issue 31).

    python -m bench.layer_probe --blocks 2 --groups qkv,o --calib 16      # Qwen2.5-Coder-1.5B's block 2

Builds only the first ``max(blocks) + 1`` blocks of the converted model (``bench/cache/qwen1.5b``; about 1–3 GB,
not the whole 7 GB), runs ``--calib`` windows × 512 tokens of WikiText-2 ``valid.txt`` (seed 0) and the first 4
windows × 512 of ``test.txt`` through them with the model's own forward, and for each layer group that reads one
input (q/k/v, o, gate/up, down) of the chosen blocks quantizes the stacked weight ``W`` to ``--bits`` with group
128 (symmetric, minmax) by RTN and by GPTQ from Hessians ``H = 2XXᵀ/n`` of: the first 8 windows; all windows;
all windows with dampening 0.1 instead of 0.01; all windows without position 0 of each window (the token that
carries Qwen's massive activation); and, where the GGUF weights hold exact zeros, with them held at zero
(``keep_zeros``). Reported per variant: the relative output error ``‖(W − Ŵ)X‖² / ‖WX‖²`` on the test tokens
(all, without position 0, position 0 only) and on the calibration tokens (``tr(ΔHΔᵀ) / tr(WHWᵀ)``). Every layer
sees the dense model's inputs (no sequential error propagation), so this isolates the per-layer solve.
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
    """A ``Qwen2Model`` with the first ``k`` blocks of ``folder``'s weights (the rest is never read)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    cfg = AutoConfig.from_pretrained(folder)
    cfg.num_hidden_layers, cfg.layer_types = k, cfg.layer_types[:k]
    model = Qwen2Model(cfg).eval()
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


def rel_err(X: torch.Tensor, D: torch.Tensor, Y: torch.Tensor, rows: torch.Tensor) -> float:
    """``‖X_r (W − Ŵ)ᵀ‖² / ‖X_r Wᵀ‖²`` over the token rows ``r`` (``D = W − Ŵ``, ``Y = X Wᵀ``)."""
    return round(((X[rows] @ D.t()) ** 2).sum().item() / (Y[rows] ** 2).sum().item(), 6)


def main() -> None:
    from lmcompress.algorithms.gptq import gptq_quantize
    from lmcompress.algorithms.quant import QuantSpec, rtn_quantize
    from lmcompress.calibration.data import draw, eval_windows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(CACHE / "qwen1.5b"), help="converted Qwen2 folder")
    parser.add_argument("--blocks", default="2", help="comma-separated block indices")
    parser.add_argument("--groups", default="qkv,o,gateup,down")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens (at least 9)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    blocks, groups = [int(b) for b in args.blocks.split(",")], args.groups.split(",")
    model, tok = load_first_blocks(args.model, max(blocks) + 1)
    calib, _ = draw(tok, str(wikitext("valid")), nsamples=args.calib, seqlen=512, seed=0)
    test = eval_windows(tok, wikitext("test").read_text(encoding="utf-8"), 512)[:4]

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

    spec, rows = QuantSpec(args.bits, 128, True, "minmax"), []
    for b in blocks:
        for g in groups:
            s = stats.pop((b, g))
            W = torch.cat([submodule(model.layers[b], name).weight.detach().float() for name in GROUPS[g]])
            X = torch.cat(s["test"])
            pos0 = torch.zeros(X.shape[0], dtype=torch.bool)
            pos0[::512] = True
            Y = X @ W.t()
            H_all = s["H"] / s["n"]
            hessians = {
                "gptq8": (2 * s["H8"] / s["n8"], 0.01),
                "gptqN": (2 * H_all, 0.01),
                "gptqN_d0.1": (2 * H_all, 0.1),
                "gptqN_nopos0": (2 * (s["H"] - s["P0"]) / (s["n"] - args.calib), 0.01),
            }
            diag = torch.diag(H_all)
            row = {
                "block": b,
                "group": g,
                "in": W.shape[1],
                "diag_max_over_mean": round((diag.max() / diag.mean()).item(), 1),
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
