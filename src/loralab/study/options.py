"""``study run``'s options, parsed and checked in one place.

Every combination either runs or is refused here, before anything is started, with a
ConfigError (exit code 2) naming the flag:

* --halving, --fuse (the default) / --no-fuse, --retries, --budget work with both backends
  and with each other;
* --gpus belongs to the local backend (Ray gives its tasks their GPUs);
* --address belongs to the Ray backend;
* --eta and --min-steps belong to --halving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loralab.errors import ConfigError
from loralab.study.policy import Halving
from loralab.units import parse_duration

BACKENDS = ("local", "ray")


@dataclass
class StudyOptions:
    """How ``study run`` schedules a study (see docs/studies.md, "Scheduling")."""

    workers: int | None = None  # units at a time; None: one per GPU (local), else 1
    executor: str = "local"  # backend: local processes or Ray tasks
    address: str | None = None  # Ray cluster address (None: start a local instance)
    max_memory: int | None = None  # bytes: skip runs over it; the memory one device gives fused groups
    halving: Halving | None = None
    retries: int = 1  # times a killed unit is run again in this invocation
    max_attempts: int = 3  # kills after which a run is recorded failed
    retry_failed: bool = False
    fuse: bool = True  # fused groups wherever runs can share a base and fit
    budget_s: float | None = None  # no unit starts after this many seconds
    gpus: list[str] | None = None  # local backend: the GPUs to use (None: every visible one)
    gpus_per_run: int = 1  # processes (devices) of every run whose distributed.nproc is 1
    progress: bool = False  # a bar of runs finished on stderr (terminals only; the command: not --json)

    def check(self, runs: list[Any] | None = None) -> StudyOptions:
        """ConfigError for a value or combination that cannot run; returns self."""
        if self.executor not in BACKENDS:
            raise ConfigError(f"--executor must be local or ray (got {self.executor!r})")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (got {self.workers})")
        if self.retries < 0 or self.max_attempts < 1:
            raise ConfigError(
                f"--retries must be >= 0 (got {self.retries}) and max_attempts >= 1 (got {self.max_attempts})")
        if self.budget_s is not None and self.budget_s < 0:
            raise ConfigError(f"--budget must be >= 0 seconds (got {self.budget_s})")
        if self.gpus_per_run < 1:
            raise ConfigError(f"--gpus-per-run must be >= 1 (got {self.gpus_per_run})")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError(f"--max-memory must be > 0 (got {self.max_memory})")
        if self.gpus is not None and self.executor == "ray":
            raise ConfigError("--gpus is for the local backend; with --executor ray each task asks Ray for its GPU "
                              "(declare GPUs when the Ray cluster starts)")
        if self.gpus is not None and (not self.gpus or len(set(self.gpus)) != len(self.gpus)):
            raise ConfigError(f"--gpus must list distinct GPU ids, e.g. 0,1,2,3 (got {','.join(self.gpus)!r})")
        if self.address is not None and self.executor != "ray":
            raise ConfigError("--address is the Ray cluster's address: use it with --executor ray")
        if self.halving is not None and runs is not None:
            self.halving.check(runs)
        return self

    @classmethod
    def from_args(cls, args: Any) -> StudyOptions:
        """The options of ``loralab study run``'s parsed command line, checked."""
        from loralab.units import parse_bytes

        if not args.halving and (args.eta is not None or args.min_steps is not None):
            raise ConfigError("--eta and --min-steps set successive halving's rungs: add --halving")
        halving = None
        if args.halving:
            halving = Halving(eta=3 if args.eta is None else args.eta,
                              min_steps=10 if args.min_steps is None else args.min_steps)
        gpus = None
        if args.gpus is not None:
            gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        return cls(
            workers=args.workers, executor=args.executor, address=args.address,
            max_memory=parse_bytes(args.max_memory, "--max-memory") if args.max_memory else None,
            halving=halving, retries=args.retries, retry_failed=args.retry_failed, fuse=args.fuse,
            budget_s=parse_duration(args.budget, "--budget") if args.budget else None, gpus=gpus,
            gpus_per_run=args.gpus_per_run,
            progress=not args.json,
        ).check()
