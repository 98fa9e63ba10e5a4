"""Weights & Biases: one W&B run per loralab run, grouped by ``tracking.experiment``.

Offline by default (``tracking.wandb_mode: auto``): online only when WANDB_MODE says so or
the user is logged in (WANDB_API_KEY or an api.wandb.ai entry in ~/.netrc). Offline runs
live in ``<run dir>/wandb/`` and go up later with ``wandb sync <run dir>/wandb/offline-run-*``.
The config is the run's W&B config, metrics keep their names and steps, the summary is the
W&B summary, the axes are tags ``key=value``, the adapter a ``model`` artifact.
"""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from loralab.rundir import Status
from loralab.track.sink import run_label, summary_numbers


def wandb_mode(setting: str) -> str:
    """offline / online for ``tracking.wandb_mode``."""
    if setting != "auto":
        return setting
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandbSink:
    def __init__(self, *, run_dir: Path, tracking: Any, tags: dict[str, str], state: dict[str, Any] | None):
        import wandb

        experiment, name = run_label(tracking, run_dir)
        self.mode = (state or {}).get("mode") or wandb_mode(tracking.wandb_mode)
        run_id = (state or {}).get("run_id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            dir=str(run_dir), project=tracking.project, group=experiment, name=name, id=run_id,
            resume="allow", mode=self.mode, tags=[f"{k}={v}" for k, v in tags.items()][:64],
            reinit="create_new",  # several runs in one process (a notebook, a fused group)
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.project = tracking.project

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run.id, "project": self.project, "mode": self.mode, "dir": self.run.dir}

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict[str, Any], artifacts: dict[str, Path]) -> None:
        import wandb

        self.run.summary.update({**summary_numbers(summary), "status": str(summary.get("status")),
                                 "error": summary.get("error")})
        for name, path in artifacts.items():
            art = wandb.Artifact(
                f"{self.run.name}-{name}".replace("/", "-"), type="model" if name == "adapter" else name)
            art.add_dir(str(path))
            self.run.log_artifact(art)
        self.run.finish(exit_code=0 if summary.get("status") in (Status.COMPLETED, Status.PAUSED) else 1)
