"""Experiment trackers, read back with each tracker's own reader: TensorBoard's EventAccumulator,
MlflowClient, and the W&B offline run file (``run-<id>.wandb``: W&B's record log of its own
protobuf ``Record`` messages). Same metric names, values and steps as metrics.jsonl, the
config as parameters, one tracker run per loralab run, a resumed run continuing its tracker
run, and a tracker that fails leaving the training run completed.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_cfg
from loralab.config import load_config
from loralab.errors import ConfigError
from loralab.track import Tracker
from loralab.train.loop import train

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

SRC = str(Path(__file__).resolve().parents[1] / "src")
RUN = dict(train__max_steps=4, train__checkpoint_every=2, eval__every=2, data__limit=32, data__val_max_examples=8,
           data__max_seq_length=48, lora__r=4)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns next to the caller
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def metric_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} from metrics.jsonl: what every tracker must hold."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((row["step"], float(v)))
    return out


def tensorboard_series(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    return scalars, config_text


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file: a 7-byte header (':W&B', magic, version), then
    LevelDB-log blocks of 32 KiB holding chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(buf))
            buf = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    """Every offline W&B session of a run directory: run ids, config, history, summary, artifacts."""
    out: dict = {"ids": set(), "config": {}, "history": {}, "summary": {}, "artifacts": [], "tags": set()}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].add(r.run.run_id)
                out["tags"].update(r.run.tags)
                out["group"] = r.run.run_group
            elif kind == "config":
                out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                step = items.pop("_step")
                for k, v in items.items():
                    if not k.startswith("_"):
                        out["history"].setdefault(k, []).append((step, float(v)))
            elif kind == "summary":
                out["summary"].update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                                       for u in r.summary.update})
            elif kind == "artifact":
                out["artifacts"].append((r.artifact.type, r.artifact.name))
    return out


def by_step(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """One value per step: tokens_seen is on a step's train and eval lines alike in
    metrics.jsonl, and the trackers get it once."""
    return list(dict(points).items())


def assert_same_series(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]], rel=1e-6):
    """Each tracker series holds metrics.jsonl's values, one point per step (MLflow kept two
    identical tokens_seen points at every evaluation step)."""
    for name, points in want.items():
        g, w = got[name], by_step(points)
        assert [s for s, _ in g] == [s for s, _ in w], name
        assert [v for _, v in g] == pytest.approx([v for _, v in w], rel=rel, nan_ok=True), name


@pytest.mark.slow
def test_every_tracker_holds_the_run_and_a_resume_continues_its_tracker_run(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = ["tracking.backends=[tensorboard,mlflow,wandb]", f"tracking.tracking_uri={uri}",
             "tracking.experiment=exp", "tracking.axes=[lora.r,train.lr]"]
    first = train(make_cfg("builtin:tiny", run_dir, *track, "train.stop_at_step=2", **RUN))
    assert first["status"] == "paused"
    ids = json.loads((run_dir / "tracking.json").read_text())
    assert set(ids) == {"tensorboard", "mlflow", "wandb"} and not any("error" in v for v in ids.values())
    resumed = train(load_config(run_dir / "config.yaml", ["train.stop_at_step=null"]), resume=True)
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == 2
    again = json.loads((run_dir / "tracking.json").read_text())
    assert again["mlflow"]["run_id"] == ids["mlflow"]["run_id"] and again["wandb"]["run_id"] == ids["wandb"]["run_id"]
    want = metric_series(run_dir)
    assert [s for s, _ in want["train_loss"]] == [1, 2, 3, 4] and [s for s, _ in want["eval_loss"]] == [2, 4]

    # TensorBoard: scalars by step (float32 in event files), the config as text
    scalars, config_text = tensorboard_series(run_dir / "tb")
    assert_same_series(scalars, want)
    assert "lora.r: 4" in config_text and '"builtin:tiny"' in config_text
    assert scalars["summary/tokens_per_s"][-1][1] == pytest.approx(resumed["tokens_per_s"], rel=1e-6)

    # MLflow: one run in the experiment, continued, finished; params, tags, summary, adapter artifact
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["data.path"] == "builtin:arithmetic_2ds"
    assert run.data.tags["lora.r"] == "4" and run.data.tags["loralab.status"] == "completed"
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in want}
    assert_same_series(history, want, rel=1e-12)
    assert run.data.metrics["summary/peak_memory_bytes"] == resumed["peak_memory_bytes"]
    assert run.data.metrics["summary/trainable_params"] == resumed["trainable_params"]
    assert run.data.metrics["summary/best_eval_loss"] == pytest.approx(resumed["best_eval_loss"])
    files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in files

    # W&B offline: two sessions (before and after the resume) of one run id in the group
    wb = wandb_run(run_dir)
    assert wb["ids"] == {ids["wandb"]["run_id"]} and wb["group"] == "exp" and "lora.r=4" in wb["tags"]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert wb["config"]["lora.r"] == 4 and wb["config"]["train.max_steps"] == 4
    assert_same_series(wb["history"], want, rel=1e-12)
    assert wb["summary"]["status"] == "completed" and wb["summary"]["steps_done"] == 4
    assert ("model", "run-adapter") in wb["artifacts"]


@pytest.mark.slow
def test_a_failing_tracker_never_fails_the_run(tmp_path, monkeypatch, caplog):
    """The library missing (wandb), the server down (mlflow), the folder unusable (tensorboard)."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tb").write_text("a file where the event folder should be")
    cfg = make_cfg("builtin:tiny", run_dir, "tracking.backends=[tensorboard,mlflow,wandb]",
                   "tracking.tracking_uri=http://127.0.0.1:9", **{**RUN, "train__checkpoint_every": 0})
    with caplog.at_level(logging.WARNING, logger="loralab.track"):
        summary = train(cfg)
    assert summary["status"] == "completed"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    series = metric_series(run_dir)
    assert [s for s, _ in series["train_loss"]] == [1, 2, 3, 4] and [s for s, _ in series["eval_loss"]] == [2, 4]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    errors = json.loads((run_dir / "tracking.json").read_text())
    assert "loralab[wandb]" in errors["wandb"]["error"]
    assert set(errors) == {"tensorboard", "mlflow", "wandb"} and all("error" in e for e in errors.values())
    assert {r.getMessage().split()[1] for r in caplog.records if "stopped" in r.getMessage()} == {
        "tensorboard", "mlflow", "wandb"}


class FullDisk:
    """A tracker whose writes fail the way a full disk does, after it opened fine."""

    def __init__(self):
        self.logged = 0

    def log_metrics(self, step, values):
        self.logged += 1
        if self.logged > 1:
            raise OSError(28, "No space left on device")

    def finish(self, summary, artifacts):
        raise AssertionError("a dropped tracker is not finished")


def test_a_tracker_failing_mid_run_is_dropped_and_the_rest_go_on(tmp_path, caplog):
    from loralab.config import TrackingConfig

    tracker = Tracker(tmp_path, TrackingConfig(backends=["tensorboard"]))
    disk = tracker.sinks["tensorboard"] = FullDisk()
    with caplog.at_level(logging.WARNING, logger="loralab.track"):
        for step in (1, 2, 3):
            tracker.log({"step": step, "train_loss": 1.0})
        tracker.finish({"status": "completed"})
    assert disk.logged == 2 and not tracker.sinks
    assert "No space left" in json.loads((tmp_path / "tracking.json").read_text())["tensorboard"]["error"]
    assert any("tensorboard stopped" in r.getMessage() for r in caplog.records)


def test_tracking_config_shorthand_and_bad_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tracking: [tensorboard, mlflow]\nlora:\n  r: 4\n")
    assert load_config(path).tracking.backends == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError,
                       match=r"tracking.backends must be a list of one of 'tensorboard', 'mlflow', 'wandb'"):
        load_config(None, ["tracking.backends=[tensorbored]"])
    env = {**os.environ, "PYTHONPATH": SRC}
    bad = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--track", "neptune",
                          "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "tracking.backends must be a list of one of" in bad.stderr


@pytest.mark.slow
def test_study_run_track_and_export_after_the_fact(tmp_path):
    """`study run --track mlflow --fuse`: one experiment (the study), one MLflow run per run
    (the two runs trained in one fused process), tagged with its axes; `study export --to tensorboard`
    writes each run's tb/ afterwards; a second export sends nothing twice."""
    from mlflow.tracking import MlflowClient

    base = {"model": {"path": "builtin:tiny", "device": "cpu"},
            "data": {"path": "builtin:arithmetic_2ds", "limit": 16, "val_max_examples": 4, "max_seq_length": 48},
            "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, "log_every": 1},
            "output": {"save_adapter": False}}
    study = tmp_path / "st.yaml"
    study.write_text(yaml.safe_dump({"name": "st", "base": base, "axes": {"lora.r": [2, 4]}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "loralab.cli", *args, "--out", str(tmp_path / "runs")],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

    ran = cli("study", "run", str(study), "--track", "mlflow", "--set", f"tracking.tracking_uri={uri}", "--fuse")
    assert ran.returncode == 0, ran.stderr
    summary = json.loads((tmp_path / "runs" / "st" / "r2" / "summary.json").read_text())
    assert [Path(p).name for p in summary["fused_with"]] == ["r4"]  # one process, two tracker runs
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("st").experiment_id])
    records = {n: (tmp_path / "runs" / "st" / n / "tracking.json").read_text() for n in ("r2", "r4")}
    assert sorted((r.info.run_name, r.data.tags["lora.r"], r.data.params["lora.r"]) for r in runs) == [
        ("r2", "2", "2"), ("r4", "4", "4")], records
    for r in runs:
        want = metric_series(tmp_path / "runs" / "st" / r.info.run_name)
        got = {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)] for k in want}
        assert_same_series(got, want, rel=1e-12)

    exported = cli("study", "export", "st", "--to", "tensorboard", "--json")
    assert exported.returncode == 0, exported.stderr
    assert [(r["run"], r["sent"]) for r in json.loads(exported.stdout)["runs"]] == [("r2", True), ("r4", True)]
    for name in ("r2", "r4"):
        scalars, _ = tensorboard_series(tmp_path / "runs" / "st" / name / "tb")
        assert_same_series(scalars, metric_series(tmp_path / "runs" / "st" / name))
    twice = cli("study", "export", "st", "--to", "mlflow", "--tracking-uri", uri, "--json")
    assert [r["why"] for r in json.loads(twice.stdout)["runs"]] == ["already in mlflow"] * 2
    assert len(client.search_runs([client.get_experiment_by_name("st").experiment_id])) == 2
    # another MLflow server gets its own copy (it was refused as "already in mlflow")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    moved = cli("study", "export", "st", "--to", "mlflow", "--tracking-uri", other, "--json")
    assert [(r["run"], r["sent"]) for r in json.loads(moved.stdout)["runs"]] == [("r2", True), ("r4", True)]
    there = MlflowClient(other)
    assert sorted(r.info.run_name for r in there.search_runs([there.get_experiment_by_name("st").experiment_id])) == [
        "r2", "r4"]
