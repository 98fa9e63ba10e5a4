"""The study database: one SQLite file (schema.sql) that the study driver alone writes.

    store = Store(Path("runs/rank_alpha_grid/study.db"))
    study_id = store.open_study(study)            # creates the study and its runs once
    store.start(run_id, run_dir=..., estimated=...)
    store.finish(run_id, status=Status.COMPLETED, summary=summary, metrics=rows)

WAL journal, a busy timeout and one transaction per change, so a reader (``study status``,
a report) never sees half a result and a killed driver loses at most the run in flight.
Opening the store marks runs left "running" by a killed driver as interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from loralab.errors import ConfigError, LoralabError
from loralab.rundir import Status, write_atomic
from loralab.units import is_number

# Statuses a run ends in, as the study sees it; the others (pending, running, interrupted) mean
# "still to do". (rundir.FINAL is narrower: the statuses after which a run has nothing left to train.)
ENDED = (Status.COMPLETED, Status.FAILED, Status.DIVERGED, Status.OUT_OF_MEMORY, Status.INVALID, Status.PAUSED,
         Status.SKIPPED, Status.STOPPED_EARLY)
TO_RUN = (Status.PENDING, Status.INTERRUPTED)
SUMMARY_FIELDS = ("wall_time_s", "train_time_s", "tokens_per_s", "peak_memory_bytes", "trainable_params",
                  "total_params", "final_eval_loss", "best_eval_loss")


def schema_sql() -> str:
    return resources.files("loralab").joinpath("study", "schema.sql").read_text(encoding="utf-8")


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def metric_rows(metrics_jsonl: Path) -> list[tuple[int, str, float | None]]:
    """(step, name, value) for every number in a run's metrics.jsonl (a torn last line is skipped)."""
    rows: dict[tuple[int, str], float | None] = {}
    if not metrics_jsonl.is_file():
        return []
    for line in metrics_jsonl.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a killed run was writing
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        for k, v in rec.items():
            if k != "step" and is_number(v):
                rows[(rec["step"], k)] = _finite(float(v))
    return [(s, n, v) for (s, n), v in rows.items()]


def open_readonly(db_path: Path | str) -> sqlite3.Connection:
    """A read-only connection to a study database, rows as sqlite3.Row: SQLite itself refuses
    writes (mode=ro), whatever the file's permissions. A missing file is a clear error, not a
    new empty database. Every reader of a study database opens it here."""
    path = Path(db_path)
    if not path.is_file():
        raise ConfigError(f"no study database at {path}")
    # isolation_level=None: no implicit transactions (and a reader has none to commit).
    con = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", timeout=30, isolation_level=None, uri=True)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA busy_timeout = 30000")
    return con


class Store:
    """Transactional access to one study database."""

    def __init__(self, db_path: Path | str, *, readonly: bool = False):
        self.path = Path(db_path)
        if readonly:
            self.db = open_readonly(self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write goes through tx().
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 30000")
        self.db.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL survives a killed process
            self.db.executescript(schema_sql())

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so it never deadlocks."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ studies and runs

    def study_id(self, name: str) -> int:
        row = self.db.execute("SELECT id FROM studies WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = [r[0] for r in self.db.execute("SELECT name FROM studies")]
            raise ConfigError(f"no study {name!r} in {self.path} (it holds: {', '.join(known) or 'none'})")
        return int(row[0])

    def study_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM studies ORDER BY id")]

    def spec(self, name: str) -> dict[str, Any]:
        row = self.db.execute("SELECT spec_json FROM studies WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else {}

    def open_study(self, name: str, spec: dict[str, Any], root: Path, runs: list[Any]) -> tuple[int, list[str]]:
        """Create the study and insert its runs once; mark runs left running as interrupted.

        Returns (study id, names of the runs recovered as interrupted). A run that exists
        with a different config is refused: its results would not be the new run's."""
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO studies (name, spec_json, root, created_at) VALUES (?, ?, ?, ?)",
                       (name, json.dumps(spec, default=str), str(root), time.time()))
            sid = int(db.execute("SELECT id FROM studies WHERE name = ?", (name,)).fetchone()[0])
            db.execute("UPDATE studies SET spec_json = ? WHERE id = ?", (json.dumps(spec, default=str), sid))
            existing = {r["name"]: r["config_json"] for r in db.execute(
                "SELECT name, config_json FROM runs WHERE study_id = ?", (sid,))}
            for run in runs:
                config_json = json.dumps(run.config, sort_keys=True, default=str)
                if run.name in existing:
                    if existing[run.name] != config_json:
                        from loralab.config import flat_keys

                        was, now = flat_keys(json.loads(existing[run.name])), flat_keys(json.loads(config_json))
                        keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
                        changed = ", ".join(f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in keys[:4]) + (
                            f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                        raise ConfigError(
                            f"study {name!r} in {self.path} already has a run {run.name!r} with a different config "
                            f"({changed}); start a fresh study with `loralab study run ... --name NEW_NAME` (or "
                            "another --out root) instead of mixing results")
                    continue
                db.execute("INSERT INTO runs (study_id, name, axes_json, config_json, status) VALUES (?, ?, ?, ?, ?)",
                           (sid, run.name, json.dumps(run.axes, default=str), config_json, Status.PENDING))
            recovered = [r[0] for r in db.execute("SELECT name FROM runs WHERE study_id = ? AND status = ?",
                                                  (sid, Status.RUNNING))]
            db.execute("UPDATE runs SET status = ?, error = 'the study driver stopped while this run was running' "
                       "WHERE study_id = ? AND status = ?", (Status.INTERRUPTED, sid, Status.RUNNING))
        return sid, recovered

    def runs(self, study_id: int, statuses: tuple[Status, ...] | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM runs WHERE study_id = ?"
        args: list[Any] = [study_id]
        if statuses:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += list(statuses)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def run(self, study_id: int, name: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM runs WHERE study_id = ? AND name = ?", (study_id, name)).fetchone()
        if row is None:
            raise ConfigError(f"no run {name!r} in this study")
        return dict(row)

    def metrics(self, run_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(
            "SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY step, name", (run_id,))]

    def metric_at(self, run_id: int, name: str, step: int) -> float | None:
        row = self.db.execute(
            "SELECT value FROM metrics WHERE run_id = ? AND name = ? AND step = ?", (run_id, name, step)).fetchone()
        return None if row is None else row[0]

    def counts(self, study_id: int) -> dict[str, int]:
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT status, COUNT(*) FROM runs WHERE study_id = ? GROUP BY status", (study_id,))}

    # ------------------------------------------------------------------ state changes

    def start(self, run_id: int, *, run_dir: str, estimated: int | None) -> None:
        with self.tx() as db:
            db.execute("UPDATE runs SET status = ?, run_dir = ?, attempts = attempts + 1, started_at = ?, "
                       "finished_at = NULL, error = NULL, estimated_memory_bytes = COALESCE(?, estimated_memory_bytes) "
                       "WHERE id = ?",
                       (Status.RUNNING, run_dir, time.time(), estimated, run_id))

    def set_estimate(self, run_id: int, estimated: int | None, trainable: int | None) -> None:
        with self.tx() as db:
            db.execute("UPDATE runs SET estimated_memory_bytes = ?, trainable_params = COALESCE(trainable_params, ?) "
                       "WHERE id = ?",
                       (estimated, trainable, run_id))

    def skip(self, run_id: int, reason: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                       (Status.SKIPPED, reason, time.time(), run_id))

    def finish(
        self,
        run_id: int,
        *,
        status: str,  # a Status, or the string a run wrote into its summary.json
        summary: dict[str, Any] | None = None,
        metrics: list[tuple[int, str, float | None]] | None = None,
        error: str | None = None,
        stopped_at_step: int | None = None,
    ) -> None:
        """Record a run's outcome, its summary numbers and its metric series in one transaction."""
        summary = summary or {}
        values = {k: _finite(summary.get(k)) for k in SUMMARY_FIELDS}
        with self.tx() as db:
            db.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = ?, stopped_at_step = ?, "
                + ", ".join(f"{k} = COALESCE(?, {k})" for k in SUMMARY_FIELDS) + " WHERE id = ?",
                (status, error, time.time(), stopped_at_step, *values.values(), run_id),
            )
            if metrics is not None:
                db.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
                db.executemany("INSERT OR REPLACE INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
                               [(run_id, s, n, v) for s, n, v in metrics])

    def reset(self, run_ids: list[int]) -> None:
        """Make runs pending again (``--retry-failed``)."""
        with self.tx() as db:
            db.executemany("UPDATE runs SET status = ? WHERE id = ?", [(Status.PENDING, i) for i in run_ids])

    # ------------------------------------------------------------------ export

    def integrity(self) -> str:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0])

    def export(self, study_name: str, out_dir: Path, fmt: str = "csv") -> list[Path]:
        """runs and metrics tables of one study as CSV (or Parquet, with pyarrow)."""
        sid = self.study_id(study_name)
        runs = self.runs(sid)
        metrics = [dict(r) for r in self.db.execute(
            "SELECT r.name AS run, m.step, m.name, m.value FROM metrics m JOIN runs r ON r.id = m.run_id "
            "WHERE r.study_id = ? ORDER BY r.id, m.step, m.name", (sid,))]
        out_dir.mkdir(parents=True, exist_ok=True)
        tables = {"runs": runs, "metrics": metrics}
        if fmt == "parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise LoralabError("Parquet export needs pyarrow (pip install pyarrow); use --format csv") from None
            paths = []
            for name, rows in tables.items():
                path = out_dir / f"{study_name}-{name}.parquet"
                buf = io.BytesIO()
                pq.write_table(pa.Table.from_pylist(rows), buf)
                write_atomic(path, buf.getvalue())
                paths.append(path)
            return paths
        if fmt != "csv":
            raise ConfigError(f"--format must be csv or parquet (got {fmt!r})")
        paths = []
        columns = {"runs": [c[1] for c in self.db.execute("PRAGMA table_info(runs)")],
                   "metrics": ["run", "step", "name", "value"]}
        for name, rows in tables.items():
            path = out_dir / f"{study_name}-{name}.csv"
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=columns[name])
            w.writeheader()
            w.writerows(rows)
            write_atomic(path, buf.getvalue())
            paths.append(path)
        return paths
