"""What a model costs to run: parameters, matmul FLOPs per token, and measured latency per token.

FLOPs count the multiply-adds of every linear layer (``2 · in · out`` per token, the output head included;
a low-rank layer as its two factors) plus the attention score and value products
(``2 · 2 · heads · head_dim · context`` per token per layer, with the mean causal context ``(seqlen + 1) / 2``).
Mixture-of-experts layers count what one token really runs: the router (``2 · hidden · experts``) and its
top-k experts (``2 · top_k ·`` one expert's weights), so dropping experts changes the router's share only.
Norms, activations, softmax and embeddings lookups are left out: they are small next to the matmuls and do not
change when channels or heads are removed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcompress.models.families import FAMILIES, get_blocks
from lmcompress.models.layouts import LAYOUTS, MOE_LAYOUTS, moe_module
from lmcompress.models.params import count_params


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a matmul layer: nn.Linear, GPT-2 Conv1D, or anything with a dense ``weight`` in [out, in]."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _attention_width(model: nn.Module) -> list[int]:
    """``heads × head_dim`` of each block's attention (what the score/value products scale with)."""
    layout = LAYOUTS.get(getattr(model.config, "model_type", None))
    try:
        blocks = get_blocks(model)
    except Exception:
        blocks = None
    if layout is not None and blocks is not None:
        widths = []
        for block in blocks:
            o = block.get_submodule(layout.o)
            shape = _linear_shape(o)
            widths.append(shape[0] if shape else int(o.in_features))  # LowRankLinear has no single matrix
        return widths
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 0
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0
    return [hidden] * layers


def _expert_flops(model: nn.Module) -> int:
    """Per-token matmul FLOPs of the mixture-of-experts layers: router plus the ``top_k`` experts a token runs."""
    layout = MOE_LAYOUTS.get(getattr(model.config, "model_type", None))
    if layout is None:
        return 0
    top_k = int(getattr(model.config, layout.topk_key))
    total = 0
    for block in get_blocks(model):
        moe = moe_module(block, layout)
        if moe is None:
            continue
        experts, router = moe.get_submodule(layout.experts), moe.get_submodule(layout.router)
        per_expert = sum(p[0].numel() for p in experts.parameters(recurse=False) if p.dim() == 3)
        total += 2 * top_k * per_expert
        if _linear_shape(router) is None:  # an nn.Linear router is already counted with the linear layers
            total += 2 * router.weight.numel()
    return total


def flops_breakdown(model: nn.Module, seqlen: int) -> dict[str, float]:
    """Matmul FLOPs per token of the linear layers, MoE experts and attention, for a forward of ``seqlen`` tokens."""
    if seqlen <= 0:
        raise ValueError("seqlen must be positive")
    linear = 0
    seen: set[int] = set()
    for module in model.modules():
        shape = _linear_shape(module)
        if shape is None or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        linear += 2 * shape[0] * shape[1]
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    context = (seqlen + 1) / 2 if family is None or family.kind == "decoder" else seqlen
    attention = sum(4 * width * context for width in _attention_width(model))
    experts = _expert_flops(model)
    return {
        "linear": float(linear),
        "experts": float(experts),
        "attention": float(attention),
        "total": float(linear + experts + attention),
    }


def flops_per_token(model: nn.Module, seqlen: int) -> float:
    """Matmul FLOPs per token (linear layers + attention products); see :func:`flops_breakdown`."""
    return flops_breakdown(model, seqlen)["total"]


@torch.inference_mode()
def latency_per_token(
    model: nn.Module,
    seqlen: int = 256,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    *,
    warmup: int = 2,
    reduce: str = "median",
    clock: str = "wall",
) -> float:
    """Measured forward time per token in milliseconds: one window of ``seqlen`` random tokens, batch 1.

    ``warmup`` untimed forwards first, then ``repeats`` timed ones; ``reduce`` is ``"median"`` or ``"min"``.
    ``clock="cpu"`` measures the CPU time this process spent instead of wall time: on a machine shared with
    other work it is far less noisy (with one torch thread it equals the compute time); CPU device only.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    timer = time.process_time if clock == "cpu" else time.perf_counter
    if repeats < 1 or seqlen < 1:
        raise ValueError("repeats and seqlen must be positive")
    device = torch.device(device)
    model.eval()
    home = next(model.parameters()).device
    model.to(device)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, seqlen), generator=torch.Generator().manual_seed(0)).to(device)

    family = FAMILIES.get(getattr(model.config, "model_type", None))
    kwargs = {"use_cache": False} if family is None or family.kind == "decoder" else {}

    def forward() -> None:
        model(ids, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        for _ in range(warmup):
            forward()
        times = []
        for _ in range(repeats):
            t0 = timer()
            forward()
            times.append(timer() - t0)
    finally:
        model.to(home)
    value = min(times) if reduce == "min" else statistics.median(times)
    return value / seqlen * 1000.0


def profile_model(
    model: nn.Module, seqlen: int = 256, device: str | torch.device = "cpu", repeats: int = 5
) -> dict[str, float]:
    """``params``, ``flops_per_token``, ``latency_ms_per_token`` (wall) and, on CPU, ``cpu_ms_per_token``.

    The CPU time of the process is reported next to the wall time because on a busy machine it is far steadier.
    """
    on_cpu = torch.device(device).type == "cpu"
    return {
        "params": count_params(model),
        "flops_per_token": flops_per_token(model, seqlen),
        "latency_ms_per_token": latency_per_token(model, seqlen, device, repeats),
        "cpu_ms_per_token": latency_per_token(model, seqlen, device, repeats, clock="cpu") if on_cpu else None,
        "torch_threads": torch.get_num_threads(),
        "profile_seqlen": seqlen,
    }


def profile_with_source(
    model: nn.Module,
    recipe: dict | None,
    seqlen: int = 256,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    *,
    dtype: str = "float32",
) -> dict:
    """Profile ``model`` and, if its recipe names a dense source that exists locally, the source too.

    Adds ``speedup`` (source latency / model latency) and ``params_ratio`` when the source was profiled.
    """
    out: dict = {"model": profile_model(model, seqlen, device, repeats), "source": None}
    source = (recipe or {}).get("source_model")
    if source and Path(str(source)).is_dir():
        from lmcompress.checkpoint.load import load

        dense, _ = load(source, dtype=dtype)
        out["source"] = {"path": str(source), **profile_model(dense, seqlen, device, repeats)}
        del dense
        out["speedup"] = out["source"]["latency_ms_per_token"] / out["model"]["latency_ms_per_token"]
        if out["model"]["cpu_ms_per_token"]:
            out["cpu_speedup"] = out["source"]["cpu_ms_per_token"] / out["model"]["cpu_ms_per_token"]
        out["params_ratio"] = out["model"]["params"] / out["source"]["params"]
        out["flops_ratio"] = out["model"]["flops_per_token"] / out["source"]["flops_per_token"]
    return out


def profile_pretrained(
    model: str | Path,
    *,
    seqlen: int = 256,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 5,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    kernels: str = "auto",
    generation: bool = False,
) -> dict:
    """Load a model folder (anything ``lmcompress.load`` reads) and profile it and its recipe's dense source.

    ``generation`` (CPU, local folders): also prefill / decode speed and peak memory with ``kernels``
    (:func:`generation_profile`), under ``"generation"``."""
    from lmcompress.checkpoint.folder import read_recipe
    from lmcompress.checkpoint.load import load_model
    from lmcompress.runtime import resolve_seqlen

    net, _ = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    seqlen = resolve_seqlen(net, seqlen)  # within the model's context, or it times positions it has not got
    recipe = read_recipe(model) if Path(str(model)).is_dir() else None
    out = profile_with_source(net, recipe, seqlen, device, repeats, dtype=dtype)
    if generation and torch.device(device).type == "cpu" and Path(str(model)).is_dir() and not trust_remote_code:
        del net
        source = (out.get("source") or {}).get("path")
        out["generation"] = generation_profile(model, source, kernels, dtype=dtype, prefill_tokens=seqlen)
    return out


def generation_profile(
    model: str | Path, source: str | Path | None, kernels: str = "auto", *, dtype: str, prefill_tokens: int = 256
) -> dict:
    """Prefill / decode tokens per second at batch 1 and peak memory of ``model`` run with ``kernels`` and of its
    dense ``source`` (if given), each in a fresh process (:func:`lmcompress.measure.speed.measure_folder`):
    a prefill of ``prefill_tokens``, 64 decode steps after a 32-token prompt, best of 3."""
    from lmcompress.measure.speed import measure_folder

    sizes = {"dtype": dtype, "prefill_tokens": prefill_tokens, "context": 32, "new_tokens": 64}
    out: dict = {"model": measure_folder(model, kernels=kernels, **sizes), "source": None}
    if source:
        out["source"] = measure_folder(source, kernels="none", **sizes)
        out["decode_speedup"] = out["model"]["decode_tokens_per_s"] / out["source"]["decode_tokens_per_s"]
        out["prefill_speedup"] = out["model"]["prefill_tokens_per_s"] / out["source"]["prefill_tokens_per_s"]
    return out


def format_profile(profile: dict) -> str:
    """Human-readable lines for ``lmcompress eval --profile``."""

    def line(name: str, p: dict) -> str:
        cpu = f", CPU time {p['cpu_ms_per_token']:.4f}" if p.get("cpu_ms_per_token") is not None else ""
        return (
            f"  {name:7s} params {p['params']:,}  FLOPs/token {p['flops_per_token']:.4g}  "
            f"latency {p['latency_ms_per_token']:.4f}{cpu} ms/token (seqlen {p['profile_seqlen']})"
        )

    lines = [line("model", profile["model"])]
    if profile.get("source"):
        lines.append(line("source", profile["source"]))
        lines.append(
            f"  wall speed-up ×{profile['speedup']:.2f}, params ×{profile['params_ratio']:.3f}, "
            f"FLOPs ×{profile['flops_ratio']:.3f} vs the dense source"
            + (f"; CPU-time speed-up ×{profile['cpu_speedup']:.2f}" if "cpu_speedup" in profile else "")
        )
    gen = profile.get("generation")
    if gen:

        def speed(name: str, p: dict) -> str:
            return (
                f"  {name:7s} prefill {p['prefill_tokens_per_s']:.1f} tokens/s (CPU time "
                f"{p['prefill_tokens_per_s_cpu']:.1f}), decode {p['decode_tokens_per_s']:.1f} tokens/s (CPU time "
                f"{p['decode_tokens_per_s_cpu']:.1f}), peak RSS {p['peak_rss_mb']:.0f} MiB, batch 1, "
                f"{p['torch_threads']} threads"
            )

        lines.append(f"  generation, {gen['model'].get('kernel_summary') or 'kernels none'}:")
        lines.append(speed("model", gen["model"]))
        if gen.get("source"):
            lines.append(speed("source", gen["source"]))
            lines.append(
                f"  decode speed-up ×{gen['decode_speedup']:.2f}, prefill ×{gen['prefill_speedup']:.2f} vs the "
                "dense source"
            )
    return "\n".join(lines)
