"""Fused routed experts in a compressed-tensors export: one 2-D linear layer per expert matrix, as MoE
checkpoints store them and as vLLM and transformers read them.

transformers ≥ 5 holds a block's routed experts as ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``
(:mod:`lmcompress.calibration.experts`). Checkpoints on the Hub, and the compressed-tensors checkpoints that
llm-compressor writes, keep each expert's three matrices under their own names (Mixtral
``block_sparse_moe.experts.E.w1 / w3 / w2``; Qwen2/3-MoE, OLMoE and DeepSeek ``mlp.experts.E.gate_proj /
up_proj / down_proj``), each with its own ``weight_packed``, ``weight_scale``, ``weight_shape``. transformers'
loader merges them back into the fused parameters (its conversion mapping), dequantizing each expert first;
vLLM's fused-MoE layer reads them expert by expert.

:func:`unfuse_experts` replaces every fused-expert module of a model by :class:`UnfusedExperts`, whose
``nn.Linear`` layers hold the experts' matrices (``gate_up_proj[e]`` split row-wise into ``gate = rows[:I]``,
``up = rows[I:]``, ``down = down_proj[e]``), so that compressed-tensors packs them like any linear layer and
``save_pretrained`` writes them under the checkpoint's names. The model is then for saving only: an
``UnfusedExperts`` has no forward.
"""

from __future__ import annotations

from torch import nn

from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.models.families import get_blocks
from lmcompress.models.layouts import FUSED_EXPERTS, expert_checkpoint_names, find_fused_experts

# A compressed-tensors target for every expert linear: the names written here and vLLM's (which matches a
# fused-MoE layer's scheme by ``<layer>.experts.0.gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral too).
# transformers picks the experts' scheme as the config group whose ``re:`` target mentions ``experts``.
EXPERTS_TARGET = r"re:.*\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)$"


class UnfusedExperts(nn.ModuleList):
    """The routed experts of one fused-expert module as ``E`` modules of three ``nn.Linear`` (for saving)."""

    def __init__(self, fused: nn.Module, names: tuple[str, str, str]) -> None:
        gate_up, down = (getattr(fused, p).detach() for p in FUSED_EXPERTS)
        i = gate_up.shape[1] // 2
        experts = []
        for e in range(gate_up.shape[0]):
            expert = nn.Module()
            for name, matrix in zip(names, (gate_up[e, :i], gate_up[e, i:], down[e]), strict=True):
                linear = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False, device="meta")
                linear.weight = nn.Parameter(matrix.clone(), requires_grad=False)
                setattr(expert, name, linear)
            experts.append(expert)
        super().__init__(experts)


def expert_rows(q: QuantizedTensor, experts: int) -> list[QuantizedTensor]:
    """A fused parameter's stacked codes ``[E·rows, in]`` as each expert's ``[rows, in]``."""
    rows = q.codes.shape[0] // experts
    return [q.rows(e * rows, (e + 1) * rows) for e in range(experts)]


def fused_parameters(model: nn.Module) -> list[str]:
    """The names of ``model``'s fused routed-expert parameters (``...experts.gate_up_proj`` / ``down_proj``)."""
    prefix = {id(b): n for n, b in model.named_modules()}
    return [
        f"{prefix[id(block)]}.{path}.{param}"
        for block in get_blocks(model)
        for path in find_fused_experts(block)
        for param in FUSED_EXPERTS
    ]


def unfuse_experts(
    model: nn.Module, quantized: dict[str, QuantizedTensor]
) -> dict[str, tuple[nn.Linear, QuantizedTensor]]:
    """Replace every fused-expert module of ``model`` by :class:`UnfusedExperts` (in place).

    ``quantized``: the fused parameters' stacked codes by parameter name (``...experts.gate_up_proj``). Returns
    the expert linears that are quantized, by module name, each with its own rows of the codes (gate: the
    first ``I`` rows of ``gate_up_proj[e]``, up: the next ``I``); the others are written dense."""
    names = expert_checkpoint_names(model.config)
    prefix = {id(b): n for n, b in model.named_modules()}
    layers: dict[str, tuple[nn.Linear, QuantizedTensor]] = {}
    for block in get_blocks(model):
        for path, fused in find_fused_experts(block).items():
            full = f"{prefix[id(block)]}.{path}"
            n, two_i, _ = fused.gate_up_proj.shape
            i = two_i // 2
            unfused = UnfusedExperts(fused, names)
            parent, _, leaf = full.rpartition(".")
            setattr(model.get_submodule(parent), leaf, unfused)
            for param in FUSED_EXPERTS:
                q = quantized.get(f"{full}.{param}")
                if q is None:
                    continue
                for e, qe in enumerate(expert_rows(q, n)):
                    parts = (qe.rows(0, i), qe.rows(i, 2 * i)) if param == "gate_up_proj" else (qe,)
                    leaves = names[:2] if param == "gate_up_proj" else names[2:]
                    for leaf_name, part in zip(leaves, parts, strict=True):
                        layers[f"{full}.{e}.{leaf_name}"] = (getattr(unfused[e], leaf_name), part)
    return layers
