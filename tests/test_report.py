"""Findings and the study report: statistics on synthetic rows in a real SQLite schema, and a
report rendered from a small real study (tiny trainings) whose numbers are checked against the
database."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import sqlite3
import sys
from pathlib import Path

import pytest

import loralab.study
from loralab.errors import LoralabError
from loralab.study import stats
from loralab.study.findings import NO_REPEATS, findings
from loralab.study.report import write_report
from studytools import sql

SCHEMA = Path(loralab.study.__file__).with_name("schema.sql")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042, 100: 1.984}


# ---------------------------------------------------------------- building databases

def create_db(path: Path, spec: dict) -> sqlite3.Connection:
    con = sqlite3.connect(path)
    con.executescript(SCHEMA.read_text(encoding="utf-8"))
    con.execute("INSERT INTO studies (name, spec_json, root, created_at) VALUES (?, ?, ?, 0)",
                (spec["name"], json.dumps(spec), str(path.parent)))
    return con


def insert_run(con, name: str, axes: dict, *, status="completed", value=None, time_s=10.0, memory=1000,
               params=100, stopped_at_step=None, error=None, series=(), config=None) -> int:
    cur = con.execute(
        "INSERT INTO runs (study_id, name, axes_json, config_json, status, final_eval_loss, train_time_s, "
        "peak_memory_bytes, trainable_params, stopped_at_step, error) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (name, json.dumps(axes), json.dumps(config or {}), status, value, time_s, memory, params, stopped_at_step,
         error))
    con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)", [(cur.lastrowid, s, n, v) for s, n, v in series])
    return cur.lastrowid


def synthetic_db(tmp_path: Path, spec: dict, rows: list[dict]) -> Path:
    """rows: {"name", "axes", ...insert_run keywords}; spec gets a name and metric if missing."""
    spec = {"name": "s", "metric": "eval_loss", "goal": "min", **spec}
    db = tmp_path / "study.db"
    con = create_db(db, spec)
    for r in rows:
        r = dict(r)
        insert_run(con, r.pop("name"), r.pop("axes"), **r)
    con.commit()
    con.close()
    return db


def one(found: list[dict], kind: str) -> dict:
    hits = [f for f in found if f["kind"] == kind]
    assert len(hits) == 1, [f["kind"] for f in found]
    return hits[0]


# Fixed "seed noise" offsets, so every expected number below is computed, not guessed.
NOISE = [0.012, -0.007, -0.005]


def two_level_rows(effect: float, seeds=(1, 2, 3)) -> list[dict]:
    """lora.alpha 8 vs 64 at r=8, three seeds; alpha=64 is lower (better) by ``effect``."""
    rows = []
    for a, base in ((8, 2.0), (64, 2.0 - effect)):
        for s, n in zip(seeds, NOISE, strict=False):
            rows.append({"name": f"a{a}-s{s}", "axes": {"lora.alpha": a, "train.seed": s}, "value": base + n})
    return rows


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_table(df):
    assert stats.t_quantile(0.975, df) == pytest.approx(T975[df], abs=6e-4)


def test_t_quantile_against_scipy_when_installed():
    sp = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 12, 61, 199, 200, 201, 350, 10_000):
        for p in (0.9, 0.975, 0.995):
            assert stats.t_quantile(p, df) == pytest.approx(sp.t.ppf(p, df), rel=1e-8)


def test_pooled_sd_mean_interval_spearman_and_pareto():
    groups = [[1.0, 2.0, 3.0], [10.0, 12.0], [7.0]]
    sd, df = stats.pooled_sd(groups)
    assert df == 3  # (3 - 1) + (2 - 1); a single run adds nothing
    assert sd == pytest.approx(math.sqrt((2.0 + 2.0) / 3))
    assert stats.pooled_sd([[1.0], [2.0]]) == (None, 0)
    m, lo, hi = stats.mean_interval([1.0, 2.0, 3.0])
    assert (m, hi - m) == pytest.approx((2.0, T975[2] * 1.0 / math.sqrt(3)), abs=1e-3)
    assert stats.spearman([1, 2, 3, 4], [10, 20, 15, 40]) == pytest.approx(0.8)
    assert stats.spearman([1, 2, 3], [5, 5, 5]) == 0.0
    # cost, quality (min): (1, 3) and (2, 1) are optimal, (3, 2) is dominated by (2, 1)
    assert stats.pareto_front([1, 2, 3], [3.0, 1.0, 2.0], "min") == [True, True, False]
    assert stats.pareto_front([1, 2, 3], [3.0, 1.0, 2.0], "max") == [True, False, False]


# ---------------------------------------------------------------- findings on synthetic rows

def test_axis_effect_names_a_winner_only_beyond_the_noise(tmp_path):
    spec = {"axes": {"lora.alpha": [8, 64]}, "findings": [{"kind": "axis_effect", "axis": "lora.alpha"}]}
    small = tmp_path / "small"
    small.mkdir()
    f = one(findings(synthetic_db(small, spec, two_level_rows(0.002)), "s"), "axis_effect")
    sd, df = stats.pooled_sd([[2.0 + n for n in NOISE], [1.998 + n for n in NOISE]])
    half = stats.t_quantile(0.975, df) * sd * math.sqrt(1 / 3 + 1 / 3)
    assert f["comparison"]["difference"] == pytest.approx(-0.002)
    assert f["comparison"]["half_width"] == pytest.approx(half)
    assert f["comparison"]["beyond_noise"] is False and f["winner"] is None
    assert "within the seed noise" in f["text"] and "no level is clearly best" in f["text"]

    large = tmp_path / "large"
    large.mkdir()
    f = one(findings(synthetic_db(large, spec, two_level_rows(0.2)), "s"), "axis_effect")
    assert f["comparison"]["difference"] == pytest.approx(-0.2)
    assert f["comparison"]["beyond_noise"] is True and f["winner"] == 64
    assert "lora.alpha=64 was best" in f["text"] and "beyond the seed noise" in f["text"]
    # the per-level interval uses the pooled seed noise: mean +/- t(df) * sd / sqrt(n)
    lvl = {row["value"]: row for row in f["levels"]}
    assert lvl[64]["mean"] == pytest.approx(1.8 + sum(NOISE) / 3)
    assert lvl[64]["high"] - lvl[64]["mean"] == pytest.approx(stats.t_quantile(0.975, df) * sd / math.sqrt(3))


def test_without_repeats_no_winner_is_named_even_for_a_large_effect(tmp_path):
    spec = {"axes": {"lora.alpha": [8, 64]}}  # no findings listed: the defaults run
    found = findings(synthetic_db(tmp_path, spec, two_level_rows(0.5, seeds=(1,))), "s")
    f = one(found, "axis_effect")
    assert f["winner"] is None and f["comparison"]["half_width"] is None
    assert NO_REPEATS in f["text"] and "no level is named best" in f["text"]
    assert NO_REPEATS in one(found, "spread")["text"]
    assert NO_REPEATS in one(found, "pareto")["text"]


def grid_rows(values: dict[tuple[int, float], float]) -> list[dict]:
    rows = []
    for (r, a), v in values.items():
        for s, n in zip((1, 2), NOISE, strict=False):
            rows.append({"name": f"r{r}-a{a}-s{s}", "axes": {"lora.r": r, "lora.alpha": a, "train.seed": s},
                         "value": v + n, "params": 100 * r, "time_s": 5.0 + r})
    return rows


def test_trend_within_counts_ranks_where_higher_alpha_was_better(tmp_path):
    # r=2, 8, 32: loss falls as alpha grows; r=128: it rises (the count must say 3/4)
    values = {}
    for r in (2, 8, 32, 128):
        for i, a in enumerate((0.5, 8, 512)):
            values[(r, a)] = 2.0 + (0.1 * i if r == 128 else -0.1 * i)
    spec = {"axes": {"lora.r": [2, 8, 32, 128], "lora.alpha": [0.5, 8, 512]},
            "findings": [{"kind": "trend_within", "axis": "lora.alpha", "within": "lora.r"}]}
    db = synthetic_db(tmp_path, spec, grid_rows(values))
    f = one(findings(db, "s"), "trend_within")

    # the same count straight from SQL: per rank, is the alpha=512 mean below the alpha=0.5 mean,
    # and are the three means in decreasing order?
    con = sqlite3.connect(db)
    means = dict(((r, a), m) for r, a, m in con.execute(
        "SELECT json_extract(axes_json, '$.\"lora.r\"'), json_extract(axes_json, '$.\"lora.alpha\"'), "
        "AVG(final_eval_loss) FROM runs WHERE status = 'completed' GROUP BY 1, 2"))
    con.close()
    direct = sum(means[(r, 512)] < means[(r, 8)] < means[(r, 0.5)] for r in (2, 8, 32, 128))
    assert (f["k_higher_better"], f["n"]) == (direct, 4) == (3, 4)
    assert f["k_lower_better"] == 1 and f["k_best_at_highest"] == 3
    assert f["k_beyond_noise"] == 3  # 0.2 apart with a seed SD of ~0.013
    assert "higher lora.alpha was better at 3/4 lora.r values, lower at 1/4" in f["text"]

    # every rank improving: "at every lora.r (4/4)"
    values = {(r, a): 2.0 - 0.1 * i for r in (2, 8, 32, 128) for i, a in enumerate((0.5, 8, 512))}
    db.unlink()
    f = one(findings(synthetic_db(tmp_path, spec, grid_rows(values)), "s"), "trend_within")
    assert "higher lora.alpha was better at every lora.r (4/4)" in f["text"]


def test_equivalence_with_a_tied_learning_rate(tmp_path):
    """alpha x k with lr / k: train.lr moves with lora.alpha, so it is not an "other axis"."""
    def rows(gap: float) -> list[dict]:
        # as the study driver stores them: axes_json holds the axes, the tied lr is in the config
        out = []
        for a, v in ((1, 2.0), (512, 2.0 + gap)):
            for s, n in zip((1, 2, 3), NOISE, strict=True):
                out.append({"name": f"a{a}-s{s}", "axes": {"lora.alpha": a, "train.seed": s}, "value": v + n,
                            "config": {"lora": {"alpha": a}, "train": {"lr": 0.00512 / a, "seed": s}}})
        return out

    spec = {"axes": {"lora.alpha": [1, 512]}, "tied": {"train.lr": "0.00512 / lora.alpha"},
            "findings": [{"kind": "equivalence", "axis": "lora.alpha", "reference": 1}]}
    f = one(findings(synthetic_db(tmp_path, spec, rows(0.003)), "s"), "equivalence")
    (lvl,) = f["levels"]
    assert lvl["verdict"] == "matched" and lvl["comparison"]["difference"] == pytest.approx(0.003)
    assert ("lora.alpha=512, train.lr=1e-05 matched lora.alpha=1, train.lr=0.00512 within the seed-to-seed "
            "spread") in f["text"]

    (tmp_path / "study.db").unlink()
    spec["findings"][0]["reference"] = "1"  # a level named as text in the study file is found too
    f = one(findings(synthetic_db(tmp_path, spec, rows(0.3)), "s"), "equivalence")
    assert f["levels"][0]["verdict"] == "differs" and "differed from lora.alpha=1" in f["text"]


def test_cost_in_percent_with_the_metric_difference(tmp_path):
    rows = []
    for mode, mem, t, v in (("none", 100e6, 100.0, 1.50), ("nf4", 62e6, 131.0, 1.51)):
        for s, n in zip((1, 2, 3), NOISE, strict=True):
            rows.append({"name": f"{mode}-s{s}", "axes": {"quant.mode": mode, "train.seed": s},
                         "value": v + n, "memory": int(mem), "time_s": t + 100 * n})  # time varies by seed too
    spec = {"axes": {"quant.mode": ["none", "nf4"]},
            "findings": [{"kind": "cost", "axis": "quant.mode", "baseline": "none"}]}
    f = one(findings(synthetic_db(tmp_path, spec, rows), "s"), "cost")
    (lvl,) = f["levels"]
    assert lvl["memory"]["change_pct"] == pytest.approx(-38.0)
    assert lvl["memory"]["half_width_pct"] == pytest.approx(0.0)  # memory repeated exactly: no noise
    assert lvl["time"]["change_pct"] == pytest.approx(31.0)
    # time's own seed noise: the offsets 1.2, -0.7, -0.5 s at both levels
    sd_t = stats.sample_sd([100 * n for n in NOISE])
    half_t = stats.t_quantile(0.975, 4) * sd_t * math.sqrt(2 / 3)
    assert lvl["time"]["half_width_pct"] == pytest.approx(100 * half_t / (100 + 100 * sum(NOISE) / 3))
    assert lvl["comparison"]["difference"] == pytest.approx(0.01)
    assert (f"quant.mode=nf4 against quant.mode=none: saved 38% peak memory and cost 31% more time "
            f"(+/- {100 * half_t / 100:.0f}%)") in f["text"]
    assert "eval_loss differed by +0.01 +/- " in f["text"] and "within the seed noise" in f["text"]


def test_runs_that_did_not_complete_are_listed_and_not_counted(tmp_path):
    rows = two_level_rows(0.2)
    rows += [
        {"name": "a64-s4", "axes": {"lora.alpha": 64, "train.seed": 4}, "status": "failed",
         "error": "ModelError: boom\ntrace"},
        {"name": "a8-s4", "axes": {"lora.alpha": 8, "train.seed": 4}, "status": "stopped_early", "stopped_at_step": 20,
         "value": 0.1},
        {"name": "a8-s5", "axes": {"lora.alpha": 8, "train.seed": 5}, "status": "skipped",
         "error": "needs 9 GiB > --max-memory"},
        {"name": "a64-s5", "axes": {"lora.alpha": 64, "train.seed": 5}, "status": "completed"},  # no eval_loss
    ]
    spec = {"axes": {"lora.alpha": [8, 64]}, "findings": [{"kind": "axis_effect", "axis": "lora.alpha"}]}
    found = findings(synthetic_db(tmp_path, spec, rows), "s")
    ex = one(found, "excluded")
    assert ex["n"] == 4 and ex["n_total"] == 10
    assert "a64-s4 failed: ModelError: boom;" in ex["text"]
    assert "a8-s4 stopped early at step 20 (successive halving)" in ex["text"]
    assert "a8-s5 skipped: needs 9 GiB > --max-memory" in ex["text"]
    assert "a64-s5 completed but has no final eval_loss" in ex["text"]
    f = one(found, "axis_effect")
    assert [row["n"] for row in f["levels"]] == [3, 3]  # the stopped run's 0.1 is not in the mean
    assert f["levels"][0]["mean"] == pytest.approx(2.0 + sum(NOISE) / 3)
    assert "4 run(s) that did not complete are not counted" in f["text"]


def test_level_means_are_balanced_over_the_other_axis(tmp_path):
    """Missing runs must not tilt a level's mean: rank does nothing here, alpha 64 is 4.0 better;
    r=2 lost an alpha=1 seed and r=8 an alpha=64 seed (a plain average would favour r=2 by ~1.3)."""
    rows = []
    for r in (2, 8):
        for a, v in ((1, 6.4), (64, 2.4)):
            for s, n in zip((1, 2), (0.03, -0.03), strict=True):
                lost = (r, a, s) in {(2, 1, 2), (8, 64, 2)}
                rows.append({"name": f"r{r}-a{a}-s{s}", "axes": {"lora.r": r, "lora.alpha": a, "train.seed": s},
                             "value": v + n, "status": "failed" if lost else "completed"})
    spec = {"axes": {"lora.r": [2, 8], "lora.alpha": [1, 64]}, "findings": [{"kind": "axis_effect", "axis": "lora.r"}]}
    f = one(findings(synthetic_db(tmp_path, spec, rows), "s"), "axis_effect")
    r2, r8 = f["levels"]
    assert r2["mean"] == pytest.approx(((6.4 + 0.03) + 2.4) / 2)  # alpha=1 has one seed left, alpha=64 two
    assert r8["mean"] == pytest.approx((6.4 + (2.4 + 0.03)) / 2)
    assert r2["plain_mean"] == pytest.approx((6.43 + 2.43 + 2.37) / 3)
    assert f["comparison"]["difference"] == pytest.approx(0.0, abs=1e-12) and f["winner"] is None
    assert "Not every level" not in f["text"]

    # both seeds of r=8, alpha=64 gone: r=8 never ran with alpha=64, and the text says so
    (tmp_path / "study.db").unlink()
    for row in rows:
        if row["name"] == "r8-a64-s1":
            row["status"] = "failed"
    f = one(findings(synthetic_db(tmp_path, spec, rows), "s"), "axis_effect")
    assert "Not every level ran under the same other settings" in f["text"]
    # ranked on alpha=1, the one setting both ranks ran with: r=8 (6.40) before r=2 (6.43)
    assert f["best"] == 8 and f["comparison"]["cells"] == 1
    assert f["comparison"]["difference"] == pytest.approx(6.40 - 6.43)


def test_metric_other_than_eval_loss_uses_the_last_step_and_goal_max(tmp_path):
    rows = []
    for a, acc in ((8, 0.40), (64, 0.90)):
        for s, n in zip((1, 2, 3), NOISE, strict=True):
            series = [(10, "arith/exact_match", 0.0), (30, "arith/exact_match", acc + n),
                      (20, "arith/exact_match", 0.99)]
            rows.append({"name": f"a{a}-s{s}", "axes": {"lora.alpha": a, "train.seed": s}, "value": 5.0,
                         "series": series})
    spec = {"metric": "arith/exact_match", "goal": "max", "axes": {"lora.alpha": [8, 64]},
            "findings": [{"kind": "axis_effect", "axis": "lora.alpha"}]}
    f = one(findings(synthetic_db(tmp_path, spec, rows), "s"), "axis_effect")
    assert [row["mean"] for row in f["levels"]] == pytest.approx([0.40 + sum(NOISE) / 3, 0.90 + sum(NOISE) / 3])
    assert f["winner"] == 64 and "was best" in f["text"]


def test_bad_database_or_study_is_a_clear_error(tmp_path):
    missing = tmp_path / "nothing.db"
    with pytest.raises(LoralabError, match="no study database"):
        findings(missing, "s")
    assert not missing.exists()
    db = synthetic_db(tmp_path, {"axes": {}}, [])
    with pytest.raises(LoralabError, match="no study named 'other' .*studies here: s"):
        findings(db, "other")
    spec_findings = [{"kind": "nonsense"}, {"kind": "axis_effect", "axis": "lora.nope"}, {"kind": "cost", "axis": "x"}]
    (tmp_path / "study.db").unlink()
    db = synthetic_db(tmp_path, {"axes": {"lora.alpha": [8, 64]}, "findings": spec_findings}, two_level_rows(0.1))
    texts = [f["text"] for f in findings(db, "s")]
    assert "unknown findings kind 'nonsense'" in texts[0]
    assert "lora.nope does not vary in this study" in texts[1]
    assert "cost needs baseline" in texts[2]


def test_a_study_with_nothing_completed_still_gets_a_report(tmp_path):
    rows = [{"name": "r2-s1", "axes": {"lora.r": 2, "train.seed": 1}, "status": "failed", "error": "boom"},
            {"name": "r8-s1", "axes": {"lora.r": 8, "train.seed": 1}, "status": "pending"}]
    spec = {"axes": {"lora.r": [2, 8]}, "findings": [{"kind": "axis_effect", "axis": "lora.r"},
                                                      {"kind": "cost", "axis": "lora.r", "baseline": 2},
                                                      {"kind": "pareto"}]}
    db = synthetic_db(tmp_path, spec, rows)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pareto.png").write_bytes(b"from an earlier report")
    (out / "curves_eval_loss_by_lora.r.png").write_bytes(b"from an earlier report")
    (out / "photo.png").write_bytes(b"the user's own file")
    paths = write_report(db, "s", out)
    assert paths["pngs"] == []
    assert sorted(p.name for p in out.glob("*.png")) == ["photo.png"]  # stale figures gone, other files kept
    md = paths["markdown"].read_text()
    assert "2 of 2 runs are left out" in md and "- r2-s1: failed: boom" in md and "- r8-s1: pending" in md
    assert "lora.r: only 0 level(s) completed; nothing to compare" in md
    assert "lora.r=2 (the baseline) has no completed run" in md


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    db = synthetic_db(tmp_path, {"axes": {"lora.alpha": [8, 64]}}, two_level_rows(0.1))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LoralabError, match=r"pip install 'loralab\[report\]'"):
        write_report(db, "s", tmp_path / "out")
    assert not (tmp_path / "out" / "report.html").exists()


# ---------------------------------------------------------------- a small real study

STUDY_FILE = """
name: tiny_alpha
description: lora.alpha x lora.r on the tiny base, two seeds
question: Does a higher alpha help at every rank?
claim: For a fixed lr, higher alpha was better.
metric: eval_loss
goal: min
base:
  model: {path: builtin:tiny, device: cpu}
  data: {path: builtin:arithmetic_2ds, limit: 64, val_max_examples: 16, max_seq_length: 64}
  train: {max_steps: 6, batch_size: 4, micro_batch_size: 4, warmup_steps: 0, log_every: 1, lr: 3.0e-3}
  eval: {every: 3, tasks: [world_pairs], limit: 8}
  output: {save_adapter: false}
axes:
  lora.r: [2, 8]
  lora.alpha: [1, 64]
repeats: 2
findings:
  - {kind: trend_within, axis: lora.alpha, within: lora.r}
  - {kind: axis_effect, axis: lora.alpha}
  - {kind: axis_effect, axis: lora.r}
  - {kind: equivalence, axis: lora.r, reference: 2}
  - {kind: cost, axis: lora.r, baseline: 2}
  - {kind: spread}
  - {kind: pareto}
"""
DIVERGES, STOPPED = "r8-a64-s2", "r2-a1-s2"


@pytest.fixture(scope="module")
def real_study(tmp_path_factory):
    """A real study database: the study file expanded and recorded by loralab.study (spec,
    Store, the driver's outcome reader), each run a real tiny training (in this process, to keep
    the test fast). One run diverges for real (its lr raised to 1e30) and one is paused at
    step 3 and recorded as successive halving records a stopped run."""
    from loralab.config import config_from_dict
    from loralab.study.execute import outcome
    from loralab.study.spec import load_study
    from loralab.study.store import Store
    from loralab.train.loop import train

    root = tmp_path_factory.mktemp("studies") / "tiny_alpha"  # where `study run --out <parent>` puts it
    root.mkdir()
    (root / "study.yaml").write_text(STUDY_FILE, encoding="utf-8")
    study = load_study(root / "study.yaml", root=root)
    assert len(study.runs) == 8
    with Store(root / "study.db") as store:
        sid, _ = store.open_study(study.name, study.to_json(), root, study.runs)
        ids = {r["name"]: r["id"] for r in store.runs(sid)}
        for run in study.runs:
            config = json.loads(json.dumps(run.config))
            if run.name == DIVERGES:
                config["train"]["lr"] = 1e30
            if run.name == STOPPED:
                config["train"]["stop_at_step"] = 3
            run_dir = Path(config["output"]["dir"])
            store.start(ids[run.name], run_dir=str(run_dir), estimated=None)
            with contextlib.suppress(LoralabError):  # the diverging run raises after recording it
                train(config_from_dict(config))
            result = outcome(run_dir, 0)
            if run.name == STOPPED:
                result = {**result, "status": "stopped_early", "stopped_at_step": 3,
                          "error": "successive halving stopped it at step 3"}
            store.finish(ids[run.name], status=result["status"], summary=result.get("summary"),
                         metrics=result.get("metrics"), error=result.get("error"),
                         stopped_at_step=result.get("stopped_at_step"))
    return root / "study.db"


@pytest.mark.slow
def test_real_study_findings_match_the_database(real_study):
    statuses = dict(sql(real_study, "SELECT name, status FROM runs"))
    assert statuses.pop(DIVERGES) == "diverged" and statuses.pop(STOPPED) == "stopped_early"
    assert set(statuses.values()) == {"completed"} and len(statuses) == 6
    found = findings(real_study, "tiny_alpha")

    by_axis = {f["axis"]: f for f in found if f["kind"] == "axis_effect"}
    for axis in ("lora.alpha", "lora.r"):
        # the mean over the other axis of the mean over seeds, in SQL
        avg = {v: (m, n) for v, m, n in sql(
            real_study, f"SELECT v, AVG(m), SUM(n) FROM (SELECT json_extract(axes_json, '$.\"{axis}\"') AS v, "
                        "json_extract(axes_json, '$.\"lora.r\"') AS r, "
                        "json_extract(axes_json, '$.\"lora.alpha\"') AS a, "
                        "AVG(final_eval_loss) AS m, COUNT(*) AS n FROM runs WHERE status = 'completed' "
                        "GROUP BY r, a) GROUP BY v")}
        got = {row["value"]: (row["mean"], row["n"]) for row in by_axis[axis]["levels"]}
        assert set(got) == set(avg) and len(avg) == 2
        for v, (m, n) in avg.items():
            assert got[v][0] == pytest.approx(m, rel=1e-12) and got[v][1] == n == 3

    # the seed noise, straight from SQL: SD within each (r, alpha) configuration, pooled
    vals: dict[tuple, list[float]] = {}
    for r, a, v in sql(real_study, "SELECT json_extract(axes_json, '$.\"lora.r\"'), json_extract(axes_json, "
                                   "'$.\"lora.alpha\"'), final_eval_loss FROM runs WHERE status = 'completed'"):
        vals.setdefault((r, a), []).append(v)
    mean = {k: sum(g) / len(g) for k, g in vals.items()}
    ss = sum((x - mean[k]) ** 2 for k, g in vals.items() for x in g)
    df = sum(len(g) - 1 for g in vals.values())
    pooled = math.sqrt(ss / df)
    spread = one(found, "spread")
    assert df == 2 and spread["noise_df"] == 2 and spread["noise_sd"] == pytest.approx(pooled)
    assert sorted(g["config"] for g in spread["groups"]) == ["lora.r=2, lora.alpha=64", "lora.r=8, lora.alpha=1"]

    trend = one(found, "trend_within")
    direct = sum(mean[(r, 64)] < mean[(r, 1)] for r in (2, 8))
    assert (trend["k_higher_better"], trend["n"]) == (direct, 2)
    assert f"({direct}/2)" in trend["text"] or f"at {direct}/2" in trend["text"]

    # alpha 64 against alpha 1, matched per rank; a winner is named exactly when the
    # difference exceeds its 95% interval
    alpha = by_axis["lora.alpha"]
    cmp = alpha["comparison"]  # the best level minus the other one
    diff = sum(mean[(r, 64)] - mean[(r, 1)] for r in (2, 8)) / 2
    inv = sum(1 / len(vals[(r, 64)]) + 1 / len(vals[(r, 1)]) for r in (2, 8))
    assert cmp["difference"] == pytest.approx(diff if alpha["best"] == 64 else -diff)
    assert cmp["half_width"] == pytest.approx(stats.t_quantile(0.975, 2) * pooled * math.sqrt(inv) / 2)
    assert (alpha["winner"] is not None) == (abs(cmp["difference"]) > cmp["half_width"])

    cost = one(found, "cost")
    params = dict(sql(real_study, "SELECT json_extract(axes_json, '$.\"lora.r\"'), AVG(trainable_params) "
                                  "FROM runs WHERE status = 'completed' GROUP BY 1"))
    (r8,) = cost["levels"]
    assert r8["params"]["level_mean"] == params[8] == 4 * params[2]  # LoRA parameters grow linearly with r
    assert r8["params"]["change_pct"] == pytest.approx(300.0)
    ex = one(found, "excluded")
    assert f"{DIVERGES} diverged: non-finite loss" in ex["text"]
    assert f"{STOPPED} stopped early at step 3 (successive halving)" in ex["text"]


@pytest.mark.slow
def test_real_study_report_is_self_contained(real_study, tmp_path):
    paths = write_report(real_study, "tiny_alpha", tmp_path / "report")
    out = tmp_path / "report"
    names = sorted(p.name for p in paths["pngs"])
    assert names == sorted(["curves_eval_loss_by_lora.r.png", "curves_eval_loss_by_lora.alpha.png",
                            "curves_world_pairs_pairs_accuracy.png", "heatmap_lora.r_lora.alpha.png",
                            "pareto.png", "spread.png", "train_loss.png"])  # training loss: log_every 1
    for p in paths["pngs"]:
        assert p.parent == out and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page = paths["html"].read_text()
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert sorted(base64.b64decode(b) for b in embedded) == sorted(p.read_bytes() for p in paths["pngs"])
    assert not re.search(r"https?://|src=['\"](?!data:)|<link|<script|@import|url\(", page)
    assert "Does a higher alpha help at every rank?" in page and "For a fixed lr, higher alpha was better." in page
    assert f"{DIVERGES}: diverged" in page and f"{STOPPED}: stopped early at step 3" in page

    md = paths["markdown"].read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(refs) == names and all((out / r).is_file() for r in refs)
    # the runs table shows every run with its final metric as stored
    for name, loss in sql(real_study, "SELECT name, final_eval_loss FROM runs WHERE status = 'completed'"):
        assert re.search(rf"\| {re.escape(name)} \|[^\n]*\| completed \| {loss:.4g} \|", md)
    assert json.loads(paths["findings"].read_text()) == json.loads(
        json.dumps(findings(real_study, "tiny_alpha"), default=str))


@pytest.mark.slow
def test_study_report_command_writes_the_report(real_study, capsys):
    from loralab.cli import main

    out = real_study.parent.parent
    assert main(["study", "report", "tiny_alpha", "--out", str(out), "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert Path(paths["html"]) == real_study.parent / "report" / "report.html"
    assert Path(paths["html"]).is_file() and all(Path(p).is_file() for p in paths["pngs"])
    assert main(["study", "report", "no_such_study", "--out", str(out)]) == 2
    assert "no study 'no_such_study'" in capsys.readouterr().err


def test_html_page_escapes_every_text_and_inlines_every_figure(tmp_path):
    """The page (templates/report.html.j2, autoescaped) shows text from the database and the
    spec as text, never as markup, and carries each PNG inline, byte for byte."""
    from html.parser import HTMLParser

    rows = two_level_rows(0.1) + [{"name": "a<b>&c", "axes": {"lora.alpha": 8, "train.seed": 9}, "status": "failed",
                                   "error": "<script>alert(1)</script> & 'quotes'"}]
    spec = {"axes": {"lora.alpha": [8, 64]}, "question": "Is alpha > 8 \"better\"?",
            "findings": [{"kind": "axis_effect", "axis": "lora.alpha"}]}
    paths = write_report(synthetic_db(tmp_path, spec, rows), "s", tmp_path / "out")
    page = paths["html"].read_text(encoding="utf-8")

    class Read(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text, self.images = [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "img":
                self.images.append(dict(attrs)["src"])

        def handle_data(self, data):
            self.text.append(data)

    read = Read()
    read.feed(page)
    text = "".join(read.text)
    assert "script" not in read.tags and "b" in read.tags  # <b> only where the page itself bolds
    assert "a<b>&c: failed: <script>alert(1)</script> & 'quotes'" in text
    assert 'Is alpha > 8 "better"?' in text and "Study report: s" in text
    assert [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in read.images] == \
        [p.read_bytes() for p in paths["pngs"]] and len(read.images) >= 2
