"""What a search keeps in its work folder between runs: the state of each trajectory after every generation, and
the dense weights that later database rounds start from. A killed search run again continues from them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmcompress.algorithms.evolution import SearchState
from lmcompress.checkpoint.folder import json_text, write_file_atomic, write_path_atomic
from lmcompress.models.families import prunable_layers, set_weight_matrix, weight_matrix

DENSE_FILE = "dense.safetensors"  # the dense weights, for rebuilding the database in later rounds
STATE_FILE = "state-{}.json"  # one per search trajectory (the key's hash), so that bisection steps resume too


def state_name(key: str) -> str:
    """The state file of the trajectory with this key."""
    return STATE_FILE.format(hashlib.sha256(key.encode()).hexdigest()[:16])


def save_state(work: Path, state: SearchState, key: str, baselines: dict, round_starts: list) -> None:
    """Write the search state (atomically) after a generation, with the baselines and the round starts."""
    data = {
        "key": key,
        "baselines": baselines,
        "round_starts": round_starts,
        "levels": state.levels,
        "fitness": state.fitness,
        "generation": state.generation,
        "history": state.history,
        "rng_state": state.rng_state,
    }
    write_file_atomic(work / state_name(key), json_text(data) + "\n")


def load_state(work: Path, key: str) -> tuple[SearchState | None, dict, list]:
    """The saved state, baselines and round starts of a search with the same settings, or ``(None, {}, [])``."""
    path = work / state_name(key)
    if not path.is_file():
        return None, {}, []
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None, {}, []
        rng = data["rng_state"]
        rng_state = None if rng is None else (rng[0], tuple(rng[1]), rng[2])
        state = SearchState(
            list(data["levels"]), float(data["fitness"]), int(data["generation"]), list(data["history"]), rng_state
        )
        baselines = dict(data["baselines"])
        if not {"uniform", "allocations"} <= set(baselines):
            return None, {}, []
        starts = [dict(r, levels=list(map(int, r["levels"]))) for r in data.get("round_starts", [])]
        return state, baselines, starts
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError,
            AttributeError):  # fmt: skip
        return None, {}, []  # a damaged state file: start the search again


def keep_dense_weights(model: nn.Module, path: Path) -> None:
    """Save the dense prunable weights once (the model must still be dense the first time)."""
    if not path.is_file():
        tensors = {name: weight_matrix(m).detach().cpu().contiguous() for name, m in prunable_layers(model).items()}
        write_path_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def restore_dense_weights(model: nn.Module, path: Path) -> None:
    """Put the weights :func:`keep_dense_weights` saved back into the model."""
    modules = prunable_layers(model)
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            set_weight_matrix(modules[name], f.get_tensor(name))
