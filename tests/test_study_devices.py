"""A study's runs on several devices: distributed.nproc per run, ``study run --gpus-per-run K``.

A run on K processes trains alone (``loralab train``'s launcher, gloo on the CPU) and takes K of
the pool's slots, K GPUs on the local backend. Real runs on a tiny random-init Llama saved with
save_pretrained; the packing of slots is checked on real planned units with a backend that
only records what ran when.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import studytools
from loralab.rundir import RunDir
from loralab.study.scheduler import GpuSlots, Scheduler, form_units, plan_tasks
from loralab.study.spec import load_study
from loralab.study.store import Store

STEPS = 6


def base(model: Path) -> dict:
    """batch 6 in micro batches of 2, dropout 0, fp32: 2 processes do the 1-process maths."""
    return {
        "model": {"path": str(model), "device": "cpu", "dtype": "fp32"},
        "data": {"path": "builtin:arithmetic_2ds", "limit": 48, "val_max_examples": 8, "max_seq_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": STEPS, "batch_size": 6, "micro_batch_size": 2, "warmup_steps": 0, "log_every": 1,
                  "lr": 0.01},
        "output": {"save_adapter": False},
    }


def study_run(spec: Path, root: Path, *flags: str) -> subprocess.CompletedProcess:
    """``loralab study run SPEC --out ROOT --json FLAGS`` as a user runs it, to its end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "loralab.cli", "study", "run", str(spec), "--out", str(root),
                           "--json", *flags], env=env, capture_output=True, text=True, timeout=300)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.mark.slow
def test_a_run_wider_than_the_study_is_skipped_with_the_reason(tmp_path, tiny_model_dir):
    spec = studytools.write_study(tmp_path, "wide", base(tiny_model_dir("llama")), axes={"lora.r": [2]})
    root = tmp_path / "runs"
    done = study_run(spec, root, "--workers", "2", "--gpus-per-run", "3")
    assert done.returncode == 0, done.stderr[-3000:]  # skipped, as the memory gate skips: the study went as asked
    (row,) = studytools.rows_of(root / "wide" / "study.db").values()
    assert row["status"] == "skipped"
    assert row["error"] == ("the run trains on 3 processes (distributed.nproc), one device each, but the study has "
                            "2 worker slots (--workers)")
    assert not list((root / "wide").glob("*/summary.json"))  # nothing started
    bad = study_run(spec, tmp_path / "bad", "--gpus-per-run", "0")
    assert bad.returncode == 2 and "--gpus-per-run must be >= 1 (got 0)" in bad.stderr


@pytest.mark.slow  # a local Ray instance: ~30 s
def test_a_run_wider_than_the_ray_cluster_is_skipped_not_waited_for(tmp_path, tiny_model_dir):
    """On Ray a run on more processes than the cluster has CPUs was submitted and waited for
    forever (Ray never schedules it); it is skipped with the reason, as the local pool skips it."""
    pytest.importorskip("ray")
    spec = studytools.write_study(tmp_path, "wide", base(tiny_model_dir("llama")), axes={"lora.r": [2]})
    root = tmp_path / "runs"
    cpus = len(os.sched_getaffinity(0))
    done = study_run(spec, root, "--executor", "ray", "--gpus-per-run", str(cpus + 1))
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = studytools.rows_of(root / "wide" / "study.db").values()
    assert row["status"] == "skipped"
    assert row["error"] == (f"the run trains on {cpus + 1} processes (distributed.nproc), one device each, but the "
                            f"study has {cpus} CPUs in the Ray cluster (one per process)")


def test_gpu_slots_give_a_run_on_several_processes_one_gpu_each():
    gpus = GpuSlots(["0", "1", "2"], capacity=10)
    assert gpus.acquire(4, 2) == "0,1"
    assert gpus.acquire(4, 2) == "2,0"  # the free GPU first, then the emptiest where 4 more fit
    assert gpus.acquire(4, 2) == "1,2"
    assert gpus.acquire(4) is None  # each holds 8 of 10
    gpus.release("0,1", 4)
    assert gpus.used == {"0": 4, "1": 4, "2": 8} and gpus.count == {"0": 1, "1": 1, "2": 2}
    assert gpus.acquire(4, 3) is None  # GPU 2 has no room: three GPUs cannot be had
    assert gpus.acquire(4, 2) == "0,1"
    assert GpuSlots(["0", "1"], capacity=None).acquire(None, 3) is None  # more GPUs than there are


class Recorder:
    """A backend that trains nothing: each unit ends after ``polls`` polls with completed
    outcomes, and the slots in use are recorded at every start."""

    name = "recorder"

    def __init__(self, polls: int = 3):
        self.polls, self.active, self.starts = polls, [], []

    def start(self, unit, *, memory, threads):
        handle = _Handle(self, unit, self.polls)
        self.active.append(handle)
        self.starts.append((unit.runs[0].name, unit.nproc, sum(h.unit.nproc for h in self.active)))
        return handle


class _Handle:
    def __init__(self, backend: Recorder, unit, polls: int):
        self.backend, self.unit, self.left = backend, unit, polls

    def poll(self):
        self.left -= 1
        if self.left > 0:
            return None
        self.backend.active.remove(self)
        return [{"status": "completed", "summary": {}, "metrics": [], "error": None} for _ in self.unit.runs]


def test_the_pool_fills_free_slots_in_queue_order_and_never_over(tmp_path, tiny_model_dir, monkeypatch):
    """Runs of 2, 2, 1 and 1 processes in 3 slots: the second run of two waits for its slots
    while a run of one starts beside the first; never more than 3 slots in use."""
    monkeypatch.setattr("loralab.study.scheduler.POLL_S", 0.0)
    spec = studytools.write_study(tmp_path, "pk", base(tiny_model_dir("llama")),
                                  axes={"distributed.nproc": [2, 1], "lora.r": [2, 4]})
    root = tmp_path / "runs"
    study = load_study(spec, root=root)
    with Store(root / "study.db") as store:
        sid, _ = store.open_study(study.name, study.to_json(), root, study.runs)
        tasks = plan_tasks(store, sid, root, max_memory=None)
        units = sorted(form_units(tasks, fuse=False, budget=None), key=lambda u: (-u.size, u.name))
        assert [u.size for u in units] == [2, 2, 1, 1]
        backend = Recorder()
        assert Scheduler(store, backend, workers=3).run(units)
        assert {r["status"] for r in store.runs(sid)} == {"completed"}
    # (run, its processes, slots in use once it started): each pair ends together after 3 polls
    assert [(size, busy) for _, size, busy in backend.starts] == [(2, 2), (1, 3), (2, 2), (1, 3)]
    assert [name for name, _, _ in backend.starts] == [units[0].name, units[2].name, units[1].name, units[3].name]



def rank_1(driver: int):
    """The process of rank 1 among a study driver's descendants, or None."""
    import psutil

    for p in psutil.Process(driver).children(recursive=True):
        try:
            if p.environ().get("RANK") == "1":
                return p
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_a_run_on_two_processes_beside_a_run_on_one_killed_and_run_again(tmp_path, tiny_model_dir):
    """distributed.nproc [1, 2] with --workers 2: the 2-process run takes both slots, so the two
    runs never train side by side. Its rank 1 is SIGKILLed after the first checkpoint: the
    launcher records the run interrupted and the pool runs it again (--retries 1, the default)
    from that checkpoint on two processes. It ends with the 1-process run's losses, every step
    logged once."""
    from loralab.study.backends.process import checkpoint_step
    from waiting import wait_for

    cfg = base(tiny_model_dir("llama"))
    cfg["train"] |= {"max_steps": 40, "checkpoint_every": 5}
    spec = studytools.write_study(tmp_path, "np", cfg, axes={"distributed.nproc": [1, 2]})
    root = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "loralab.cli", "study", "run", str(spec), "--out", str(root),
                               "--workers", "2", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    two = root / "np" / "nproc2"
    wait_for(lambda: checkpoint_step(two) > 0, 240, "the 2-process run's first checkpoint")
    wait_for(lambda: rank_1(driver.pid), 30, "rank 1").kill()
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err[-3000:]

    rows = studytools.rows_of(root / "np" / "study.db")
    one = root / "np" / "nproc1"
    assert {n: (r["status"], r["attempts"]) for n, r in rows.items()} == {
        one.name: ("completed", 1), two.name: ("completed", 2)}
    summary = RunDir(two).read_summary()
    assert summary["resumed_from_step"] >= 5 and summary["resumed_from_step"] % 5 == 0  # continued, not restarted
    assert summary["extra"]["distributed"]["world_size"] == 2
    assert yaml.safe_load(RunDir(two).config.read_text())["distributed"]["nproc"] == 2
    assert "distributed" not in RunDir(one).read_summary().get("extra", {})
    with Store(root / "np" / "study.db") as s:
        steps = sorted(m["step"] for m in s.metrics(rows[two.name]["id"]) if m["name"] == "train_loss")
    assert steps == list(range(1, 41))
    a, b = losses(one), losses(two)
    assert len(a) == 40 and b == pytest.approx(a, rel=1e-6)
    spans = sorted((r["started_at"], r["finished_at"]) for r in rows.values())
    assert spans[0][1] <= spans[1][0], spans  # 2 + 1 slots do not fit in 2: never side by side
    log = (root / "np" / "study.log").read_text()
    assert "trains alone: distributed.nproc 2" in log and "on 2 processes" in log
    assert "rank 1 ended with SIGKILL" in log
