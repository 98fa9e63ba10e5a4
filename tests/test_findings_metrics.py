"""Findings per metric: a study judged on several metrics reports each, and says when they
disagree. Synthetic rows in the real SQLite schema (every expected number computed here), the
study file's ``metrics`` key, and a small real study judged on an lm-eval task (the study
metric harness:world_mc/mc2), eval loss and a loralab task, checked against SQL and against
`loralab eval --harness` on a run's adapter."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from pathlib import Path

import pytest

import loralab.study
from loralab.errors import ConfigError, LoralabError
from loralab.study import stats
from loralab.study.findings import NO_REPEATS, findings
from loralab.study.spec import load_study
from studytools import sql

SCHEMA = Path(loralab.study.__file__).with_name("schema.sql")
NOISE = [0.004, -0.003, -0.001]  # fixed seed offsets: the pooled SD is their sample SD


def make_db(tmp_path: Path, spec: dict, runs: list[tuple[str, dict, dict[str, float]]]) -> Path:
    """runs: (name, axes, {metric: final value}); each value is the metric's row at step 10."""
    db = tmp_path / "study.db"
    con = sqlite3.connect(db)
    con.executescript(SCHEMA.read_text(encoding="utf-8"))
    con.execute("INSERT INTO studies (name, spec_json, root, created_at) VALUES ('s', ?, ?, 0)",
                (json.dumps({"name": "s", **spec}), str(tmp_path)))
    for name, axes, values in runs:
        cur = con.execute("INSERT INTO runs (study_id, name, axes_json, config_json, status, train_time_s, "
                          "peak_memory_bytes, trainable_params) VALUES (1, ?, ?, '{}', 'completed', 10, 1000, 100)",
                          (name, json.dumps(axes)))
        con.executemany("INSERT INTO metrics VALUES (?, 10, ?, ?)", [(cur.lastrowid, m, v) for m, v in values.items()])
    con.commit()
    con.close()
    return db


SPEC = {"metric": "arith/exact_match", "goal": "max", "metrics": {"world_mc/mc2": "max"},
        "axes": {"quant.mode": ["none", "nf4"]},
        "findings": [{"kind": "axis_effect", "axis": "quant.mode"}]}


def quant_runs(arith: dict[str, float], mc2: dict[str, float], seeds=(1, 2, 3)) -> list:
    return [(f"q{q}-s{s}", {"quant.mode": q, "train.seed": s},
             {"arith/exact_match": arith[q] + n, "world_mc/mc2": mc2[q] + n})
            for q in ("none", "nf4") for s, n in zip(seeds, NOISE, strict=False)]


def test_metrics_that_disagree_beyond_the_noise(tmp_path):
    """nf4 better on arithmetic by 0.04, worse on MC2 by 0.03, each beyond the seed noise."""
    db = make_db(tmp_path, SPEC, quant_runs({"none": 0.50, "nf4": 0.54}, {"none": 0.60, "nf4": 0.57}))
    found = findings(db, "s")
    (across,) = [f for f in found if f["kind"] == "across_metrics"]
    assert across["axis"] == "quant.mode" and across["reference"] == "none" and across["disagree"]
    (level,) = across["levels"]
    assert level["value"] == "nf4" and level["verdict"] == "disagree"
    # both metrics carry the same seed offsets: pooled SD = SD of NOISE with df 4
    half = stats.t_quantile(0.975, 4) * stats.sample_sd(NOISE) * math.sqrt(1 / 3 + 1 / 3)
    arith, mc2 = level["by_metric"]["arith/exact_match"], level["by_metric"]["world_mc/mc2"]
    assert arith["direction"] == "better" and arith["difference"] == pytest.approx(0.04)
    assert mc2["direction"] == "worse" and mc2["difference"] == pytest.approx(-0.03)
    assert arith["half_width"] == pytest.approx(half) and mc2["half_width"] == pytest.approx(half)
    assert arith["beyond_noise"] and mc2["beyond_noise"]
    assert across["text"].startswith("The metrics disagree on quant.mode: quant.mode=nf4 against quant.mode=none: "
                                     f"better on arith/exact_match by 0.04 +/- {half:.2g}, "
                                     f"worse on world_mc/mc2 by 0.03 +/- {half:.2g} (95% intervals)")

    # every finding once per metric, each on its own values and naming its metric
    effects = {f["metric"]: f for f in found if f["kind"] == "axis_effect"}
    assert set(effects) == {"arith/exact_match", "world_mc/mc2"}
    assert effects["arith/exact_match"]["winner"] == "nf4" and effects["world_mc/mc2"]["winner"] == "none"
    means = {m: [row["mean"] for row in f["levels"]] for m, f in effects.items()}
    assert means["arith/exact_match"] == pytest.approx([0.50 + sum(NOISE) / 3, 0.54 + sum(NOISE) / 3])
    assert means["world_mc/mc2"] == pytest.approx([0.60 + sum(NOISE) / 3, 0.57 + sum(NOISE) / 3])
    assert effects["world_mc/mc2"]["text"].startswith("[world_mc/mc2] world_mc/mc2 by quant.mode:")


@pytest.mark.parametrize("seeds, verdict", [((1, 2, 3), "mixed"), ((1,), "mixed_no_repeats")])
def test_different_directions_inside_the_noise_are_not_called_a_disagreement(tmp_path, seeds, verdict):
    db = make_db(tmp_path, SPEC, quant_runs({"none": 0.50, "nf4": 0.54}, {"none": 0.600, "nf4": 0.599}, seeds))
    (across,) = [f for f in findings(db, "s") if f["kind"] == "across_metrics"]
    assert not across["disagree"] and across["levels"][0]["verdict"] == verdict
    assert across["text"].startswith("Across metrics, quant.mode:")
    if verdict == "mixed":
        assert "worse on world_mc/mc2 by 0.001 +/- " in across["text"]
        assert "(within the seed noise)" in across["text"] and "not each beyond the seed noise" in across["text"]
    else:
        assert NO_REPEATS in across["text"] and "+/-" not in across["text"]


def test_agreeing_metrics_and_a_run_one_metric_lacks(tmp_path):
    runs = quant_runs({"none": 0.50, "nf4": 0.54}, {"none": 0.60, "nf4": 0.66})
    del runs[0][2]["world_mc/mc2"]  # qnone-s1 never wrote an MC2 value
    found = findings(make_db(tmp_path, SPEC, runs), "s")
    (across,) = [f for f in found if f["kind"] == "across_metrics"]
    assert across["levels"][0]["verdict"] == "agree" and "the metrics agree" in across["text"]
    # MC2 is judged on the five runs that have it; arithmetic on all six
    effects = {f["metric"]: f for f in found if f["kind"] == "axis_effect"}
    assert [row["n"] for row in effects["world_mc/mc2"]["levels"]] == [2, 3]
    assert [row["n"] for row in effects["arith/exact_match"]["levels"]] == [3, 3]
    (left_out,) = [f for f in found if f["kind"] == "excluded"]
    assert (left_out["metric"] == "world_mc/mc2"
            and "qnone-s1 completed but has no final world_mc/mc2" in left_out["text"])
    assert left_out["text"].startswith("[world_mc/mc2] ")


def test_one_metric_study_findings_are_unchanged(tmp_path):
    spec = {k: v for k, v in SPEC.items() if k != "metrics"}
    found = findings(make_db(tmp_path, spec, quant_runs({"none": 0.5, "nf4": 0.54}, {"none": 0.6, "nf4": 0.57})), "s")
    assert [f["kind"] for f in found] == ["axis_effect"]
    assert found[0]["metric"] == "arith/exact_match" and found[0]["text"].startswith("arith/exact_match by")


def test_study_file_metrics_key(tmp_path):
    def study(extra: str):
        path = tmp_path / "s.yaml"
        path.write_text("name: s\nmetric: world_mc/mc2\ngoal: max\nbase: {model: {path: builtin:tiny}}\n"
                        "axes: {lora.r: [2, 4]}\n" + extra, encoding="utf-8")
        return load_study(path)

    s = study("metrics: [world_mc/mc2, eval_loss, harness:world_pairs/pairs_accuracy, arithmetic_2ds/perplexity]\n")
    assert s.metrics == {"eval_loss": "min", "harness:world_pairs/pairs_accuracy": "max",
                         "arithmetic_2ds/perplexity": "min"}  # the study metric itself is not repeated
    assert s.to_json()["metrics"] == s.metrics
    assert study("metrics: {eval_loss: max}\n").metrics == {"eval_loss": "max"}
    assert study("").metrics == {}
    with pytest.raises(ConfigError, match=r"s.yaml:6: metrics: eval_loss: goal must be min or max"):
        study("metrics: {eval_loss: lowest}\n")
    with pytest.raises(ConfigError, match=r"s.yaml:6: metrics must be a list of metrics.jsonl keys"):
        study("metrics: 3\n")


# ---------------------------------------------------------------- a small real study

STUDY_FILE = """
name: tiny_lr_benchmarks
question: Does a higher lr help on every benchmark?
metric: harness:world_mc/mc2
goal: max
metrics: [eval_loss, world_pairs/pairs_accuracy]
base:
  model: {path: builtin:tiny, device: cpu}
  data: {path: builtin:arithmetic_2ds, limit: 64, val_max_examples: 16, max_seq_length: 64}
  train: {max_steps: 4, batch_size: 8, micro_batch_size: 8, warmup_steps: 0, log_every: 1}
  eval: {tasks: ["harness:world_mc", world_pairs], limit: 4}
axes:
  train.lr: [1.0e-3, 3.0e-2]
repeats: 2
findings:
  - {kind: axis_effect, axis: train.lr}
  - {kind: spread}
"""
METRICS = ("harness:world_mc/mc2", "eval_loss", "world_pairs/pairs_accuracy")


@pytest.fixture(scope="module")
def real_study(tmp_path_factory):
    """The study file expanded and recorded by loralab.study (spec, Store, the driver's outcome
    reader), each run a real tiny training in this process, lm-eval scoring its model."""
    from loralab.config import config_from_dict
    from loralab.study.execute import outcome
    from loralab.study.store import Store
    from loralab.train.loop import train

    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install loralab[harness])")
    root = tmp_path_factory.mktemp("studies") / "tiny_lr_benchmarks"
    root.mkdir()
    (root / "study.yaml").write_text(STUDY_FILE, encoding="utf-8")
    study = load_study(root / "study.yaml", root=root)
    with Store(root / "study.db") as store:
        sid, _ = store.open_study(study.name, study.to_json(), root, study.runs)
        ids = {r["name"]: r["id"] for r in store.runs(sid)}
        for run in study.runs:
            run_dir = Path(run.config["output"]["dir"])
            store.start(ids[run.name], run_dir=str(run_dir), estimated=None)
            with contextlib.suppress(LoralabError):
                train(config_from_dict(json.loads(json.dumps(run.config))))
            result = outcome(run_dir, 0)
            store.finish(ids[run.name], status=result["status"], summary=result.get("summary"),
                         metrics=result.get("metrics"), error=result.get("error"))
    return root / "study.db"


def final_by_sql(db: Path, metric: str) -> dict[tuple[float, int], float]:
    """{(lr, seed): final value} of ``metric``, straight from the runs and metrics tables."""
    lr_seed = "json_extract(r.axes_json, '$.\"train.lr\"'), json_extract(r.axes_json, '$.\"train.seed\"')"
    if metric == "eval_loss":
        rows = sql(db, f"SELECT {lr_seed}, r.final_eval_loss FROM runs r WHERE r.status = 'completed'")
    else:
        rows = sql(db, f"SELECT {lr_seed}, m.value FROM metrics m JOIN runs r ON r.id = m.run_id "
                       "WHERE r.status = 'completed' AND m.name = ? AND m.step = (SELECT MAX(step) FROM metrics "
                       "WHERE run_id = m.run_id AND name = ? AND value IS NOT NULL)", metric, metric)
    return {(lr, s): v for lr, s, v in rows}


@pytest.mark.slow
def test_real_study_findings_per_metric_match_the_database(real_study):
    assert {s for (s,) in sql(real_study, "SELECT status FROM runs")} == {"completed"}
    found = findings(real_study, "tiny_lr_benchmarks")
    (across,) = [f for f in found if f["kind"] == "across_metrics"]
    (level,) = across["levels"]
    assert across["reference"] == 1e-3 and level["value"] == 3e-2 and across["metrics"] == list(METRICS)
    effects = {f["metric"]: f for f in found if f["kind"] == "axis_effect"}
    spreads = {f["metric"]: f for f in found if f["kind"] == "spread"}
    assert set(effects) == set(spreads) == set(METRICS)
    directions = set()
    for metric in METRICS:
        final = final_by_sql(real_study, metric)
        assert len(final) == 4
        mean = {lr: (final[(lr, 1)] + final[(lr, 2)]) / 2 for lr in (1e-3, 3e-2)}
        got = {row["value"]: row["mean"] for row in effects[metric]["levels"]}
        assert got == pytest.approx(mean, rel=1e-12, abs=1e-15)
        pooled = math.sqrt(sum((final[(lr, s)] - mean[lr]) ** 2 for lr in mean for s in (1, 2)) / 2)
        assert spreads[metric]["noise_sd"] == pytest.approx(pooled, abs=1e-15) and spreads[metric]["noise_df"] == 2
        x = level["by_metric"][metric]
        diff = mean[3e-2] - mean[1e-3]
        assert x["difference"] == pytest.approx(diff, abs=1e-15)
        assert x["half_width"] == pytest.approx(stats.t_quantile(0.975, 2) * pooled, abs=1e-15)
        better = diff < 0 if metric == "eval_loss" else diff > 0
        worse = diff > 0 if metric == "eval_loss" else diff < 0
        assert x["direction"] == ("better" if better else "worse" if worse else "same")
        if x["direction"] != "same" and abs(diff) > x["half_width"]:
            directions.add(x["direction"])
    assert across["disagree"] == (directions == {"better", "worse"})


@pytest.mark.slow
def test_real_study_metric_equals_cli_harness_on_the_adapter(real_study, capsys):
    """The study metric of a run (lm-eval on the model being trained) is what
    `loralab eval --harness world_mc` gives on the adapter that run saved."""
    from loralab.cli import main

    (run_dir,) = [d for (d,) in sql(real_study,
                                    "SELECT run_dir FROM runs WHERE name LIKE '%s2' ORDER BY id DESC LIMIT 1")]
    stored = final_by_sql(real_study, "harness:world_mc/mc2")
    (lr,) = [lr for (lr,) in sql(real_study, "SELECT json_extract(axes_json, '$.\"train.lr\"') FROM runs "
                                             "WHERE run_dir = ?", run_dir)]
    capsys.readouterr()
    assert main(["eval", "--harness", "world_mc", "--model", "builtin:tiny", "--adapter", run_dir,
                 "--limit", "4", "--batch-size", "8", "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    (cli,) = [r["value"] for r in rows if r["adapter"] == run_dir and r["metric"] == "mc2"]
    assert cli == pytest.approx(stored[(lr, 2)], abs=1e-9)
