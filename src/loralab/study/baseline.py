"""The study metric scored once on the base, before the runs: can the metric move at all?

    base = score_base(study, root)   # {"metric": ..., "value": 0.0, "edge": "floor"} or None
    warning = base_warning(base)     # "the base scores arithmetic_2ds/exact_match = 0 ..."

A study judged on exact match of a task the model cannot do scores 0 in every run, and the
report can only say it could not answer. ``loralab study run`` scores the base on the study's
task metric first (``loralab eval`` in a child process, so the driver never holds a model),
writes it to ``<study dir>/base_score.json`` (a restarted study reuses it) and warns when the
base sits at the floor or ceiling of a bounded metric, suggesting a metric that can move.
eval_loss has no floor or ceiling and is not scored here.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from loralab.rundir import write_atomic

log = logging.getLogger(__name__)
BOUNDED = ("exact_match", "greedy_match", "accuracy", "token_accuracy", "acc", "mc1", "mc2")  # metrics in [0, 1]


def score_base(study: Any, root: Path) -> dict[str, Any] | None:
    """The base's value of the study metric (cached in base_score.json), or None when the metric
    is not a bounded task metric or the base cannot be scored (the runs will say why)."""
    task, _, name = study.metric.partition("/")
    if not name or name not in BOUNDED or study.goal != "max" or task.startswith("harness:") or not study.runs:
        return None
    path = root / "base_score.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    cfg = study.runs[0].config
    model, evaluation = cfg["model"], cfg.get("eval") or {}
    cmd = [sys.executable, "-m", "loralab.cli", "eval", "--model", str(model["path"]), "--tasks", task, "--json",
           "--dtype", str(model.get("dtype", "auto")), "--device", str(model.get("device", "auto")),
           "--quant", str((cfg.get("quant") or {}).get("mode", "none"))]
    if evaluation.get("limit"):
        cmd += ["--limit", str(evaluation["limit"])]
    from loralab.study.backends.child import loralab_env

    done = subprocess.run(cmd, capture_output=True, text=True, env=loralab_env())
    rows = json.loads(done.stdout).get("results", []) if done.returncode == 0 and done.stdout.strip() else []
    value = next((r["value"] for r in rows if r.get("task") == task and r.get("metric") == name), None)
    if value is None:
        log.info("the base could not be scored on %s before the runs (%s)", study.metric,
                 (done.stderr.strip().splitlines() or ["no value"])[-1])
        return None
    out = {"metric": study.metric, "value": value,
           "n": next((r.get("n") for r in rows if r.get("metric") == name), None),
           "edge": "floor" if value <= 0 else "ceiling" if value >= 1 else None}
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(path, out, fsync=False)
    return out


def base_warning(base: dict[str, Any] | None) -> str | None:
    """What to say when the base sits at the metric's floor or ceiling."""
    if base is None or base["edge"] is None:
        return None
    way = "no run can score lower" if base["edge"] == "ceiling" else "a run must learn the task to move it"
    return (f"the base scores {base['metric']} = {base['value']:.4g}, the metric's {base['edge']} ({way}): the "
            "runs may all score the same and the study cannot tell its settings apart. Judge it on a metric that "
            "can move (the study file's metric: eval_loss, or a harness task), or on a model that can do the task")
