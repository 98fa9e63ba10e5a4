"""The default paths on a user's model: a fused group never fails for one member (issue 21)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

import studytools
from conftest import make_cfg
from loralab.cli import main
from loralab.errors import ConfigError
from loralab.train.fused import train_fused
from loralab.train.loop import train
from loralab.tune import plan_tune
from studytools import rows_of
from test_fused import assert_same_run, curve
from userdata import instruction_records, write_jsonl

RANK_MESSAGE = "lora.r = 128 is larger than the dimensions of model.layers.0.self_attn.q_proj (64 x 64)"


def h64_base(model: Path) -> dict:
    """The study tools' two-step base on a Llama whose attention projections are 64 x 64."""
    return {**studytools.TINY, "model": {"path": str(model), "device": "cpu"},
            "lora": {"alpha": 8, "dropout": 0.0}}


@pytest.mark.slow
def test_an_invalid_rank_is_recorded_alone_before_grouping(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama_h64")
    path = studytools.write_study(tmp_path, "ranks", base=h64_base(model), axes={"lora.r": [4, 8, 128]})
    # the dry run exits as the run will: 1, a run would end invalid while the others train
    assert main(["study", "run", str(path), "--out", str(tmp_path / "runs"), "--dry-run"]) == 1
    dry = capsys.readouterr().out
    assert f"r128: invalid here, will not train: {RANK_MESSAGE}" in dry
    assert "the study: 2 runs to train" in dry
    # exit 1: a run of the study ended invalid (0 only when every run completed)
    assert main(["study", "run", str(path), "--out", str(tmp_path / "runs"), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    # two trained; the invalid run is this invocation's outcome, not one done before
    assert (result["planned"], result["ran"], result["already_done"]) == (2, 2, 0)
    rows = rows_of(tmp_path / "runs" / "ranks" / "study.db")
    assert {n: r["status"] for n, r in rows.items()} == {"r4": "completed", "r8": "completed", "r128": "invalid"}
    assert rows["r128"]["error"].startswith(RANK_MESSAGE)
    assert rows["r4"]["error"] is None and rows["r8"]["error"] is None
    log = (tmp_path / "runs" / "ranks" / "study.log").read_text()
    assert "fusion: r4, r8 train together (2 runs" in log and "r128" not in log.split("fusion:", 1)[1]


def test_a_run_whose_adapters_fail_in_a_group_is_invalid_alone(tiny_model_dir, tmp_path):
    """The fused group's own process (no scheduler before it): r 128 is rejected while the
    group builds its adapters; r 4 and r 8 train on and equal their solo runs."""
    model = tiny_model_dir("llama_h64")
    kw = dict(lora__dropout=0.0, train__max_steps=3, data__limit=32, data__val_max_examples=8)
    out = train_fused([make_cfg(model, tmp_path / f"f{r}", lora__r=r, **kw) for r in (4, 128, 8)])
    assert [s["status"] for s in out] == ["completed", "invalid", "completed"]
    assert out[1]["error"] == RANK_MESSAGE + "; a rank above 64 adds parameters but no expressiveness"
    assert json.loads((tmp_path / "f128" / "summary.json").read_text())["status"] == "invalid"
    for r in (4, 8):
        train(make_cfg(model, tmp_path / f"s{r}", lora__r=r, **kw))
        assert_same_run(tmp_path / f"s{r}", tmp_path / f"f{r}")


def test_a_run_failing_mid_group_ends_alone(tmp_path, monkeypatch):
    """One run's adapter save fails (injected) after training: it alone is failed with its own
    error; the others complete and equal their solo runs."""
    import loralab.train.group_adapters as group_adapters

    real = group_adapters.save_trained_adapter

    def save(base, lora, *, seed, weights, out_dir):
        if Path(out_dir).parent.name == "f2":
            raise OSError("injected: cannot write f2's adapter")
        return real(base, lora, seed=seed, weights=weights, out_dir=out_dir)

    monkeypatch.setattr(group_adapters, "save_trained_adapter", save)
    kw = dict(lora__dropout=0.0, train__max_steps=3, data__limit=32, data__val_max_examples=8)
    out = train_fused([make_cfg("builtin:tiny", tmp_path / f"f{r}", lora__r=r, **kw) for r in (2, 4)])
    assert [s["status"] for s in out] == ["failed", "completed"]
    assert out[0]["error"] == "saving its adapter: OSError: injected: cannot write f2's adapter"
    assert not (tmp_path / "f2" / "adapter").exists() and (tmp_path / "f4" / "adapter").is_dir()
    monkeypatch.setattr(group_adapters, "save_trained_adapter", real)
    train(make_cfg("builtin:tiny", tmp_path / "s4", lora__r=4, **kw))
    assert_same_run(tmp_path / "s4", tmp_path / "f4")


def test_a_run_failing_in_its_evaluation_ends_alone(tmp_path, monkeypatch):
    """An evaluation task that fails for one run (injected, at the first evaluation) ends that
    run alone; the other trains on to the end, as its solo run does."""
    import loralab.train.evaluation as evaluation

    real = evaluation.run_eval_tasks
    calls = []

    def tasks(model, tokenizer, ts, *, batch_size):
        calls.append(1)
        if len(calls) == 1:  # the first run's first evaluation
            raise RuntimeError("injected evaluation error")
        return real(model, tokenizer, ts, batch_size=batch_size)

    monkeypatch.setattr(evaluation, "run_eval_tasks", tasks)
    kw = dict(lora__dropout=0.0, train__max_steps=4, eval__every=2, data__limit=32, data__val_max_examples=8)
    out = train_fused([make_cfg("builtin:tiny", tmp_path / f"f{r}", lora__r=r, **kw) for r in (2, 4)])
    assert [s["status"] for s in out] == ["failed", "completed"]
    assert out[0]["error"] == "evaluation at step 2: RuntimeError: injected evaluation error"
    monkeypatch.setattr(evaluation, "run_eval_tasks", real)
    train(make_cfg("builtin:tiny", tmp_path / "s4", lora__r=4, **kw))
    assert_same_run(tmp_path / "s4", tmp_path / "f4")


# ----------------------------------------------------------------------------- tune respects the model


def long_record(i: int) -> dict:
    """An instruction record of about 700 tokens with the shipped tokenizer."""
    body = " ".join(f"Step {k} of the report on item {i} keeps the water warm and the road clear." for k in range(60))
    return {"instruction": f"Write a long report on item {i}.", "input": "", "output": body}


@pytest.fixture
def model_512(tiny_model_dir, tmp_path) -> Path:
    """The 64-dim Llama with a 512-position context (rotary: the weights do not change)."""
    out = tmp_path / "llama-512"
    shutil.copytree(tiny_model_dir("llama_h64"), out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 512
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.slow
def test_tune_resolves_the_context_and_ranks_from_the_model(model_512, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(20, seed=3) + [long_record(0), long_record(1)])
    out = tmp_path / "runs"
    code = main(["tune", "--model", str(model_512), "--data", str(data), "--out", str(out), "--name", "t",
                 "--batch-size", "8", "--search", "lora.r", "--fixed", "train.lr=1e-3", "--fixed", "lora.dropout=0",
                 "--fixed", "data.val_fraction=0.15", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    rows = rows_of(out / "t" / "study.db")
    assert {r["status"] for r in rows.values()} == {"completed"}
    assert {json.loads(r["config_json"])["lora"]["r"] for r in rows.values()} == {8, 32}  # 128 > 64 dropped
    # a note to widen the ranks never names one the model cannot mean (32 recommended: widen to 64)
    widen = [e for e in json.loads(stdout)["edges"] if e.startswith("lora.r")]
    assert all(e.endswith(("--widen lora.r=8,32,64", "--widen lora.r=2,8,32")) for e in widen), widen
    for r in rows.values():  # the longest example is ~700 tokens: auto stops at the context, as in loralab train
        stats = json.loads((Path(r["run_dir"]) / "summary.json").read_text())["data_stats"]
        assert stats["max_seq_length"] == stats["context"] == 512
    note = "lora.r 128 not searched: above 64, the smallest dimension of an adapted matrix"
    assert note in (out / "t" / "tune.md").read_text()
    assert any(note in n for n in json.loads((out / "t" / "tune-plan.json").read_text())["notes"])


def test_tune_refuses_a_budget_too_small_to_search(model_512, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(40, seed=3))
    out = tmp_path / "runs"
    args = ["tune", "--model", str(model_512), "--data", str(data), "--out", str(out), "--batch-size", "8"]
    assert main([*args, "--budget-steps", "20"]) == 2
    err = capsys.readouterr().err
    found = re.search(r"--budget-steps 20 is too small for a search: comparing two values of each searched key "
                      r"\(train.lr, lora.r, lora.targets\) takes 8 candidates and their repeats, (\d+) optimizer "
                      r"steps, at least about [\d.]+ s on this machine; give at least --budget-steps (\d+)", err)
    assert found and found.group(1) == found.group(2), err
    assert not out.exists()  # nothing half-written
    least = int(found.group(1))  # the budget named is the smallest that searches
    plan = plan_tune(model=str(model_512), data=str(data), metric="eval_loss", fixed={}, batch_size=8,
                     budget_steps=least)
    assert plan.candidates == 8 and plan.planned_steps <= least
    with pytest.raises(ConfigError, match="too small for a search"):
        plan_tune(model=str(model_512), data=str(data), metric="eval_loss", fixed={}, batch_size=8,
                  budget_steps=least - 1)


# ----------------------------------------------------------------------------- a study that cannot answer


def degenerate_study(tmp_path: Path, model: Path) -> Path:
    """Two settings, 2 optimizer steps per run (8 examples at batch 4, 1 epoch) where the seed
    made 390, judged on exact match, which a random-init model scores 0 on: it cannot answer."""
    base = {"model": {"path": str(model), "device": "cpu"},
            "data": {"path": "builtin:arithmetic_2ds", "limit": 8, "val_max_examples": 4, "max_seq_length": 48},
            "lora": {"alpha": 8}, "train": {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0},
            "eval": {"tasks": ["arithmetic_2ds"], "limit": 4}, "output": {"save_adapter": False}}
    return studytools.write_study(tmp_path, "degenerate", base=base, axes={"lora.r": [2, 4]},
                                  metric="arithmetic_2ds/exact_match", goal="max",
                                  seed={"source": "a seed", "steps": 390},
                                  findings=[{"kind": "axis_effect", "axis": "lora.r"}])


@pytest.mark.slow
def test_a_study_that_cannot_answer_says_so(tiny_model_dir, tmp_path, capsys, caplog):
    path = degenerate_study(tmp_path, tiny_model_dir("llama"))
    out = tmp_path / "runs"
    assert main(["study", "run", str(path), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "every run: 2 optimizer steps (8 examples at batch 4, 1 epoch) instead of the seed's about 390" in text
    assert "the study: 2 runs to train, 4 optimizer steps" in text and "of training on this machine" in text
    assert ("WARNING: 2 of 2 runs train fewer than 20 optimizer steps (fewest: r2, 2 optimizer steps") in text
    assert ("Fix: more data (at least 80 examples at batch 4), or more epochs (--set train.epochs=10)") in text

    with caplog.at_level(logging.INFO, logger="loralab.cli.study"):
        assert main(["study", "run", str(path), "--out", str(out)]) == 0
    assert "WARNING: 2 of 2 runs train fewer than 20 optimizer steps" in caplog.text  # said before the runs
    assert ("WARNING: the base scores arithmetic_2ds/exact_match = 0, the metric's floor (a run must learn the task "
            "to move it)") in caplog.text
    assert json.loads((out / "degenerate" / "base_score.json").read_text())["edge"] == "floor"
    assert main(["study", "report", "degenerate", "--out", str(out)]) == 0
    report = (out / "degenerate" / "report" / "report.md").read_text().splitlines()
    assert report[0] == "# Study report: degenerate"
    assert report[2].startswith("**Verdict: The study could not answer its question: every run trained at most "
                                "2 optimizer steps, under the 20 it takes to leave the initialisation")
    assert ("every completed run scored arithmetic_2ds/exact_match = 0 (the metric's floor), so no setting can be "
            "told from another; judge it on a metric that can move here (eval_loss, or a harness task)") in report[2]
    assert "## What the runs showed (not results: see the verdict)" in report and "## Findings" not in report
    assert "drawn as a point: there is no curve to show." in "\n".join(report)
    found = json.loads((out / "degenerate" / "report" / "findings.json").read_text())
    assert found[0]["kind"] == "verdict" and found[0]["answered"] is False and len(found[0]["reasons"]) == 2
    assert [f["result"] for f in found[1:]] == [False]


# ----------------------------------------------------------------------------- clean output

LIBRARY_NOISE = ("bitsandbytes", "kernels-community", "FutureWarning", "warnings.warn", "is_gradient_checkpointing",
                 "trainable params", "transformers", "peft")


@pytest.mark.slow
def test_a_plain_train_prints_loralab_lines_only(tmp_path):
    """The quickstart's config as a user runs it (a subprocess, stderr not a terminal, the hub in
    offline mode as on a machine without it), a few steps: stderr holds no line of bitsandbytes,
    kernels, transformers or PEFT; -v shows them again."""
    import subprocess
    import sys

    from loralab.cli.run import QUICKSTART

    src = Path(__file__).resolve().parents[1] / "src"
    env = {k: v for k, v in os.environ.items() if k != "LORALAB_VERBOSE"}
    # offline: on a CPU with AVX512, bitsandbytes' kernels package then warns about the hub's trust check
    env |= {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def train(*flags: str, out: str) -> str:
        cmd = [sys.executable, "-m", "loralab.cli", *flags, "train", str(QUICKSTART), "--set", "train.max_steps=4",
               "--set", "eval.every=2", "--set", "data.limit=64", "--out", str(tmp_path / out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "status:  completed" in done.stdout
        return done.stderr

    plain = train(out="plain")
    assert [line for line in plain.splitlines() if any(word in line for word in LIBRARY_NOISE)] == [], plain
    loud = train("-v", out="loud")
    # what the libraries print differs between their versions (PEFT 0.22 no longer warns about
    # is_gradient_checkpointing); PEFT's parameter line and bitsandbytes' loading line stay
    noise = [line for line in loud.splitlines() if any(word in line for word in LIBRARY_NOISE)]
    assert any(line.startswith("trainable params: ") for line in noise), loud
    assert any("bitsandbytes" in line for line in noise), loud


# ----------------------------------------------------------------------------- a run's result is its own


@pytest.mark.slow
def test_a_runs_result_does_not_depend_on_its_group(tmp_path):
    """With LoRA dropout on (tune's default), the same run trains to the same numbers in a group
    of 2 and of 4 with other partners; with activation checkpointing the recomputed forwards
    draw the same masks, so it follows the run without it."""
    kw = dict(lora__dropout=0.1, train__max_steps=4, train__lr=3e-3, data__limit=32, data__val_max_examples=8,
              train__batch_size=8, train__micro_batch_size=4)
    n = iter(range(100))

    def run(**extra):
        return make_cfg("builtin:tiny", tmp_path / f"r{next(n)}", lora__r=4, **kw, **extra)

    def partner(r: int, **extra):
        return make_cfg("builtin:tiny", tmp_path / f"p{next(n)}", lora__r=r, **{**kw, **extra})

    pair = train_fused([run(), partner(8)])[0]
    four = train_fused([partner(2, train__lr=1e-3), partner(16), run(), partner(8, lora__alpha=32.0)])[2]
    assert pair["final_eval_loss"] == four["final_eval_loss"]
    assert curve(Path(pair["run_dir"]), "train_loss") == curve(Path(four["run_dir"]), "train_loss")
    gc = train_fused([run(train__gradient_checkpointing=True), partner(8, train__gradient_checkpointing=True)])[0]
    expected = curve(Path(pair["run_dir"]), "train_loss")
    assert curve(Path(gc["run_dir"]), "train_loss") == pytest.approx(expected, rel=1e-5)


class MemoryBoundBackend:
    """Stands in for a device where three runs' activations do not fit together but one run's
    does: a fused unit of more than ``fits`` runs ends out of memory in every run (as
    run_group records it), a smaller one completes. No training: the scheduler's reaction is
    what is tested."""

    name = "memory-bound"

    def __init__(self, fits: int):
        self.fits, self.units = fits, []

    def start(self, unit, *, memory, threads):
        self.units.append([r.name for r in unit.runs])
        oom = len(unit.runs) > self.fits
        out = [{"status": "out_of_memory" if oom else "completed", "summary": {}, "metrics": [],
                "error": "CUDA out of memory. Tried to allocate 2.00 GiB" if oom else None} for _ in unit.runs]

        class Done:
            def poll(self):
                return out

        return Done()


def test_a_group_out_of_memory_is_split_not_failed(tmp_path, caplog):
    from loralab.study.scheduler import Scheduler, form_units, plan_tasks
    from loralab.study.spec import load_study
    from loralab.study.store import Store

    path = studytools.write_study(tmp_path, "oom", axes={"lora.r": [2, 4, 8]})
    root = tmp_path / "runs"
    study = load_study(path, root=root)
    backend = MemoryBoundBackend(fits=1)
    with Store(root / "study.db") as store, caplog.at_level(logging.INFO, logger="loralab.study.scheduler"):
        sid, _ = store.open_study(study.name, study.to_json(), root, study.runs)
        units = form_units(plan_tasks(store, sid, root, max_memory=None), fuse=True, budget=None)
        assert [len(u.tasks) for u in units] == [3]
        Scheduler(store, backend, workers=1).run(units)
    assert backend.units == [["r2", "r4", "r8"], ["r2"], ["r4", "r8"], ["r4"], ["r8"]]
    statuses = {n: r["status"] for n, r in rows_of(root / "study.db").items()}
    assert statuses == dict.fromkeys(["r2", "r4", "r8"], "completed")
    assert ("fusion: r2+r4+r8 ran out of memory together (CUDA out of memory. Tried to allocate 2.00 GiB); "
            "training them again as r2 and r4, r8") in caplog.text


def run_rank_study(tiny_model_dir, tmp_path, name: str, ranks: list[int]) -> tuple[Path, Path, list[dict]]:
    """A study over lora.r on the 32-wide Llama, run (exit 1: some run invalid) and reported:
    (its file, the output directory, the report's findings)."""
    base = {"model": {"path": str(tiny_model_dir("llama")), "device": "cpu"},
            "data": {"path": "builtin:arithmetic_2ds", "limit": 8, "val_max_examples": 4, "max_seq_length": 48},
            "train": {"max_steps": 1, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0}}
    path = studytools.write_study(tmp_path, name, base=base, axes={"lora.r": ranks},
                                  findings=[{"kind": "axis_effect", "axis": "lora.r"}])
    out = tmp_path / "runs"
    assert main(["study", "run", str(path), "--out", str(out)]) == 1
    assert main(["study", "report", name, "--out", str(out)]) == 0
    return path, out, json.loads((out / name / "report" / "findings.json").read_text())


def test_a_study_where_no_run_could_train_has_a_verdict(tiny_model_dir, tmp_path):
    """Every rank above the model's width: every run is invalid. The report's verdict says no run
    completed and how they ended (before, it had none: only "nothing to compare")."""
    _, out, found = run_rank_study(tiny_model_dir, tmp_path, "toowide", [64, 128])
    report = (out / "toowide" / "report" / "report.md").read_text().splitlines()
    assert report[2] == ("**Verdict: The study could not answer its question: no run completed with a value of "
                         "eval_loss (2 invalid); the excluded runs below say why each one ended.**")
    assert found[0]["kind"] == "verdict" and found[0]["answered"] is False


def test_a_study_with_one_value_of_its_axis_left_says_it_could_not_answer(tiny_model_dir, tmp_path, capsys):
    """r 64 is above this model's width (invalid here), so only r 8 trains: with one value of the
    axis there is nothing to compare, and the verdict says so (it had none, and the report was
    headed "Findings" as if the study had answered)."""
    path, out, found = run_rank_study(tiny_model_dir, tmp_path, "onelevel", [8, 64])
    assert found[0]["kind"] == "verdict" and found[0]["answered"] is False
    assert ("only 1 of the 2 values of lora.r has a completed run (8), so there is nothing to compare it with; the "
            "excluded runs below say why the others ended") in found[0]["reasons"]
    assert "## Findings" not in (out / "onelevel" / "report" / "report.md").read_text()
    capsys.readouterr()
    main(["study", "run", str(path), "--out", str(out), "--dry-run"])  # it used to say "no run can train here"
    said = capsys.readouterr().out
    assert "every run that can train here already completed (1); the other 1 cannot train here" in said


@pytest.mark.slow
def test_a_cost_finding_does_not_compare_runs_that_shared_a_fused_group(tiny_model_dir, tmp_path):
    """Dropout's cost (the dropout preset's question) on runs fused by default: their time and peak
    are the group's, shared equally, so the finding says they were not measured apart; it used to
    report "the same peak memory and the same time" from the shared figures."""
    base = {"model": {"path": str(tiny_model_dir("llama")), "device": "cpu"},
            "data": {"path": "builtin:arithmetic_2ds", "limit": 8, "val_max_examples": 4, "max_seq_length": 48},
            "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0}}
    path = studytools.write_study(tmp_path, "dropcost", base=base, axes={"lora.dropout": [0.0, 0.1]},
                                  findings=[{"kind": "cost", "axis": "lora.dropout", "baseline": 0.0}])
    out = tmp_path / "runs"
    assert main(["study", "run", str(path), "--out", str(out)]) == 0
    summaries = [json.loads(p.read_text()) for p in (out / "dropcost").glob("*/summary.json")]
    assert len(summaries) == 2 and all(len(s["fused_with"]) == 1 for s in summaries)  # one group of two
    assert main(["study", "report", "dropcost", "--out", str(out)]) == 0
    (cost,) = [f for f in json.loads((out / "dropcost" / "report" / "findings.json").read_text())
               if f["kind"] == "cost"]
    (level,) = cost["levels"]
    assert level["fused"] and level["memory"] is None and level["time"] is None
    assert cost["text"].startswith("lora.dropout=0.1 against lora.dropout=0: peak memory and time not measured apart "
                                   "(they trained in one fused group")


def test_the_time_lower_bound_is_taken_on_the_datas_examples(tiny_model_dir, tmp_path, monkeypatch):
    """study run's (and tune's) "at least about" is estimate's FLOPs at the measured matmul rate. It
    was taken at full-length rows (micro batch x max_seq_length), so on data of real lengths it
    came out several times above the time the runs then took, and tune refused budgets that were
    enough. It is now the FLOPs of the data's tokens: at a fixed rate (the machine's own is
    measured by bench/bench_time_bound.py), about 4 multiply-adds of the model's matmul
    weights per token (forward and input-gradient backward), not the 3.3x of that full rows
    would take here."""
    import torch
    import transformers

    import loralab.estimate
    from loralab.study.spec import load_study
    from loralab.study.steps import step_plan

    rate = 1e11
    monkeypatch.setattr(loralab.estimate, "matmul_throughput", lambda device, dtype: rate)
    model_dir = tiny_model_dir("llama_512")
    data = write_jsonl(tmp_path / "d.jsonl", instruction_records(48, seed=3))
    base = {"model": {"path": str(model_dir), "device": "cpu", "dtype": "fp32"},
            "data": {"path": str(data), "max_seq_length": 512, "val_max_examples": 4},
            "train": {"max_steps": 4, "batch_size": 8, "micro_batch_size": 8, "warmup_steps": 0},
            "eval": {"every": 0}}
    path = studytools.write_study(tmp_path, "lowerbound", base=base, axes={"lora.r": [4]})
    (run,) = step_plan(load_study(str(path))).runs
    assert run.tokens < 0.4 * run.steps * run.batch_size * 512  # rows far longer than the mean example
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_token = run.seconds * rate / run.tokens / matmul  # FLOPs per token per matmul weight
    # 5.1 here (4 = 2 forward + 2 backward; the rest: attention, the adapters); 16.6 at full rows
    assert 4 <= per_token < 6, per_token
