"""One unit as a child process: its command, its environment, and what it left.

A unit is one run (``loralab train``) or a fused group of runs (``python -m
loralab.study.fuse``). Either way each run's outcome is read from its run directory
(summary.json, metrics.jsonl), the unit of truth:

* summary status completed / failed / diverged / out_of_memory / invalid / paused /
  stopped_early -> that status;
* no final summary and the process killed by a signal, or a summary ``interrupted`` (the
  launcher of a run on several processes writes it when a rank was killed) -> interrupted (the
  scheduler runs it again, from its newest complete checkpoint when it has one);
* no final summary and a non-zero exit -> failed, with the tail of its log.

Children die with the driver (PR_SET_PDEATHSIG on Linux). Nothing here imports the
scheduler or the store: both backends call it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loralab.rundir import RunDir, Status, checkpoint_step_of, write_atomic
from loralab.study.backends.child import die_with_parent, loralab_env
from loralab.study.backends.warm import WarmProcess, WarmStarter
from loralab.study.store import ENDED, metric_rows

# What a run's own summary.json can end with (SKIPPED is the driver's word, never a run's).
ENDED_BY_RUN = tuple(s for s in ENDED if s != Status.SKIPPED)


@dataclass
class UnitRun:
    """One run of a unit: its name, directory and resolved config (a plain dict); a study's expanded
    run, before it has a directory, is loralab.study.spec.RunSpec."""

    name: str
    run_dir: Path
    config: dict[str, Any]


@dataclass
class UnitSpec:
    """What a backend starts: one run alone, or several fused in one process.

    ``stop_at_step``: a solo run pauses there (process-level successive halving).
    ``prune``: a fused group prunes itself at the rungs (eta, min_steps, metric, goal).
    """

    runs: list[UnitRun]
    stop_at_step: int | None = None
    prune: tuple[int, int, str, str] | None = None
    env: dict[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES from the scheduler

    @property
    def fused(self) -> bool:
        return len(self.runs) > 1

    @property
    def nproc(self) -> int:
        """Processes (devices) the unit trains on: a run's distributed.nproc; a fused group one."""
        return 1 if self.fused else processes(self.runs[0].config)

    @property
    def log_path(self) -> Path:
        first = RunDir(self.runs[0].run_dir)
        return first.fused_log if self.fused else first.log


def processes(config: dict[str, Any]) -> int:
    """The processes (devices) a run's config (a plain dict) asks for: distributed.nproc."""
    return int(config.get("distributed", {}).get("nproc") or 1)


def prepare_run_dir(run_dir: Path, config: dict[str, Any]) -> Path:
    """A clean run directory holding the run's config (a previous attempt is removed)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    path = RunDir(run_dir).config
    write_atomic(path, yaml.safe_dump(config, sort_keys=False))
    return path


def resume_point(run_dir: Path) -> Path | None:
    """The newest complete checkpoint an interrupted run can continue from, if any."""
    if not RunDir(run_dir).config.is_file():
        return None
    from loralab.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir)


def checkpoint_step(run_dir: Path) -> int:
    """The step of a run directory's newest complete checkpoint (0 when it has none); reads
    manifests only, no hashing."""
    from loralab.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(RunDir(run_dir).checkpoints)
    return checkpoint_step_of(found[-1]) if found else 0


def train_command(config_path: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "loralab.cli", "train", str(config_path), "--out", str(run_dir), "--json"]


def start_command(run_dir: Path, config: dict[str, Any],
                  stop_at_step: int | None = None) -> tuple[list[str], Path | None]:
    """(command, checkpoint) for one run: continue from the run directory's newest complete
    checkpoint when it has one, otherwise start over in a clean directory (checkpoint None).
    ``stop_at_step`` pauses the run there."""
    stop = f"train.stop_at_step={stop_at_step if stop_at_step else 'null'}"
    checkpoint = resume_point(run_dir)
    if checkpoint is not None:
        command = [sys.executable, "-m", "loralab.cli", "train", "--resume", str(run_dir), "--set", stop, "--json"]
        return command, checkpoint
    if stop_at_step:
        config = {**config, "train": {**config["train"], "stop_at_step": stop_at_step}}
    return train_command(prepare_run_dir(run_dir, config), run_dir), None


def fused_command(unit: UnitSpec) -> tuple[list[str], bool]:
    """(command, resumed) for a fused group: ``--resume`` only when a run directory of the
    group holds a complete checkpoint (its configs are kept), else clean directories."""
    resume = any(resume_point(r.run_dir) is not None for r in unit.runs)
    if resume:
        paths = [str(RunDir(r.run_dir).config) for r in unit.runs]
    else:
        paths = [str(prepare_run_dir(r.run_dir, r.config)) for r in unit.runs]
    args = [f"--halving={','.join(map(str, unit.prune))}"] if unit.prune else []
    args += ["--resume"] if resume else []
    return [sys.executable, "-m", "loralab.study.fuse", *args, *paths], resume


def unit_command(unit: UnitSpec) -> tuple[list[str], bool]:
    """(command, continues an earlier attempt) for any unit."""
    if unit.fused:
        return fused_command(unit)
    run = unit.runs[0]
    cmd, checkpoint = start_command(run.run_dir, run.config, unit.stop_at_step)
    return cmd, checkpoint is not None


def launch(unit: UnitSpec, threads: int, starter: WarmStarter | None = None) -> subprocess.Popen | WarmProcess:
    """Start the unit's process; its output goes to the unit's log (appended on a resume).
    Forked by ``starter`` where it can (backends/warm.py), else a process of its own."""
    cmd, resumed = unit_command(unit)
    env = loralab_env(threads, unit.env)
    if starter is not None and (proc := starter.start(cmd, env, unit.log_path, append=resumed)) is not None:
        return proc
    with unit.log_path.open("ab" if resumed else "wb") as logf:
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)


def run_unit(unit: UnitSpec, threads: int) -> list[dict[str, Any]]:
    """Start the unit, wait, and return one outcome per run (the Ray backend's task body)."""
    return outcomes(unit, launch(unit, threads).wait())


def log_tail(path: Path, lines: int = 6) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


def outcome(run_dir: Path, returncode: int, log_path: Path | None = None) -> dict[str, Any]:
    """What a finished run process left: status, summary, metric rows, error (its log's tail
    when it left no final summary; ``log_path`` defaults to the run's train.log)."""
    summary: dict[str, Any] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        summary = json.loads(RunDir(run_dir).summary.read_text(encoding="utf-8"))
    status = summary.get("status")
    rows = metric_rows(RunDir(run_dir).metrics)
    if summary.get("resume_error"):  # refused to resume (its summary and checkpoints kept as they were):
        return {"status": Status.INVALID, "summary": summary, "metrics": rows,  # it cannot go on in the study
                "error": summary["resume_error"]}
    if status in ENDED_BY_RUN:
        return {"status": status, "summary": summary, "metrics": rows, "error": summary.get("error"),
                "stopped_at_step": summary.get("stopped_at_step")}
    if status == Status.INTERRUPTED:  # a run on several processes: its launcher saw a rank killed
        return {"status": Status.INTERRUPTED, "summary": summary, "metrics": rows, "error": summary.get("error")}
    if returncode < 0:
        known = -returncode in signal.Signals.__members__.values()
        sig = signal.Signals(-returncode).name if known else str(-returncode)
        return {"status": Status.INTERRUPTED, "summary": summary, "metrics": rows,
                "error": f"the run process was killed by {sig} before it finished"}
    tail = log_tail(log_path or RunDir(run_dir).log)
    return {"status": Status.FAILED, "summary": summary, "metrics": rows,
            "error": f"the run process exited with code {returncode} without a final summary: {tail}"}


def outcomes(unit: UnitSpec, returncode: int) -> list[dict[str, Any]]:
    """One outcome per run of the unit, in order."""
    return [outcome(r.run_dir, returncode, unit.log_path) for r in unit.runs]
