"""What every tracker backend shares: the Sink interface, the run's label and the summary's numbers.

The backends (tensorboard.py, mlflow_sink.py, wandb_sink.py) import from here, and
loralab.track imports the backends: the arrows run one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from loralab.config import TrackingConfig
from loralab.units import is_number

# Summary fields a tracker receives as numbers (the rest, e.g. versions and paths, stay in summary.json).
SUMMARY_NUMBERS = ("steps", "steps_done", "skipped_steps", "wall_time_s", "train_time_s", "tokens_seen",
                   "tokens_per_s", "peak_memory_bytes", "trainable_params", "total_params",
                   "final_eval_loss", "best_eval_loss")


class Sink(Protocol):
    """One tracker run. Built by ``open_sink``; every method may raise (the Tracker drops it)."""

    def state(self) -> dict[str, Any]: ...  # what tracking.json keeps to continue this tracker run
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...
    def finish(self, summary: dict[str, Any], artifacts: dict[str, Path]) -> None: ...


def run_label(tracking: TrackingConfig, run_dir: Path) -> tuple[str, str]:
    """(experiment or group, run name) for ``run_dir``."""
    return tracking.experiment or "loralab", tracking.run_name or Path(run_dir).resolve().name


def summary_numbers(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers for a tracker: SUMMARY_NUMBERS plus final/best task metrics."""
    out = {k: float(summary[k]) for k in SUMMARY_NUMBERS if is_number(summary.get(k))}
    for group in ("final_eval_tasks", "best_eval_tasks"):
        for k, v in (summary.get(group) or {}).items():
            if is_number(v):
                out[f"{group.removesuffix('_tasks')}/{k}"] = float(v)
    return out
