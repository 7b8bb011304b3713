"""Depth pruning: remove whole decoder blocks, or skip the attention or FFN sublayer of some blocks.

Which ones is decided by their *influence* on the residual stream, measured on the calibration windows of the
unchanged model (ShortGPT's block influence): for a map ``x ↦ y`` of the hidden states,

    influence = 1 − mean over calibration tokens t of cos(x_t, y_t),

so a block (or sublayer) that barely turns the hidden state of any token scores near 0 and is removed first.
For a block, ``x`` is its input and ``y`` its output. For the sublayers of a sequential block
(``h' = h + f_attn(h)``, ``out = h' + f_ffn(h')``), the attention's influence compares ``h`` with ``h'`` and the
FFN's compares ``h'`` with ``out``; ``h'`` is the block's output with its FFN skipped.

Removed blocks leave the model (``nn.ModuleList`` shortened, the remaining blocks renumbered, per-layer config
fields kept consistent by :mod:`lmcompress.models.depth`), so plain ``from_pretrained`` loads the result and the
KV cache works in ``generate``. A skipped sublayer is replaced by :class:`~lmcompress.models.surgery.SkippedSublayer`
(output zero: the residual passes through) and recorded as surgery, so ``lmcompress.load`` rebuilds it; its weights
are not stored.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.calibration.engine import BlockInputs, call_block, walk_blocks
from lmcompress.errors import UserError
from lmcompress.models.depth import depth_layout, layer_count_key, renumbered_fields, sublayer_path
from lmcompress.models.families import blocks_path, get_blocks
from lmcompress.models.params import count_params
from lmcompress.models.surgery import SkippedSublayer, record_skip

TARGETS = ("blocks", "sublayers")
CRITERIA = ("cosine", "search")
SUBLAYERS = ("attention", "ffn")


@dataclass
class DepthConfig:
    """What to remove: ``count`` whole blocks (``target="blocks"``), or the ``attention`` / ``ffn`` sublayers of
    that many blocks each (``target="sublayers"``), the least influential ones by ``criterion``: ``cosine``
    (the ranking of the module docstring) or ``search`` (blocks only: up to ``swap_scans`` single-swap descents
    and then ``generations`` generations of ``offspring`` candidates from the ranking's drop set, scored by KL
    on ``fitness_windows`` calibration windows; :mod:`lmcompress.search.depth`)."""

    target: str = "blocks"
    count: int = 0
    attention: int = 0
    ffn: int = 0
    criterion: str = "cosine"
    generations: int = 20
    offspring: int = 16
    fitness_windows: int = 8
    seed: int = 0
    swap_scans: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def needs_calibration(self) -> bool:
        return True

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise UserError(f"unknown depth target {self.target!r}: choose blocks or sublayers", param="target")
        if self.criterion not in CRITERIA:
            raise UserError(f"unknown criterion {self.criterion!r}: choose {', '.join(CRITERIA)}", param="criterion")
        if self.criterion == "search" and self.target != "blocks":
            raise UserError("criterion search chooses whole blocks; sublayers take criterion cosine", param="criterion")
        for name in ("generations", "offspring", "fitness_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a whole number ≥ 1, got {value!r}", param=name)
        for name in ("count", "attention", "ffn", "swap_scans"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name} must be a whole number ≥ 0, got {value!r}", param=name)
        if self.target == "blocks":
            if self.count < 1:
                raise UserError(f"count must be at least 1 (blocks to remove), got {self.count}", param="count")
            if self.attention or self.ffn:
                raise UserError("attention / ffn counts are for sublayers, not blocks", param=("attention", "ffn"))
        else:
            if self.count:
                raise UserError("count is for whole blocks; sublayers take attention and ffn", param="count")
            if self.attention + self.ffn < 1:
                raise UserError(
                    "nothing to skip: give attention K and/or ffn K (sublayers to skip, each ≥ 1)",
                    param=("attention", "ffn"),
                )

    def check_model(self, config) -> None:
        """Refuse, before any weights are loaded, what ``config``'s model cannot do."""
        depth_layout(config)
        n = getattr(config, layer_count_key(config))
        if self.target == "blocks":
            if self.count >= n:
                raise UserError(
                    f"count {self.count} would remove all {n} blocks of the model (or more): at least one must "
                    f"remain; use a count of at most {n - 1}",
                    param="count",
                )
            renumbered_fields(config, list(range(n - self.count)))  # fields that cannot stay consistent: refused now
            return
        for sublayer in SUBLAYERS:
            k = getattr(self, sublayer)
            if not k:
                continue
            sublayer_path(config, sublayer)
            if k > n:
                raise UserError(f"{sublayer} {k} exceeds the model's {n} blocks", param=sublayer)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DepthReport:
    config: dict
    scores: dict[str, list[float]]  # "block" or "attention" / "ffn" → influence of every block's part, in order
    removed: dict[str, list[int]]  # "blocks" or "attention" / "ffn" → the original block indices removed / skipped
    blocks_before: int
    blocks_after: int
    config_fields: dict = field(default_factory=dict)  # config fields rewritten for the kept blocks
    surgery: list[dict] = field(default_factory=list)  # skipped sublayers, for lmcompress.load
    params_before: int = 0
    params_after: int = 0
    wall_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    search: dict | None = None  # criterion search: KL of the ranking's drop set and of the result, per generation

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe_fields(self) -> dict:
        return {
            **self.config,
            "scores": self.scores,
            "removed": self.removed,
            "blocks_before": self.blocks_before,
            "blocks_after": self.blocks_after,
            "config_fields": self.config_fields,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "surgery": self.surgery,
            **({"search": self.search} if self.search else {}),
        }


# --------------------------------------------------------------------------------------------------- influence


def _parent(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return (block.get_submodule(parent) if parent else block), attr


def skip_sublayer(block: nn.Module, path: str, sublayer: str) -> nn.Module:
    """Replace the sublayer at ``path`` (inside ``block``) by a :class:`SkippedSublayer`; returns the old module."""
    parent, attr = _parent(block, path)
    old = getattr(parent, attr)
    setattr(parent, attr, SkippedSublayer(sublayer, getattr(old, "layer_idx", None)))
    return old


@contextmanager
def _skipped(block: nn.Module, path: str, sublayer: str):
    old = skip_sublayer(block, path, sublayer)
    try:
        yield
    finally:
        parent, attr = _parent(block, path)
        setattr(parent, attr, old)


def _one_minus_cos(x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ over tokens of 1 − cos(x_t, y_t) (float64 sum)."""
    return float((1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum())


@torch.no_grad()
def influence_scores(
    model: nn.Module, calib: torch.Tensor, device: str | torch.device, *, sublayers: bool, progress: bool = True
) -> dict[str, list[float]]:
    """Every block's influence (``{"block": [...]}``), or its attention's and FFN's
    (``{"attention": [...], "ffn": [...]}``), on the calibration windows ``calib`` of the unchanged model."""
    names = SUBLAYERS if sublayers else ("block",)
    ffn_path = sublayer_path(model.config, "ffn") if sublayers else None
    scores: dict[str, list[float]] = {k: [] for k in names}

    def visit(_i: int, block: nn.Module, inputs: BlockInputs) -> bool:
        sums = dict.fromkeys(names, 0.0)
        tokens = 0
        step = max(1, inputs.batch)
        for j in range(0, inputs.hidden.shape[0], step):
            h = inputs.hidden[j : j + step]
            if sublayers:
                with _skipped(block, ffn_path, "ffn"):
                    mid = call_block(block, h, inputs)
            out = call_block(block, h, inputs)
            if sublayers:
                sums["attention"] += _one_minus_cos(h, mid)
                sums["ffn"] += _one_minus_cos(mid, out)
            else:
                sums["block"] += _one_minus_cos(h, out)
            tokens += h.shape[0] * h.shape[1]
            inputs.hidden[j : j + step] = out
        for k in names:
            scores[k].append(sums[k] / tokens)
        return True  # the outputs are written over the inputs already

    walk_blocks(model, calib, torch.device(device), visit, desc="influence", progress=progress, last_outputs=False)
    return scores


def least_influential(scores: list[float], k: int) -> list[int]:
    """The indices of the ``k`` smallest scores (ties: the earlier block), ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k])


# ------------------------------------------------------------------------------------------------------ surgery


def remove_blocks(model: nn.Module, drop: list[int]) -> dict[str, object]:
    """Remove the blocks ``drop`` from ``model`` in place; returns the config fields rewritten.

    The remaining blocks are renumbered (every ``layer_idx`` attribute inside them, which the KV cache is indexed
    by) and per-layer config fields are kept consistent (:func:`lmcompress.models.depth.renumbered_fields`).
    """
    blocks = get_blocks(model)
    n = len(blocks)
    if not drop or len(set(drop)) >= n or any(not 0 <= i < n for i in drop):
        raise UserError(f"cannot remove blocks {sorted(drop)} of {n}: give 1 to {n - 1} indices in 0..{n - 1}")
    keep = [i for i in range(n) if i not in set(drop)]
    fields = renumbered_fields(model.config, keep)
    kept = nn.ModuleList([blocks[i] for i in keep])
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    path = blocks_path(model)
    parent_path, _, attr = path.rpartition(".")
    parent = operator.attrgetter(parent_path)(model) if parent_path else model
    setattr(parent, attr, kept)
    for key, value in fields.items():
        setattr(model.config, key, value)
    return fields


def skip_sublayers(model: nn.Module, skip: dict[str, list[int]]) -> list[dict]:
    """Replace the sublayers ``skip`` (``"attention"`` / ``"ffn"`` → block indices) by :class:`SkippedSublayer`
    in place; returns their surgery records."""
    prefix = blocks_path(model)
    blocks = get_blocks(model)
    records = []
    for sublayer, indices in skip.items():
        path = sublayer_path(model.config, sublayer)
        for i in indices:
            skip_sublayer(blocks[i], path, sublayer)
            name = f"{prefix}.{i}.{path}"
            records.append(record_skip(name, model.get_submodule(name)))
    return records


# ------------------------------------------------------------------------------------------------------- driver


def depth_prune(
    model: nn.Module,
    config: DepthConfig,
    calib: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    choose: Callable | None = None,
) -> DepthReport:
    """Remove the least influential blocks, or skip the least influential sublayers, of ``model`` in place.

    ``choose(model, ranking_drop, calib, device, progress) → (drop, info)`` picks the blocks with criterion
    ``search`` (:func:`lmcompress.search.depth.drop_chooser`; ``lmcompress.jobs`` passes it)."""
    start = time.perf_counter()
    config.validate()
    config.check_model(model.config)
    if calib is None or calib.numel() == 0:
        raise UserError("depth pruning scores blocks on calibration data: give calibration windows")
    model.eval()
    n = len(get_blocks(model))
    params_before = count_params(model)
    sublayers = config.target == "sublayers"
    scores = influence_scores(model, calib, device, sublayers=sublayers, progress=progress)
    fields: dict = {}
    surgery: list[dict] = []
    notes: list[str] = []
    search: dict | None = None
    if sublayers:
        removed = {s: least_influential(scores[s], getattr(config, s)) for s in SUBLAYERS if getattr(config, s)}
        both = sorted(set(removed.get("attention", [])) & set(removed.get("ffn", [])))
        if both:
            notes.append(
                f"blocks {both} lose both sublayers: they pass their input through (shrink blocks removes them)"
            )
        surgery = skip_sublayers(model, removed)
    else:
        removed = {"blocks": least_influential(scores["block"], config.count)}
        if config.criterion == "search":
            if choose is None:
                raise UserError("criterion search needs the search engine: run it through lmcompress.jobs")
            drop, search = choose(model, removed["blocks"], calib, device, progress)
            removed = {"blocks": sorted(drop), "ranking": removed["blocks"]}
        fields = remove_blocks(model, removed["blocks"])
    return DepthReport(
        config=config.to_dict(),
        scores=scores,
        removed=removed,
        blocks_before=n,
        blocks_after=len(get_blocks(model)),
        config_fields=fields,
        surgery=surgery,
        params_before=params_before,
        params_after=count_params(model),
        wall_time_s=time.perf_counter() - start,
        notes=notes,
        search=search,
    )
