"""The Python API (loralab.api) and the notebook that uses it, examples/quickstart.ipynb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loralab
from loralab import api
from loralab.config import Config
from loralab.errors import ConfigError, DataError, ModelError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(model={"path": "builtin:tiny", "device": "cpu"},
             data={"path": "builtin:arithmetic_2ds", "limit": 32, "val_max_examples": 8, "max_seq_length": 48},
             train={"max_steps": 4, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, "log_every": 1},
             lora={"r": 4})


def test_load_config_from_yaml_dict_config_and_keywords(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  r: 16\n  alpha: 32\ntrain:\n  lr: 1.0e-3\n")
    cfg = api.load_config(path, lora={"r": 4}, overrides=["train.lr=2e-3"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.lr) == (4, 32.0, 2e-3)
    assert api.load_config({"lora": {"r": 16}}).lora.r == 16
    again = api.load_config(cfg, train={"max_steps": 7})
    assert (isinstance(again, Config) and again.train.max_steps == 7 and again.lora.r == 4
            and cfg.train.max_steps is None)
    assert loralab.load_config is api.load_config and loralab.Study is api.Study
    # a bad value is blamed on the keyword or override that gave it, not on the file (which has no lora.rank)
    for kw, said in (({"lora": {"rank": 4}}, "lora={'rank': 4}: unknown key lora.rank (did you mean lora.r?)"),
                     ({"overrides": ["train.lr=-1"]}, "--set train.lr=-1: train.lr must be > 0 (got -1.0)")):
        with pytest.raises(ConfigError) as caught:
            api.load_config(path, **kw)
        assert str(caught.value).startswith(said) and str(path) not in str(caught.value)


def test_errors_are_loralab_errors_with_the_command_lines_message(tmp_path):
    with pytest.raises(ConfigError) as caught:
        api.load_config(lora={"r": -1, "rank": 3})
    text = str(caught.value)
    assert "lora.r must be > 0 (got -1)" in text and "unknown key lora.rank" in text
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cli = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--set", "lora.r=-1", "--set", "lora.rank=3"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert cli.returncode == 2
    for line in text.splitlines()[1:]:  # the same problems, each blamed on the keyword or the --set that made it
        origin, problem = line.removeprefix("  - ").split("}: ", 1)
        origin += "}"
        key = "lora.rank" if "unknown" in problem else problem.split(" ")[0]
        assert origin == {"lora.r": "lora={'r': -1}", "lora.rank": "lora={'rank': 3}"}[key]
        flag = {"lora.r": "--set lora.r=-1", "lora.rank": "--set lora.rank=3"}[key]
        assert f"  - {flag}: {problem}" in cli.stderr
    with pytest.raises(DataError, match="--limit must be a positive integer"):
        api.evaluate(limit=0)
    with pytest.raises(ConfigError, match="not a loralab run directory"):
        api.train(out=tmp_path / "nothing", resume=True)


@pytest.mark.slow
def test_train_result_resume_estimate_and_evaluate(tmp_path):
    out = tmp_path / "run"
    paused = api.train(out=out, overrides=["train.stop_at_step=2"], **SMALL)
    assert paused.status == "paused" and paused.adapter is not None and len(paused.metrics) == 3
    result = api.train(out=out, resume=True, overrides=["train.stop_at_step=null"])
    summary = json.loads((out / "summary.json").read_text())
    assert result.status == "completed" and result.summary == summary and result.run_dir == out
    assert (result.final_eval_loss, result.trainable_params, result.tokens_per_s) == (
        summary["final_eval_loss"], summary["trainable_params"], summary["tokens_per_s"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result.metrics == lines and [r["step"] for r in lines if "train_loss" in r] == [1, 2, 3, 4]
    frame = result.metrics_frame()
    assert list(frame["train_loss"].dropna()) == [r["train_loss"] for r in lines if "train_loss" in r]
    assert (result.adapter / "adapter_model.safetensors").is_file()

    # the estimate counts the same trainable parameters the run trained
    assert api.estimate(api.load_config(out / "config.yaml")).trainable_params == result.trainable_params

    rows = api.evaluate("builtin:tiny", adapters=[out], tasks=["arithmetic_2ds"], limit=4)
    assert [(r["adapter"], r["task"], r["metric"], r["n"]) for r in rows if r["metric"] == "exact_match"] == [
        (None, "arithmetic_2ds", "exact_match", 4), (str(out), "arithmetic_2ds", "exact_match", 4)]


def test_train_again_into_a_run_is_refused_and_evaluate_checks_the_base(tmp_path, tiny_model_dir):
    """A notebook cell run again: api.train into a directory holding a run is refused, every file
    as it was, unless overwrite=True (it used to replace the run, a paused run's checkpoints
    too); api.evaluate refuses an adapter on a base it was not trained on, as `loralab eval`."""
    out = tmp_path / "run"
    small = {**SMALL, "train": {**SMALL["train"], "max_steps": 2}}
    api.train(out=out, overrides=["train.stop_at_step=1", "train.checkpoint_every=1"], **small)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"holds an earlier run \(paused; .*resume=True.*overwrite=True"):
        api.train(out=out, **small)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert api.train(out=out, overwrite=True, **small).status == "completed"
    with pytest.raises(ModelError, match="was trained on builtin:tiny .* not on"):
        api.evaluate(tiny_model_dir("llama"), adapters=[out], tasks="arithmetic_2ds", limit=2)


def test_a_resume_in_python_makes_the_command_lines_checks(tmp_path, tiny_model_dir):
    """api.train(resume=True) continued a paused run on a base whose weights had changed since,
    without a word, and recorded the new base; it dropped train={...} given with it. It now
    makes `loralab train --resume`'s checks, in the API's terms."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("llama"), base)
    out = tmp_path / "run"
    small = {**SMALL, "model": {"path": str(base), "device": "cpu"}}
    paused = api.train(out=out, overrides=["train.stop_at_step=2", "train.checkpoint_every=1"], **small)
    assert paused.status == "paused"
    with pytest.raises(ConfigError, match=r"takes the config from the run directory; give train= as "
                                          r"overrides=\['section.key=value'\]"):
        api.train(out=out, resume=True, train={"lr": 0.5, "stop_at_step": None})
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    with torch.no_grad():  # the base directory now holds a fine-tune of what the run trained on
        for p in model.parameters():
            p.add_(0.01 * p.std() * torch.randn_like(p))
    model.save_pretrained(base)
    record = (out / "summary.json").read_text()
    with pytest.raises(ModelError) as caught:
        api.train(out=out, resume=True, overrides=["train.stop_at_step=null"])
    assert (f"adapter {out}: the model at {base} holds other weights than when it trained: the same architecture "
            "and sizes, but other weights (") in str(caught.value)
    assert str(caught.value).endswith("Put the base it trained on back at model.path, or force=True to use it anyway")
    assert (out / "summary.json").read_text() == record  # still paused, as it was
    assert api.train(out=out, resume=True, force=True, overrides=["train.stop_at_step=null"]).status == "completed"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    """examples/quickstart.ipynb runs top to bottom (a train, an eval, an estimate, a study and
    its report shown inline), in a fresh kernel, in a scratch directory."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = nb.cells[-1].outputs[0]["data"]["text/html"]
    assert shown.startswith("<iframe srcdoc=") and "Study report: notebook_study" in shown
    assert json.loads((tmp_path / "runs" / "notebook-train" / "summary.json").read_text())["status"] == "completed"
    statuses = {json.loads((tmp_path / "runs" / "notebook_study" / r / "summary.json").read_text())["status"]
                for r in ("r2", "r16")}
    assert statuses == {"completed"}


@pytest.mark.slow
def test_study_run_with_no_budget_left_then_resume_then_report(tmp_path):
    import yaml

    path = tmp_path / "api_study.yaml"
    base = {**SMALL, "train": {**SMALL["train"], "max_steps": 2}, "output": {"save_adapter": False}}
    path.write_text(yaml.safe_dump({"name": "api_study", "base": base, "axes": {"lora.r": [2, 4]}}))
    study = api.Study(path, out=tmp_path / "runs")
    assert study.runs == [{"name": "r2", "lora.r": 2}, {"name": "r4", "lora.r": 4}]
    with pytest.raises(ConfigError, match="no study 'api_study'"):
        study.status()
    first = study.run(budget_s=0)  # no time: nothing starts, both stay pending
    assert first["counts"] == {"pending": 2} and [r["status"] for r in study.status()] == ["pending", "pending"]
    done = study.resume(fuse=True)
    assert done["counts"] == {"completed": 2} and done["ran"] == 2
    rows = study.status()
    summaries = [json.loads((study.root / r["name"] / "summary.json").read_text()) for r in rows]
    assert [r["eval_loss"] for r in rows] == pytest.approx([s["final_eval_loss"] for s in summaries])
    report = study.report()
    assert report.html.is_file() and "Study report: api_study" in report._repr_html_()
    assert {f["kind"] for f in report.findings} >= {"axis_effect"}
