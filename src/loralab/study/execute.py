"""Running a study: each run in its own process, N at a time, results into the study database.

    summary = run_study(load_study("preset:dropout", quick=True, root=root), root=root, workers=2)

The driver (this module, in the ``loralab study run`` process) is the database's only
writer. A run is ``python -m loralab.cli train <config.yaml> --out <run dir> --json`` in a
child process, so a crash or an out-of-memory kill ends that run only and the peak memory
it reports is its own. What a run ends as is read from its run directory (summary.json,
metrics.jsonl), the unit of truth:

* summary status completed / failed / diverged / out_of_memory -> recorded as such;
* no final summary and the process killed by a signal -> interrupted, run again (from
  its newest complete checkpoint when train.checkpoint_every left one, else from
  scratch) up to ``retries`` more times in this invocation, and again on the next
  ``study run``; after ``max_attempts`` kills it is recorded failed;
* no final summary and a non-zero exit -> failed, with the tail of its log.

Re-running a study skips runs already finished; runs left "running" by a killed driver are
marked interrupted when the database is opened and run again. Children die with the
driver (PR_SET_PDEATHSIG on Linux), and a lock file keeps two drivers off one study.

Executors: ``local`` (subprocesses on this machine) and ``ray`` (the same subprocess inside
a Ray task; the task returns the summary and metric rows to the driver, see ray_exec.py).
Successive halving (``halving=Halving(...)``): every run trains to the first rung
(``train.stop_at_step``, status paused, a checkpoint), the best 1/eta on the study metric
continue from their checkpoint (``loralab train --resume RUN_DIR --set
train.stop_at_step=NEXT``) to the next rung, the others are recorded stopped_early.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loralab.config import config_from_dict
from loralab.errors import ConfigError, LoralabError
from loralab.halving import halving_rungs, split_at_rung
from loralab.paths import child_dir
from loralab.study.spec import Study
from loralab.study.store import FINAL, TO_RUN, Store, metric_rows

log = logging.getLogger(__name__)
POLL_S = 0.2
# Summary statuses a run process ends with on its own (invalid: bad input found before step 1;
# paused: train.stop_at_step reached, resumable with --resume).
FINAL_SUMMARY = tuple(s for s in FINAL if s != "skipped")  # what a run's own summary.json can end with


@dataclass
class Halving:
    """Successive halving on the study metric: rungs at min_steps * eta**k below max_steps."""

    eta: int = 3
    min_steps: int = 10

    def rungs(self, max_steps: int) -> list[int]:
        return halving_rungs(self.min_steps, self.eta, max_steps)


@dataclass
class Task:
    run_id: int
    name: str
    config: dict[str, Any]
    run_dir: Path
    estimate: int | None = None
    cost: float = 0.0
    attempts: int = 0
    stop_at_step: int | None = None  # successive halving: train up to this step, then pause


# ----------------------------------------------------------------------------- one run


def loralab_env(threads: int | None = None) -> dict[str, str]:
    """The child's environment: this loralab first on the path, a fair share of threads."""
    import loralab

    env = dict(os.environ)
    src = str(Path(loralab.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def prepare_run_dir(run_dir: Path, config: dict[str, Any]) -> Path:
    """A clean run directory holding the run's config (a previous attempt is removed)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def train_command(config_path: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "loralab.cli", "train", str(config_path), "--out", str(run_dir), "--json"]


def resume_point(run_dir: Path) -> Path | None:
    """The newest complete checkpoint an interrupted run can continue from, if any."""
    if not (run_dir / "config.yaml").is_file():
        return None
    from loralab.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir)


def start_command(run_dir: Path, config: dict[str, Any], stop_at_step: int | None = None) -> tuple[list[str], Path | None]:
    """(command, checkpoint): continue from the run directory's newest complete checkpoint
    when it has one, otherwise start over in a clean directory (checkpoint None).
    ``stop_at_step`` pauses the run there."""
    stop = f"train.stop_at_step={stop_at_step if stop_at_step else 'null'}"
    checkpoint = resume_point(run_dir)
    if checkpoint is not None:
        return [sys.executable, "-m", "loralab.cli", "train", "--resume", str(run_dir), "--set", stop, "--json"], checkpoint
    if stop_at_step:
        config = {**config, "train": {**config["train"], "stop_at_step": stop_at_step}}
    return train_command(prepare_run_dir(run_dir, config), run_dir), None


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the driver dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    status = summary.get("status")
    rows = metric_rows(run_dir / "metrics.jsonl")
    if status in FINAL_SUMMARY:
        return {"status": status, "summary": summary, "metrics": rows, "error": summary.get("error"),
                "stopped_at_step": summary.get("stopped_at_step")}
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.Signals.__members__.values() else str(-returncode)
        return {"status": "interrupted", "summary": summary, "metrics": rows,
                "error": f"the run process was killed by {sig} before it finished"}
    tail = log_tail(log_path or run_dir / "train.log")
    return {"status": "failed", "summary": summary, "metrics": rows,
            "error": f"the run process exited with code {returncode} without a final summary: {tail}"}


def execute_run(config: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Run one training config in a child process and wait (used by the Ray executor)."""
    rd = Path(run_dir)
    cmd, checkpoint = start_command(rd, config)
    with (rd / "train.log").open("ab" if checkpoint else "wb") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=loralab_env(threads), preexec_fn=_die_with_parent)
    return outcome(rd, proc.returncode)


class LocalRun:
    """A run process started by the driver; poll() returns its outcome once it ends."""

    def __init__(self, task: Task, threads: int):
        self.task = task
        cmd, checkpoint = start_command(task.run_dir, task.config, task.stop_at_step)
        if checkpoint:
            log.info("run %s: resuming from %s", task.name, checkpoint)
        self.logf = (task.run_dir / "train.log").open("ab" if checkpoint else "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=loralab_env(threads),
                                     preexec_fn=_die_with_parent)

    def poll(self) -> dict[str, Any] | None:
        rc = self.proc.poll()
        if rc is None:
            return None
        self.logf.close()
        return outcome(self.task.run_dir, rc)


# ----------------------------------------------------------------------------- planning


def plan_tasks(store: Store, study_id: int, root: Path, *, max_memory: int | None, paused: bool = False) -> list[Task]:
    """Runs still to do, with memory estimates; runs over max_memory are recorded skipped.
    ``paused``: include runs paused at a halving rung (a restarted halving study)."""
    from loralab.estimate import estimate_run

    tasks = []
    for row in store.runs(study_id, (*TO_RUN, "skipped", *(("paused",) if paused else ()))):
        config = json.loads(row["config_json"])
        cfg = config_from_dict(config, source=f"run {row['name']}")
        est_total, cost, trainable = None, 0.0, None
        try:
            est = estimate_run(cfg, device="cpu" if _device(cfg) == "cpu" else "cuda")
            est_total, trainable = est.memory_bytes["total"], est.trainable_params
            cost = (est.flops_per_step or 0.0) * (cfg.train.max_steps or 1) * cfg.grad_accum
        except LoralabError as exc:  # a model estimate cannot describe: run it, unestimated
            log.warning("run %s: no memory estimate (%s)", row["name"], exc)
        store.set_estimate(row["id"], est_total, trainable)
        if max_memory is not None and est_total is not None and est_total > max_memory:
            store.skip(row["id"], f"estimated memory {est_total / 2**30:.2f} GiB is over --max-memory {max_memory / 2**30:.2f} GiB")
            continue
        if row["status"] == "skipped" and not (row["error"] or "").startswith("estimated memory"):
            continue
        tasks.append(Task(row["id"], row["name"], config, child_dir(root, row["name"], what="run name"),
                          estimate=est_total, cost=cost, attempts=row["attempts"]))
    tasks.sort(key=lambda t: (t.cost, t.estimate or 0, t.name))  # cheapest first
    return tasks


def _device(cfg: Any) -> str:
    if cfg.model.device != "auto":
        return cfg.model.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def driver_lock(root: Path):
    """One driver per study directory; the lock goes away with the process."""
    root.mkdir(parents=True, exist_ok=True)
    f = (root / ".driver.lock").open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise LoralabError(f"another `loralab study run` is driving {root}; wait for it or stop it first") from None
    try:
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()


# ----------------------------------------------------------------------------- the driver


def run_study(
    study: Study,
    *,
    root: Path,
    workers: int = 1,
    executor: str = "local",
    address: str | None = None,
    max_memory: int | None = None,
    halving: Halving | None = None,
    retries: int = 1,
    max_attempts: int = 3,
    retry_failed: bool = False,
    fuse: bool = False,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Expand-once, run what is left, record everything. Returns counts and the database path.

    ``budget_s``: no run is started once this many seconds of the invocation have passed; runs
    already going finish, the rest stay pending for the next ``study run``.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor must be local or ray (got {executor!r})")
    if halving is not None and executor != "local":
        raise ConfigError("--halving runs with the local executor only")
    if halving is not None:
        _check_halving(study, halving)
    if budget_s is not None and (budget_s < 0 or executor != "local" or halving is not None or fuse):
        raise ConfigError("--budget takes a duration >= 0 and works with the local executor, without --halving or --fuse")
    t0 = time.perf_counter()
    db_path = root / "study.db"
    with driver_lock(root), Store(db_path) as store:
        sid, recovered = store.open_study(study.name, study.to_json(), root, study.runs)
        if recovered:
            log.info("recovered %d run(s) left running by a stopped driver: %s", len(recovered), ", ".join(recovered))
        if retry_failed:
            store.reset([r["id"] for r in store.runs(sid, ("failed", "diverged", "out_of_memory", "invalid"))])
        tasks = plan_tasks(store, sid, root, max_memory=max_memory, paused=halving is not None)
        done_before = sum(n for s, n in store.counts(sid).items() if s not in TO_RUN)
        log.info("study %s: %d runs, %d to run, %d worker(s), executor %s", study.name, len(study.runs), len(tasks), workers, executor)
        if fuse:
            from loralab.study.fuse import run_fused

            run_fused(store, tasks, workers=workers, halving=halving, metric=study.metric, goal=study.goal,
                      retries=retries, max_attempts=max_attempts)
        elif executor == "ray":
            from loralab.study.ray_exec import run_ray

            run_ray(store, tasks, workers=workers, address=address, retries=retries, max_attempts=max_attempts)
        elif halving is not None:
            run_halving(store, tasks, halving=halving, metric=study.metric, goal=study.goal, workers=workers,
                        retries=retries, max_attempts=max_attempts)
        else:
            deadline = None if budget_s is None else t0 + budget_s
            run_local(store, tasks, workers=workers, retries=retries, max_attempts=max_attempts, deadline=deadline)
        counts = store.counts(sid)
    return {"study": study.name, "database": str(db_path), "root": str(root), "runs": len(study.runs),
            "ran": len(tasks), "already_done": done_before, "recovered": recovered, "counts": counts,
            "wall_time_s": time.perf_counter() - t0,
            "budget_spent": budget_s is not None and any(s in counts for s in TO_RUN)}


def record(store: Store, task: Task, result: dict[str, Any], *, max_attempts: int) -> bool:
    """Write one outcome; True when the run was interrupted and may be run again."""
    status = result["status"]
    if status == "interrupted" and task.attempts >= max_attempts:
        status = "failed"
        result["error"] = f"{result['error']} (attempt {task.attempts} of {max_attempts}; not run again)"
    store.finish(task.run_id, status=status, summary=result.get("summary"), metrics=result.get("metrics"),
                 error=result.get("error"), stopped_at_step=result.get("stopped_at_step"))
    log.info("run %s: %s%s", task.name, status, f" ({result['error'].splitlines()[0]})" if result.get("error") and status != "completed" else "")
    return status == "interrupted"


def run_local(store: Store, tasks: list[Task], *, workers: int, retries: int = 1, max_attempts: int = 3,
              deadline: float | None = None) -> None:
    """Keep ``workers`` run processes going until every task has an outcome (or, past
    ``deadline``, until the running ones have: the rest stay pending)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    queue = list(tasks)
    active: dict[int, LocalRun] = {}
    tries: dict[int, int] = {}
    while queue or active:
        if queue and deadline is not None and time.perf_counter() >= deadline:
            log.info("study budget spent: %d run(s) left pending for the next `study run`", len(queue))
            queue.clear()
            continue
        while queue and len(active) < workers:
            task = queue.pop(0)
            store.start(task.run_id, run_dir=str(task.run_dir), estimated=task.estimate)
            task.attempts += 1
            tries[task.run_id] = tries.get(task.run_id, 0) + 1
            active[task.run_id] = LocalRun(task, threads)
        time.sleep(POLL_S)
        for run_id, run in list(active.items()):
            result = run.poll()
            if result is None:
                continue
            del active[run_id]
            if record(store, run.task, result, max_attempts=max_attempts) and tries[run_id] <= retries:
                queue.append(run.task)


# ----------------------------------------------------------------------------- successive halving


def _check_halving(study: Study, halving: Halving) -> None:
    if halving.eta < 2 or halving.min_steps < 1:
        raise ConfigError(f"--eta must be >= 2 and --min-steps >= 1 (got {halving.eta}, {halving.min_steps})")
    for run in study.runs:
        steps = run.config["train"]["max_steps"]
        if not steps:
            raise ConfigError(f"--halving needs train.max_steps in every run (run {run.name} trains by epochs)")
        if not halving.rungs(steps):
            raise ConfigError(f"--halving: --min-steps {halving.min_steps} is not below train.max_steps {steps} (run {run.name}); no rung to stop at")


def _eval_at_rungs(task: Task, halving: Halving) -> None:
    """Evaluate at every rung: eval.every must divide min_steps (rungs are its multiples)."""
    ev = task.config.setdefault("eval", {})
    every = ev.get("every") or 0
    if not every or halving.min_steps % every:
        ev["every"] = halving.min_steps


def run_halving(
    store: Store,
    tasks: list[Task],
    *,
    halving: Halving,
    metric: str,
    goal: str,
    workers: int,
    retries: int = 1,
    max_attempts: int = 3,
) -> None:
    """Synchronous successive halving over ``tasks``.

    At each rung every surviving run trains up to that step and pauses (checkpoint); the
    best ceil(n / eta) on ``metric`` at that step go on from their checkpoints, the rest are
    recorded stopped_early. Runs already past a rung (a restarted driver) are not re-run."""
    if not tasks:
        return
    sid = int(store.db.execute("SELECT study_id FROM runs WHERE id = ?", (tasks[0].run_id,)).fetchone()[0])
    alive = list(tasks)
    for task in alive:
        _eval_at_rungs(task, halving)
    for rung in halving.rungs(max(t.config["train"]["max_steps"] for t in alive)):
        behind = [t for t in alive if _checkpoint_step(t.run_dir) < rung < t.config["train"]["max_steps"]]
        for t in behind:
            t.stop_at_step = rung
        run_local(store, behind, workers=workers, retries=retries, max_attempts=max_attempts)
        rows = store.runs(sid)
        status = {r["id"]: r["status"] for r in rows}
        # Only runs paused at this very rung are ranked here: a restarted driver finds runs
        # already promoted past it (paused later, or interrupted on the way) and they go on.
        paused = [t for t in alive if status[t.run_id] == "paused" and _checkpoint_step(t.run_dir) == rung]
        values = {t.run_id: store.metric_at(t.run_id, metric, rung) for t in paused}
        # Runs a stopped driver already cut at this rung still count, so a restart cuts no deeper.
        cut_before = sum(1 for r in rows if r["status"] == "stopped_early" and r["stopped_at_step"] == rung)
        ranked, cut = split_at_rung(paused, lambda t, values=values: values[t.run_id], eta=halving.eta, goal=goal, already_cut=cut_before)
        keep = len(ranked)
        for t in cut:
            store.finish(t.run_id, status="stopped_early", stopped_at_step=rung,
                         error=f"successive halving: {metric} {values[t.run_id]} at step {rung} was not in the best {keep} of {len(ranked) + len(cut)}")
        log.info("halving at step %d: %d of %d runs go on (%s)", rung, keep, len(ranked) + len(cut), ", ".join(t.name for t in ranked))
        # go on: the promoted runs, runs too short to reach this rung, runs a restart found past it
        alive = ranked + [t for t in alive if t not in paused and status[t.run_id] in (*TO_RUN, "paused")]
    for t in alive:
        t.stop_at_step = None
    run_local(store, alive, workers=workers, retries=retries, max_attempts=max_attempts)


def _checkpoint_step(run_dir: Path) -> int:
    """The step of a run directory's newest complete checkpoint (0 when it has none)."""
    from loralab.train.checkpoint import checkpoint_root, complete_checkpoints

    found = complete_checkpoints(checkpoint_root(run_dir))  # manifests only: no hashing per rung
    return int(found[-1].name.rsplit("-", 1)[-1]) if found else 0
