"""Studies: expansion, the database, the local and Ray executors, kills, halving, memory skips.

Runs are real `loralab train` processes on builtin:tiny with a few steps each.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.config import config_from_dict
from loralab.errors import ConfigError
from loralab.study.backends.process import checkpoint_step
from loralab.study.execute import run_study
from loralab.study.policy import Halving
from loralab.study.spec import load_study, preset_names
from loralab.study.store import Store, metric_rows
from studytools import TINY, rows_of, write_study
from waiting import descendants, run_processes, wait_for

SRC = str(Path(__file__).resolve().parents[1] / "src")


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "loralab.cli", *args], capture_output=True, text=True, env=env, **kw)


# ----------------------------------------------------------------------------- expansion


def test_expansion_grid_tied_repeats(tmp_path):
    path = write_study(tmp_path, axes={"lora.r": [2, 8], "lora.dropout": {"grid": [0.0, 0.1]}},
                       tied={"lora.alpha": "2 * lora.r", "train.lr": "0.004 / (lora.r ** 2)"}, repeats=2)
    study = load_study(path, root=tmp_path / "root")
    assert [r.name for r in study.runs] == [
        "r2-do0-s1", "r2-do0-s2", "r2-do0.1-s1", "r2-do0.1-s2", "r8-do0-s1", "r8-do0-s2", "r8-do0.1-s1", "r8-do0.1-s2"]
    first, last = study.runs[0], study.runs[-1]
    assert first.axes == {"lora.r": 2, "lora.dropout": 0.0, "train.seed": 1}
    assert first.config["lora"]["alpha"] == 4.0 and last.config["lora"]["alpha"] == 16.0
    assert (first.config["train"]["lr"] == pytest.approx(0.001)
            and last.config["train"]["lr"] == pytest.approx(0.004 / 64))
    assert last.config["train"]["seed"] == 2 and last.config["output"]["dir"] == str(tmp_path / "root" / "r8-do0.1-s2")
    for run in study.runs:  # every expanded config is a valid loralab config
        assert config_from_dict(run.config).lora.r == run.axes["lora.r"]


def test_expansion_samples_are_seeded_and_in_range(tmp_path):
    path = write_study(tmp_path, axes={"train.lr": {"loguniform": [1.0e-4, 1.0e-2], "n": 4, "seed": 3},
                                       "lora.r": {"uniform": [2, 64], "n": 3, "seed": 1}}, seeds=[7, 42])
    a, b = load_study(path), load_study(path)
    assert [r.name for r in a.runs] == [r.name for r in b.runs]
    lrs = a.axes["train.lr"]
    assert len(lrs) == 4 and len(set(lrs)) == 4 and all(1e-4 <= v <= 1e-2 for v in lrs)
    assert all(isinstance(r, int) and 2 <= r <= 64 for r in a.axes["lora.r"])
    assert len(a.runs) == 4 * len(a.axes["lora.r"]) * 2 and {r.axes["train.seed"] for r in a.runs} == {7, 42}
    quick = write_study(tmp_path, "q", axes={"lora.r": [2, 8, 32]}, repeats=3,
                        quick={"axes": {"lora.r": [2]}, "repeats": 1, "base": {"train": {"max_steps": 1}}})
    qs = load_study(quick, quick=True)
    assert (qs.name == "q-quick" and [r.name for r in qs.runs] == ["r2-s1"]
            and qs.runs[0].config["train"]["max_steps"] == 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"axes": {"lora.rank": [2, 4]}},
         "s.yaml:{line lora.rank}: axis 'lora.rank' is not a training-config key (did you mean lora.r?)"),
        ({"axes": {"lora.r": [2]}, "tied": {"lora.alfa": "2 * lora.r"}},
         "tied key 'lora.alfa' is not a training-config key (did you mean lora.alpha?)"),
        ({"axes": {"lora.r": [2]}, "findings": [{"kind": "trend", "axis": "lora.r"}]}, "; did you mean trend_within?"),
        ({"axes": {"lora.r": [2]}, "findings": [{"kind": "axis_effect", "axs": "lora.r"}]},
         "findings[0] (axis_effect) needs axis (it has axs, which axis_effect does not take)"),
        ({"axes": {"lora.r": []}}, "s.yaml:{line lora.r}: axis lora.r has an empty list of values"),
        ({"axes": {"train.lr": {"loguniform": [0, 1], "n": 2}}}, "loguniform needs low < high and low > 0"),
        ({"axes": {"lora.r": [2]}, "tied": {"lora.alpha": "__import__('os').system('x')"}},
         "may only use numbers, config keys"),
        ({"axes": {"lora.r": [2]}, "tied": {"lora.alpha": "().__class__"}}, "may only use numbers, config keys"),
        ({"axes": {"lora.r": [2]}, "tied": {"lora.alpha": "2 * lora.rank"}},
         "'lora.rank' in '2 * lora.rank' is not a training-config key"),
        ({"axes": {"lora.r": [2]}, "tied": {"lora.alpha": "1 / (lora.r - 2)"}}, "tied lora.alpha: division by zero"),
        ({"axes": {"lora.r": [2]}, "tied": {"lora.r": "2"}}, "lora.r is both an axis and tied"),
        ({"axes": {"lora.r": [2, 0]}}, "lora.r must be > 0 (got 0)"),
        ({"axes": {"lora.r": [2]}, "findings": [{"kind": "axis_effect", "axis": "lora.alpha"}]},
         "not one of the study's axes"),
        ({"axes": {"lora.r": [2]}, "axis": {}}, "unknown study key 'axis'"),
    ],
)
def test_invalid_studies_are_refused_with_the_key(tmp_path, spec, message):
    path = write_study(tmp_path, **spec)
    with pytest.raises(ConfigError) as exc:
        load_study(path)
    if "{line " in message:  # the line of that key in the written file
        key = message.split("{line ")[1].split("}")[0]
        line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(key + ":"))
        message = message.replace("{line " + key + "}", str(line))
    assert message in str(exc.value)


def test_every_preset_loads_full_and_quick():
    names = preset_names()
    assert set(names) >= {"rank_alpha_grid", "rslora_vs_lora", "alpha_lr_equivalence", "qlora", "optimizers",
                          "targets", "dropout", "epochs", "consistency"}
    for name in names:
        full, quick = load_study(f"preset:{name}"), load_study(f"preset:{name}", quick=True)
        assert full.question and full.claim and full.findings, name
        assert "DURATION_FULL" not in full.description, name
        assert 1 <= len(quick.runs) <= len(full.runs) and len(quick.runs) <= 8, name
        assert all(r.config["model"]["path"] == "builtin:tiny" for r in full.runs)
    grid = load_study("preset:rank_alpha_grid")
    assert len(grid.runs) == 28 and grid.axes["lora.alpha"] == [0.5, 2, 8, 32, 128, 256, 512]
    eq = load_study("preset:alpha_lr_equivalence")
    assert [r.config["lora"]["alpha"] * r.config["train"]["lr"] for r in eq.runs] == pytest.approx([0.00512] * 12)
    assert {r.config["train"]["lr"] for r in eq.runs} == {0.00512, 0.00064, 0.00008, 0.00001}
    mine = load_study("preset:dropout", model="/models/llama", data="/data/train.jsonl")
    assert {(r.config["model"]["path"], r.config["data"]["path"]) for r in mine.runs} == {
        ("/models/llama", "/data/train.jsonl")}


# ----------------------------------------------------------------------------- execution


@pytest.mark.slow
def test_local_study_two_workers_crash_recorded_and_commands(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "What is 1 plus 1?", "input": "", "output": "2"}\nnot json\n', encoding="utf-8")
    path = write_study(tmp_path, "mix", axes={"data.path": ["builtin:arithmetic_2ds", str(bad)]}, repeats=2)
    root = tmp_path / "runs" / "mix"
    result = run_study(load_study(path, root=root), root=root, workers=2)
    assert result["counts"] == {"completed": 2, "invalid": 2}
    rows = rows_of(root / "study.db")
    for name in ("data_arithmetic_2ds-s1", "data_arithmetic_2ds-s2"):
        r = rows[name]
        assert r["status"] == "completed" and r["attempts"] == 1 and r["peak_memory_bytes"] > 100 * 2**20
        assert r["trainable_params"] > 0 and r["final_eval_loss"] > 0 and r["estimated_memory_bytes"] > 100 * 2**20
        with Store(root / "study.db") as s:
            stored = {(m["step"], m["name"]): m["value"] for m in s.metrics(r["id"])}
        from_file = {(st, n): v for st, n, v in metric_rows(root / name / "metrics.jsonl")}
        assert stored == pytest.approx(from_file) and stored[(2, "eval_loss")] == pytest.approx(r["final_eval_loss"])
    for name in ("data_bad-s1", "data_bad-s2"):
        assert rows[name]["status"] == "invalid" and "bad.jsonl:2" in rows[name]["error"]
    # two workers: the two good runs (first by cost order and name) overlapped in time
    a, b = sorted((rows[n] for n in rows), key=lambda r: r["started_at"])[:2]
    assert b["started_at"] < a["finished_at"]
    assert sqlite3.connect(root / "study.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    out = tmp_path / "runs"
    status = json.loads(cli("study", "status", "mix", "--out", str(out), "--json").stdout)
    assert status["counts"] == {"completed": 2, "invalid": 2} and len(status["runs"]) == 4
    listed = json.loads(cli("runs", "list", "--out", str(out), "--status", "invalid", "--json").stdout)["runs"]
    assert sorted(r["name"] for r in listed) == ["data_bad-s1", "data_bad-s2"]
    shown = json.loads(cli("runs", "show", "data_arithmetic_2ds-s1", "--study", "mix", "--out", str(out),
                           "--json").stdout)
    assert shown["final_metrics"]["eval_loss"] == pytest.approx(rows["data_arithmetic_2ds-s1"]["final_eval_loss"])
    cmp = json.loads(cli("runs", "compare", "data_arithmetic_2ds-s1", "data_bad-s1", "--study", "mix",
                         "--out", str(out), "--json").stdout)
    assert cmp["differences"] == ["data.path"]
    exp = json.loads(cli("study", "export", "mix", "--out", str(out), "--json").stdout)
    runs_csv = Path(exp["files"][0]).read_text(encoding="utf-8").splitlines()
    assert len(runs_csv) == 5 and runs_csv[0].startswith("id,study_id,name")
    # re-running the study repeats nothing
    again = run_study(load_study(path, root=root), root=root, workers=2)
    assert again["ran"] == 0 and {r["attempts"] for r in rows_of(root / "study.db").values()} == {1}


def _statuses(db: Path) -> dict[str, str]:
    if not db.is_file():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        return dict(con.execute("SELECT name, status FROM runs").fetchall())
    except sqlite3.OperationalError:
        return {}


@pytest.mark.slow
def test_driver_killed_then_rerun_repeats_nothing_and_loses_nothing(tmp_path):
    path = write_study(tmp_path, "resume", axes={"lora.r": [2, 4]}, repeats=2)
    out = tmp_path / "runs"
    db = out / "resume" / "study.db"
    env = {**os.environ, "PYTHONPATH": SRC}
    driver = subprocess.Popen([sys.executable, "-m", "loralab.cli", "study", "run", str(path), "--out", str(out)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: "completed" in _statuses(db).values() and "running" in _statuses(db).values(), 240,
             "one run done, one running")
    in_flight = [n for n, s in _statuses(db).items() if s == "running"]
    child = descendants(driver.pid)  # its run processes (and the warm process they were forked from)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = rows_of(db)
    done_before = {n: r["finished_at"] for n, r in before.items() if r["status"] == "completed"}
    assert before[in_flight[0]]["status"] == "running"  # what a killed driver leaves behind
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
                             for p in child),
              30, "the run process to die with its driver")
    rerun = cli("study", "run", str(path), "--out", str(out), "--json")
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["recovered"] == in_flight
    after = rows_of(db)
    assert len(after) == 4 and {r["status"] for r in after.values()} == {"completed"}
    for name, finished in done_before.items():  # finished runs were not repeated
        assert after[name]["attempts"] == 1 and after[name]["finished_at"] == finished
    assert after[in_flight[0]]["attempts"] == 2
    assert result["ran"] == 4 - len(done_before)


@pytest.mark.slow
def test_ctrl_c_of_the_driver_records_its_running_runs_interrupted(tmp_path):
    """SIGTERM (kill, a batch scheduler) to the driver: exit 143, and what was running is
    interrupted in study.db (a SIGKILLed driver leaves it running until the next invocation
    recovers it); a rerun ends it. SIGTERM is raised as Ctrl-C's KeyboardInterrupt
    (loralab.ending.sigterm_interrupts), so this is Ctrl-C's path too; before, SIGTERM killed
    the driver outright."""
    path = write_study(tmp_path, "ctrlc", axes={"lora.r": [2, 4]}, repeats=2)
    out = tmp_path / "runs"
    db = out / "ctrlc" / "study.db"
    driver = subprocess.Popen([sys.executable, "-m", "loralab.cli", "study", "run", str(path), "--out", str(out)],
                              env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    wait_for(lambda: "running" in _statuses(db).values(), 240, "a run running")
    in_flight = {n for n, s in _statuses(db).items() if s == "running"}
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=60) == 143, driver.stderr.read()[-2000:]
    after = rows_of(db)
    assert "running" not in {r["status"] for r in after.values()}
    for name in in_flight:
        assert after[name]["status"] == "interrupted"
        assert after[name]["error"].startswith("the study was interrupted (SIGTERM) while this run was running")
    rerun = cli("study", "run", str(path), "--out", str(out), "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert {r["status"] for r in rows_of(db).values()} == {"completed"}


@pytest.mark.slow
def test_sigkilled_run_is_recorded_interrupted_then_resumed(tmp_path):
    """A run process killed: interrupted in study.db, resumed by the next `study run` from its
    checkpoint. Run again after its data file changed, the study is refused before anything
    starts (exit 2, study.db and the run directory as they were), since the run would resume on
    other examples; with the data put back, it resumes."""
    from userdata import instruction_records, write_jsonl

    records = instruction_records(48, seed=5)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    train = {**TINY["train"], "max_steps": 40, "checkpoint_every": 5}
    base = {**TINY, "data": {"path": str(data), "max_seq_length": 256, "val_max_examples": 8}, "train": train}
    path = write_study(tmp_path, "kill", axes={"lora.r": [2]}, base=base)
    out = tmp_path / "runs"
    db = out / "kill" / "study.db"
    env = {**os.environ, "PYTHONPATH": SRC}
    driver = subprocess.Popen([sys.executable, "-m", "loralab.cli", "study", "run", str(path), "--out", str(out),
                               "--retries", "0"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # a complete checkpoint, as the driver counts them: a manifest in a checkpoint's temporary
    # directory before its rename is not one (pathlib's "*" matches ".tmp-step-..." too)
    wait_for(lambda: checkpoint_step(out / "kill" / "r2") > 0, 240, "the run's first checkpoint")
    (child,) = run_processes(driver.pid)
    os.kill(child, signal.SIGKILL)
    assert driver.wait(timeout=60) == 1  # something is left to do
    row = rows_of(db)["r2"]
    assert row["status"] == "interrupted" and "SIGKILL" in row["error"] and row["attempts"] == 1
    run_dir = out / "kill" / "r2"
    files = {p: p.read_bytes() for p in [db, *run_dir.rglob("*")] if p.is_file()}
    write_jsonl(data, records[:-1])  # one record fewer
    refused = cli("study", "run", str(path), "--out", str(out))
    assert refused.returncode == 2, refused.stderr
    assert "study 'kill': run r2 trained on other examples than the data gives now (" in refused.stderr
    assert "--name NEW_NAME" in refused.stderr
    assert {p: p.read_bytes() for p in [db, *run_dir.rglob("*")] if p.is_file()} == files
    write_jsonl(data, records)  # put back
    rerun = cli("study", "run", str(path), "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    row = rows_of(db)["r2"]
    assert row["status"] == "completed" and row["attempts"] == 2 and row["error"] is None
    summary = json.loads((out / "kill" / "r2" / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 5 and summary["resumed_from_step"] % 5 == 0  # continued, not restarted
    with Store(db) as s:  # the series is whole: every step logged once, from 1 to 40
        steps = sorted(m["step"] for m in s.metrics(row["id"]) if m["name"] == "train_loss")
    assert steps == list(range(1, 41))


@pytest.mark.slow
def test_successive_halving_stops_poor_runs(tmp_path):
    base = {**TINY, "train": {**TINY["train"], "max_steps": 16}}
    path = write_study(tmp_path, "halving", base=base, axes={"train.lr": [0.01, 1.0e-7]}, repeats=2)
    root = tmp_path / "runs" / "halving"
    # process-level halving: every run alone (fused, each seed's pair would prune inside its group)
    result = run_study(load_study(path, root=root), root=root, workers=2, halving=Halving(eta=2, min_steps=2),
                       fuse=False)
    # rungs at steps 2, 4, 8: 4 runs -> 2 -> 1 -> 1, which trains on to step 16
    assert result["counts"] == {"completed": 1, "stopped_early": 3}
    rows = rows_of(root / "study.db")
    for name in ("lr1e-07-s1", "lr1e-07-s2"):  # barely trained: out at the first rung
        assert rows[name]["status"] == "stopped_early" and rows[name]["stopped_at_step"] == 2, rows[name]
    with Store(root / "study.db") as s:
        at2 = {n: s.metric_at(r["id"], "eval_loss", 2) for n, r in rows.items()}
        last = {n: max(m["step"] for m in s.metrics(r["id"])) for n, r in rows.items()}
    assert max(at2["lr0.01-s1"], at2["lr0.01-s2"]) < min(at2["lr1e-07-s1"], at2["lr1e-07-s2"])
    (winner,) = [n for n, r in rows.items() if r["status"] == "completed"]
    (second,) = [n for n, r in rows.items() if r["stopped_at_step"] == 4]
    assert winner.startswith("lr0.01") and second.startswith("lr0.01")
    assert all(last[n] == rows[n]["stopped_at_step"] for n in rows if n != winner) and last[winner] == 16
    summary = json.loads((root / winner / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 8  # went on from its checkpoint


def test_max_memory_skips_runs_and_records_the_estimate(tmp_path):
    from loralab.estimate import estimate_run
    from loralab.train.step import fullest_micro_batch

    path = write_study(tmp_path, "mem", axes={"lora.targets": [["query"], ["all", "head"]], "lora.r": [64]})
    study = load_study(path)
    cfgs = [config_from_dict(r.config) for r in study.runs]
    tokens = fullest_micro_batch(cfgs[0])  # the study estimates at its data's fullest micro batch
    assert tokens < cfgs[0].train.micro_batch_size * cfgs[0].data.max_seq_length
    small, big = (estimate_run(c, device="cpu", tokens=tokens).memory_bytes["total"] for c in cfgs)
    assert big > small
    root = tmp_path / "runs" / "mem"
    result = run_study(load_study(path, root=root), root=root, max_memory=(small + big) // 2)
    rows = rows_of(root / "study.db")
    assert result["counts"] == {"completed": 1, "skipped": 1}
    skipped = rows["t_all.head-r64"]
    assert (skipped["status"] == "skipped" and skipped["estimated_memory_bytes"] == big
            and "--max-memory" in skipped["error"])
    assert skipped["attempts"] == 0 and not (root / "t_all.head-r64").exists()
    assert rows["t_query-r64"]["estimated_memory_bytes"] == small


def test_budget_leaves_unstarted_runs_pending_for_the_next_invocation(tmp_path):
    from loralab.units import parse_duration

    assert [parse_duration(t, "--budget") for t in ("90s", "30m", "2h", "45")] == [90, 1800, 7200, 45]
    with pytest.raises(ConfigError, match="--budget"):
        parse_duration("soon", "--budget")
    path = write_study(tmp_path, "budget", axes={"lora.r": [2, 4]})
    root = tmp_path / "runs" / "budget"
    spent = run_study(load_study(path, root=root), root=root, budget_s=0.0)
    assert spent["counts"] == {"pending": 2} and spent["budget_spent"]
    assert (spent["planned"], spent["ran"]) == (2, 0)  # planned, none started within the budget
    assert not (root / "r2").exists() and not (root / "r4").exists()
    done = run_study(load_study(path, root=root), root=root, budget_s=3600)
    assert done["counts"] == {"completed": 2} and not done["budget_spent"]
    assert {r["attempts"] for r in rows_of(root / "study.db").values()} == {1}
    with pytest.raises(ConfigError, match="--budget"):
        run_study(load_study(path, root=root), root=root, budget_s=-1)


def test_store_marks_running_as_interrupted_on_open(tmp_path):
    path = write_study(tmp_path, "st", axes={"lora.r": [2, 4]})
    study = load_study(path)
    db = tmp_path / "st.db"
    with Store(db) as s:
        sid, recovered = s.open_study(study.name, study.to_json(), tmp_path, study.runs)
        assert recovered == []
        s.start(s.run(sid, "r2")["id"], run_dir="x", estimated=None)
    with Store(db) as s:  # the driver died with r2 running
        sid, recovered = s.open_study(study.name, study.to_json(), tmp_path, study.runs)
        assert recovered == ["r2"] and s.counts(sid) == {"interrupted": 1, "pending": 1}
        study.runs[0].config["lora"]["r"] = 3
        with pytest.raises(ConfigError, match="different config"):
            s.open_study(study.name, study.to_json(), tmp_path, study.runs)
        assert s.counts(sid) == {"interrupted": 1, "pending": 1}  # the refused open changed nothing


def test_study_readers_never_write_the_database(tmp_path):
    path = write_study(tmp_path, "ro", axes={"lora.r": [2, 4]})
    study = load_study(path)
    root = tmp_path / "out"
    db = root / "ro" / "study.db"
    db.parent.mkdir(parents=True)
    with Store(db) as s:
        sid, _ = s.open_study(study.name, study.to_json(), root / "ro", study.runs)
        s.skip(s.run(sid, "r2")["id"], "over --max-memory")
    with Store(db, readonly=True) as reader, pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.skip(reader.run(sid, "r4")["id"], "a reader cannot do this")
    with Store(db) as driver, driver.tx():  # a driver in the middle of a write transaction
        driver.db.execute("UPDATE runs SET status = 'running' WHERE name = 'r4'")
        for args in (["study", "status", "ro"], ["runs", "list", "--study", "ro"],
                     ["runs", "show", "r2", "--study", "ro"]):
            out = cli(*args, "--out", str(root))
            assert out.returncode == 0, out.stderr
        assert "skipped" in out.stdout and "over --max-memory" in out.stdout
        driver.db.execute("UPDATE runs SET status = 'pending' WHERE name = 'r4'")
    assert rows_of(db)["r4"]["status"] == "pending" and rows_of(db)["r2"]["status"] == "skipped"


@pytest.mark.slow
def test_fuse_trains_a_group_in_one_process(tmp_path):
    path = write_study(tmp_path, "fuse", axes={"lora.r": [2, 4], "train.lr": [1.0e-3]})
    root = tmp_path / "runs" / "fuse"
    result = run_study(load_study(path, root=root), root=root, fuse=True)
    assert result["counts"] == {"completed": 2}
    rows = rows_of(root / "study.db")
    assert rows["r4-lr0.001"]["trainable_params"] == 2 * rows["r2-lr0.001"]["trainable_params"]
    for name, r in rows.items():
        summary = json.loads((root / name / "summary.json").read_text())
        assert summary["fused_with"] and r["final_eval_loss"] == pytest.approx(summary["final_eval_loss"])


@pytest.mark.slow
def test_fuse_with_halving_prunes_inside_the_group(tmp_path):
    base = {**TINY, "train": {**TINY["train"], "max_steps": 4}}
    path = write_study(tmp_path, "fh", base=base, axes={"train.lr": [1.0e-5, 1.0e-3, 3.0e-3]})
    root = tmp_path / "runs" / "fh"
    result = run_study(load_study(path, root=root), root=root, fuse=True, halving=Halving(eta=3, min_steps=2))
    assert result["counts"] == {"completed": 1, "stopped_early": 2}
    rows = rows_of(root / "study.db")
    stopped = [r for r in rows.values() if r["status"] == "stopped_early"]
    assert {r["stopped_at_step"] for r in stopped} == {2}
    at_rung = dict(sqlite3.connect(root / "study.db").execute(  # the survivor had the lowest eval loss there
        "SELECT runs.name, metrics.value FROM metrics JOIN runs ON runs.id = metrics.run_id "
        "WHERE metrics.step = 2 AND metrics.name = 'eval_loss'").fetchall())
    survivor = next(n for n, r in rows.items() if r["status"] == "completed")
    assert len(at_rung) == 3 and survivor == min(at_rung, key=at_rung.get)


def test_a_run_whose_resume_was_refused_ends_invalid_in_the_study(tmp_path):
    """`loralab train --resume` refused before its first step leaves the run's summary as it was
    (paused here) with resume_error; the study driver records it invalid with that reason rather
    than as paused, which it would plan to resume again."""
    from loralab.rundir import RunDir, write_atomic
    from loralab.study.backends.process import outcome

    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    write_atomic(run.summary, {"status": "paused", "error": None, "steps_done": 2, "stopped_at_step": 2,
                               "resume_error": "--resume refused before its first step: data.path x: no such file"})
    result = outcome(run.root, 2)
    assert result["status"] == "invalid"
    assert result["error"] == "--resume refused before its first step: data.path x: no such file"
    write_atomic(run.summary, {"status": "paused", "error": None, "steps_done": 2, "stopped_at_step": 2})
    assert outcome(run.root, 0)["status"] == "paused"


def test_a_study_run_again_on_changed_data_is_refused(tmp_path, capsys):
    """Its completed runs trained on the data as it was: run again after the file changed, the
    study would mix two datasets in one report. Refused before anything starts (exit 2, study.db
    as it was), naming the runs; unchanged it plans nothing; --name starts a fresh study."""
    from loralab.cli import main
    from userdata import instruction_records, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", instruction_records(40, seed=4))
    base = {**TINY, "data": {"path": str(data), "max_seq_length": 256, "val_max_examples": 4}}
    path = write_study(tmp_path, "cd", base, axes={"lora.r": [2, 4]})
    out = str(tmp_path / "runs")
    assert main(["study", "run", str(path), "--out", out]) == 0
    db = tmp_path / "runs" / "cd" / "study.db"
    before = db.read_bytes()
    capsys.readouterr()
    assert main(["study", "run", str(path), "--out", out, "--dry-run"]) == 0  # unchanged: nothing to refuse
    assert "every run already completed (2)" in capsys.readouterr().out
    records = instruction_records(40, seed=4)
    records[7]["instruction"] = "Briefly: " + records[7]["instruction"]  # the start: never cut away
    write_jsonl(data, records)
    for dry in ([], ["--dry-run"]):
        assert main(["study", "run", str(path), "--out", out, *dry]) == 2
        err = capsys.readouterr().err
        assert ("study 'cd': runs r2, r4 trained on other examples than the data gives now (the same number of "
                "examples, other tokens): the data file or the tokenizer changed since") in err
        assert "--name NEW_NAME" in err and db.read_bytes() == before
    assert main(["study", "run", str(path), "--out", out, "--name", "cd2"]) == 0
    assert {r["status"] for r in rows_of(tmp_path / "runs" / "cd2" / "study.db").values()} == {"completed"}
