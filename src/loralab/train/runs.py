"""One run of a group (Run: its state and summary), a run ending alone, the clock sharing time."""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralab.config import Config
from loralab.rundir import MetricsWriter, RunDir, Status, write_atomic
from loralab.track import Tracker
from loralab.train import distributed
from loralab.train.checkpoint import TrainState

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Run:
    """One run of a group: its config, directory, summary, optimizer and train state."""

    index: int
    cfg: Config
    dir: RunDir
    summary: dict[str, Any]
    params: list[torch.nn.Parameter] = field(default_factory=list)
    opt: Any = None
    sched: Any = None
    state: TrainState = field(default_factory=TrainState)
    metrics: MetricsWriter | None = None
    status: Status = Status.RUNNING
    checkpoint: Path | None = None
    resumed_from: int | None = None
    session_wall_s: float = 0.0  # this session's share of the group's wall time
    scaler: torch.amp.GradScaler | None = None  # fp16: the run's own loss scale
    tracker: Tracker | None = None  # the run's experiment trackers, fed by its metrics writer
    # a resumed run's summary.json and config.yaml as the resume found them (put back if it is refused)
    before: tuple[dict[str, Any], str] | None = None

    def record(self, **fields: Any) -> None:
        """Update summary.json (atomically)."""
        self.summary.update(fields)
        if distributed.writes():  # several ranks: rank 0 writes the run directory
            write_atomic(self.dir.summary, self.summary)


@contextlib.contextmanager
def fails_alone(run: Run, group: list[Run], doing: str):
    """An error of ``run``'s own (its evaluation, its save) ends ``run`` alone, status failed with
    its own error, while another run of the group still trains. Raised as before when no other
    run is left (a solo run fails as a run), and always for out-of-memory and a full disk,
    which belong to the group."""
    try:
        yield
    except Exception as exc:
        others = [r for r in group if r is not run and r.status is Status.RUNNING]
        disk_full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        if not others or disk_full or isinstance(exc, torch.OutOfMemoryError):
            raise
        end_alone(run, Status.FAILED, f"{doing}: {type(exc).__name__}: {exc}")


def end_alone(run: Run, status: Status, error: str) -> None:
    """``run`` leaves its group with ``status`` and its own ``error``; the others go on."""
    log.warning("%s: %s; it ends alone, the rest of its group goes on", run.dir.root, error)
    run.status = status
    if run.metrics is not None and not run.metrics.f.closed:
        run.metrics.write(step=run.state.step, event=status)
        run.metrics.close()
    run.record(status=status, error=error)


class Clock:
    """Splits shared wall, step and CPU time among runs in equal shares."""

    def __init__(self) -> None:
        self.start = self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt

    def charge(self, runs: list[Run], *, train_s: float = 0.0, cpu_s: float = 0.0) -> None:
        dt = self.lap()
        for r in runs:
            r.session_wall_s += dt / len(runs)
            r.state.train_time_s += train_s / len(runs)
            r.state.train_cpu_time_s += cpu_s / len(runs)

    @contextlib.contextmanager
    def charge_to(self, run: Run):
        self.lap()
        yield
        self.charge([run])
