"""Routed experts as layers: per-expert views of fused 3-D expert tensors, and their routed statistics.

transformers ≥ 5 stores the routed experts of a mixture-of-experts block (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V2/V3) as two fused parameters of one module, ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``, called as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.
Expert ``e`` is two linear layers, ``gate_up_proj[e]`` (``[2I, H]``, reading the token) and ``down_proj[e]``
(``[H, I]``, reading ``act(gate) · up``); :class:`ExpertSlice` makes each a layer the layer-wise solvers (GPTQ,
SparseGPT, Wanda, RTN, magnitude) handle like an ``nn.Linear``, writing into the fused parameter in place.

Statistics (:func:`collect_expert_stats`): expert ``e`` sees only the ``n_e`` calibration tokens routed to it,
each scaled by ``g_{t,e}``, the weight the block gives the expert's output on token ``t`` (the top-k routing
weight, renormalized where the family renormalizes):

    H_e = (2 / n_e) Σ_{t → e} g_{t,e}² x_t x_tᵀ,    ‖x_j‖²_e = Σ_{t → e} g_{t,e}² x_{t,j}²

The block's output is ``Σ_e g_{t,e} f_e(x_t)``, so a change ``ΔW`` of ``down_proj[e]`` changes it by
``g_{t,e} ΔW h_t``: ``H_e`` is, up to the factor ``1 / n_e``, the Hessian of the block's squared output error
in that expert's weights (and, to first order, the gate/up error reaches the output through the same factor
``g_{t,e}``). An expert the router barely uses on a token matters to the output that much less. Tokens are
counted unweighted (``n_e``); the solvers are invariant to the Hessian's overall scale.

An expert that no calibration token reaches is solved with white-input statistics (``H = 2I``,
``‖x_j‖ = 1``): GPTQ then rounds to nearest, Wanda prunes by magnitude per row, SparseGPT by magnitude per
column block. Experts with fewer routed tokens than inputs (a singular ``X Xᵀ``) are solved from what they
have plus the solver's damping; both kinds are named in the run's report (:func:`scarce_experts`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from lmcompress.algorithms.quant import QuantizedTensor
from lmcompress.calibration.distributed import new_input_stats, reduce_stats, spread
from lmcompress.calibration.engine import BlockInputs, run_windows
from lmcompress.calibration.stats import InputStats
from lmcompress.models.families import get_blocks
from lmcompress.models.layouts import FUSED_EXPERTS, find_fused_experts

R = TypeVar("R")
log = logging.getLogger(__name__)

FUSED = FUSED_EXPERTS  # the fused parameters, in the order a token goes through them
WEIGHTING = "H_e = 2/n_e · Σ_t g_te² x_t x_tᵀ over the tokens routed to e (g: the block's routing weight)"


class _Stop(Exception):
    """Raised from the experts' pre-hook once their statistics are in: the rest of the block is not needed."""


class ExpertSlice(nn.Module):
    """One expert's matrix of a fused 3-D expert parameter as a layer: ``weight`` is the view ``param[e]``
    (``[out, in]``), so writing it (``models.families.set_weight_matrix``) writes the fused parameter."""

    def __init__(self, param: torch.Tensor, expert: int) -> None:
        super().__init__()
        self.weight = param.data[expert]  # a view, not a Parameter: the fused parameter stays the model's
        self.expert = expert

    def extra_repr(self) -> str:
        return f"expert={self.expert}, shape={tuple(self.weight.shape)}"


def model_has_fused_experts(model: nn.Module) -> bool:
    """True when some block of ``model`` holds routed experts as fused 3-D parameters."""
    return any(find_fused_experts(b) for b in get_blocks(model))


def unsupported_experts(block: nn.Module) -> list[str]:
    """Paths of 3-D parameters in ``block`` that are not in a fused-expert layout this module handles."""
    fused = {id(getattr(m, n)) for m in find_fused_experts(block).values() for n in FUSED}
    return [n for n, p in block.named_parameters() if p.dim() == 3 and id(p) not in fused]


def expert_name(path: str, param: str, expert: int) -> str:
    """The layer name of expert ``expert``'s matrix ``param`` of the fused module at ``path``."""
    return f"{path}.{param}.{expert}" if path else f"{param}.{expert}"


def expert_layers(block: nn.Module, fused: dict[str, nn.Module] | None = None) -> dict[str, ExpertSlice]:
    """Every routed expert's two matrices as :class:`ExpertSlice` layers, by :func:`expert_name`."""
    fused = find_fused_experts(block) if fused is None else fused
    out: dict[str, ExpertSlice] = {}
    for path, module in fused.items():
        for param in FUSED:
            tensor = getattr(module, param)
            for e in range(tensor.shape[0]):
                out[expert_name(path, param, e)] = ExpertSlice(tensor, e)
    return out


def _expert_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]) :]]
    return values[0], values[1], values[2]


@dataclass
class RoutedStats:
    """One fused module's routed statistics: per expert, those of ``gate_up_proj`` and ``down_proj`` inputs."""

    gate_up: list[InputStats | None]
    down: list[InputStats | None]
    tokens: list[int] = field(default_factory=list)  # tokens routed to each expert (counted in the gate/up pass)

    def add(self, module: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one call's tokens ``x`` ``[T, H]`` routed by ``index`` / ``weights`` ``[T, k]``."""
        for e in torch.unique(index).tolist():
            if not 0 <= e < len(self.tokens):
                continue  # an index past the experts (a dropped expert's slot): nobody computes it
            rows, slot = torch.where(index == e)
            xe = x[rows]
            g = weights[rows, slot].float().unsqueeze(1)
            self.tokens[e] += int(rows.numel())
            if self.gate_up[e] is not None:
                self.gate_up[e].add(g * xe.float())
            if self.down[e] is not None:  # what down_proj[e] reads, computed as the module computes it
                gate, up = nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
                self.down[e].add(g * (module.act_fn(gate) * up).float())


@torch.no_grad()
def collect_expert_stats(
    block: nn.Module,
    inputs: BlockInputs,
    fused: dict[str, nn.Module],
    *,
    gate_up: bool,
    down: bool,
    hessian: bool,
) -> dict[str, RoutedStats]:
    """Run every calibration window through ``block`` and gather each fused module's :class:`RoutedStats`
    (``gate_up`` / ``down``: which matrices'; ``hessian``: ``Σ x xᵀ`` too). The experts' own computation is
    skipped (a pre-hook reads the routing they are called with and stops the block there)."""
    device = inputs.hidden.device
    stats: dict[str, RoutedStats] = {}
    for path, m in fused.items():
        n, two_i, h = m.gate_up_proj.shape
        stats[path] = RoutedStats(
            [new_input_stats(h, device, hessian) if gate_up else None for _ in range(n)],
            [new_input_stats(two_i // 2, device, hessian) if down else None for _ in range(n)],
            [0] * n,
        )
    fired: set[str] = set()

    def hook(path: str):
        def fn(module, args, kwargs):
            x, index, weights = _expert_call(args, kwargs)
            stats[path].add(module, x.detach(), index, weights)
            fired.add(path)
            if len(fired) == len(fused):
                raise _Stop

        return fn

    handles = [m.register_forward_pre_hook(hook(p), with_kwargs=True) for p, m in fused.items()]
    try:
        run_windows(block, inputs, fired, _Stop)
    finally:
        for h in handles:
            h.remove()
    flat = {
        f"{p}.{k}.{e}": s
        for p, r in stats.items()
        for k, per in (("gate_up", r.gate_up), ("down", r.down))
        for e, s in enumerate(per)
        if s is not None
    }
    reduce_stats(flat)  # under torch.distributed: every rank's windows (token counts summed)
    for r in stats.values():
        per = r.gate_up if gate_up else r.down
        r.tokens = [s.tokens for s in per]
    return stats


def white_stats(in_features: int, device: torch.device, hessian: bool) -> InputStats:
    """Statistics of white inputs (``Σ x xᵀ = I``, ``Σ x² = 1``, one token): what an expert no token reached
    is solved from. GPTQ then rounds to nearest; SparseGPT and Wanda prune by magnitude."""
    s = InputStats(in_features, device, hessian=False)
    s.tokens = 1
    s.sq_sum = torch.ones(in_features, dtype=torch.float32, device=device)
    if hessian:
        s.xtx = torch.eye(in_features, dtype=torch.float32, device=device)
    return s


def scarce_experts(tokens: dict[str, int], widths: dict[str, int]) -> dict[str, int]:
    """The experts (by layer name) that saw fewer routed tokens than they have inputs, with their counts."""
    return {n: t for n, t in tokens.items() if t < widths[n]}


def note_tokens(
    expert_tokens: dict[str, list[int]],
    few_tokens: dict[str, int],
    param: str,
    names: list[str],
    layers: list[nn.Module],
    tokens: list[int] | None,
) -> None:
    """Record in a run's report the routed tokens of the experts ``names`` (full layer names, ``layers`` their
    :class:`ExpertSlice`) of the fused parameter ``param``, and name (and log) those with fewer than inputs."""
    if tokens is None:
        return
    expert_tokens[param] = tokens
    widths = {n: m.weight.shape[1] for n, m in zip(names, layers, strict=True)}
    few = scarce_experts(dict(zip(names, tokens, strict=True)), widths)
    if few:
        least = min(few, key=few.get)
        log.info(
            "%d experts of %s saw fewer routed tokens than inputs (fewest: %s, %d)", len(few), param, least, few[least]
        )
    few_tokens.update(few)


def warn_few_tokens(few_tokens: dict[str, int], fallback: str) -> None:
    """One warning for a whole run naming how many experts saw fewer routed tokens than inputs, and how many
    none (those were solved by ``fallback``); the names are in the report's ``experts_few_tokens``."""
    if few_tokens:
        none = sum(1 for t in few_tokens.values() if t == 0)
        log.warning(
            "%d expert matrices saw fewer routed calibration tokens than inputs (solved with damping), %d saw none "
            "(solved by %s); their names are in the recipe's experts_few_tokens — more calibration data helps",
            len(few_tokens), none, fallback,
        )  # fmt: skip


def compress_experts(
    block: nn.Module,
    inputs: BlockInputs | None,
    layers: dict[str, nn.Module],
    solve: Callable[[list[str], InputStats | None], R],
    apply: Callable[[list[str], R], None],
    cost: Callable[[list[str]], float],
    *,
    hessian: bool,
    in_block: str,
) -> dict[str, int]:
    """Compress every routed expert of ``block``'s fused modules, each matrix its own group (``layers`` holds
    the :class:`ExpertSlice` views by :func:`expert_name`). Returns the tokens routed to each expert matrix.

    Without ``inputs`` (RTN, magnitude) each is solved from its weights (``stats`` None). With them, the
    statistics are the routed ones (module docstring). ``in_block="sequential"``: every ``gate_up_proj`` is
    solved first, then a second pass gives ``down_proj`` the inputs of the compressed gate/up; ``"parallel"``:
    both from one pass through the unchanged experts.
    """
    fused = find_fused_experts(block)
    names = {
        param: [expert_name(p, param, e) for p, m in fused.items() for e in range(getattr(m, param).shape[0])]
        for param in FUSED
    }
    if inputs is None:
        for param in FUSED:
            groups = [[n] for n in names[param]]
            for group, result in zip(groups, spread(groups, lambda g: solve(g, None), cost), strict=True):
                apply(group, result)
        return {}
    tokens: dict[str, int] = {}
    passes = [FUSED] if in_block == "parallel" else [(p,) for p in FUSED]
    for wanted in passes:
        stats = collect_expert_stats(
            block, inputs, fused, gate_up="gate_up_proj" in wanted, down="down_proj" in wanted, hessian=hessian
        )
        held: dict[str, InputStats] = {}
        for path, r in stats.items():
            for param, per in (("gate_up_proj", r.gate_up), ("down_proj", r.down)):
                if param not in wanted:
                    continue
                for e, s in enumerate(per):
                    name = expert_name(path, param, e)
                    tokens[name] = s.tokens
                    held[name] = s if s.tokens else white_stats(s.sq_sum.shape[0], s.sq_sum.device, hessian)
        for param in wanted:
            groups = [[n] for n in names[param]]
            results = spread(groups, lambda g, held=held: solve(g, held.pop(g[0])), cost)
            for group, result in zip(groups, results, strict=True):
                apply(group, result)
    return tokens


def stack_quantized(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """The experts' quantized matrices as one ``[E·rows, in]`` tensor (rows stacked in expert order): how a
    fused 3-D parameter's codes are kept and stored. They must share a grid and group index."""
    first = parts[0]
    for q in parts[1:]:
        if q.spec != first.spec:
            raise ValueError(f"experts quantized on different grids ({first.spec} and {q.spec}) cannot be stacked")
        if not torch.equal(q.group_index().cpu(), first.group_index().cpu()):
            raise ValueError("experts with different act-order group indices cannot be stacked")
    return QuantizedTensor(
        torch.cat([q.codes for q in parts]),
        torch.cat([q.scale for q in parts]),
        torch.cat([q.zero for q in parts]),
        first.spec,
        first.g_idx,
    )
