"""The local backend: each unit is a child process on this machine.

The scheduler decides how many run at once and which GPU each gets (its environment's
CUDA_VISIBLE_DEVICES); this module only starts the process and reads what it left. On the
CPU the processes are forked from the study's warm process, which has the libraries loaded
(warm.py; the driver owns it, through warm.warm_process).
"""

from __future__ import annotations

from typing import Any

from loralab.study.backends.process import UnitSpec, launch, outcomes
from loralab.study.backends.warm import WarmStarter


class LocalHandle:
    """A unit's process; ``poll`` returns one outcome per run once it has ended."""

    def __init__(self, unit: UnitSpec, threads: int, starter: WarmStarter | None):
        self.unit = unit
        self.proc = launch(unit, threads, starter)

    def poll(self) -> list[dict[str, Any]] | None:
        rc = self.proc.poll()
        return None if rc is None else outcomes(self.unit, rc)


class LocalBackend:
    name = "local"

    def __init__(self, starter: WarmStarter | None = None) -> None:
        self.starter = starter  # None: every unit a process of its own

    def start(self, unit: UnitSpec, *, memory: int | None, threads: int) -> LocalHandle:
        return LocalHandle(unit, threads, self.starter)
