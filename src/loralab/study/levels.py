"""Levels of a study's axes and matched comparisons between them: the arithmetic under every finding.

    compare(data, data.ok, "lora.r", 16, 8)   # level 16 minus level 8, matched over the other axes

A comparison between two levels uses only the combinations of the other axes where both levels
ran and averages the per-combination differences, so a failed run at one level does not tilt it.
Axes tied to the compared axis (alpha = 2 x r, or an lr that moves with alpha) are not "other
axes": they move with it. Intervals are t intervals from the pooled seed noise (study.stats).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from loralab.study import stats
from loralab.study.results import RunResult, StudyData, canon, repeat_groups
from loralab.units import is_number


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(fmt_value, value))
    return str(value)


def config_label(run: RunResult, axes: list[str]) -> str:
    return ", ".join(f"{k}={fmt_value(run.axes.get(k))}" for k in axes) or "base"


def levels(runs: list[RunResult], axis: str) -> list[Any]:
    """The axis's distinct values: numeric ones sorted, others in order of appearance."""
    by_key: dict[str, Any] = {}
    for r in runs:
        by_key.setdefault(canon(r.axes.get(axis)), r.axes.get(axis))
    values = list(by_key.values())
    if values and all(is_number(v) for v in values):
        values.sort()
    return values


def at_level(runs: list[RunResult], axis: str, value: Any) -> list[RunResult]:
    key = canon(value)
    return [r for r in runs if canon(r.axes.get(axis)) == key]


def tied_to(data: StudyData, axis: str) -> list[str]:
    """Varying axes whose value is fixed by ``axis`` (alpha = 2 x r; lr = c / alpha)."""
    if axis in data._tied:
        return data._tied[axis]
    out = data._tied[axis] = []
    for k in data.axes:
        if k == axis:
            continue
        per_level: dict[str, set[str]] = defaultdict(set)
        for r in data.runs:
            per_level[canon(r.axes.get(axis))].add(canon(r.axes.get(k)))
        if all(len(v) == 1 for v in per_level.values()):
            out.append(k)
    return out


def level_label(data: StudyData, axis: str, value: Any) -> str:
    """"lora.alpha=512" plus the tied keys that move with it: "lora.alpha=512, train.lr=1e-05"."""
    label = f"{axis}={fmt_value(value)}"
    sample = next((r for r in data.runs if canon(r.axes.get(axis)) == canon(value)), None)
    if sample is not None:
        for k in tied_to(data, axis):
            label += f", {k}={fmt_value(sample.axes.get(k))}"
    return label


# ---------------------------------------------------------------- comparisons

def other_axes(data: StudyData, axis: str) -> list[str]:
    return [k for k in data.axes if k != axis and k not in tied_to(data, axis)]


def value_of(run: RunResult, attr: str) -> float | None:
    """A run's ``attr`` (value, time_s, memory_bytes, params) as a float, or None."""
    v = getattr(run, attr)
    return None if v is None else float(v)


def cells_of(data: StudyData, runs: list[RunResult], axis: str, value: Any,
             attr: str = "value") -> dict[tuple, list[float]]:
    """Values of ``attr`` at one level, by combination of the other (untied) axes."""
    others = other_axes(data, axis)
    out: dict[tuple, list[float]] = defaultdict(list)
    for r in at_level(runs, axis, value):
        if value_of(r, attr) is not None:
            out[tuple(canon(r.axes.get(k)) for k in others)].append(value_of(r, attr))
    return dict(out)


def noise(data: StudyData, attr: str = "value") -> tuple[float | None, int]:
    """Pooled seed-to-seed SD of ``attr`` (the metric, time_s, memory_bytes) and its df."""
    if attr == "value":
        return data.noise_sd, data.noise_df
    if attr not in data._noise:
        groups = [[value_of(r, attr) for r in g if value_of(r, attr) is not None]
                  for g in repeat_groups(data.ok).values()]
        data._noise[attr] = stats.pooled_sd(groups)
    return data._noise[attr]


def compare(data: StudyData, runs: list[RunResult], axis: str, a: Any, b: Any,
            attr: str = "value") -> dict[str, Any] | None:
    """Level ``a`` minus level ``b`` of ``attr`` (default the metric), matched over the other
    (untied) axes: the mean over shared combinations of the per-combination differences.

    Returns None when no combination of the other axes has both levels.
    """
    ca, cb = cells_of(data, runs, axis, a, attr), cells_of(data, runs, axis, b, attr)
    common = [c for c in ca if c in cb]
    if not common:
        return None
    diff = stats.mean([stats.mean(ca[c]) - stats.mean(cb[c]) for c in common])
    out = {"difference": diff, "n_a": sum(len(ca[c]) for c in common), "n_b": sum(len(cb[c]) for c in common),
           "cells": len(common), "half_width": None, "low": None, "high": None, "beyond_noise": None,
           "mean_a": stats.mean([stats.mean(ca[c]) for c in common]),
           "mean_b": stats.mean([stats.mean(cb[c]) for c in common])}
    sd, df = noise(data, attr)
    if sd is not None:
        # Var(mean over cells of (mean_a - mean_b)) = sd^2 / C^2 * sum_c (1/n_ac + 1/n_bc)
        inv = sum(1 / len(ca[c]) + 1 / len(cb[c]) for c in common)
        half = stats.t_half_width(sd, df, math.sqrt(inv) / len(common))
        out.update(half_width=half, low=diff - half, high=diff + half, beyond_noise=abs(diff) > half)
    return out


def find_level(runs: list[RunResult], axis: str, value: Any) -> Any | None:
    """The axis level a study file names (``reference: 1`` or ``"1"``), or None if no run has it."""
    for v in levels(runs, axis):
        if canon(v) == canon(value) or (isinstance(value, str) and fmt_value(v) == value):
            return v
    return None


def level_stats(data: StudyData, runs: list[RunResult], axis: str) -> list[dict[str, Any]]:
    """Per level: the mean over the other axes' combinations of the mean over repeats (with
    every combination equally represented this is the plain average), and its 95% interval
    from the pooled seed noise (None without repeats)."""
    out = []
    for v in levels(runs, axis):
        cells = cells_of(data, runs, axis, v)
        m = stats.mean([stats.mean(c) for c in cells.values()])
        vals = [x for c in cells.values() for x in c]
        row = {"value": v, "n": len(vals), "mean": m, "plain_mean": stats.mean(vals), "combinations": len(cells),
               "low": None, "high": None}
        if data.noise_sd is not None:
            inv = sum(1 / len(c) for c in cells.values())
            half = stats.t_half_width(data.noise_sd, data.noise_df, math.sqrt(inv) / len(cells))
            row.update(low=m - half, high=m + half)
        out.append(row)
    return out
