"""The default paths on a user's model: a fused group never fails for one member (issue 21)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import studytools
from conftest import make_cfg
from loralab.cli import main
from loralab.train.fused import train_fused
from loralab.train.loop import train
from studytools import rows_of
from test_fused import assert_same_run

RANK_MESSAGE = "lora.r = 128 is larger than the dimensions of model.layers.0.self_attn.q_proj (64 x 64)"


def h64_base(model: Path) -> dict:
    """The study tools' two-step base on a Llama whose attention projections are 64 x 64."""
    return {**studytools.TINY, "model": {"path": str(model), "device": "cpu"},
            "lora": {"alpha": 8, "dropout": 0.0}}


@pytest.mark.slow
def test_an_invalid_rank_is_recorded_alone_before_grouping(tiny_model_dir, tmp_path, caplog):
    model = tiny_model_dir("llama_h64")
    path = studytools.write_study(tmp_path, "ranks", base=h64_base(model), axes={"lora.r": [4, 8, 128]})
    assert main(["study", "run", str(path), "--out", str(tmp_path / "runs"), "--json"]) == 0
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
    import loralab.train.core as core

    real = core.save_trained_adapter

    def save(base, lora, *, seed, weights, out_dir):
        if Path(out_dir).parent.name == "f2":
            raise OSError("injected: cannot write f2's adapter")
        return real(base, lora, seed=seed, weights=weights, out_dir=out_dir)

    monkeypatch.setattr(core, "save_trained_adapter", save)
    kw = dict(lora__dropout=0.0, train__max_steps=3, data__limit=32, data__val_max_examples=8)
    out = train_fused([make_cfg("builtin:tiny", tmp_path / f"f{r}", lora__r=r, **kw) for r in (2, 4)])
    assert [s["status"] for s in out] == ["failed", "completed"]
    assert out[0]["error"] == "saving its adapter: OSError: injected: cannot write f2's adapter"
    assert not (tmp_path / "f2" / "adapter").exists() and (tmp_path / "f4" / "adapter").is_dir()
    monkeypatch.setattr(core, "save_trained_adapter", real)
    train(make_cfg("builtin:tiny", tmp_path / "s4", lora__r=4, **kw))
    assert_same_run(tmp_path / "s4", tmp_path / "f4")


def test_a_run_failing_in_its_evaluation_ends_alone(tmp_path, monkeypatch):
    """An evaluation task that fails for one run (injected, at the first evaluation) ends that
    run alone; the other trains on to the end, as its solo run does."""
    import loralab.train.core as core

    real = core.run_eval_tasks
    calls = []

    def tasks(model, tokenizer, ts, *, batch_size):
        calls.append(1)
        if len(calls) == 1:  # the first run's first evaluation
            raise RuntimeError("injected evaluation error")
        return real(model, tokenizer, ts, batch_size=batch_size)

    monkeypatch.setattr(core, "run_eval_tasks", tasks)
    kw = dict(lora__dropout=0.0, train__max_steps=4, eval__every=2, data__limit=32, data__val_max_examples=8)
    out = train_fused([make_cfg("builtin:tiny", tmp_path / f"f{r}", lora__r=r, **kw) for r in (2, 4)])
    assert [s["status"] for s in out] == ["failed", "completed"]
    assert out[0]["error"] == "evaluation at step 2: RuntimeError: injected evaluation error"
    monkeypatch.setattr(core, "run_eval_tasks", real)
    train(make_cfg("builtin:tiny", tmp_path / "s4", lora__r=4, **kw))
    assert_same_run(tmp_path / "s4", tmp_path / "f4")
