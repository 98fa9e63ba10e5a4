"""A study's runs as read from its database: each run's axes, status, costs and final metric values.

    data = read_study("runs/rank_alpha_grid/study.db", "rank_alpha_grid")
    data.ok, data.excluded, data.noise_sd        # completed runs, the runs left out, the seed noise

The one reader of a study's results (findings, the report, its context, tune, ``study status``),
through ``store.open_readonly``. A run's final value of a metric is ``runs.final_eval_loss`` for
eval_loss, otherwise the last row of that metric's series. Runs whose axes differ only in
train.seed are repeats of one configuration; the standard deviation between repeats, pooled over
every repeated configuration, is the seed noise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loralab.errors import LoralabError
from loralab.rundir import RunDir, Status
from loralab.study import stats
from loralab.study.store import open_readonly
from loralab.units import is_number

if TYPE_CHECKING:
    from loralab.study.store import Store

SEED_KEY = "train.seed"


@dataclass
class RunResult:
    """One run of a study as its database holds it (``loralab.train.core.Run`` is a run training)."""

    id: int
    name: str
    axes: dict[str, Any]
    status: str
    value: float | None  # the final value of the study metric
    time_s: float | None  # training time (train_time_s, or wall time when absent)
    memory_bytes: int | None
    params: int | None
    stopped_at_step: int | None = None
    error: str | None = None
    values: dict[str, float | None] = field(default_factory=dict)  # final value of every judged metric
    steps: int | None = None  # the last optimizer step it logged
    config: dict[str, Any] = field(default_factory=dict)  # its resolved config, nested sections
    run_dir: str | None = None
    train_time_s: float | None = None  # training time alone (None when the run never trained)
    fused_with: tuple[str, ...] = ()  # the run directories it trained with in one fused group (summary.json)


@dataclass
class StudyData:
    """A study as the findings see it: the spec, every run, and the seed noise."""

    name: str
    spec: dict[str, Any]
    metric: str
    goal: str  # "min" | "max"
    runs: list[RunResult]
    ok: list[RunResult] = field(default_factory=list)  # completed, with a metric value
    excluded: list[tuple[RunResult, str]] = field(default_factory=list)  # (run, why it is left out)
    axes: list[str] = field(default_factory=list)  # axes that vary, train.seed excluded
    noise_sd: float | None = None
    noise_df: int = 0
    metrics: list[tuple[str, str]] = field(default_factory=list)  # every judged (metric, goal), the study's first
    # computed once from the runs on first use (the runs do not change after read_study)
    _tied: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _noise: dict[str, tuple[float | None, int]] = field(default_factory=dict, repr=False)

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "min" else a > b


def study_row(con: sqlite3.Connection, study_name: str, db_path: str | Path) -> sqlite3.Row:
    row = con.execute("SELECT id, name, spec_json, root FROM studies WHERE name = ?", (study_name,)).fetchone()
    if row is None:
        names = [r[0] for r in con.execute("SELECT name FROM studies ORDER BY name")]
        raise LoralabError(f"{db_path}: no study named {study_name!r} (studies here: {', '.join(names) or 'none'})")
    return row


def final_value(con: sqlite3.Connection, run: sqlite3.Row, metric: str) -> float | None:
    if metric == "eval_loss" and run["final_eval_loss"] is not None:
        return float(run["final_eval_loss"])
    row = con.execute(
        "SELECT value FROM metrics WHERE run_id = ? AND name = ? AND value IS NOT NULL ORDER BY step DESC LIMIT 1",
        (run["id"], metric),
    ).fetchone()
    return None if row is None else float(row[0])


def run_rows(store: Store, study_id: int, metric: str) -> list[dict[str, Any]]:
    """One dict per run of a study (``study status``, ``runs list``, ``Study.status()``): name,
    status, axis values, the final value of ``metric``, time, memory, attempts."""
    out = []
    for r in store.runs(study_id):
        row = {"name": r["name"], "status": r["status"], **json.loads(r["axes_json"]),
               metric: final_value(store.db, r, metric), "wall_s": r["wall_time_s"],
               "peak_MiB": r["peak_memory_bytes"] / 2**20 if r["peak_memory_bytes"] else None,
               "est_MiB": r["estimated_memory_bytes"] / 2**20 if r["estimated_memory_bytes"] else None,
               "attempts": r["attempts"], "stopped_at": r["stopped_at_step"]}
        out.append(row)
    return out


def read_study(db_path: str | Path, study_name: str) -> StudyData:
    """The study's spec and runs, split into those the statistics use and those left out.

    Each run's ``value`` is the study metric's; ``values`` holds every judged metric's."""
    con = open_readonly(db_path)
    try:
        srow = study_row(con, study_name, db_path)
        spec = json.loads(srow["spec_json"])
        metric = spec.get("metric") or "eval_loss"
        goal = spec.get("goal") or "min"
        judged = [(metric, goal), *(spec.get("metrics") or {}).items()]
        runs = []
        for r in con.execute("SELECT * FROM runs WHERE study_id = ? ORDER BY id", (srow["id"],)).fetchall():
            time_s = r["train_time_s"] if r["train_time_s"] is not None else r["wall_time_s"]
            values = {m: final_value(con, r, m) if r["status"] == Status.COMPLETED else None for m, _ in judged}
            config = json.loads(r["config_json"]) if r["config_json"] else {}
            runs.append(RunResult(
                id=r["id"], name=r["name"], axes=run_axes(r, spec, config), status=r["status"],
                value=values[metric], values=values,
                time_s=time_s, memory_bytes=r["peak_memory_bytes"], params=r["trainable_params"],
                stopped_at_step=r["stopped_at_step"], error=r["error"],
                config=config, run_dir=r["run_dir"], train_time_s=r["train_time_s"],
                fused_with=tuple(((RunDir(r["run_dir"]).read_summary() or {}) if r["run_dir"] else {})
                                 .get("fused_with") or ()),
                steps=con.execute("SELECT MAX(step) FROM metrics WHERE run_id = ? AND name = 'train_loss'",
                                  (r["id"],)).fetchone()[0],
            ))
    finally:
        con.close()
    data = StudyData(name=study_name, spec=spec, metric=metric, goal=goal, runs=runs, metrics=judged)
    _split_runs(data)
    return data


def read_series(db_path: str | Path, study_name: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{run name: {metric name: [(step, value), ...]}} for every run of the study."""
    con = open_readonly(db_path)
    try:
        sid = study_row(con, study_name, db_path)["id"]
        rows = con.execute(
            "SELECT r.name, m.name, m.step, m.value FROM metrics m JOIN runs r ON r.id = m.run_id "
            "WHERE r.study_id = ? AND m.value IS NOT NULL ORDER BY r.id, m.name, m.step", (sid,)
        ).fetchall()
    finally:
        con.close()
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run, name, step, value in rows:
        out.setdefault(run, {}).setdefault(name, []).append((int(step), float(value)))
    return out


def _split_runs(data: StudyData) -> None:
    """Fill ``ok``, ``excluded``, ``axes`` and the seed noise from ``runs`` and the metric."""
    for run in data.runs:
        reason = exclusion_reason(run, data.metric)
        if reason is None:
            data.ok.append(run)
        else:
            data.excluded.append((run, reason))
    data.axes = varying_axes(data.spec, data.runs)
    data.noise_sd, data.noise_df = stats.pooled_sd([[r.value for r in g] for g in repeat_groups(data.ok).values()])


def for_metric(data: StudyData, metric: str, goal: str) -> StudyData:
    """The same study judged on another of its metrics: each run's value, the runs left out
    and the seed noise are that metric's."""
    if metric == data.metric:
        return data
    runs = [dataclasses.replace(r, value=r.values.get(metric)) for r in data.runs]
    out = StudyData(name=data.name, spec=data.spec, metric=metric, goal=goal, runs=runs, metrics=data.metrics)
    _split_runs(out)
    return out


def run_axes(row: sqlite3.Row, spec: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The values a run varies: its axes, plus tied keys (train.lr = c / lora.alpha) read from
    its config, so a level can be named with what moved along with it."""
    axes = json.loads(row["axes_json"])
    tied = spec.get("tied") or {}
    if tied and config:
        for key in tied:
            node: Any = config
            for part in str(key).split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                axes.setdefault(key, node)
    return axes


def exclusion_reason(run: RunResult, metric: str) -> str | None:
    if run.status == Status.COMPLETED:
        if run.value is None or not math.isfinite(run.value):
            return f"completed but has no final {metric}"
        return None
    if run.status == Status.STOPPED_EARLY:
        at = f" at step {run.stopped_at_step}" if run.stopped_at_step is not None else ""
        return f"stopped early{at} (successive halving)"
    why = run.status.replace("_", " ")
    if run.error:
        first = run.error.strip().splitlines()[0] if run.error.strip() else ""
        why += f": {textwrap.shorten(first, width=240, placeholder=' ...')}"  # whole words
    return why


def varying_axes(spec: dict[str, Any], runs: list[RunResult]) -> list[str]:
    """Axes with more than one value, in the study file's order, then tied keys; no seed."""
    declared = [k for k in (spec.get("axes") or {}) if isinstance(k, str)]
    seen = declared + [k for r in runs for k in r.axes if k not in declared]
    out = []
    for k in dict.fromkeys(seen):
        if k != SEED_KEY and len({canon(r.axes.get(k)) for r in runs}) > 1:
            out.append(k)
    return out


# ---------------------------------------------------------------- repeats

def canon(value: Any) -> str:
    """A hashable, order-free key for an axis value (1 and 1.0 are the same level)."""
    if is_number(value):
        return json.dumps(float(value))
    return json.dumps(value, sort_keys=True)


def config_key(run: RunResult) -> tuple:
    return tuple(sorted((k, canon(v)) for k, v in run.axes.items() if k != SEED_KEY))


def repeat_groups(runs: list[RunResult]) -> dict[tuple, list[RunResult]]:
    """Runs grouped by everything but the seed: each group is one configuration's repeats."""
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for r in runs:
        groups[config_key(r)].append(r)
    return dict(groups)
