"""Run processes forked from a study's warm process (loralab.study.backends.warm) against run
processes started on their own: the same losses to the bit, the unit's output in its log,
exit codes as a plain process gives them, a SIGKILL reported as one, and a warm process that
dies taking its runs with it while the next units start on their own; no forking on a GPU
build of torch."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from loralab.rundir import RunDir
from loralab.study.backends import warm
from loralab.study.backends.process import UnitRun, UnitSpec, launch, outcomes
from loralab.study.backends.warm import WarmStarter
from studytools import TINY
from waiting import wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.version.cuda is not None, reason="the warm process serves CPU builds of torch")]


def unit(tmp: Path, name: str, model: Path, **train) -> UnitSpec:
    config = {**TINY, "model": {"path": str(model), "device": "cpu"}, "train": {**TINY["train"], **train}}
    return UnitSpec([UnitRun(name, tmp / name, config)])


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def test_a_forked_run_trains_as_a_run_of_its_own(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    starter = WarmStarter()
    try:
        t0 = time.perf_counter()
        forked = launch(unit(tmp_path, "forked", model, max_steps=4), 2, starter)
        assert forked.wait() == 0
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = launch(unit(tmp_path, "again", model, max_steps=4), 2, starter)
        assert again.wait() == 0
        second = time.perf_counter() - t0  # no warm process to start this time
        t0 = time.perf_counter()
        own = launch(unit(tmp_path, "own", model, max_steps=4), 2)  # a process of its own
        assert own.wait() == 0 and not hasattr(own, "starter")
        alone = time.perf_counter() - t0
    finally:
        starter.close()
    assert forked.pid != again.pid and starter.unusable is None
    assert losses(tmp_path / "forked") == losses(tmp_path / "again") == losses(tmp_path / "own")
    assert len(losses(tmp_path / "own")) == 4
    summary = json.loads(RunDir(tmp_path / "forked").summary.read_text())
    assert summary["status"] == "completed"
    assert "loralab" in RunDir(tmp_path / "forked").log.read_text()  # the unit's output is in its log
    print(f"\nwarm process start + first run {first:.1f} s, next run {second:.1f} s, alone {alone:.1f} s")
    assert second < first and second < alone


def test_exit_codes_kills_and_a_dead_warm_process(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    starter = WarmStarter()
    try:
        bad = unit(tmp_path, "bad", model)
        bad.runs[0].config["lora"] = {"r": "four"}  # invalid: loralab train exits 2 with the key
        proc = launch(bad, 1, starter)
        assert proc.wait() == 2
        assert "lora.r" in RunDir(tmp_path / "bad").log.read_text()

        long = unit(tmp_path, "long", model, max_steps=2000, log_every=1)
        proc = launch(long, 1, starter)
        wait_for(lambda: RunDir(tmp_path / "long").metrics.is_file(), 120, "the run training")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert outcomes(long, proc.returncode)[0]["status"] == "interrupted"

        other = unit(tmp_path, "other", model, max_steps=2000, log_every=1)
        proc = launch(other, 1, starter)
        wait_for(lambda: RunDir(tmp_path / "other").metrics.is_file(), 120, "the run training")
        os.kill(starter.proc.pid, signal.SIGKILL)  # the warm process dies: its run dies with it
        assert proc.wait() == -signal.SIGKILL
        wait_for(lambda: not os.path.exists(f"/proc/{proc.pid}"), 30, "the forked run to die")
        assert starter.unusable == "the warm process stopped"

        after = launch(unit(tmp_path, "after", model), 1, starter)  # on its own from now on
        assert not hasattr(after, "starter") and after.wait() == 0
    finally:
        starter.close()
    assert yaml.safe_load(RunDir(tmp_path / "after").config.read_text())["model"]["path"] == str(model)


def test_a_gpu_build_of_torch_starts_each_unit_as_a_process_of_its_own(tmp_path, tiny_model_dir, monkeypatch):
    """A unit's CUDA_VISIBLE_DEVICES must hold before CUDA starts, so no forking there: the driver
    sees it from the files torch installed, the warm process from torch itself."""
    assert warm._gpu_build() is None and warm._why_not_here() is None  # this CPU build
    fake = tmp_path / "site" / "torch"
    (fake / "lib").mkdir(parents=True)
    (fake / "lib" / "libtorch_cuda.so").write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("torch", None, origin=str(fake / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "torch" else None)
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert "is a GPU build" in warm._why_not_here()
    starter = WarmStarter()
    starter.spawn()
    assert starter.proc is None and starter.unusable.startswith("torch is a GPU build (libtorch_cuda.so)")
    monkeypatch.undo()
    proc = launch(unit(tmp_path, "alone", tiny_model_dir("llama")), 1, starter)
    assert isinstance(proc, subprocess.Popen) and proc.wait() == 0
    assert json.loads(RunDir(tmp_path / "alone").summary.read_text())["status"] == "completed"
