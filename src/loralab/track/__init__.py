"""Experiment trackers: a run's config, metrics and summary also go to TensorBoard, MLflow or W&B.

    # run.yaml                                # or: loralab train run.yaml --track tensorboard,mlflow
    tracking: [tensorboard, mlflow, wandb]

    tracker = open_trackers(cfg, run_dir, resume=False)   # None when cfg.tracking.backends is empty
    tracker.log({"step": 10, "train_loss": 1.23})         # every metrics.jsonl row, as it is written
    tracker.finish(summary)                               # summary numbers, adapter artifact, status
    replay_run(run_dir, tracking)                         # a finished run directory, after the fact

metrics.jsonl and summary.json stay the run's own records; a tracker is a copy. A tracker
that fails (library missing, server down, its folder unwritable) is dropped with a warning
and the run goes on. ``<run dir>/tracking.json`` holds each tracker's run id, so a resumed
run continues the same tracker run. The backends: tensorboard.py, mlflow_sink.py, wandb_sink.py,
each a Sink (loralab.track.sink, which they import instead of this package).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loralab.config import TRACKERS, Config, TrackingConfig, config_from_dict, flat_keys, read_yaml
from loralab.rundir import METRICS, SUMMARY, RunDir, Status, write_atomic
from loralab.track.sink import Sink, run_label
from loralab.units import is_number

log = logging.getLogger(__name__)
TRACKING_FILE = "tracking.json"
INSTALL_HINT = {"tensorboard": "pip install 'loralab[tensorboard]'", "mlflow": "pip install 'loralab[mlflow]'",
                "wandb": "pip install 'loralab[wandb]'"}


def axis_tags(tracking: TrackingConfig, params: dict[str, Any]) -> dict[str, str]:
    """The study's axis values of this run, as tracker tags."""
    return {key: json.dumps(params[key]) if isinstance(params[key], list) else str(params[key])
            for key in tracking.axes if key in params}


def open_sink(backend: str, *, run_dir: Path, tracking: TrackingConfig, tags: dict[str, str],
              state: dict[str, Any] | None) -> Sink:
    """The backend's sink: a new tracker run, or the one in ``state`` continued."""
    if backend == "tensorboard":
        from loralab.track.tensorboard import TensorBoardSink

        return TensorBoardSink(run_dir=run_dir, resumed=state is not None)
    if backend == "mlflow":
        from loralab.track.mlflow_sink import MlflowSink

        return MlflowSink(run_dir=run_dir, tracking=tracking, tags=tags, state=state)
    if backend == "wandb":
        from loralab.track.wandb_sink import WandbSink

        return WandbSink(run_dir=run_dir, tracking=tracking, tags=tags, state=state)
    raise ValueError(f"unknown tracker {backend!r} (known: {', '.join(TRACKERS)})")


class Tracker:
    """The run's trackers behind one object; a tracker that raises is dropped with a warning."""

    def __init__(self, run_dir: Path, tracking: TrackingConfig, *, state: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.records: dict[str, Any] = dict(state or {})  # tracking.json: backend -> state or error
        self.sinks: dict[str, Sink] = {}
        self.tracking = tracking
        self._step, self._at_step = None, {}  # the values already sent at the current step

    def open(self, params: dict[str, Any], *, resume: bool) -> Tracker:
        tags = axis_tags(self.tracking, params)
        for backend in dict.fromkeys(self.tracking.backends):
            previous = self.records.get(backend) if resume else None
            previous = previous if isinstance(previous, dict) and "error" not in previous else None
            try:
                sink = open_sink(backend, run_dir=self.run_dir, tracking=self.tracking, tags=tags, state=previous)
            except ImportError as exc:
                self._drop(backend, f"{exc}; install it with {INSTALL_HINT[backend]}")
                continue
            except Exception as exc:  # a tracker never fails the run
                self._drop(backend, f"{type(exc).__name__}: {exc}")
                continue
            self.sinks[backend] = sink
            if previous is None:
                self._call(backend, sink.log_params, params)
            if backend in self.sinks:
                self._call(backend, lambda s=sink, b=backend: self.records.__setitem__(b, s.state()))
        self._save()
        return self

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row: its numbers at its step (strings such as ``event`` are left out)."""
        values = {k: float(v) for k, v in row.items() if k != "step" and is_number(v)}
        if row.get("step") != self._step:
            self._step, self._at_step = row.get("step"), {}
        # a step's train and evaluation lines both carry tokens_seen: one point, not two
        values = {k: v for k, v in values.items() if self._at_step.get(k) != v}
        self._at_step.update(values)
        if values and isinstance(row.get("step"), int):
            for backend, sink in list(self.sinks.items()):
                self._call(backend, sink.log_metrics, row["step"], values)

    def finish(self, summary: dict[str, Any], artifacts: dict[str, Path] | None = None) -> None:
        """The summary, the artifacts (default: the run's adapter/ when it has one), the end status."""
        if artifacts is None:
            adapter = RunDir(self.run_dir).adapter
            artifacts = {"adapter": adapter} if adapter.is_dir() and summary.get("status") == Status.COMPLETED else {}
        for backend, sink in list(self.sinks.items()):
            self._call(backend, sink.finish, summary, artifacts)
        self.sinks.clear()
        self._save()

    def _call(self, backend: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a tracker never fails the run
            self.sinks.pop(backend, None)
            self._drop(backend, f"{type(exc).__name__}: {exc}")

    def _drop(self, backend: str, error: str) -> None:
        log.warning("tracking: %s stopped (%s); the run goes on, and its %s and %s stay complete",
                    backend, error.splitlines()[0] if error else error, METRICS, SUMMARY)
        self.records[backend] = {"error": error}
        self._save()

    def _save(self) -> None:
        try:
            write_atomic(self.run_dir / TRACKING_FILE, self.records, fsync=False)
        except OSError as exc:
            log.warning("tracking: could not write %s (%s)", self.run_dir / TRACKING_FILE, exc)


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(run_dir) / TRACKING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def open_trackers(cfg: Config, run_dir: Path, *, resume: bool = False) -> Tracker | None:
    """The run's trackers, opened (config logged as parameters), or None when it has none.
    ``resume`` continues the tracker runs recorded in ``run_dir``/tracking.json."""
    if not cfg.tracking.backends:
        return None
    tracker = Tracker(run_dir, cfg.tracking, state=read_state(run_dir) if resume else None)
    return tracker.open(flat_keys(cfg.to_dict()), resume=resume)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a torn last line is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def replay_run(run_dir: Path, tracking: TrackingConfig, *, artifacts: dict[str, Path] | None = None) -> Tracker:
    """Send a run directory's config.yaml, metrics.jsonl and summary.json to ``tracking``'s
    trackers as new tracker runs (``study export --to``)."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    raw = read_yaml(run.config) or {}
    params = flat_keys(config_from_dict(raw, source=str(run.config)).to_dict())
    tracker = Tracker(run_dir, tracking, state=read_state(run_dir)).open(params, resume=False)
    for row in read_metrics(run.metrics):
        tracker.log(row)
    try:
        summary = json.loads(run.summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {"status": "unknown"}
    tracker.finish(summary, artifacts)
    return tracker


def track_study(study: Any) -> None:
    """A study's runs that track: the study's name is their experiment, its axes their tags."""
    for run in study.runs:
        tracking = run.config.get("tracking") or {}
        if tracking.get("backends"):
            tracking["experiment"] = tracking.get("experiment") or study.name
            tracking["axes"] = tracking.get("axes") or list(study.axes)


def prepare_study_trackers(study: Any) -> None:
    """In the study driver, before its runs start: create the study's MLflow experiment (and
    with it a new sqlite:// store's tables) once, so parallel runs do not race to do it."""
    done = set()
    for run in study.runs:
        tracking = TrackingConfig(**run.config.get("tracking") or {})
        if "mlflow" not in tracking.backends or (tracking.tracking_uri, tracking.experiment) in done:
            continue
        done.add((tracking.tracking_uri, tracking.experiment))
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking.tracking_uri)
            name = run_label(tracking, Path("."))[0]
            if client.get_experiment_by_name(name) is None:
                client.create_experiment(name)
        except Exception as exc:  # each run reports its own tracker problems; the study goes on
            log.warning("tracking: the study's MLflow experiment could not be prepared (%s)", exc)
