"""The keys that decide what a search can reuse from its work folder: the level database depends on the
settings that make the levels and on the calibration windows; a trajectory also on the fitness windows and every
setting that steers the evolution (how long it runs does not)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmcompress.search.config import RUN_FIELDS, SearchConfig
from lmcompress.search.database import LevelDatabase

DATABASE_FIELDS = ("kind", "method", "levels", "group_size", "sym", "database_inputs")


def database_key(config: SearchConfig, levels: list[float], calib_hash: str, reference: dict | None) -> str:
    """The database's key: searches that differ only in their fitness windows share it."""
    settings = config.to_dict()
    return json.dumps(
        {k: settings[k] for k in DATABASE_FIELDS} | {"levels": levels, "calib": calib_hash, "reference": reference}
    )


def trajectory_key(config: SearchConfig, data: dict[str, str]) -> str:
    """What decides a search's trajectory: its settings (not how long it runs) and its windows' hashes."""
    return json.dumps({k: v for k, v in config.to_dict().items() if k not in RUN_FIELDS} | data)


def database_dir(work: Path, db_key: str) -> Path:
    """Where the level database of these settings lives in ``work`` (one folder per settings and reference)."""
    return work / f"database-{hashlib.sha256(db_key.encode()).hexdigest()[:12]}"


def open_database(folder: Path, levels: list[float], key: str) -> LevelDatabase | None:
    """The database a run with the same settings left behind, if it is complete."""
    try:
        if json.loads((folder / "key.json").read_text())["key"] == key:
            db = LevelDatabase.open(folder)
            return db if db.levels == levels else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        pass
    return None
