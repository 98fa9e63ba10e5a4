"""Seed deviations: where a study's runs differ from the setup its seed (the cited experiment) ran.

    deviations(seed_setup, [run.config for run in study.runs], sources, skip=set(study.axes))
    deviation_text(d)   # 'train.lr 0.0001 instead of the seed's 1e-05 (set by --set train.lr)'
"""

from __future__ import annotations

import math
from typing import Any

from loralab.study.keys import checked_part, fmt_config_value, get_key
from loralab.units import is_number


def _same(a: Any, b: Any) -> bool:
    if is_number(a) and is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def deviations(seed_setup: dict[str, Any], configs: list[dict[str, Any]], sources: dict[str, str],
               skip: set[str], *, notes: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """Every key of the seed's setup whose value in a run's config (``configs``: each run's, nested
    sections) differs from the seed's: [{key, value, seed, source}] (value is a list when runs
    differ). ``skip`` holds the axes and tied keys: those differences are the study's question.
    ``notes``: each run's {key: why} for a value filled in run by run (``auto``); a deviation's
    source is then the note of a run that deviates, not of one that kept the seed's value."""
    if not seed_setup or not configs:
        return []
    seed_flat = checked_part(seed_setup, "seed.setup")
    if "train.epochs" in seed_flat and "train.max_steps" not in seed_flat:
        seed_flat["train.max_steps"] = None  # the seed counted epochs: a step count overrides them
    out = []
    for key in seed_flat:
        if key in skip:
            continue
        want = seed_flat[key]
        used, why = [], None
        for i, config in enumerate(configs):
            v = get_key(config, key)
            if not _same(v, want) and all(not _same(v, u) for u in used):
                used.append(v)
                why = why or (notes[i].get(key) if notes else None)
        if used:
            out.append({"key": key, "value": used[0] if len(used) == 1 else used, "seed": want,
                        "source": why or sources.get(key, "loralab's default")})
            if key == "train.max_steps":
                out[-1]["seed_ran"] = f"train.epochs {fmt_config_value(seed_flat['train.epochs'])}"
    return out


def deviation_text(d: dict[str, Any]) -> str:
    """'train.lr 0.0001 instead of the seed's 1e-05 (set by --set train.lr)'."""
    def show(v: Any) -> str:
        if isinstance(v, list) and v and not all(isinstance(x, str) for x in v):
            return " / ".join(show(x) for x in v)
        return fmt_config_value(v)

    seed = d.get("seed_ran") or show(d["seed"])
    how = d["source"] if d["source"].startswith("auto:") else f"set by {d['source']}"
    return f"{d['key']} {show(d['value'])} instead of the seed's {seed} ({how})"
