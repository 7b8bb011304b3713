"""Where a per-input-channel scale can be folded, per family: the table SmoothQuant and AWQ use.

A *smoothing group* is a set of linear layers that read one input ``X`` plus the module that produces ``X``
(its *source*): a norm (``X = norm(h)``, affine in its weight and bias) or a linear layer whose output rows
reach the group unchanged (``v_proj`` → ``o_proj`` through the attention's weighted sum; ``up_proj`` →
``down_proj`` through the elementwise ``act(gate) · up``). :func:`fold_scales` multiplies the group's input
columns by ``s`` and divides the source's outputs by ``s`` (a norm's weight and bias, or a linear layer's
output rows and bias), so the block computes the same function; a nonlinearity between two layers (GELU
after ``fc1``) or a norm outside this table rules a fold out, and such layers are simply not in a group.

:data:`SMOOTHING` holds the groups of each family, paths relative to a block (``families.get_blocks``).
A linear source with ``rows`` feeds its group only some of its output rows (fused ``[q; k; v]`` or
``[gate; up]``). With grouped-query attention one value row feeds the ``o_proj`` input of every query head
that shares its KV head (``heads``): those inputs must share one scale, so their statistics are tied
(:meth:`Group.tie`) before the scales are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.algorithms.awq import AwqResult, Quantizer, awq_search
from lmcompress.algorithms.smoothquant import ChannelStats, search_grid, smoothing_scales, weight_absmax
from lmcompress.errors import UserError
from lmcompress.models.families import blocks_path, get_blocks, weight_matrix
from lmcompress.models.layouts import head_shape

Rows = Callable[[object], torch.Tensor]  # config → indices of the source's output rows that feed the group
Search = Callable[[Callable[[float], float], Sequence[float] | int], tuple[float, dict[float, float]]]


@dataclass(frozen=True)
class GroupSpec:
    source: str  # a norm, or a linear layer whose output rows (all, or ``rows``) are the group's input
    targets: tuple[str, ...]  # the linear layers reading that input
    rows: Rows | None = None
    heads: bool = False  # the targets read the query heads' outputs; the source rows are per KV head


def _last_third(config) -> torch.Tensor:  # GPT-2's c_attn: [q; k; v], each hidden_size rows
    return torch.arange(2 * config.hidden_size, 3 * config.hidden_size)


def _second_half(config) -> torch.Tensor:  # Phi-3's gate_up_proj: [gate; up]
    return torch.arange(config.intermediate_size, 2 * config.intermediate_size)


def _fused_v(config) -> torch.Tensor:  # Phi-3's qkv_proj: [q (heads·d); k (kv·d); v (kv·d)]
    shape = head_shape(config)
    start = (shape.heads + shape.kv_heads) * shape.head_dim
    return torch.arange(start, start + shape.kv_heads * shape.head_dim)


def _neox_v(config) -> torch.Tensor:  # GPT-NeoX's query_key_value: per head [q; k; v] of head_dim rows each
    shape = head_shape(config)
    d = shape.head_dim
    return torch.cat([torch.arange(h * 3 * d + 2 * d, h * 3 * d + 3 * d) for h in range(shape.heads)])


_LLAMA = (
    GroupSpec("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    GroupSpec("self_attn.v_proj", ("self_attn.o_proj",), heads=True),
    GroupSpec("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    GroupSpec("mlp.up_proj", ("mlp.down_proj",)),
)

SMOOTHING: dict[str, tuple[GroupSpec, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi": (  # parallel attention and MLP read the same input_layernorm
        GroupSpec("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),
        GroupSpec("self_attn.v_proj", ("self_attn.dense",), heads=True),
    ),
    "phi3": (
        GroupSpec("input_layernorm", ("self_attn.qkv_proj",)),
        GroupSpec("self_attn.qkv_proj", ("self_attn.o_proj",), _fused_v, heads=True),
        GroupSpec("post_attention_layernorm", ("mlp.gate_up_proj",)),
        GroupSpec("mlp.gate_up_proj", ("mlp.down_proj",), _second_half),
    ),
    "opt": (  # pre-LN only (do_layer_norm_before); see smoothing_groups
        GroupSpec("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        GroupSpec("self_attn.v_proj", ("self_attn.out_proj",)),
        GroupSpec("final_layer_norm", ("fc1",)),
    ),
    "gpt2": (
        GroupSpec("ln_1", ("attn.c_attn",)),
        GroupSpec("attn.c_attn", ("attn.c_proj",), _last_third),
        GroupSpec("ln_2", ("mlp.c_fc",)),
    ),
    "gpt_neox": (
        GroupSpec("input_layernorm", ("attention.query_key_value",)),
        GroupSpec("attention.query_key_value", ("attention.dense",), _neox_v),
        GroupSpec("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
}


def smoothing_specs(config) -> tuple[GroupSpec, ...]:
    """The family's groups, or a UserError naming the families that have them."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SMOOTHING:
        routed = any(getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
        why = (
            " (a mixture-of-experts model: its post-attention norm feeds the router and every routed expert, and "
            "no scale search over the routed experts is implemented; quantize it without --awq / --smoothquant)"
            if routed
            else ""
        )
        raise UserError(
            f"SmoothQuant / AWQ scale folding is not supported for {model_type!r} models{why}: lmcompress knows "
            f"where to fold the scales for {', '.join(sorted(SMOOTHING))}"
        )
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise UserError("SmoothQuant / AWQ need pre-LN OPT models; this one normalizes after each sublayer")
    return SMOOTHING[model_type]


@dataclass
class Group:
    """One smoothing group of a live model: the source module and the linear layers it feeds."""

    name: str  # full dotted path of the source, e.g. "model.layers.0.input_layernorm"
    source: nn.Module
    targets: dict[str, nn.Module]  # full dotted path → layer
    rows: torch.Tensor | None  # [in]: the source's output row feeding each target input (None: norm, one to one)

    @property
    def features(self) -> int:
        return weight_matrix(next(iter(self.targets.values()))).shape[1]

    def weights(self) -> list[torch.Tensor]:
        """The targets' weights as ``[out, in]`` views."""
        return [weight_matrix(m) for m in self.targets.values()]

    def tie(self, values: torch.Tensor, reduce: str = "amax") -> torch.Tensor:
        """Per-input ``values`` ([in]) reduced (``amax`` or ``mean``) over the inputs fed by one source row and
        spread back: inputs that share a row get one scale. Unchanged where every input has its own row."""
        if self.rows is None or self.rows.unique().numel() == self.rows.numel():
            return values
        rows = self.rows.to(values.device)
        out = torch.zeros(int(rows.max()) + 1, dtype=values.dtype, device=values.device)
        return out.scatter_reduce(0, rows, values, reduce, include_self=False)[rows]


def _is_linear_source(module: nn.Module) -> bool:
    return getattr(module, "weight", None) is not None and module.weight.dim() == 2


def _input_rows(spec: GroupSpec, source: nn.Module, features: int, config) -> torch.Tensor | None:
    """The source row feeding each of the ``features`` target inputs (see :class:`Group`); None for a norm."""
    if not _is_linear_source(source):
        return None
    rows = spec.rows(config) if spec.rows is not None else torch.arange(weight_matrix(source).shape[0])
    shape = head_shape(config) if spec.heads else None
    if shape is not None and rows.numel() == shape.kv_heads * shape.head_dim < features == shape.heads * shape.head_dim:
        j = torch.arange(
            features
        )  # query head h reads KV head h // group: input h·d + i ← value row (h // group)·d + i
        rows = rows[(j // shape.head_dim // shape.group) * shape.head_dim + j % shape.head_dim]
    return rows


def block_groups(block: nn.Module, config, prefix: str = "") -> list[Group]:
    """The smoothing groups of one block; a group whose source rows do not match its targets' inputs (heads
    removed by structured pruning, say) is left out."""
    dot = f"{prefix}." if prefix else ""
    groups = []
    for spec in smoothing_specs(config):
        targets = {f"{dot}{t}": block.get_submodule(t) for t in spec.targets}
        source = block.get_submodule(spec.source)
        widths = {weight_matrix(m).shape[1] for m in targets.values()}
        if len(widths) != 1:
            continue
        features = widths.pop()
        rows = _input_rows(spec, source, features, config)
        fits = rows is None or int(rows.max()) < weight_matrix(source).shape[0]
        if fits and (source.weight.numel() if rows is None else rows.numel()) == features:
            groups.append(Group(f"{dot}{spec.source}", source, targets, rows))
    return groups


def model_groups(model: nn.Module) -> list[Group]:
    """Every block's smoothing groups, in model order (names are full dotted paths)."""
    path = blocks_path(model)
    return [g for i, block in enumerate(get_blocks(model)) for g in block_groups(block, model.config, f"{path}.{i}")]


@torch.no_grad()
def fold_scales(group: Group, scales: torch.Tensor) -> None:
    """In place: the targets' input columns times ``s``, the source's outputs divided by ``s`` (``[in]``, > 0;
    equal on inputs that share a source row).

    The group's output is unchanged in exact arithmetic: ``(X · diag(s)⁻¹) · (W · diag(s))ᵀ = X · Wᵀ``.
    """
    s = scales.float().cpu()
    if s.shape != (group.features,) or not bool((s > 0).all()):
        raise ValueError(f"{group.name}: scales must be {group.features} positive numbers, got shape {tuple(s.shape)}")
    if not torch.allclose(group.tie(s, "amax"), s, rtol=1e-6, atol=0):
        raise ValueError(f"{group.name}: inputs fed by one source row need one scale (see Group.tie)")
    for w in group.weights():
        w.copy_((w.float() * s.to(w.device)).to(w.dtype))
    source = group.source
    if group.rows is not None:
        w = weight_matrix(source)
        per_row = torch.zeros(w.shape[0]).scatter_(0, group.rows, s)  # one value per row (they are equal)
        rows = group.rows.unique()
        div = per_row[rows].to(w.device)
        w[rows.to(w.device)] = (w[rows.to(w.device)].float() / div.unsqueeze(1)).to(w.dtype)
        if source.bias is not None:
            b = source.bias.data
            b[rows.to(b.device)] = (b[rows.to(b.device)].float() / div.to(b.device)).to(b.dtype)
        return
    for p in (source.weight, getattr(source, "bias", None)):
        if p is not None:
            p.data.copy_((p.data.float() / s.to(p.device)).to(p.dtype))


@contextmanager
def recorded_inputs(groups: list[Group], keep_tokens: int = 0) -> Iterator[dict[str, ChannelStats]]:
    """Within the ``with``, every forward adds each group's input to its :class:`ChannelStats` (by group name).

    The first ``keep_tokens`` input rows are kept too (``ChannelStats.samples``), for AWQ's search.
    """
    stats = {g.name: ChannelStats(g.features, keep_tokens) for g in groups}

    def hook(name: str):
        return lambda _module, args: stats[name].update(args[0])

    handles = [next(iter(g.targets.values())).register_forward_pre_hook(hook(g.name)) for g in groups]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextmanager
def restored(groups: list[Group]) -> Iterator[None]:
    """Within the ``with``, the groups' parameters may be changed (a trial fold); on exit they are put back."""
    params = {
        id(p): (p, p.data.clone()) for g in groups for m in (g.source, *g.targets.values()) for p in m.parameters()
    }
    try:
        yield
    finally:
        for p, saved in params.values():
            p.data.copy_(saved)


def smooth(groups: list[Group], stats: dict[str, ChannelStats], alpha: float) -> dict[str, torch.Tensor]:
    """SmoothQuant on each group with the activation maxima in ``stats``: the scales, folded in place."""
    scales = {
        g.name: smoothing_scales(g.tie(stats[g.name].absmax), g.tie(weight_absmax(g.weights())), alpha) for g in groups
    }
    for g in groups:
        fold_scales(g, scales[g.name])
    return scales


def search_smoothing(
    groups: list[Group],
    stats: dict[str, ChannelStats],
    loss: Callable[[], float],
    grid: Sequence[float] | int = 11,
    search: Search = search_grid,
) -> tuple[float, dict[float, float]]:
    """The α of ``grid`` whose smoothing of ``groups`` gives the lowest ``loss()`` (the caller quantizes and
    measures, e.g. a block's calibration KL), found by ``search`` (every point, or ``search_golden``); that α is
    then applied. Returns it and the loss of every α tried. The tied per-channel maxima of the activations and of
    the weights do not depend on α: they are taken once, and each trial only folds its scales (then restores)."""
    maxima = {g.name: (g.tie(stats[g.name].absmax), g.tie(weight_absmax(g.weights()))) for g in groups}

    def apply(alpha: float) -> None:
        for g in groups:
            fold_scales(g, smoothing_scales(*maxima[g.name], alpha))

    def trial(alpha: float) -> float:
        with restored(groups):
            apply(alpha)
            return loss()

    best, losses = search(trial, grid)
    apply(best)
    return best, losses


def awq(
    groups: list[Group], stats: dict[str, ChannelStats], quantize: Quantizer, grid: Sequence[float] | int = 21
) -> dict[str, AwqResult]:
    """AWQ's exponent search on each group's kept input rows (``stats[name].samples``), scales folded in place."""
    results = {}
    for g in groups:
        if stats[g.name].samples.shape[0] == 0:
            raise ValueError(f"{g.name}: no inputs kept; record with keep_tokens > 0")
        results[g.name] = awq_search(stats[g.name].samples, g.weights(), quantize, grid, tie=g.tie)
        fold_scales(g, results[g.name].scales)
    return results
