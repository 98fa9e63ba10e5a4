"""A study under load: 24 short runs, 4 workers, crashing runs, a killed worker, a killed driver.

Crashes are injected through the study itself: a quarter of the runs train on a data file
whose second line is not JSON, so they fail at run time (after every config was checked)
and are recorded invalid (bad input found before step 1).
One run process is SIGKILLed while training, and the driver is SIGKILLed mid-study and
started again. At the end every run must be recorded exactly once with the right status,
nothing left running, every metric row of every run directory in the database, and
SQLite's integrity check passing. The figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loralab.study.store import Store, metric_rows
from waiting import run_processes, wait_for

SRC = str(Path(__file__).resolve().parents[1] / "src")
SEEDS = 6
DATA = ["builtin:arithmetic_2ds", "builtin:arithmetic_4ds", "builtin:arithmetic"]
RUNS = (len(DATA) + 1) * SEEDS  # the last data file crashes
# Steps per run: enough that a run is still training when the test looks for one to kill (a run
# forked from the study's warm process starts in a fraction of a second).
STEPS = 12


def _statuses(db: Path) -> dict[str, str]:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        return dict(con.execute("SELECT name, status FROM runs").fetchall())
    except sqlite3.OperationalError:
        return {}


def _final_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("status")
    except (OSError, json.JSONDecodeError):
        return None


@pytest.mark.slow
def test_study_under_load(tmp_path):
    t0 = time.time()
    bad = tmp_path / "bad.jsonl"
    # Crashing runs: records that parse (so `study run` starts, as its checks read but do not
    # tokenize the data) whose prompts outgrow max_seq_length, so each run fails when it starts.
    long_prompt = {"instruction": "Explain " + "the river and the hill " * 30, "input": "", "output": "It flows."}
    bad.write_text((json.dumps(long_prompt) + "\n") * 4, encoding="utf-8")
    study = {
        "name": "load",
        "base": {
            "model": {"path": "builtin:tiny", "device": "cpu"},
            "data": {"limit": 16, "val_max_examples": 4, "max_seq_length": 64},
            "lora": {"r": 2, "alpha": 4},
            "train": {"max_steps": STEPS, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, "log_every": 1},
            "output": {"save_adapter": False},
        },
        "axes": {"data.path": [*DATA, str(bad)]},
        "repeats": SEEDS,
    }
    path = tmp_path / "load.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    out = tmp_path / "runs"
    db = out / "load" / "study.db"
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "loralab.cli", "study", "run", str(path), "--out", str(out), "--workers", "4",
           "--json"]

    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # 1. kill one run process mid-run with SIGKILL
    wait_for(lambda: sum(s == "completed" for s in _statuses(db).values()) >= 4, 900, "4 runs done")
    victim = None
    while victim is None:  # a run that trains (not one of the crashing ones), killed while alive
        children = wait_for(lambda: {p: log.parent for p, log in run_processes(driver.pid).items()
                                           if "data_bad" not in log.parent.name},
                            120, "a run process")
        pid, run_dir = next(iter(children.items()))
        try:
            os.kill(pid, signal.SIGKILL)
            victim = Path(run_dir).name
        except ProcessLookupError:
            continue
    # 2. kill the driver with SIGKILL while runs are in flight
    wait_for(lambda: sum(s not in ("pending", "running") for s in _statuses(db).values()) >= RUNS // 2
          and "running" in _statuses(db).values(), 900, "half the runs done with some running")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    with Store(db) as s:  # opening a store does not recover; only the driver does (read here)
        sid = s.study_id("load")
        before = {r["name"]: dict(r) for r in s.runs(sid)}
    left_running = sorted(n for n, r in before.items() if r["status"] == "running")
    finished_before = {n: r["finished_at"] for n, r in before.items() if r["status"] in ("completed", "invalid")}
    assert left_running, "the driver was killed with runs in flight"
    time.sleep(1.0)  # the run processes die with the driver (PR_SET_PDEATHSIG)
    # a run that wrote its final summary before the driver could record it is recorded, not rerun
    done_on_disk = {n for n in left_running if _final_status(out / "load" / n) == "completed"}
    # 3. start the driver again and let it finish
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 1, rerun.stderr[-2000:]  # 1: the crashing runs ended invalid, the rest completed
    result = json.loads(rerun.stdout)
    assert result["recovered"] == left_running

    with Store(db) as s:
        assert s.integrity() == "ok"
        runs = {r["name"]: r for r in s.runs(sid)}
        assert len(runs) == RUNS == 24
        assert s.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == RUNS  # exactly once each
        lost = 0
        for name, r in runs.items():
            expected = "invalid" if name.startswith("data_bad") else "completed"
            assert r["status"] == expected, (name, r["status"], r["error"])
            if expected == "invalid":
                assert "bad.jsonl" in r["error"] and "truncation" in r["error"], r["error"]
            stored = {(m["step"], m["name"]) for m in s.metrics(r["id"])}
            on_disk = {(st, n) for st, n, _ in metric_rows(out / "load" / name / "metrics.jsonl")}
            lost += len(on_disk - stored)
            if expected == "completed":
                assert (STEPS, "eval_loss") in stored and r["final_eval_loss"] > 0
    assert lost == 0
    for name, finished in finished_before.items():  # nothing finished was run again
        assert runs[name]["finished_at"] == finished and runs[name]["attempts"] == before[name]["attempts"], name
    for name in left_running:
        retried = 0 if name in done_on_disk else 1
        assert runs[name]["attempts"] == before[name]["attempts"] + retried, name
    assert runs[victim]["attempts"] >= 2 and runs[victim]["status"] == "completed"
    figures = {
        "runs": len(runs),
        "workers": 4,
        "failures_injected": {"crashing_runs": SEEDS, "run_process_sigkilled": 1,
                              "driver_sigkilled_with_runs_in_flight": len(left_running)},
        "failures_recovered": 1 + len(left_running),
        "crashing_runs_recorded_invalid": sum(r["status"] == "invalid" for r in runs.values()),
        "rows_lost": lost,
        "metric_rows": s_count(db),
        "integrity_check": "ok",
        "wall_time_s": round(time.time() - t0, 1),
    }
    print("\nLOAD TEST FIGURES " + json.dumps(figures))


def s_count(db: Path) -> int:
    return sqlite3.connect(db).execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
