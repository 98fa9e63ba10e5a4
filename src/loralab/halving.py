"""Successive halving's rules, in one place for every scheduler that prunes runs.

A study (process-level, over paused runs) and a fused group (in-process, over its members)
both train every live run to a rung step, rank the runs on the metric at that step and keep
the best ``ceil(n / eta)``; the lr schedule stays the full run's, so a survivor's result is
what it would have been without pruning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def halving_rungs(min_steps: int, eta: int, steps: int) -> list[int]:
    """Successive halving's rung steps: min_steps * eta**k below the run's last step."""
    out, step = [], min_steps
    while step < steps:
        out.append(step)
        step *= eta
    return out


def rank_key(value: float | None, goal: str) -> float:
    """Smaller is better; a missing or non-finite metric ranks last."""
    if value is None or not math.isfinite(value):
        return math.inf
    return value if goal == "min" else -value


def keep_count(n: int, eta: int) -> int:
    """How many of ``n`` runs ranked at a rung go on: the best ceil(n / eta), at least one."""
    return max(1, math.ceil(n / eta))


def split_at_rung(runs: Iterable[T], value: Callable[[T], float | None], *, eta: int, goal: str,
                  already_cut: int = 0) -> tuple[list[T], list[T]]:
    """(runs that go on, runs stopped at this rung), best first. ``already_cut`` counts runs a
    restarted driver had already stopped at this rung, so a restart cuts no deeper."""
    ranked = sorted(runs, key=lambda r: rank_key(value(r), goal))
    keep = min(len(ranked), keep_count(len(ranked) + already_cut, eta))
    return ranked[:keep], ranked[keep:]
