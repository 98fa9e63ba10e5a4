"""Running a study: the driver that takes a study from its options to recorded outcomes.

    summary = run_study(load_study("preset:dropout", quick=True, root=root), root=root, workers=2)

The flow, one module each, each importing only what is below it:

    options (options.py)  every flag and combination checked, before anything starts
    -> plan (scheduler.plan_tasks)  runs still to do, memory estimates, the memory gate
    -> units (scheduler.form_units)  fused groups where runs fit together, the rest alone
    -> policy (policy.py)  all runs, or successive halving, wave after wave
    -> scheduler (scheduler.Scheduler)  one worker pool: retries, budget, GPU slots
    -> backend (backends/local.py, backends/ray.py)  a unit's process: ``loralab train``
       for a run, ``python -m loralab.study.fuse`` for a fused group

The driver (this module, in the ``loralab study run`` process) is the study database's only
writer. A run's outcome is read from its run directory (backends/process.py). Re-running a
study skips runs already finished; runs left "running" by a killed driver are marked
interrupted when the database is opened and run again (from their checkpoints); a lock file
keeps two drivers off one study.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loralab.errors import LoralabError
from loralab.progress import progress
from loralab.rundir import Status
from loralab.study.backends.process import outcome
from loralab.study.backends.warm import WarmStarter, warm_process
from loralab.study.options import StudyOptions
from loralab.study.policy import Halving, run_all, run_halving
from loralab.study.scheduler import (
    GpuSlots,
    Scheduler,
    device_memory,
    form_units,
    plan_tasks,
    planned_again,
    run_device,
    visible_gpus,
)
from loralab.study.spec import Study
from loralab.study.store import TO_RUN, Store

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["Halving", "StudyOptions", "run_study"]
log = logging.getLogger(__name__)


@contextlib.contextmanager
def driver_lock(root: Path) -> Iterator[None]:
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


@contextlib.contextmanager
def study_log(path: Path) -> Iterator[None]:
    """The driver's messages (units, fusion decisions, outcomes, halving) also go to the
    study directory's study.log, appended by every invocation."""
    logger = logging.getLogger("loralab.study")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def run_study(study: Study, *, root: Path, options: StudyOptions | None = None, starter: WarmStarter | None = None,
              **kw: Any) -> dict[str, Any]:
    """Expand once, run what is left, record everything. Returns counts and the database path.

    ``options`` (or its fields as keywords: workers, executor, address, max_memory, halving,
    retries, max_attempts, retry_failed, fuse, budget_s, gpus) say how; see StudyOptions.
    ``starter``: the local backend's warm process when the caller started it earlier (and stops
    it); by default one is started here (backends/warm.py).
    """
    opts = (options or StudyOptions(**kw)).check(study.runs)
    t0 = time.perf_counter()
    db_path = root / "study.db"
    warm = contextlib.nullcontext(starter) if starter is not None else warm_process(local=opts.executor != "ray")
    with driver_lock(root), study_log(root / "study.log"), Store(db_path) as store, warm as starter:
        sid, recovered = store.open_study(study.name, study.to_json(), root, study.runs)
        if recovered:
            log.info("recovered %d run(s) left running by a stopped driver: %s", len(recovered), ", ".join(recovered))
            record_finished(store, sid, recovered)
        if opts.retry_failed:
            store.reset([r["id"] for r in store.runs(
                sid, (Status.FAILED, Status.DIVERGED, Status.OUT_OF_MEMORY, Status.INVALID))])
        # ended in an earlier invocation and not planned again (planning may record runs invalid or skipped)
        again = planned_again(paused=opts.halving is not None)
        done_before = sum(n for s, n in store.counts(sid).items() if s not in again)
        tasks = plan_tasks(store, sid, root, max_memory=opts.max_memory, paused=opts.halving is not None,
                           nproc=opts.gpus_per_run)
        with progress(len(tasks), desc=f"study {study.name}", unit="run", enabled=opts.progress) as bar:
            scheduler, budget = _scheduler(store, opts, on_gpu=any(t.on_gpu for t in tasks), t0=t0, bar=bar,
                                           starter=starter, widest=max((t.nproc for t in tasks), default=1))
            units = form_units(tasks, fuse=opts.fuse, budget=budget, workers=scheduler.workers,
                               halving=opts.halving is not None)
            log.info("study %s: %d runs, %d to run as %d unit(s), %d worker(s), backend %s", study.name,
                     len(study.runs), len(tasks), len(units), scheduler.workers, opts.executor)
            try:
                if opts.halving is not None:
                    run_halving(scheduler, units, halving=opts.halving, metric=study.metric, goal=study.goal)
                else:
                    run_all(scheduler, units)
            except KeyboardInterrupt as exc:  # the driver's Ctrl-C or SIGTERM: what was running goes on next time
                signame = getattr(exc, "signal_name", "SIGINT")  # loralab.errors.Terminated: SIGTERM
                for row in store.runs(sid, (Status.RUNNING,)):
                    store.finish(row["id"], status=Status.INTERRUPTED,
                                 error=f"the study was interrupted ({signame}) while this run was running; run the "
                                       "study again to continue it")
                raise
        counts = store.counts(sid)
        left = {r["id"] for r in store.runs(sid, TO_RUN)}  # planned but never started (--budget)
    return {"study": study.name, "database": str(db_path), "root": str(root), "runs": len(study.runs),
            "planned": len(tasks), "ran": sum(t.run_id not in left for t in tasks), "already_done": done_before,
            "recovered": recovered, "counts": counts,
            "wall_time_s": time.perf_counter() - t0,
            "budget_spent": opts.budget_s is not None and any(s in counts for s in TO_RUN)}


def record_finished(store: Store, sid: int, names: list[str]) -> None:
    """Runs a stopped driver left behind that finished on their own (the process completed after
    the driver died, or before it could record the outcome): recorded from their run directory,
    not trained again."""
    for row in store.runs(sid):
        if row["name"] not in names or not row["run_dir"]:
            continue
        result = outcome(Path(row["run_dir"]), 0)
        if result["status"] == Status.COMPLETED:
            store.finish(row["id"], status=Status.COMPLETED, summary=result["summary"], metrics=result["metrics"],
                         error=None, stopped_at_step=None)
            log.info("run %s: completed before the driver stopped; recorded from its run directory", row["name"])


def _scheduler(store: Store, opts: StudyOptions, *, on_gpu: bool, t0: float, bar: tqdm | None = None,
               starter: WarmStarter | None = None, widest: int = 1) -> tuple[Scheduler, int | None]:
    """The scheduler and its backend, and the memory a fused group may estimate (one GPU's, or
    this machine's RAM shared by the workers, unless --max-memory says); ``bar``
    (a :func:`loralab.progress.progress` bar) counts the runs finished. Without --workers the
    pool has one slot per GPU, or (CPU, Ray) as many as the widest run's processes (``widest``)."""
    deadline = None if opts.budget_s is None else t0 + opts.budget_s
    device = run_device("auto") if on_gpu else "cpu"
    budget = opts.max_memory
    if budget is None:  # units on the CPU share this machine's RAM with the other workers' units
        budget = device_memory(device) // (1 if device == "cuda" else max(1, opts.workers or 1))
    kw = {"retries": opts.retries, "max_attempts": opts.max_attempts, "deadline": deadline, "bar": bar}
    if opts.executor == "ray":
        from loralab.study.backends.ray import RayBackend

        backend = RayBackend(address=opts.address, gpu_memory=opts.max_memory)
        workers, slots = opts.workers or widest, "worker slots (--workers)"
        cpus = backend.process_slots()
        if not on_gpu and cpus < workers:  # a task asking for more CPUs than the cluster has would wait forever
            log.info("the Ray cluster has CPUs for %d process(es) at once: at most %d worker(s); a run on more "
                     "processes is skipped", cpus, cpus)
            workers, slots = cpus, "CPUs in the Ray cluster (one per process)"
        return Scheduler(store, backend, workers=workers, slots=slots, **kw), budget
    from loralab.study.backends.local import LocalBackend

    ids = opts.gpus if opts.gpus is not None else (visible_gpus() if on_gpu else [])
    capacity = opts.max_memory if opts.max_memory is not None else (device_memory("cuda") if device == "cuda" else None)
    gpus = GpuSlots(ids, capacity) if ids else None
    if gpus is not None:
        log.info("GPUs %s, %s each", ", ".join(ids), f"{capacity / 2**30:.1f} GiB" if capacity else "one unit")
    return Scheduler(store, LocalBackend(starter), workers=opts.workers or len(ids) or widest, gpus=gpus,
                     **kw), budget
