"""The study scheduler: one flow, every flag combination run or refused, fusion by default,
GPUs per worker (read from the environment each run process received), halving + fusion on a
local Ray instance with the same survivors as the local backend."""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import studytools
from loralab.errors import ConfigError
from loralab.rundir import FUSED_LOG
from loralab.study.execute import run_study
from loralab.study.options import StudyOptions
from loralab.study.policy import Halving
from loralab.study.scheduler import GpuSlots, form_units, group_memory
from loralab.study.spec import load_study
from loralab.study.store import Store
from studytools import TINY as TINY48
from studytools import rows_of
from waiting import run_processes, wait_for

SRC = Path(__file__).resolve().parents[1] / "src"
PROBE = Path(__file__).resolve().parent / "env_probe"  # sitecustomize: children log their environment
TINY = {**TINY48, "data": {**TINY48["data"], "limit": 32}}


def write_study(tmp_path: Path, name: str, base: dict | None = None, **spec) -> Path:
    return studytools.write_study(tmp_path, name, base or TINY, **spec)


def child_envs(log_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(log_dir.glob("*.json"))]


def run_name(argv: list[str]) -> str:
    """The run a `loralab train ... --out RUN_DIR` / `--resume RUN_DIR` process trains."""
    flag = "--out" if "--out" in argv else "--resume"
    return Path(argv[argv.index(flag) + 1]).name


@pytest.fixture
def probe_env(tmp_path, monkeypatch):
    """Every run process started from here on logs its environment under the returned folder."""
    log_dir = tmp_path / "envs"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), str(PROBE)]))
    monkeypatch.setenv("LORALAB_TEST_ENV_LOG", str(log_dir))
    return log_dir


# ----------------------------------------------------------------------------- the flow


@functools.cache
def _parser() -> argparse.ArgumentParser:
    from loralab.cli import build_parser

    return build_parser()


def _parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["study", "run", "preset:dropout", *argv])


def test_every_flag_combination_runs_or_is_refused_with_a_message():
    """Every combination of the scheduling flags: accepted, or refused (exit 2) naming a flag.
    The accepted ones all run in tests: local x {fuse, no-fuse} x {halving, none} in
    test_study.py, Ray here: halving + fusion, with DoRA runs alone at the rungs, in
    test_halving_and_fusion_on_ray_*, and no-fuse without halving in the resource tests. A
    fused group without halving is the same unit on Ray with no --halving argument."""
    flags = {
        "executor": [[], ["--executor", "ray"]],
        "halving": [[], ["--halving"]],
        "eta": [[], ["--eta", "2", "--min-steps", "1"]],
        "fuse": [[], ["--fuse"], ["--no-fuse"]],
        "retries": [[], ["--retries", "0"], ["--retries", "3"]],
        "budget": [[], ["--budget", "30m"]],
        "gpus": [[], ["--gpus", "0,1"]],
        "address": [[], ["--address", "ray://head:10001"]],
        "workers": [[], ["--workers", "2"]],
        "max_memory": [[], ["--max-memory", "8GB"]],
    }
    accepted = refused = 0
    for combo in itertools.product(*flags.values()):
        on = dict(zip(flags, (bool(c) for c in combo), strict=True))
        ray = on["executor"]
        args = _parse(*itertools.chain.from_iterable(combo))
        expect = ("--eta" if on["eta"] and not on["halving"] else
                  "--gpus" if on["gpus"] and ray else
                  "--address" if on["address"] and not ray else None)
        if expect is None:
            opts = StudyOptions.from_args(args)
            accepted += 1
            assert opts.executor == ("ray" if ray else "local") and opts.fuse == ("--no-fuse" not in combo[3])
            assert (opts.halving is not None) == on["halving"] and opts.retries == int(combo[4][1] if combo[4] else 1)
            assert (opts.budget_s == (1800 if on["budget"] else None)
                    and opts.gpus == (["0", "1"] if on["gpus"] else None))
            assert opts.max_memory == (8 * 10**9 if on["max_memory"] else None)
            if on["halving"]:
                assert (opts.halving.eta, opts.halving.min_steps) == ((2, 1) if on["eta"] else (3, 10))
        else:
            with pytest.raises(ConfigError, match=expect):
                StudyOptions.from_args(args)
            refused += 1
    # local: any --gpus; Ray: any --address; --eta: with --halving
    assert accepted == 864 and accepted + refused == 2304
    # through the command line: refused before the study is loaded, exit code 2, the flag named
    from loralab.cli import main

    for argv, flag in ((["--executor", "ray", "--gpus", "0"], "--gpus"), (["--address", "x"], "--address"),
                       (["--eta", "2"], "--eta"), (["--retries", "-1"], "--retries"),
                       (["--budget", "soon"], "--budget"), (["--gpus", ","], "--gpus")):
        assert main(["study", "run", "preset:dropout", *argv]) == 2, flag
    seen = subprocess.run([sys.executable, "-m", "loralab.cli", "study", "run", "preset:dropout", "--workers", "0"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert seen.returncode == 2 and "--workers must be >= 1" in seen.stderr, seen.stderr


def test_halving_options_are_checked_against_the_runs(tmp_path):
    study = load_study(write_study(tmp_path, "h", axes={"lora.r": [2, 4]}))
    with pytest.raises(ConfigError, match="--min-steps 2 is not below train.max_steps 2"):
        StudyOptions(halving=Halving(eta=3, min_steps=2)).check(study.runs)
    with pytest.raises(ConfigError, match="--eta must be >= 2"):
        StudyOptions(halving=Halving(eta=1, min_steps=1)).check(study.runs)
    StudyOptions(halving=Halving(eta=2, min_steps=1), executor="ray", fuse=True, retries=2).check(study.runs)


# ----------------------------------------------------------------------------- fusion and GPUs


def _tasks(tmp_path: Path, study_path: Path):
    from loralab.study.scheduler import plan_tasks

    root = tmp_path / "plan"
    study = load_study(study_path, root=root)
    with Store(tmp_path / "plan.db") as store:
        sid, _ = store.open_study(study.name, study.to_json(), root, study.runs)
        return plan_tasks(store, sid, root, max_memory=None)


def test_fusion_groups_what_fits_and_says_why_not(tmp_path, caplog):
    tasks = _tasks(tmp_path, write_study(tmp_path, "fz", axes={"lora.r": [2, 4, 8, 16, 32]}))
    (tmp_path / "d").mkdir()
    dora = _tasks(tmp_path / "d", write_study(tmp_path, "fzd", axes={"lora.dora": [True]}))
    both = tasks + dora
    assert all(t.memory and t.memory["base_weights"] > 0 for t in both)
    shared = sum(tasks[0].memory.get(p, 0) for p in ("base_weights", "dequant_buffer", "framework"))
    # on the CPU one run's allocator slack in full, 40% of the other's activations and backward
    # transient (bench/bench_fused_memory.py measured 1.3-1.4x of a further run's live activations)
    a, b = sorted((t.memory for t in tasks[:2]), key=lambda m: -m["allocator_slack"])
    assert group_memory(tasks[:2]) == a["total"] + b["total"] - shared - b["allocator_slack"] + int(
        0.4 * (b["activations"] + b["backward_transient"]))
    budget = group_memory(tasks[:3]) + 1  # three of the cheapest fit, not four
    with caplog.at_level(logging.INFO, logger="loralab.study.scheduler"):
        units = form_units(both, fuse=True, budget=budget, halving=True)
    sizes = sorted(len(u.tasks) for u in units)
    assert sizes == [1, 2, 3]  # r2 r4 r8 | r16 r32 | the DoRA run alone
    assert all(group_memory(u.tasks) <= budget for u in units if u.fused)
    text = caplog.text
    assert "dora" in text.lower() and "trains alone" in text and "starts a new group" in text
    assert "r2, r4, r8 train together (3 runs" in text
    # without halving, groups split for idle workers (never below two runs); --no-fuse: all alone
    assert sorted(len(u.tasks) for u in form_units(tasks, fuse=True, budget=None, workers=2)) == [2, 3]
    assert [len(u.tasks) for u in form_units(tasks, fuse=False, budget=None)] == [1] * 5


def test_cpu_workers_share_the_machines_ram_for_fused_groups(tmp_path):
    """Two local workers on the CPU train two units at once in one RAM: each unit's fused group
    may estimate half of it; --max-memory, when given, is each unit's own."""
    from loralab.study.execute import _scheduler
    from loralab.study.scheduler import device_memory
    from loralab.study.store import Store

    ram = device_memory("cpu")
    store = Store(tmp_path / "s.db")
    budgets = [_scheduler(store, StudyOptions(**kw), on_gpu=False, t0=0.0)[1]
               for kw in ({}, {"workers": 2}, {"workers": 3, "max_memory": 5 * 2**30})]
    assert budgets == [ram, ram // 2, 5 * 2**30]


def test_gpu_slots_give_each_worker_a_gpu_and_share_only_what_fits():
    gpus = GpuSlots(["0", "1"], capacity=10)
    assert [gpus.acquire(4), gpus.acquire(4), gpus.acquire(4), gpus.acquire(4)] == ["0", "1", "0", "1"]
    assert gpus.acquire(4) is None and gpus.acquire(None) is None  # full; unknown size waits for a free GPU
    gpus.release("1", 4)
    assert gpus.acquire(7) is None and gpus.acquire(6) == "1"
    unknown = GpuSlots(["3"], capacity=None)  # capacity unknown: one unit per GPU
    assert unknown.acquire(1) == "3" and unknown.acquire(1) is None


@pytest.mark.slow
def test_local_backend_gives_each_worker_its_gpu_from_the_environment(tmp_path, probe_env):
    """Four runs, three on GPUs (model.device auto), one on the CPU; --gpus 0,1, --workers 4, and
    --max-memory says two runs fit on one GPU: the third GPU run shares GPU 0."""
    path = write_study(tmp_path, "gpu", axes={"lora.r": [2, 3, 4, 5]})
    study = load_study(path)
    for run in study.runs:
        run.config["model"]["device"] = "cpu" if run.name == "r5" else "auto"
    from loralab.config import config_from_dict
    from loralab.estimate import estimate_run

    est = max(estimate_run(config_from_dict(r.config), device="cpu").memory_bytes["total"] for r in study.runs)
    root = tmp_path / "runs" / "gpu"
    study.place(root)
    result = run_study(study, root=root, workers=4, gpus=["0", "1"], max_memory=int(2.5 * est), fuse=False)
    assert result["counts"] == {"completed": 4}
    envs = {run_name(e["argv"]): e for e in child_envs(probe_env)}
    assert sorted(envs) == ["r2", "r3", "r4", "r5"]
    gpus = sorted(envs[n]["CUDA_VISIBLE_DEVICES"] for n in ("r2", "r3", "r4"))
    assert gpus == ["0", "0", "1"]  # cheapest first: r2 -> GPU 0, r3 -> GPU 1, r4 -> beside r2 on GPU 0
    assert envs["r5"]["CUDA_VISIBLE_DEVICES"] == os.environ.get("CUDA_VISIBLE_DEVICES")  # a CPU run: untouched
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, os.cpu_count() // 4))
    assert {e["OMP_NUM_THREADS"] for e in envs.values()} == {threads}
    if torch.version.cuda is None:  # forked from the warm process: torch took the share too
        assert [e["threads"] for e in envs.values()] == [int(threads)] * 4


@pytest.mark.slow
def test_fused_group_killed_is_run_again_with_retries(tmp_path):
    base = {**TINY, "train": {**TINY["train"], "max_steps": 60}}
    path = write_study(tmp_path, "kill", base=base, axes={"lora.r": [2, 4]})
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    driver = subprocess.Popen([sys.executable, "-m", "loralab.cli", "study", "run", str(path), "--out", str(out),
                               "--retries", "1", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)

    def fused_child() -> int | None:
        for pid, log in run_processes(driver.pid).items():
            if log.name == FUSED_LOG and (out / "kill" / "r2" / "metrics.jsonl").is_file():
                return pid
        return None

    os.kill(wait_for(fused_child, 240, "the fused group's process training"), signal.SIGKILL)
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-2000:]
    assert "fusion: r2, r4 train together" in stderr
    study_log = (out / "kill" / "study.log").read_text(encoding="utf-8")
    assert "fusion: r2, r4 train together" in study_log and "run r2: interrupted" in study_log
    rows = rows_of(out / "kill" / "study.db")
    assert {n: (r["status"], r["attempts"]) for n, r in rows.items()} == {"r2": ("completed", 2),
                                                                          "r4": ("completed", 2)}
    with Store(out / "kill" / "study.db") as s:  # the rerun's series only: every step once
        steps = sorted(m["step"] for m in s.metrics(rows["r2"]["id"]) if m["name"] == "train_loss")
    assert steps == list(range(1, 61))


# ----------------------------------------------------------------------------- Ray


HALVING_BASE = {**TINY, "train": {**TINY["train"], "max_steps": 4}}
HALVING_AXES = {"train.lr": [1.0e-5, 1.0e-3, 3.0e-3], "lora.dora": [False, True]}  # DoRA runs cannot be fused


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """One local Ray instance for the module, declaring two GPUs (no GPU needed: Ray only
    books them and sets CUDA_VISIBLE_DEVICES); its workers log run environments too."""
    ray = pytest.importorskip("ray")
    log_dir = tmp_path_factory.mktemp("ray-envs")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(SRC), str(PROBE)]),
                                       "LORALAB_TEST_ENV_LOG": str(log_dir)}})
    yield log_dir
    ray.shutdown()


@pytest.fixture(scope="module")
def local_halving(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local-halving")
    root = tmp / "runs" / "hf"
    result = run_study(load_study(write_study(tmp, "hf", HALVING_BASE, axes=HALVING_AXES), root=root), root=root,
                       halving=Halving(eta=3, min_steps=2))
    return result, rows_of(root / "study.db")


def _outcomes(rows: dict[str, dict]) -> dict[str, tuple]:
    return {n: (r["status"], r["stopped_at_step"], r["attempts"]) for n, r in rows.items()}


@pytest.mark.slow
def test_halving_and_fusion_locally(local_halving):
    result, rows = local_halving
    # three fusable runs prune inside their group, the three DoRA runs alone at the rungs: 1 of 3 each
    assert result["counts"] == {"completed": 2, "stopped_early": 4}
    for dora in ("dora_off", "dora_on"):
        group = [r for n, r in rows.items() if n.endswith(dora)]
        assert sorted((r["status"], r["stopped_at_step"]) for r in group) == \
            [("completed", None), ("stopped_early", 2), ("stopped_early", 2)], dora
    # one start each, but the DoRA survivor: started again from its rung-2 checkpoint
    assert {n: r["attempts"] for n, r in rows.items() if r["attempts"] != 1} == \
        {n: 2 for n, r in rows.items() if n.endswith("dora_on") and r["status"] == "completed"}


@pytest.mark.slow
def test_halving_and_fusion_on_ray_same_survivors_as_local(tmp_path, ray_instance, local_halving):
    root = tmp_path / "runs" / "hf"
    result = run_study(load_study(write_study(tmp_path, "hf", HALVING_BASE, axes=HALVING_AXES), root=root), root=root,
                       halving=Halving(eta=3, min_steps=2), executor="ray", workers=2)
    rows = rows_of(root / "study.db")
    local = local_halving[1]
    assert result["counts"] == local_halving[0]["counts"]
    assert _outcomes(rows) == _outcomes(local)  # same survivors, same rungs, every run once
    with Store(root / "study.db") as s:
        for name, r in rows.items():
            points = [(m["step"], m["name"]) for m in s.metrics(r["id"])]
            assert len(points) == len(set(points)) and points  # no step recorded twice
            assert {n for _, n in points} >= {"train_loss", "eval_loss", "lr"}
            assert r["final_eval_loss"] == pytest.approx(local[name]["final_eval_loss"], rel=1e-4)
            assert r["trainable_params"] == local[name]["trainable_params"] > 0 and r["peak_memory_bytes"] > 0
    envs = [e for e in child_envs(ray_instance) if "loralab.study.fuse" in e["argv"]]
    assert len(envs) == 1 and any(a.startswith("--halving=3,2,") for a in envs[0]["argv"])


@pytest.mark.slow
def test_ray_tasks_request_a_gpu_share_and_cpus(tmp_path, ray_instance, caplog):
    """Runs on model.device auto ask Ray for a GPU: half of one when --max-memory says two fit."""
    path = write_study(tmp_path, "rg", axes={"lora.r": [2, 4]})
    study = load_study(path)
    for run in study.runs:
        run.config["model"]["device"] = "auto"
    from loralab.config import config_from_dict
    from loralab.estimate import estimate_run

    est = max(estimate_run(config_from_dict(r.config), device="cpu").memory_bytes["total"] for r in study.runs)
    root = tmp_path / "runs" / "rg"
    study.place(root)
    before = {p.name for p in ray_instance.glob("*.json")}
    with caplog.at_level(logging.INFO, logger="loralab.study.backends.ray"):
        result = run_study(study, root=root, executor="ray", workers=2, fuse=False, max_memory=int(2.5 * est))
    assert result["counts"] == {"completed": 2}
    asked = [r.getMessage() for r in caplog.records if "Ray resources" in r.getMessage()]
    assert len(asked) == 2 and all("'GPU': 0.5" in m and "'CPU': 1.0" in m for m in asked), asked
    envs = [json.loads(p.read_text()) for p in ray_instance.glob("*.json") if p.name not in before]
    assert sorted(run_name(e["argv"]) for e in envs) == ["r2", "r4"]
    assert all(e["CUDA_VISIBLE_DEVICES"] in ("0", "1") for e in envs)  # Ray's GPU, inherited by the run


@pytest.mark.slow
def test_a_ray_task_for_a_run_on_two_processes_asks_for_two_of_each(tmp_path, ray_instance, caplog):
    """distributed.nproc 2 on model.device auto: the task asks Ray for 2 CPUs and 2 GPUs (the
    instance declares two) and the run's launcher trains it on 2 processes of that node."""
    base = {**TINY, "model": {**TINY["model"], "device": "auto"}, "distributed": {"nproc": 2}}
    root = tmp_path / "runs" / "rn"
    study = load_study(write_study(tmp_path, "rn", base, axes={"lora.r": [2]}), root=root)
    before = {p.name for p in ray_instance.glob("*.json")}
    with caplog.at_level(logging.INFO, logger="loralab.study.backends.ray"):
        result = run_study(study, root=root, executor="ray", workers=2)
    assert result["counts"] == {"completed": 1}
    asked = [r.getMessage() for r in caplog.records if "Ray resources" in r.getMessage()]
    assert len(asked) == 1 and "'GPU': 2.0" in asked[0] and "'CPU': 2.0" in asked[0], asked
    (row,) = rows_of(root / "study.db").values()
    assert json.loads((Path(row["run_dir"]) / "summary.json").read_text())["extra"]["distributed"]["world_size"] == 2
    ranks = [json.loads(p.read_text()) for p in ray_instance.glob("*.json") if p.name not in before]
    ranks = [e for e in ranks if e["RANK"] is not None]
    assert sorted(e["RANK"] for e in ranks) == ["0", "1"]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in ranks} in ({"0,1"}, {"1,0"})  # Ray's two GPUs, one per rank
