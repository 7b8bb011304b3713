"""2:4 semi-structured sparsity on CUDA (``torch.sparse.to_sparse_semi_structured``); optional, guarded.

There is no CPU kernel for sparse weights in PyTorch that beats a dense matmul at these sizes, so on CPU
pruned weights (unstructured or N:M) run as dense matrices with zeros. On a CUDA GPU of compute
capability 8.0 or newer, float16/bfloat16 ``nn.Linear`` weights that are exactly 2:4 sparse along their inputs
can be stored compressed and multiplied by the sparse tensor cores; nothing here is needed without a GPU.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of each row holds at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(-1) <= 2).all())


def sparsify_semi_structured(model: nn.Module) -> dict[str, str]:
    """Swap the weights of 2:4-sparse ``nn.Linear`` layers of a CUDA fp16/bf16 ``model`` for semi-structured
    sparse tensors, in place. Returns ``{module name: "2:4 sparse" | why not}`` (empty off CUDA)."""
    out: dict[str, str] = {}
    if not torch.cuda.is_available():
        return out
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:
        return out
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cuda":
            continue
        w = module.weight.data
        if not is_two_four(w):
            continue
        if w.dtype not in (torch.float16, torch.bfloat16):
            out[name] = f"2:4 weight in {w.dtype}: the sparse kernels take float16/bfloat16"
            continue
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            out[name] = "2:4 sparse"
        except Exception as exc:  # shapes or GPUs the sparse kernels refuse
            out[name] = f"2:4 kept dense: {str(exc).splitlines()[0][:120]}"
    if out:
        log.info("2:4 semi-structured: %d of %d layers", sum(v == "2:4 sparse" for v in out.values()), len(out))
    return out
