"""Policies: which units the scheduler runs, wave after wave.

* all runs (``run_all``): every unit once, to its end.
* successive halving (``run_halving``, ``--halving``): rungs at min_steps * eta**k below a
  run's max_steps. A run that trains alone trains to the first rung and pauses
  (``train.stop_at_step``, a checkpoint); the best ceil(n / eta) of those runs on the study
  metric at that step go on from their checkpoints to the next rung, the others are recorded
  stopped_early. A fused group prunes itself at the same rungs by the same rules
  (``loralab.halving``), in its one process. So runs are ranked against the runs they train
  with: all of a group's runs, or all the runs that train alone.

Both backends run the same waves, so a study ends with the same survivors on either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from loralab.errors import ConfigError
from loralab.halving import halving_rungs, split_at_rung
from loralab.rundir import Status
from loralab.study.backends.process import checkpoint_step
from loralab.study.scheduler import PendingRun, Scheduler, Unit
from loralab.study.store import TO_RUN

log = logging.getLogger(__name__)
CUT = "successive halving:"  # how a run cut at a rung by this policy's ranking is recorded


@dataclass
class Halving:
    """Successive halving on the study metric: rungs at min_steps * eta**k below max_steps."""

    eta: int = 3
    min_steps: int = 10

    def rungs(self, max_steps: int) -> list[int]:
        return halving_rungs(self.min_steps, self.eta, max_steps)

    def check(self, runs: list[Any]) -> None:
        """ConfigError unless every run (name, config) has a rung to stop at."""
        if self.eta < 2 or self.min_steps < 1:
            raise ConfigError(f"--eta must be >= 2 and --min-steps >= 1 (got {self.eta}, {self.min_steps})")
        for run in runs:
            steps = run.config["train"]["max_steps"]
            if not steps:
                raise ConfigError(f"--halving needs train.max_steps in every run (run {run.name} trains by epochs)")
            if not self.rungs(steps):
                raise ConfigError(f"--halving: --min-steps {self.min_steps} is not below train.max_steps {steps} "
                                  f"(run {run.name}); no rung to stop at")


def run_all(scheduler: Scheduler, units: list[Unit]) -> None:
    scheduler.run(units)


def _eval_at_rungs(task: PendingRun, halving: Halving) -> None:
    """Evaluate at every rung: eval.every must divide min_steps (rungs are its multiples)."""
    ev = task.config.setdefault("eval", {})
    every = ev.get("every") or 0
    if not every or halving.min_steps % every:
        ev["every"] = halving.min_steps


def run_halving(scheduler: Scheduler, units: list[Unit], *, halving: Halving, metric: str, goal: str) -> None:
    """Synchronous successive halving. Fused groups prune themselves (they start in the first
    wave); runs alone pause at each rung and are ranked there. Runs a restarted driver finds
    already past a rung are not run again; when the budget runs out, nothing is ranked."""
    store = scheduler.store
    groups = [u for u in units if u.fused]
    for u in groups:
        u.prune = (halving.eta, halving.min_steps, metric, goal)
    alive = [u.tasks[0] for u in units if not u.fused]
    for t in alive:
        _eval_at_rungs(t, halving)
    first = groups
    steps = max((t.config["train"]["max_steps"] for t in alive), default=0)
    for rung in halving.rungs(steps):
        behind = [t for t in alive if checkpoint_step(t.run_dir) < rung < t.config["train"]["max_steps"]]
        if not scheduler.run(first + [Unit([t], stop_at_step=rung) for t in behind]):
            return
        first = []
        status = {r["id"]: r for r in store.runs(_study_id(store, alive))}
        # Only runs paused at this very rung are ranked here: a restarted driver finds runs
        # already promoted past it (paused later, or interrupted on the way) and they go on.
        paused = [t for t in alive
                  if status[t.run_id]["status"] == Status.PAUSED and checkpoint_step(t.run_dir) == rung]
        values = {t.run_id: store.metric_at(t.run_id, metric, rung) for t in paused}
        # Runs a stopped driver already cut at this rung still count, so a restart cuts no deeper
        # (runs that a fused group pruned are not counted: they were ranked in their group).
        cut_before = sum(1 for r in status.values()
                         if r["status"] == Status.STOPPED_EARLY and r["stopped_at_step"] == rung
                         and (r["error"] or "").startswith(CUT))
        ranked, cut = split_at_rung(paused, lambda t, values=values: values[t.run_id], eta=halving.eta, goal=goal,
                                    already_cut=cut_before)
        for t in cut:
            store.finish(t.run_id, status=Status.STOPPED_EARLY, stopped_at_step=rung,
                         error=f"{CUT} {metric} {values[t.run_id]} at step {rung} was not in the best "
                               f"{len(ranked)} of {len(ranked) + len(cut)}")
        if cut:
            scheduler.finished("stopped_early", len(cut))
        log.info("halving at step %d: %d of %d runs go on (%s)", rung, len(ranked), len(ranked) + len(cut),
                 ", ".join(t.name for t in ranked))
        # go on: the promoted runs, runs too short to reach this rung, runs a restart found past it
        alive = ranked + [t for t in alive
                          if t not in paused and status[t.run_id]["status"] in (*TO_RUN, Status.PAUSED)]
    scheduler.run(first + [Unit([t]) for t in alive])


def _study_id(store: Any, tasks: list[PendingRun]) -> int:
    return int(store.db.execute("SELECT study_id FROM runs WHERE id = ?", (tasks[0].run_id,)).fetchone()[0])
