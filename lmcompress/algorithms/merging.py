"""Expert merging for mixture-of-experts layers (MC-SMoE, "Merge, Then Compress", Li et al., 2024).

Pure tensor functions over one MoE layer. Each expert is a gated FFN with ``I`` intermediate neurons,
``y = W_down · (act(W_gate x) ⊙ W_up x)``, stored as ``gate_up [2I, H]`` (gate rows, then up rows) and
``down [H, I]``. Intermediate neuron ``i`` is the triple (gate row ``i``, up row ``i``, down column ``i``);
permuting the neurons of an expert (the same permutation on all three) leaves its function unchanged.

* :func:`dominant_experts`: the ``keep`` experts the router picks most often (routing frequency);
* :func:`group_by_router`: every other expert joins the dominant expert whose router-logit column (its logits
  over the calibration tokens) has the highest cosine similarity with its own;
* :func:`match_neurons` / :func:`permute_neurons`: weight matching, a permutation of one expert's neurons that
  maximizes ``Σᵢ ⟨fᵢ, g_{π(i)}⟩`` (``f``, ``g``: the two experts' neuron features, gate row ‖ up row ‖ down
  column), solved exactly as a linear assignment problem (:func:`linear_assignment`, the Hungarian method in
  its shortest-augmenting-path form, O(I³); SciPy is not a dependency of lmcompress);
* :func:`weighted_average`: the group's (aligned) weights averaged with weights proportional to the routing
  frequency of each member;
* :func:`least_squares_down`: an optional refit of a merged expert's down projection on calibration tokens
  (not part of MC-SMoE; see ``transforms.merge``).
"""

from __future__ import annotations

import numpy as np
import torch

from lmcompress.algorithms.routing import select_keep


def dominant_experts(frequency: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted indices of the ``keep`` most frequently routed experts (ties: the lower index)."""
    return select_keep(frequency, keep)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` cosine similarity of the rows of ``a`` ``[A, n]`` and ``b`` ``[B, n]`` (0 for a zero row)."""
    a, b = a.double(), b.double()
    na = a.norm(dim=1, keepdim=True).clamp_min(1e-30)
    nb = b.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (a / na) @ (b / nb).T


def group_by_router(logits: torch.Tensor, dominant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every expert to a dominant expert by the similarity of their router logits.

    ``logits`` ``[tokens, E]``: the router's logits on the calibration tokens; column ``e`` is expert ``e``'s
    router-logit vector. Returns ``(group, similarity)``, both ``[E]``: ``group[e]`` is the dominant expert
    (an index into ``0..E-1``) that ``e`` merges into, the one of highest cosine similarity (ties: the lower
    index), and ``similarity[e]`` that cosine. Dominant experts are their own group (similarity 1).
    """
    columns = logits.T.double()
    dominant = dominant.cpu().long()
    sim = cosine_matrix(columns, columns[dominant])  # [E, K]
    best = sim.argmax(dim=1)  # argmax returns the first maximum: the lower dominant index on ties
    group = dominant[best]
    similarity = sim.gather(1, best[:, None]).squeeze(1)
    group[dominant] = dominant
    similarity[dominant] = 1.0
    return group, similarity.float()


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """``col`` with ``col[i]`` the column assigned to row ``i``: a permutation minimizing ``Σᵢ cost[i, col[i]]``.

    ``cost`` is square ``[n, n]``. The Hungarian method with potentials ``u`` (rows) and ``v`` (columns): each
    row in turn is added along a shortest augmenting path of reduced costs ``cost[i, j] − u[i] − v[j]`` (all
    ≥ 0 on the way), so the assignment found is optimal (Kuhn–Munkres; O(n³), each step vectorized over columns).
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != n:
        raise ValueError(f"linear_assignment needs a square cost matrix, got shape {cost.shape}")
    # 1-based as in the textbook form: column 0 is a virtual column holding the row being added
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    row_of = np.zeros(n + 1, dtype=np.int64)  # row_of[j]: the row assigned to column j (0: none)
    way = np.zeros(n + 1, dtype=np.int64)  # previous column on the shortest path
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used
            free[0] = False
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free[1:] & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free, minv, np.inf)
            j1 = int(np.argmin(masked))
            delta = masked[j1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # flip the path: every column on it takes the row of the column before it
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[row_of[1:] - 1] = np.arange(n)
    return col


def neuron_features(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``[I, 3H]``: each intermediate neuron's gate row, up row and down column, concatenated."""
    inter = down.shape[1]
    if gate_up.shape[0] != 2 * inter:
        raise ValueError(f"gate_up has {gate_up.shape[0]} rows; a gated FFN with {inter} neurons needs {2 * inter}")
    return torch.cat([gate_up[:inter], gate_up[inter:], down.T], dim=1)


def match_neurons(
    ref_gate_up: torch.Tensor, ref_down: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """The permutation ``π`` (``[I]``) that best aligns an expert's neurons with a reference expert's.

    Neuron ``π[i]`` of the expert is matched to neuron ``i`` of the reference: ``π`` maximizes
    ``Σᵢ ⟨f_ref,i, f_π(i)⟩`` over all permutations, with ``f`` the neuron features of :func:`neuron_features`
    (a linear assignment problem, solved exactly). Apply it with :func:`permute_neurons`.
    """
    ref = neuron_features(ref_gate_up, ref_down).double().cpu()
    other = neuron_features(gate_up, down).double().cpu()
    return torch.from_numpy(linear_assignment(-(ref @ other.T).numpy()))


def permute_neurons(gate_up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same expert with its neurons reordered: new neuron ``i`` is old neuron ``perm[i]`` (same function)."""
    inter = down.shape[1]
    perm = perm.to(gate_up.device)
    rows = torch.cat([perm, perm + inter])
    return gate_up.index_select(0, rows), down.index_select(1, perm)


def merge_weights(frequency: torch.Tensor) -> torch.Tensor:
    """Averaging weights of a group from its members' routing frequencies: ``fₑ / Σ f`` (uniform if all are 0)."""
    f = frequency.double().clamp_min(0)
    total = f.sum()
    return f / total if total > 0 else torch.full_like(f, 1.0 / f.numel())


def weighted_average(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``Σₑ wₑ Tₑ`` (computed in float64, returned in the tensors' dtype)."""
    if len(tensors) != weights.numel():
        raise ValueError(f"{len(tensors)} tensors but {weights.numel()} weights")
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights.tolist(), strict=True):
        out += w * t.double()
    return out.to(tensors[0].dtype)


def least_squares_down(z: torch.Tensor, target: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``D`` ``[H, I]`` minimizing ``Σₜ ‖targetₜ − D zₜ‖² + λ‖D‖²`` over rows ``z`` ``[n, I]``, ``target`` ``[n, H]``.

    ``D = (Σ target zᵀ)(Σ z zᵀ + λ I)⁻¹`` with ``λ = damp · mean(diag Σ z zᵀ)`` (Tikhonov damping, as GPTQ's; it
    keeps the solve defined when fewer rows than columns reach an expert). Computed in float64.
    """
    z, target = z.double(), target.double()
    gram = z.T @ z
    lam = damp * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, z.T @ target).T  # gram is symmetric: (Zᵀ Z + λI)⁻¹ Zᵀ T, transposed
