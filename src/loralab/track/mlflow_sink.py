"""MLflow: one MLflow run per loralab run, in the experiment ``tracking.experiment``.

The tracking URI is ``tracking.tracking_uri`` or MLflow's own default (MLFLOW_TRACKING_URI,
else ``sqlite:///mlflow.db`` in the working directory): ``mlflow ui`` started there shows
it. Parameters are the resolved config (``lora.r``, ...), metrics keep their metrics.jsonl
names and steps, the summary's numbers are ``summary/...`` metrics, the status and the study
axes are tags, and the adapter directory is the ``adapter`` artifact.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from loralab.rundir import Status
from loralab.track.sink import run_label, summary_numbers

BATCH = 100  # MLflow's log_batch takes at most 100 parameters per call
# any other: FAILED
END_STATUS = {Status.COMPLETED: "FINISHED", Status.PAUSED: "KILLED", Status.STOPPED_EARLY: "KILLED"}


class MlflowSink:
    def __init__(self, *, run_dir: Path, tracking: Any, tags: dict[str, str], state: dict[str, Any] | None):
        from mlflow.tracking import MlflowClient

        uri = (state or {}).get("tracking_uri") or tracking.tracking_uri
        self.client = MlflowClient(uri)
        self.uri = self.client.tracking_uri
        experiment, name = run_label(tracking, run_dir)
        if state and state.get("run_id"):
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.experiment_id = state.get("experiment_id")
            return
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**tags, "loralab.run_dir": str(Path(run_dir).resolve())})
        self.run_id = run.info.run_id

    def state(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + BATCH])

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, summary: dict[str, Any], artifacts: dict[str, Path]) -> None:
        from mlflow.entities import Metric, RunTag

        now, step = int(time.time() * 1000), int(summary.get("steps_done") or 0)
        status = str(summary.get("status"))
        metrics = [Metric(f"summary/{k}", v, now, step) for k, v in summary_numbers(summary).items()]
        tags = [RunTag("loralab.status", status)]
        if summary.get("error"):
            tags.append(RunTag("loralab.error", str(summary["error"])[:5000]))
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        for name, path in artifacts.items():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
        self.client.set_terminated(self.run_id, status=END_STATUS.get(status, "FAILED"))
