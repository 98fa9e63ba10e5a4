"""What the study tests share: a tiny study base, writing a study file, reading the study database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import yaml

from loralab.study.store import Store

# Two-step runs on the shipped base: a study of a few of them takes seconds per run.
TINY = {
    "model": {"path": "builtin:tiny", "device": "cpu"},
    "data": {"path": "builtin:arithmetic_2ds", "limit": 48, "val_max_examples": 8, "max_seq_length": 48},
    "lora": {"r": 4, "alpha": 8},
    "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, "log_every": 1},
    "output": {"save_adapter": False},
}


def write_study(tmp_path: Path, name: str = "s", base: dict | None = None, **spec) -> Path:
    """``tmp_path/NAME.yaml``: a study named NAME over ``base`` (default TINY) with ``spec``'s keys."""
    path = tmp_path / f"{name}.yaml"
    body = {"name": name, "base": base or TINY, **spec}
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


def rows_of(db: Path) -> dict[str, dict]:
    """name -> the runs-table row, of the database's (only) study."""
    with Store(db) as s:
        return {r["name"]: r for r in s.runs(s.study_id(s.study_names()[0]))}


def sql(db: Path, query: str, *args) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()
