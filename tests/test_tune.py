"""loralab tune: the search space follows the seeds' equivalences, the answer is what the study
database supports, a kill does not repeat or lose runs, and the summary names noise."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loralab.errors import ConfigError
from loralab.rundir import Status
from loralab.study.spec import RunSpec, load_study
from loralab.study.store import Store
from loralab.tune import (
    EFFECTIVE_LRS,
    EXTRA_SEEDS,
    SCALE,
    Candidate,
    default_dimensions,
    edge_notes,
    effects,
    halving_schedule,
    plan_tune,
    read_candidates,
    recommend,
    study_file,
    summary_text,
    with_absolute_paths,
)
from userdata import instruction_records, write_jsonl


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("tune-data") / "train.jsonl", instruction_records(80, seed=3))


def _expand(plan, tmp_path: Path):
    spec = study_file(plan, name="t", metric="eval_loss", goal="min")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return load_study(path)


# ----------------------------------------------------------------------------- the space


def test_space_searches_the_effective_learning_rate_at_a_fixed_scale(tiny_model_dir, user_data, tmp_path):
    plan = plan_tune(model=str(tiny_model_dir("llama_wide")), data=str(user_data), metric="eval_loss", fixed={},
                     batch_size=8)
    keys = [d.key for d in plan.dims]
    assert keys == ["train.lr", "lora.r", "lora.targets", "train.epochs"]
    study = _expand(plan, tmp_path)
    assert len(study.runs) == plan.candidates == 4 * 3 * 2 * 2
    effective = set()
    for run in study.runs:
        lora, train = run.config["lora"], run.config["train"]
        assert lora["alpha"] / lora["r"] == pytest.approx(SCALE)  # alpha tied to 2r: one scale for every rank
        effective.add(round(train["lr"] * lora["alpha"] / lora["r"], 12))
        assert train["max_steps"] == plan.steps_per_epoch * train["epochs"]
    assert sorted(effective) == sorted(EFFECTIVE_LRS)
    # alpha x k with lr / k is the same point: no two candidates differ only that way
    points = {(r.config["lora"]["r"], r.config["train"]["lr"] * r.config["lora"]["alpha"],
               str(r.config["lora"]["targets"]), r.config["train"]["epochs"]) for r in study.runs}
    assert len(points) == len(study.runs)


def test_fixed_search_and_widen_shape_the_space(tiny_model_dir, user_data, tmp_path):
    model = str(tiny_model_dir("llama"))
    plan = plan_tune(model=model, data=str(user_data), metric="eval_loss", fixed={"lora.targets": ["all"]},
                     search=["train.lr", "lora.r"], widen={"lora.r": [4, 16]}, batch_size=8)
    assert [(d.key, d.values) for d in plan.dims] == [("train.lr", [lr / SCALE for lr in EFFECTIVE_LRS]),
                                                      ("lora.r", [4, 16])]
    study = _expand(plan, tmp_path)
    assert {tuple(r.config["lora"]["targets"]) for r in study.runs} == {("all",)}
    assert {r.config["train"]["epochs"] for r in study.runs} == {1}  # not searched: the default
    with pytest.raises(ConfigError, match="lora.dropout.*not a tuned dimension"):
        plan_tune(model=model, data=str(user_data), metric="eval_loss", fixed={}, search=["lora.dropout"])
    with pytest.raises(ConfigError, match="also given to --fixed"):
        plan_tune(model=model, data=str(user_data), metric="eval_loss", fixed={"lora.r": 8}, widen={"lora.r": [4]})
    with pytest.raises(ConfigError) as bad:  # a bad --fixed is named by its flag
        plan_tune(model=model, data=str(user_data), metric="eval_loss", fixed={"lora.rank": 4})
    assert str(bad.value).startswith("--fixed lora.rank=4: unknown key lora.rank (did you mean lora.r?)")


def test_epochs_capped_by_data_size():
    assert [d.values for d in default_dimensions(500) if d.key == "train.epochs"] == [[1, 2]]
    assert [d.values for d in default_dimensions(50_000) if d.key == "train.epochs"] == [[1]]


def test_budget_steps_shrinks_the_space_or_refuses(tiny_model_dir, user_data):
    model = str(tiny_model_dir("llama_wide"))
    full = plan_tune(model=model, data=str(user_data), metric="eval_loss", fixed={}, batch_size=8)
    cut = plan_tune(model=model, data=str(user_data), metric="eval_loss", fixed={}, batch_size=8,
                    budget_steps=full.planned_steps // 3)
    assert cut.planned_steps <= full.planned_steps // 3 < full.planned_steps
    assert cut.candidates < full.candidates
    assert any("second epoch" in n for n in cut.notes)
    assert all(len(d.values) >= 2 for d in cut.dims if d.key != "train.epochs")  # still a search of every key
    with pytest.raises(ConfigError, match="--budget-steps 5 is too small for a search"):
        plan_tune(model=model, data=str(user_data), metric="eval_loss", fixed={}, batch_size=8, budget_steps=5)


def test_halving_leaves_enough_finalists():
    for n in (1, 2, 4, 9, 16, 48, 200):
        min_steps, rungs = halving_schedule(n, 90)
        alive = n
        for _ in rungs:
            alive = max(1, math.ceil(alive / 3))
        assert alive >= min(3, n)
        assert not rungs or rungs[0] == min_steps


# ----------------------------------------------------------------------------- the answer


def _cand(name, values, params):
    return Candidate(name=name, axes={"lora.r": params}, config={"train": {}}, values=values,
                     trainable_params=params, peak_memory_bytes=1, train_time_s=1.0, run_dir=None)


def test_within_noise_recommends_the_cheapest_and_says_so():
    cands = [_cand("big", [1.00, 1.10, 0.95], 1000), _cand("small", [1.02, 1.12, 0.97], 100),
             _cand("bad", [2.0, 2.1, 1.9], 50)]
    rec = recommend(cands, "min")
    assert rec["best_mean"] == "big" and rec["name"] == "small"
    assert rec["within_noise"] == ["small"]
    assert "within noise" in rec["why"] and "cheaper" in rec["why"]
    text = summary_text({"tune": "t", "metric": "eval_loss", "recommended": rec, "effects": [],
                         "compute": {"steps": 10, "train_time_s": 1.0, "grid_steps": 40, "fraction_of_grid": 0.25},
                         "plan": {"notes": []}})
    assert "Within noise of it" not in text  # the list held the recommended run itself
    assert "bad: +" in text and "beyond the noise" in text
    cands.insert(1, _cand("mid", [1.01, 1.11, 0.96], 500))
    rec = recommend(cands, "min")
    text = summary_text({"tune": "t", "metric": "eval_loss", "recommended": rec, "effects": [],
                         "compute": {"steps": 10, "train_time_s": 1.0, "grid_steps": 40, "fraction_of_grid": 0.25},
                         "plan": {"notes": []}})
    assert rec["name"] == "small" and "Also within noise of the best mean (big): mid." in text


def test_separated_finalists_recommend_the_best():
    cands = [_cand("a", [1.00, 1.01, 0.99], 1000), _cand("b", [1.50, 1.51, 1.49], 10)]
    rec = recommend(cands, "min")
    assert rec["name"] == "a" and rec["within_noise"] == []
    # pooled over both finalists: SD 0.01 with 4 degrees of freedom (t = 2.776445, from study.stats)
    assert rec["seed_sd"] == pytest.approx(0.01) and rec["seed_df"] == 4
    assert rec["ci_half_width"] == pytest.approx(2.776445 * 0.01 / math.sqrt(3), rel=1e-6)


def test_a_recommendation_at_the_end_of_a_range_says_how_to_widen_it():
    dims = default_dimensions(1000)  # lr 3e-5 .. 1e-3, r 8 / 32 / 128, targets, epochs 1 / 2
    lrs = [lr / SCALE for lr in EFFECTIVE_LRS]
    inside = edge_notes(dims, {"train.lr": lrs[1], "lora.r": 32, "lora.targets": ["all"], "train.epochs": 2})
    assert inside == []  # targets are not ordered; epochs are capped by the data, not the range
    top, bottom = edge_notes(dims, {"train.lr": lrs[-1], "lora.r": 8})
    assert top.startswith(f"train.lr = {lrs[-1]:g} is the largest value tried")
    assert top.endswith("--widen train.lr=3e-05,0.0001,0.0003,0.001,0.0033")  # one more step of x3.33
    assert "lora.r = 8 is the smallest" in bottom and bottom.endswith("--widen lora.r=2,8,32,128")
    # ranks capped by the model's smallest adapted matrix (64: tune dropped 128): widen to 64, not past it
    ranks = next(d for d in dims if d.key == "lora.r")
    ranks.values, ranks.ceiling = [8, 32], 64
    (capped,) = edge_notes([ranks], {"lora.r": 32})
    assert capped.endswith("--widen lora.r=8,32,64")
    ranks.values, ranks.ceiling = [8, 32], 32
    assert edge_notes([ranks], {"lora.r": 32}) == []  # 32 is the most a rank can mean there
    text = summary_text({"tune": "t", "metric": "eval_loss", "effects": [], "plan": {"notes": []}, "edges": [top],
                         "recommended": recommend([_cand("a", [1.0, 1.1], 10)], "min"),
                         "compute": {"steps": 1, "train_time_s": 1.0, "grid_steps": 4, "fraction_of_grid": 0.25}})
    assert f"Note: {top}" in text


def test_finalists_short_of_their_seeds_are_named_and_not_called_beyond_noise():
    # what a tune stopped in its repeats left before they were continued: one finalist with its 3
    # seeds, two with seed 1 only (eval losses of /tmp/trialA's t_int tune, rounded)
    cands = [_cand("a", [7.08, 7.095, 7.066], 1000), _cand("b", [7.09], 100), _cand("c", [7.10], 10)]
    rec = recommend(cands, "min")
    assert rec["name"] == "a" and rec["n"] == 3 and rec["comparisons"] == []
    assert rec["finalist_seeds"] == {"a": 3, "b": 1, "c": 1}
    assert rec["why"] == ("the best mean over its seeds; no other finalist has repeats to compare it with "
                          "(finalists short of their 3 seeds: b 1, c 1)")
    text = summary_text({"tune": "t", "metric": "eval_loss", "recommended": rec, "effects": [],
                         "compute": {"steps": 10, "train_time_s": 1.0, "grid_steps": 40, "fraction_of_grid": 0.25},
                         "plan": {"notes": []}})
    assert "no runner-up is within noise" not in text
    assert ("Seeds per finalist (of 3): a 3, b 1, c 1; a finalist with one seed is not compared (loralab study "
            "status shows how each repeat ended") in text


def test_best_yaml_names_local_paths_absolutely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "data.jsonl").write_text("{}\n")
    config = {"model": {"path": "models/m"}, "data": {"path": "data.jsonl"}, "lora": {"r": 8}}
    assert with_absolute_paths(config)["model"]["path"] == str(tmp_path / "models" / "m")
    assert config["data"]["path"] == str(tmp_path / "data.jsonl") and config["lora"] == {"r": 8}
    hub = {"model": {"path": "builtin:tiny"}, "data": {"path": "missing.jsonl"}}
    assert with_absolute_paths(hub) == {"model": {"path": "builtin:tiny"}, "data": {"path": "missing.jsonl"}}


def _tune_db(tmp_path: Path) -> Path:
    """A finished tune's database, written through the Store as the study driver writes it: four
    candidates (lora.r 4 / 8 x train.lr 1e-3 / 1e-2, seed 1) scored at the rung (step 2), three
    trained on to step 4 and repeated with seeds 2 and 3 (offsets 0, +0.02, -0.02: seed SD 0.02)."""
    rung = {(4, 1e-3): 2.0, (4, 1e-2): 1.8, (8, 1e-3): 1.9, (8, 1e-2): 2.3}
    final = {(4, 1e-3): 1.50, (4, 1e-2): 1.40, (8, 1e-3): 1.45}  # (8, 1e-2) stopped at the rung
    offset = {1: 0.0, 2: 0.02, 3: -0.02}
    runs = [RunSpec(f"r{r}-lr{lr:g}" + (f"-s{s}" if s > 1 else ""),
                    {"lora.r": r, "train.lr": lr, **({"train.seed": s} if s > 1 else {})},
                    {"lora": {"r": r, "alpha": 2.0 * r}, "train": {"lr": lr, "seed": s, "max_steps": 4}})
            for s in (1, 2, 3) for r, lr in rung if s == 1 or (r, lr) in final]
    spec = {"name": "tune", "metric": "eval_loss", "goal": "min",
            "axes": {"lora.r": [4, 8], "train.lr": [1e-3, 1e-2]}, "tied": {"lora.alpha": "2.0 * lora.r"}}
    db = tmp_path / "study.db"
    with Store(db) as store:
        sid, _ = store.open_study("tune", spec, tmp_path, runs)
        for row, run in zip(store.runs(sid), runs, strict=True):
            key, seed = (run.axes["lora.r"], run.axes["train.lr"]), run.config["train"]["seed"]
            at_rung = [(2, "eval_loss", rung[key] + offset[seed])]
            if key not in final:
                store.finish(row["id"], status=Status.STOPPED_EARLY, metrics=at_rung, stopped_at_step=2)
                continue
            value = final[key] + offset[seed]
            store.finish(row["id"], status=Status.COMPLETED, metrics=[*at_rung, (4, "eval_loss", value)],
                         summary={"final_eval_loss": value, "train_time_s": 1.5, "trainable_params": 100 * key[0],
                                  "peak_memory_bytes": 1000 * key[0]})
    return db


def test_the_answer_is_read_from_the_study_database_with_t_intervals(tmp_path):
    db = _tune_db(tmp_path)
    cands, spent = read_candidates(db, "tune", "eval_loss", "min")
    assert [c.name for c in cands] == ["r4-lr0.01", "r8-lr0.001", "r4-lr0.001"]  # by the seed-1 value
    assert cands[0].axes == {"lora.r": 4, "train.lr": 0.01}  # the searched keys, no seed, no tied alpha
    assert cands[0].values == pytest.approx([1.40, 1.42, 1.38]) and cands[0].train_time_s == pytest.approx(4.5)
    assert spent == {"steps": 9 * 4 + 2, "train_time_s": pytest.approx(9 * 1.5),
                     "counts": {"completed": 9, "stopped_early": 1}}

    rec = recommend(cands, "min")
    assert rec["name"] == "r4-lr0.01" and rec["seed_sd"] == pytest.approx(0.02) and rec["seed_df"] == 6
    t6 = 2.446912  # t quantile 0.975 at 6 degrees of freedom (study.stats)
    assert rec["ci_half_width"] == pytest.approx(t6 * 0.02 / math.sqrt(3), rel=1e-6)

    # what mattered, at the rung where every candidate has a value (the repeats left out):
    # lora.r 4 averages (2.0 + 1.8) / 2 = 1.9, r 8 (1.9 + 2.3) / 2 = 2.1; train.lr 1e-3 1.95, 1e-2 2.05
    found = {e["key"]: e for e in effects(db, "tune", "eval_loss", ["lora.r", "train.lr"], rec["seed_sd"], 6)}
    assert found["lora.r"]["step"] == 2 and found["lora.r"]["effect"] == pytest.approx(0.2)
    assert found["train.lr"]["effect"] == pytest.approx(0.1)
    half = found["lora.r"]["ci_half_width"]
    assert half == pytest.approx(t6 * 0.02 * math.sqrt(1 / 2 + 1 / 2), rel=1e-6)  # 0.0489
    # tune used z = 1.96 here before it took its intervals from study.stats: 0.0392, 24.8% narrower
    assert half / (1.96 * 0.02) == pytest.approx(1.248, abs=1e-3)
    assert not found["lora.r"]["within_noise"] and not found["train.lr"]["within_noise"]


# ----------------------------------------------------------------------------- end to end


def _tune_cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loralab.cli", "tune", "--model", str(model), "--data", str(data), "--out", str(out),
            "--name", "tune", "--batch-size", "8", "--search", "train.lr,lora.r", "--widen", "lora.r=4,8",
            "--widen", "train.lr=1e-3,1e-2", "--fixed", "lora.dropout=0",
            "--fixed", "data.limit=40", "--fixed", "data.val_fraction=0.15",
            "--workers", "2", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _sql_recommendation(db: Path) -> tuple[str, dict[str, list[float]]]:
    """The best mean over seeds among completed configurations, recomputed with SQL."""
    con = sqlite3.connect(db)
    rows = con.execute("""
        SELECT r.name, r.axes_json, (SELECT m.value FROM metrics m WHERE m.run_id = r.id AND m.name = 'eval_loss'
                                     ORDER BY m.step DESC LIMIT 1)
        FROM runs r WHERE r.status = 'completed'""").fetchall()
    con.close()
    groups: dict[str, list[float]] = {}
    names: dict[str, str] = {}
    for name, axes_json, value in rows:
        axes = {k: v for k, v in json.loads(axes_json).items() if k != "train.seed"}
        key = json.dumps(axes, sort_keys=True)
        groups.setdefault(key, []).append(value)
        names.setdefault(key, name)
    repeated = {k: v for k, v in groups.items() if len(v) > 1}
    best = min(repeated, key=lambda k: statistics.fmean(repeated[k]))
    return names[best], {names[k]: v for k, v in repeated.items()}


@pytest.mark.slow
def test_tune_killed_and_restarted_finishes_with_no_run_repeated_or_lost(tiny_model_dir, user_data, tmp_path):
    model = tiny_model_dir("llama")
    cmd = _tune_cmd(model, user_data, tmp_path / "runs", "--json")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), start_new_session=True)
    db = tmp_path / "runs" / "tune" / "study.db"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill the driver and its runs once a run has finished
        if db.exists():
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                done = con.execute("SELECT COUNT(*) FROM runs WHERE status IN ('completed', 'paused')").fetchone()[0]
                con.close()
            except sqlite3.Error:
                done = 0
            if done:
                break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "tune").glob("*/summary.json")
                if json.loads(p.read_text())["status"] == "completed"}

    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout)

    con = sqlite3.connect(db)
    rows = con.execute("SELECT name, status, axes_json FROM runs").fetchall()
    con.close()
    candidates = [r for r in rows if "train.seed" not in json.loads(r[2])]
    repeats = [r for r in rows if "train.seed" in json.loads(r[2])]
    assert len(candidates) == 4  # 2 lr x 2 r, each recorded once
    assert {s for _, s, _ in rows} <= {"completed", "stopped_early"}
    assert len(repeats) == 3 * len(EXTRA_SEEDS) and all(s == "completed" for _, s, _ in repeats)
    for name, mtime in finished.items():  # a run finished before the kill was not trained again
        assert (tmp_path / "runs" / "tune" / name / "summary.json").stat().st_mtime_ns == mtime
    for name, _status, _ in rows:  # every logged step once, even for runs that were killed and resumed
        steps = [json.loads(line)["step"] for line in
                 (tmp_path / "runs" / "tune" / name / "metrics.jsonl").read_text().splitlines()
                 if "train_loss" in line]
        assert len(steps) == len(set(steps)), name

    # the recommendation is what the database supports
    best, groups = _sql_recommendation(db)
    rec = answer["recommended"]
    assert rec["best_mean"] == best
    assert rec["mean"] == pytest.approx(statistics.fmean(groups[rec["name"]]), rel=1e-9)
    assert rec["name"] == best or rec["name"] in rec["within_noise"]
    best_yaml = yaml.safe_load((tmp_path / "runs" / "tune" / "best.yaml").read_text())
    assert best_yaml["train"]["lr"] == rec["axes"]["train.lr"] and best_yaml["lora"]["r"] == rec["axes"]["lora.r"]
    assert (Path(answer["adapter"]) / "adapter_model.safetensors").exists()
    assert answer["compute"]["steps"] < answer["compute"]["grid_steps"]
    assert "Recommended:" in (tmp_path / "runs" / "tune" / "tune.md").read_text()


@pytest.mark.slow
def test_a_tune_stopped_in_its_repeats_finishes_them_when_run_again(tiny_model_dir, user_data, tmp_path,
                                                                   monkeypatch):
    """Phase one's halving once picked up the repeats a stop had left pending or interrupted and cut
    them at its first rung, while the answer still said "no runner-up is within noise"."""
    import loralab.study.execute as execute
    import loralab.tune as tune

    # 4 candidates halved at step 2 (of 5), 2 finalists with one more seed each: the least that halves
    monkeypatch.setattr(tune, "FINALISTS", 2)
    monkeypatch.setattr(tune, "EXTRA_SEEDS", [2])
    monkeypatch.chdir(tmp_path)  # paths relative to here, as a user types them
    model, data = os.path.relpath(tiny_model_dir("llama"), tmp_path), os.path.relpath(user_data, tmp_path)
    kw = dict(model=model, data=data, out="runs", name="tune", search=["train.lr", "lora.r"],
              widen={"lora.r": [4, 8], "train.lr": [1e-3, 1e-2]}, batch_size=8, workers=2,
              fixed={"lora.dropout": 0, "data.limit": 40, "data.val_fraction": 0.15})
    real = execute.run_study

    def stopped_in_phase_two(study, **opts):  # the repeats are recorded, and none starts
        return real(study, **{**opts, "budget_s": 0.0} if "halving" not in opts else opts)

    monkeypatch.setattr(execute, "run_study", stopped_in_phase_two)
    first = tune.run_tune(**kw)
    assert first["recommended"]["why"].startswith("no finalist has repeats yet")
    db = tmp_path / "runs" / "tune" / "study.db"
    con = sqlite3.connect(db)  # one repeat was running when Ctrl-C came: the driver marks it interrupted
    con.execute("UPDATE runs SET status = 'interrupted' WHERE name = 'lr0.01-r8-s2'")
    con.commit()
    assert con.execute("SELECT name, status FROM runs WHERE name LIKE '%-s2' ORDER BY name").fetchall() == [
        ("lr0.01-r4-s2", "pending"), ("lr0.01-r8-s2", "interrupted")]
    con.close()

    monkeypatch.setattr(execute, "run_study", real)
    answer = tune.run_tune(**kw)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT name, status, stopped_at_step FROM runs WHERE name LIKE '%-s2' ORDER BY name")
    assert rows.fetchall() == [("lr0.01-r4-s2", "completed", None), ("lr0.01-r8-s2", "completed", None)]
    con.close()
    rec = answer["recommended"]
    assert rec["finalist_seeds"] == {"lr0.01-r8": 2, "lr0.01-r4": 2} and rec["n"] == 2
    assert [(c["name"], c["n"]) for c in rec["comparisons"]] == [(c, 2) for c in rec["finalist_seeds"]
                                                                  if c != rec["name"]]
    # best.yaml trains from any directory: the paths the tune was given are made absolute
    best = yaml.safe_load((tmp_path / "runs" / "tune" / "best.yaml").read_text())
    assert best["model"]["path"] == str(tiny_model_dir("llama")) and best["data"]["path"] == str(user_data)


@pytest.mark.slow
def test_tune_on_a_model_with_one_qkv_matrix_adapts_it_whole(tiny_model_dir, user_data, tmp_path):
    """GPT-2 holds query, key and value in one matrix (c_attn), so the LoRA paper's q,v cannot be
    asked for there: tune's attention candidate was invalid on every such model and its plan
    refused the model outright. It now adapts the matrix whole, says so, and trains it."""
    model = tiny_model_dir("gpt2")
    user_data = Path(shutil.copy(user_data, tmp_path / "train.jsonl"))  # edited below
    plan = plan_tune(model=str(model), data=str(user_data), metric="eval_loss", fixed={}, batch_size=8)
    (targets,) = [d.values for d in plan.dims if d.key == "lora.targets"]
    assert targets == [["query", "key", "value"], ["all"]]
    assert ("GPT-2 (attn.c_attn) holds query, key and value in one matrix: LoRA on attention adapts it whole "
            "(lora.targets [query, key, value]), as query and value alone cannot be asked for") in plan.notes
    cmd = [*_tune_cmd(model, user_data, tmp_path / "runs", "--json")]
    cmd[cmd.index("train.lr,lora.r")] = "lora.targets"
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout)
    con = sqlite3.connect(tmp_path / "runs" / "tune" / "study.db")
    rows = con.execute("SELECT name, status, config_json FROM runs").fetchall()
    con.close()
    assert rows and {s for _, s, _ in rows} == {"completed"}, rows
    assert {tuple(json.loads(c)["lora"]["targets"]) for _, _, c in rows} == {("query", "key", "value"), ("all",)}
    # the adapter of the q,k,v candidate is on the fused matrix of every layer, as PEFT saved it
    qkv = next(n for n, _, c in rows if json.loads(c)["lora"]["targets"] == ["query", "key", "value"])
    adapter = json.loads((tmp_path / "runs" / "tune" / qkv / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["attn.c_attn"]
    best = yaml.safe_load((tmp_path / "runs" / "tune" / "best.yaml").read_text())["lora"]["targets"]
    assert best == answer["recommended"]["axes"]["lora.targets"] and best in (["query", "key", "value"], ["all"])
    # run again after the data changed: its candidates trained on the old data, so it is refused, not mixed
    records = instruction_records(80, seed=3)
    records[0]["instruction"] = "Briefly: " + records[0]["instruction"]
    write_jsonl(user_data, records)
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "study 'tune': runs " in again.stderr
    assert " trained on other examples than the data gives now" in again.stderr
    assert "start afresh with `loralab tune ... --name NEW_NAME`" in again.stderr


def test_budget_no_run_starts_after_it(tiny_model_dir, user_data, tmp_path):
    t0 = time.time()
    # 3 s: above the plan's lower bound on the search's time, from the matmul speed of the moment
    # (about 0.3 s on a quiet Xeon, twice that on an AMD EPYC with AVX2 alone; with 2 s such a tune
    # once left no study database while another test worker ran), and below what the first two
    # units take, each a process start and its imports (1.5-3 s; with 5 s, on an AMD EPYC with
    # AVX512 the three units of this tune all started within the budget)
    out = subprocess.run(_tune_cmd(tiny_model_dir("llama"), user_data, tmp_path / "runs", "--budget", "3s",
                                   "--workers", "1"),
                         capture_output=True, text=True, env=_env(), timeout=600)
    db = tmp_path / "runs" / "tune" / "study.db"
    assert db.exists(), out.stderr[-2000:]
    con = sqlite3.connect(db)
    started = [r[0] for r in con.execute("SELECT started_at FROM runs WHERE started_at IS NOT NULL")]
    pending = con.execute("SELECT COUNT(*) FROM runs WHERE status = 'pending'").fetchone()[0]
    con.close()
    assert pending > 0, out.stderr[-2000:]  # the budget stopped the tune before every candidate ran
    assert started, out.stderr[-2000:]  # ... and after it had started some
    # the driver starts ~5 s after t0 (imports, tokenizer, data); nothing starts once the budget is spent
    assert all(s <= t0 + 60 for s in started)
    assert max(started, default=t0) - min(started, default=t0) <= 3  # the first start is after the budget's
