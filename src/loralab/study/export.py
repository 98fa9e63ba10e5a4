"""``loralab study export --to BACKEND``: a study's runs and report sent to an experiment tracker.

    rows = export_study(Path("studies/lr/study.db"), "lr", "mlflow")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loralab.config import TrackingConfig
from loralab.rundir import RunDir, Status
from loralab.study.store import Store
from loralab.track import Tracker, read_state, replay_run


def export_study(db_path: Path, name: str, backend: str, *, tracking_uri: str | None = None,
                 project: str = "loralab") -> list[dict[str, Any]]:
    """Send a finished or partly finished study to ``backend``: one tracker run per run that
    has a run directory (experiment/group = the study, axes as tags), and the study report
    (``<study dir>/report``, when written) as the artifact of a run named ``<study>-report``.
    A run already in that tracker (its tracking.json says so) is not sent twice."""
    with Store(db_path, readonly=True) as store:
        spec = store.spec(name)
        runs = store.runs(store.study_id(name))
    tracking = TrackingConfig(backends=[backend], tracking_uri=tracking_uri, project=project, experiment=name,
                              axes=list(spec.get("axes") or {}))
    out = []
    for r in runs:
        run_dir = Path(r["run_dir"]) if r["run_dir"] else None
        if run_dir is None or not RunDir(run_dir).config.is_file():
            out.append({"run": r["name"], "status": r["status"], "sent": False, "why": "never started"})
            continue
        if already_there(read_state(run_dir).get(backend), backend, tracking_uri=tracking_uri, project=project):
            out.append({"run": r["name"], "status": r["status"], "sent": False, "why": f"already in {backend}"})
            continue
        tracker = replay_run(run_dir, tracking)
        error = tracker.records.get(backend, {}).get("error")
        out.append({"run": r["name"], "status": r["status"], "sent": error is None, "why": error,
                    **({} if error else tracker.records[backend])})
    report = Path(db_path).parent / "report"
    if backend != "tensorboard" and (report / "report.html").is_file():
        report_tracking = TrackingConfig(**{**tracking.__dict__, "run_name": f"{name}-report", "axes": []})
        tracker = Tracker(report, report_tracking).open({"study.name": name}, resume=False)
        tracker.finish({"status": Status.COMPLETED}, {"report": report})
        error = tracker.records.get(backend, {}).get("error")
        out.append({"run": f"{name}-report", "status": "report", "sent": error is None, "why": error})
    return out


def already_there(previous: Any, backend: str, *, tracking_uri: str | None, project: str) -> bool:
    """Whether a run's tracking.json (``previous``: its record for ``backend``) says the run is
    already in the place an export sends it to: the same MLflow tracking URI (when one is given),
    the same W&B project; another server or project gets its own copy."""
    if not isinstance(previous, dict) or "error" in previous:
        return False
    if backend == "mlflow" and tracking_uri is not None:
        return previous.get("tracking_uri") == tracking_uri
    if backend == "wandb":
        return previous.get("project") == project
    return True
