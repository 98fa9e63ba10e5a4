"""The scheduler: which runs train together, where, in what order, and how often again.

    units = form_units(tasks, fuse=True, budget=24 * 2**30, workers=4, halving=False)
    Scheduler(store, backend, workers=4, gpus=GpuSlots(["0", "1"], 80 * 2**30)).run(units)

* Planning (``plan_tasks``): the runs still to do, each checked alone first
  (``loralab.preflight``: rank, roles, dtype and quantization on this device; a run that fails
  is recorded invalid with its own message and never joins a group), each with its memory
  estimate (``loralab.estimate``); runs over ``--max-memory`` are recorded skipped (the
  memory gate); cheapest first.
* Fusion (``form_units``): runs with equal ``train.fused.fuse_key`` (same base, data and
  batch settings) become one fused group, as many as the estimate says fit the memory budget
  together; the log says which runs were grouped and why the others train alone.
* The pool (``Scheduler.run``): ``workers`` units at a time through a backend (local
  processes or Ray). A unit whose process was killed is run again up to ``retries`` times
  (from its checkpoints when it left any; a fused group's interrupted runs go on as a group);
  a fused group that runs out of memory as a whole trains again as two halves, never recorded
  as each run's failure; no unit starts once the budget's deadline has passed.
* Progress: given a bar (:mod:`loralab.progress`), the pool moves it on each run that gets
  its final outcome (not interrupted, not paused at a rung), so it shows runs finished of
  runs to do, with the outcomes so far and an ETA.
* GPUs (``GpuSlots``, local backend): each unit gets a GPU through CUDA_VISIBLE_DEVICES; a
  GPU takes a second unit only when the estimates of both fit its memory. Units of runs on
  ``model.device: cpu`` take no GPU, and on a machine without GPUs nothing changes.
* Runs on several devices (``distributed.nproc`` K, ``study run --gpus-per-run K``): such a
  run trains alone on K processes (``loralab train``'s launcher) and takes K of the pool's
  ``workers`` slots, and K GPUs (one per process) on the local backend; its memory estimate is
  each rank's. The pool starts, in queue order, every unit that fits the free slots, so runs of
  one device fill in beside a run of several; a run that asks for more devices than the study
  has is recorded skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loralab.config import Config, config_from_dict
from loralab.errors import ConfigError, LoralabError, ModelError
from loralab.paths import child_dir
from loralab.rundir import Status
from loralab.study.backends.process import UnitRun, UnitSpec, checkpoint_step, processes
from loralab.study.store import TO_RUN, Store

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)
POLL_S = 0.2


@dataclass
class PendingRun:
    """One run still to do, as the scheduler sees it (an evaluation task is loralab.evaluate.tasks.Task)."""

    run_id: int
    name: str
    config: dict[str, Any]
    run_dir: Path
    estimate: int | None = None  # estimated peak memory alone, bytes
    memory: dict[str, int] | None = None  # the estimate by part
    cost: float = 0.0  # estimated FLOPs of the whole run
    attempts: int = 0

    @property
    def on_gpu(self) -> bool:
        return self.config.get("model", {}).get("device", "auto") != "cpu"

    @property
    def nproc(self) -> int:
        """Processes (devices) the run trains on: its distributed.nproc."""
        return processes(self.config)


def group_memory(tasks: list[PendingRun]) -> int | None:
    """Estimated peak memory of ``tasks`` trained as one fused group (None if one has no
    estimate): loralab.estimate.group_memory_bytes over the runs' estimates by part."""
    from loralab.estimate import group_memory_bytes

    if any(t.memory is None for t in tasks):
        return None
    device = "cpu" if run_device(tasks[0].config.get("model", {}).get("device", "auto")) == "cpu" else "cuda"
    return group_memory_bytes([t.memory for t in tasks], device)  # type: ignore[misc]


@dataclass
class Unit:
    """What one process trains: one run, or a fused group of runs sharing one base."""

    tasks: list[PendingRun]
    stop_at_step: int | None = None  # solo run: pause here (process-level halving)
    prune: tuple[int, int, str, str] | None = None  # fused group: halving inside (eta, min_steps, metric, goal)

    @property
    def fused(self) -> bool:
        return len(self.tasks) > 1

    @property
    def size(self) -> int:
        """Worker slots (and GPUs) the unit takes: its processes (UnitSpec.nproc)."""
        return self.spec().nproc

    @property
    def memory(self) -> int | None:
        """Estimated peak memory of each of the unit's processes (a fused group's, together)."""
        return group_memory(self.tasks)

    @property
    def cost(self) -> float:
        return sum(t.cost for t in self.tasks)

    @property
    def on_gpu(self) -> bool:
        return any(t.on_gpu for t in self.tasks)

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.tasks)

    def spec(self, env: dict[str, str] | None = None) -> UnitSpec:
        return UnitSpec([UnitRun(t.name, t.run_dir, t.config) for t in self.tasks], stop_at_step=self.stop_at_step,
                        prune=self.prune, env=dict(env or {}))


# ----------------------------------------------------------------------------- planning


def planned_again(*, paused: bool) -> tuple[Status, ...]:
    """The statuses :func:`plan_tasks` plans again: pending and interrupted runs, runs skipped by
    the memory gate (checked again), and with ``paused`` runs paused at a halving rung."""
    return (*TO_RUN, Status.SKIPPED, *((Status.PAUSED,) if paused else ()))


def plan_tasks(store: Store, study_id: int, root: Path, *, max_memory: int | None,
               paused: bool = False, nproc: int = 1) -> list[PendingRun]:
    """Runs still to do, with memory estimates, cheapest first; runs that fail their own checks
    are recorded invalid, runs over ``max_memory`` skipped. ``paused``: include runs paused at a
    halving rung (a restarted study). ``nproc`` (``--gpus-per-run``): the processes of every
    run whose distributed.nproc is 1; a run's estimate is then each process's."""
    from loralab.estimate import estimate_run, per_rank
    from loralab.preflight import check_run
    from loralab.train.distributed import check_strategy

    tasks = []
    fullest: dict[str, int | None] = {}  # micro batch tokens per data layout: runs of a study share their data
    for row in store.runs(study_id, planned_again(paused=paused)):
        config = json.loads(row["config_json"])
        if nproc > 1 and processes(config) == 1:
            config = {**config, "distributed": {**config.get("distributed", {}), "nproc": nproc}}
        cfg = config_from_dict(config, source=f"run {row['name']}")
        on_cpu = run_device(cfg.model.device) == "cpu"
        try:  # before grouping: an invalid run alone, under its own message
            check_run(cfg, device=run_device(cfg.model.device))
            check_strategy(cfg, cfg.distributed.nproc)
        except (ConfigError, ModelError) as exc:
            store.finish(row["id"], status=Status.INVALID, error=str(exc))
            log.info("run %s: %s (%s)", row["name"], Status.INVALID, str(exc).splitlines()[0])
            continue
        memory, cost, trainable = None, 0.0, None
        try:
            est = estimate_run(cfg, device="cpu" if on_cpu else "cuda", tokens=data_tokens(cfg, fullest))
            est = per_rank(est, cfg.distributed.nproc, cfg.distributed.strategy)
            memory, trainable = est.memory_bytes, est.trainable_params
            cost = (est.flops_per_step or 0.0) * (cfg.train.max_steps or 1) * cfg.grad_accum
        except LoralabError as exc:  # a model the estimate cannot describe: run it, unestimated
            log.warning("run %s: no memory estimate (%s)", row["name"], exc)
        total = memory["total"] if memory else None
        store.set_estimate(row["id"], total, trainable)
        # A run's processes on the CPU share this machine's memory; on GPUs each has its own.
        need = total * cfg.distributed.nproc if total is not None and on_cpu else total
        if max_memory is not None and need is not None and need > max_memory:
            ranks = f" ({cfg.distributed.nproc} processes)" if need != total else ""
            store.skip(row["id"], f"estimated memory {need / 2**30:.2f} GiB{ranks} is over --max-memory "
                                  f"{max_memory / 2**30:.2f} GiB")
            continue
        if row["status"] == Status.SKIPPED and not (row["error"] or "").startswith("estimated memory"):
            continue
        tasks.append(PendingRun(row["id"], row["name"], config, child_dir(root, row["name"], what="run name"),
                          estimate=total, memory=memory, cost=cost, attempts=row["attempts"]))
    tasks.sort(key=lambda t: (t.cost, t.estimate or 0, t.name))  # cheapest first
    return tasks


def data_tokens(cfg: Config, known: dict[str, int | None]) -> int | None:
    """The tokens of the fullest micro batch ``cfg`` forms from its data (loralab.train.step.
    fullest_micro_batch), worked out once per tokenizer, data and batch order (``known``); None
    where the data cannot be read here (the estimate then takes full-length sequences)."""
    from loralab.train.step import fullest_micro_batch

    t = cfg.train
    key = json.dumps([cfg.model.path, cfg.to_dict()["data"], t.seed, t.batch_size, t.micro_batch_size, t.max_steps,
                      t.epochs, t.group_by_length], sort_keys=True, default=str)
    if key not in known:
        try:
            known[key] = fullest_micro_batch(cfg)
        except (LoralabError, OSError) as exc:
            log.info("memory estimate at full-length sequences: the data cannot be read here (%s)",
                     str(exc).splitlines()[0])
            known[key] = None
    return known[key]


def run_device(device: str) -> str:
    """``model.device`` as it resolves on this machine: cpu or cuda."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_memory(device: str) -> int:
    """Memory of one device runs go to: the smallest visible GPU's, or this machine's RAM."""
    if device == "cuda":
        import torch

        return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def form_units(tasks: list[PendingRun], *, fuse: bool, budget: int | None, workers: int = 1,
               halving: bool = False) -> list[Unit]:
    """Fused groups wherever runs can share a base and fit ``budget`` together, the rest
    alone; the log says which and why. Without ``halving``, groups are split (in halves, never
    below two runs) while there are fewer units than ``workers``: a group trains in one
    process, and idle workers are slower than smaller groups. With ``halving`` groups stay
    whole, so pruning inside a group ranks as many runs as it can."""
    if not fuse:
        log.info("fusion: off (--no-fuse); every run trains alone")
        return [Unit([t]) for t in tasks]
    from loralab.train.fused import fuse_key

    groups: dict[tuple, list[PendingRun]] = {}
    units: list[Unit] = []
    for t in tasks:
        step = checkpoint_step(t.run_dir) if t.attempts else 0
        if halving and step:
            log.info("fusion: %s trains alone: it goes on from its step-%d checkpoint at a halving rung", t.name, step)
            units.append(Unit([t]))
            continue
        try:
            key = (fuse_key(config_from_dict(t.config, source=f"run {t.name}")), step)
        except ConfigError as exc:
            log.info("fusion: %s trains alone: %s", t.name, exc)
            units.append(Unit([t]))
            continue
        groups.setdefault(key, []).append(t)
    for members in groups.values():
        if len(members) == 1:
            log.info(
                "fusion: %s trains alone: no other run shares its base, data and training settings", members[0].name)
        units += [Unit(chunk) for chunk in _fit_budget(members, budget)]
    if not halving:
        units = _spread(units, workers)
    for u in units:
        if u.fused:
            mem = u.memory
            log.info("fusion: %s train together (%d runs, estimated %s)", ", ".join(t.name for t in u.tasks),
                     len(u.tasks), f"{mem / 2**30:.2f} GiB" if mem is not None else "memory unknown")
    return sorted(units, key=lambda u: (u.cost, u.memory or 0, u.name))


def _fit_budget(members: list[PendingRun], budget: int | None) -> list[list[PendingRun]]:
    """Consecutive chunks of ``members`` whose group estimate stays within ``budget``."""
    chunks: list[list[PendingRun]] = [[]]
    for t in members:
        chunk = chunks[-1]
        mem = group_memory([*chunk, t])
        if chunk and budget is not None and mem is not None and mem > budget:
            log.info("fusion: %s starts a new group: with %d more the estimate is %.2f GiB, over the budget %.2f GiB",
                     t.name, len(chunk), mem / 2**30, budget / 2**30)
            chunks.append([t])
        else:
            chunk.append(t)
    return chunks


def _spread(units: list[Unit], workers: int) -> list[Unit]:
    units = list(units)
    while len(units) < workers:
        big = max(units, key=lambda u: len(u.tasks), default=None)
        if big is None or len(big.tasks) < 4:
            break
        units.remove(big)
        half = len(big.tasks) // 2
        units += [Unit(big.tasks[:half]), Unit(big.tasks[half:])]
    return units


# ----------------------------------------------------------------------------- GPUs


@dataclass
class GpuSlots:
    """The GPUs of the local backend and the estimated memory each already carries."""

    ids: list[str]
    capacity: int | None = None  # bytes one GPU gives the study (None: unknown, one unit per GPU)
    used: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def acquire(self, memory: int | None, count: int = 1) -> str | None:
        """``count`` distinct GPUs for a unit of ``memory`` bytes on each, as
        CUDA_VISIBLE_DEVICES names them ("0" or "0,1"): free ones first, then ones where it fits
        beside what runs there; None when it has to wait."""
        free = [g for g in self.ids if not self.count.get(g)]
        fits = [g for g in self.ids if g not in free and memory is not None and self.capacity is not None
                and self.used.get(g, 0) + memory <= self.capacity]
        pick = (free + sorted(fits, key=lambda g: self.used.get(g, 0)))[:count]
        if len(pick) < count:
            return None
        for g in pick:
            self.used[g] = self.used.get(g, 0) + (memory if memory is not None else self.capacity or 0)
            self.count[g] = self.count.get(g, 0) + 1
        return ",".join(pick)

    def release(self, gpus: str, memory: int | None) -> None:
        for g in gpus.split(","):
            self.used[g] -= memory if memory is not None else self.capacity or 0
            self.count[g] -= 1


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (none on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return []
    names = [n.strip() for n in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if n.strip()]
    return names[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


# ----------------------------------------------------------------------------- the pool


class Handle(Protocol):
    def poll(self) -> list[dict[str, Any]] | None: ...


class Backend(Protocol):
    """Runs units: ``start`` returns at once, the handle's ``poll`` gives one outcome per run
    of the unit (in order) once its process has ended."""

    name: str

    def start(self, unit: UnitSpec, *, memory: int | None, threads: int) -> Handle: ...


class Scheduler:
    """One worker pool for every policy and backend: keeps ``workers`` units going, records
    each run's outcome, runs killed runs again, honours the deadline and the GPU slots."""

    def __init__(self, store: Store, backend: Backend, *, workers: int, retries: int = 1, max_attempts: int = 3,
                 deadline: float | None = None, gpus: GpuSlots | None = None, bar: tqdm | None = None,
                 slots: str = "worker slots (--workers)"):
        self.store, self.backend, self.workers, self.slots = store, backend, workers, slots
        self.retries, self.max_attempts, self.deadline, self.gpus = retries, max_attempts, deadline, gpus
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.tries: dict[int, int] = {}
        self.budget_spent = False
        self.bar = bar  # runs finished, of the runs to do (None: no bar)
        self.outcomes: dict[str, int] = {}  # final statuses recorded so far, for the bar

    def finished(self, status: str, n: int = 1) -> None:
        """``n`` runs got their final ``status``: the bar moves on and shows the tally."""
        self.outcomes[status] = self.outcomes.get(status, 0) + n
        if self.bar is not None:
            self.bar.set_postfix(self.outcomes, refresh=False)
            self.bar.update(n)

    def run(self, units: list[Unit]) -> bool:
        """Run ``units`` until each of their runs has an outcome. False when the deadline
        passed first: units not started stay pending for the next ``study run``."""
        queue = [u for u in units if not self.too_large(u)]
        active: list[tuple[Unit, Handle, str | None]] = []
        while queue or active:
            if queue and self.deadline is not None and time.perf_counter() >= self.deadline:
                log.info("study budget spent: %d unit(s) left pending for the next `study run`", len(queue))
                queue.clear()
                self.budget_spent = True
                continue
            for unit in list(queue):  # in queue order, every unit that fits the free slots (and GPUs)
                if sum(u.size for u, _, _ in active) + unit.size > self.workers:
                    continue
                gpu = self.gpus.acquire(unit.memory, unit.size) if self.gpus is not None and unit.on_gpu else None
                if self.gpus is not None and unit.on_gpu and gpu is None:
                    continue  # its GPUs are full: wait for a unit to end
                queue.remove(unit)
                active.append((unit, self._start(unit, gpu), gpu))
            time.sleep(POLL_S)
            for entry in list(active):
                unit, handle, gpu = entry
                results = handle.poll()
                if results is None:
                    continue
                active.remove(entry)
                if gpu is not None:
                    self.gpus.release(gpu, unit.memory)  # type: ignore[union-attr]
                if unit.fused and all(r["status"] == Status.OUT_OF_MEMORY for r in results):
                    queue += self.split(unit, results[0].get("error"))  # the group's memory, not a run's failure
                    continue
                again = [t for t, r in zip(unit.tasks, results, strict=True)
                         if self.record(t, r) and self.tries[t.run_id] <= self.retries]
                if again:  # killed: the interrupted runs go on together, from their checkpoints
                    queue.append(Unit(again, stop_at_step=unit.stop_at_step, prune=unit.prune))
        return not self.budget_spent

    def too_large(self, unit: Unit) -> bool:
        """Record a run that asks for more devices than the study has as skipped (True)."""
        have = len(self.gpus.ids) if self.gpus is not None and unit.on_gpu else self.workers
        if unit.size <= have:
            return False
        what = "GPUs" if self.gpus is not None and unit.on_gpu else self.slots
        for t in unit.tasks:
            self.store.skip(t.run_id, f"the run trains on {unit.size} processes (distributed.nproc), one device "
                                      f"each, but the study has {have} {what}")
            log.info("run %s: %s (it needs %d devices, the study has %d)", t.name, Status.SKIPPED, unit.size, have)
        self.finished(Status.SKIPPED, len(unit.tasks))
        return True

    def split(self, unit: Unit, error: str | None) -> list[Unit]:
        """A fused group that ran out of memory as a whole trains again as two halves (its runs
        from their checkpoints where they left any); a run alone that runs out is its own outcome."""
        half = len(unit.tasks) // 2
        parts = [unit.tasks[:half], unit.tasks[half:]]
        self.store.reset([t.run_id for t in unit.tasks])
        log.info("fusion: %s ran out of memory together (%s); training them again as %s", unit.name,
                 (error or "out of memory").splitlines()[0], " and ".join(", ".join(t.name for t in p) for p in parts))
        return [Unit(p, stop_at_step=unit.stop_at_step, prune=unit.prune) for p in parts]

    def _start(self, unit: Unit, gpu: str | None) -> Handle:
        for t in unit.tasks:
            self.store.start(t.run_id, run_dir=str(t.run_dir), estimated=t.estimate)
            t.attempts += 1
            self.tries[t.run_id] = self.tries.get(t.run_id, 0) + 1
        env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
        log.info("start %s%s%s%s", unit.name, f" on {unit.size} processes" if unit.size > 1 else "",
                 f" on GPU {gpu}" if gpu is not None else "",
                 f" (to step {unit.stop_at_step})" if unit.stop_at_step else "")
        return self.backend.start(unit.spec(env), memory=unit.memory, threads=self.threads)

    def record(self, task: PendingRun, result: dict[str, Any]) -> bool:
        """Write one outcome; True when the run was interrupted and may be run again."""
        status = result["status"]
        if status == Status.INTERRUPTED and task.attempts >= self.max_attempts:
            status = Status.FAILED
            result["error"] = f"{result['error']} (attempt {task.attempts} of {self.max_attempts}; not run again)"
        self.store.finish(task.run_id, status=status, summary=result.get("summary"), metrics=result.get("metrics"),
                          error=result.get("error"), stopped_at_step=result.get("stopped_at_step"))
        err = result.get("error")
        log.info("run %s: %s%s", task.name, status,
                 f" ({err.splitlines()[0]})" if err and status != Status.COMPLETED else "")
        if status not in (Status.INTERRUPTED, Status.PAUSED):
            self.finished(status)
        return status == Status.INTERRUPTED
