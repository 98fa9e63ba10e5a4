"""The local backend: each unit is a child process on this machine.

The scheduler decides how many run at once and which GPU each gets (its environment's
CUDA_VISIBLE_DEVICES); this module only starts the process and reads what it left.
"""

from __future__ import annotations

from typing import Any

from loralab.study.backends.process import UnitSpec, launch, outcomes


class LocalHandle:
    """A unit's process; ``poll`` returns one outcome per run once it has ended."""

    def __init__(self, unit: UnitSpec, threads: int):
        self.unit = unit
        self.proc, self.logf = launch(unit, threads)

    def poll(self) -> list[dict[str, Any]] | None:
        rc = self.proc.poll()
        if rc is None:
            return None
        self.logf.close()
        return outcomes(self.unit, rc)


class LocalBackend:
    name = "local"

    def start(self, unit: UnitSpec, *, memory: int | None, threads: int) -> LocalHandle:
        return LocalHandle(unit, threads)
