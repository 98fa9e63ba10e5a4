"""The training core: a fused group has everything a solo run has (checkpoints, resume after
SIGKILL bit for bit, stop_at_step, activation checkpointing, auto micro batch, a final
evaluation after a skipped step), and results do not depend on solo vs group."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loralab
import loralab.train.core as core
import loralab.train.evaluation as evaluation
from conftest import make_cfg, torch_threads
from loralab.config import dump_config, load_config
from loralab.errors import LoralabError, ResumeRefused
from loralab.rundir import Status
from loralab.train.checkpoint import TrainState, complete_checkpoints
from loralab.train.fused import train_fused
from loralab.train.loop import train
from userdata import instruction_records, write_jsonl

SRC = Path(loralab.__file__).resolve().parents[1]
STEPS = 6
# Two runs that differ in rank, lr and schedule; run 1 has dropout (its masks come from the
# generator state a checkpoint restores), run 0 none (so it can equal its solo run).
SHARED = dict(train__max_steps=STEPS, train__batch_size=4, train__micro_batch_size=2, train__warmup_steps=1,
              data__limit=16, data__val_max_examples=4, data__max_seq_length=48, eval__every=3, train__seed=5)
VARIANTS = [dict(lora__r=2, lora__dropout=0.0, train__lr=3e-3),
            dict(lora__r=4, lora__dropout=0.1, train__lr=1e-3, train__scheduler="linear")]


@pytest.fixture(autouse=True, scope="module")
def _two_threads_as_the_children():
    """The child processes below train with 2 torch threads (CHILD), and a bit-for-bit
    comparison needs the same count in this process, whatever the suite's (conftest)."""
    with torch_threads(2):
        yield


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def group_cfgs(model_dir: Path, root: Path, **kw):
    return [make_cfg(model_dir, root / f"run{i}", **{**SHARED, **v, **kw}) for i, v in enumerate(VARIANTS)]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "train_loss" in r]


def assert_bitwise(run_dir: Path, ref_dir: Path) -> None:
    a, b = adapter(run_dir), adapter(ref_dir)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert train_rows(run_dir) == train_rows(ref_dir)
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, STEPS + 1))
    s, ref = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref_dir))
    assert s["status"] == ref["status"] == "completed"
    assert s["final_eval_loss"] == ref["final_eval_loss"] and s["tokens_seen"] == ref["tokens_seen"]


def assert_close(run_dir: Path, solo_dir: Path) -> None:
    """Fused vs solo: rounding only (the tolerances of tests/test_fused.py)."""
    for key in ("train_loss", "grad_norm", "lr"):
        a = [r[key] for r in train_rows(solo_dir)]
        assert [r[key] for r in train_rows(run_dir)] == pytest.approx(a, rel=1e-4), key
    sa, sb = adapter(solo_dir), adapter(run_dir)
    assert sa.keys() == sb.keys()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) <= 2e-4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir) -> Path:
    """The group trained in one go, checkpointing every step (which must not change the maths)."""
    root = tmp_path_factory.mktemp("group")
    out = train_fused(group_cfgs(model_dir, root, train__checkpoint_every=1, train__keep_last=2))
    assert [s["status"] for s in out] == ["completed", "completed"]
    return root


def test_group_checkpoints_one_per_run_in_solo_format(uninterrupted, model_dir, tmp_path):
    solo = train(make_cfg(model_dir, tmp_path / "solo", **{**SHARED, **VARIANTS[0]}, train__stop_at_step=5))
    assert solo["status"] == "paused"
    for i in range(2):
        ckpts = complete_checkpoints(uninterrupted / f"run{i}" / "checkpoints")
        assert [p.name for p in ckpts] == ["step-000004", "step-000005"]  # keep_last 2, none at the last step
        s = json.loads((uninterrupted / f"run{i}" / "summary.json").read_text())
        assert s["steps_done"] == STEPS and s["checkpoint"].endswith("step-000005")
        assert s["micro_batch_size"] == 2 and s["train_cpu_time_s"] > 0 and s["resumed_from_step"] is None
    # same file names and tensor names as a solo run's checkpoint: one format
    fused_ckpt = uninterrupted / "run0" / "checkpoints" / "step-000005"
    solo_ckpt = tmp_path / "solo" / "checkpoints" / "step-000005"
    assert sorted(p.name for p in fused_ckpt.iterdir()) == sorted(p.name for p in solo_ckpt.iterdir())
    fa, sa = (load_file(str(d / "adapter.safetensors")) for d in (fused_ckpt, solo_ckpt))
    assert list(fa) == list(sa)
    assert max((fa[k] - sa[k]).abs().max().item() for k in fa) <= 2e-4
    fo, so = (load_file(str(d / "optimizer.safetensors")) for d in (fused_ckpt, solo_ckpt))
    assert fo.keys() == so.keys()


def test_fused_run_equals_solo(uninterrupted, model_dir, tmp_path):
    train(make_cfg(model_dir, tmp_path / "solo", **{**SHARED, **VARIANTS[0]}))
    assert_close(uninterrupted / "run0", tmp_path / "solo")


def test_stop_at_step_pauses_the_group_and_resume_equals_uninterrupted(uninterrupted, model_dir, tmp_path):
    out = train_fused(group_cfgs(model_dir, tmp_path, train__stop_at_step=2))
    assert [s["status"] for s in out] == [Status.PAUSED, Status.PAUSED]
    assert all(s["steps_done"] == 2 for s in out)
    assert [r["step"] for r in rows(tmp_path / "run0") if "eval_loss" in r] == [2]  # a pause evaluates
    out = train_fused(group_cfgs(model_dir, tmp_path, train__checkpoint_every=1, train__keep_last=2), resume=True)
    assert [s["resumed_from_step"] for s in out] == [2, 2]
    for i in range(2):
        assert_bitwise(tmp_path / f"run{i}", uninterrupted / f"run{i}")
    again = train_fused(group_cfgs(model_dir, tmp_path, train__checkpoint_every=1, train__keep_last=2), resume=True)
    assert again == out  # completed runs come back as they are


def test_a_group_resumed_on_other_data_is_refused_naming_its_runs(model_dir, tmp_path):
    """A fused group paused, its data file then edited: the resume names every run, and each
    stays paused with its files as they were."""
    data = write_jsonl(tmp_path / "d.jsonl", instruction_records(24, seed=2))
    out = train_fused(group_cfgs(model_dir, tmp_path, data__path=str(data), data__max_seq_length=256,
                                 train__stop_at_step=2, train__checkpoint_every=1))
    assert [s["status"] for s in out] == [Status.PAUSED, Status.PAUSED]
    files = {p: p.read_bytes() for p in sorted(tmp_path.rglob("run*/**/*")) if p.is_file()}
    write_jsonl(data, instruction_records(24, seed=3))
    with pytest.raises(ResumeRefused) as exc:
        train_fused(group_cfgs(model_dir, tmp_path, data__path=str(data), data__max_seq_length=256,
                               train__checkpoint_every=1), resume=True)
    assert str(exc.value).startswith(f"cannot resume {tmp_path / 'run0'}, {tmp_path / 'run1'}: their examples are "
                                     "not those they trained on until step 2 (the same number of examples, other "
                                     f"tokens; data.path {data})")
    for i in range(2):
        summary = json.loads((tmp_path / f"run{i}" / "summary.json").read_text())
        assert summary["status"] == Status.PAUSED and summary["resume_error"].endswith(str(exc.value))
    assert {p: p.read_bytes() for p in files if p.name != "summary.json"} == {
        p: b for p, b in files.items() if p.name != "summary.json"}


CHILD = """
import sys, torch
torch.set_num_threads(2)
from loralab.config import dump_config, load_config
from loralab.errors import LoralabError
from loralab.train.fused import train_fused
train_fused([load_config(p) for p in sys.argv[1:]], resume=True)
"""


@pytest.mark.slow
def test_group_sigkilled_at_random_moments_resumes_bit_for_bit(uninterrupted, model_dir, tmp_path):
    seed = int(os.environ.get("LORALAB_KILL_SEED", "7"))  # fixed, so a failure replays; vary it to explore
    rng = random.Random(seed)
    cfgs = group_cfgs(model_dir, tmp_path, train__checkpoint_every=1, train__keep_last=2)
    configs = []
    for cfg in cfgs:  # config.yaml only: a resume starts such a directory from step 0
        Path(cfg.output.dir).mkdir(parents=True)
        dump_config(cfg, Path(cfg.output.dir) / "config.yaml")
        configs.append(str(Path(cfg.output.dir) / "config.yaml"))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    metrics = tmp_path / "run1" / "metrics.jsonl"
    kills = 0
    for _ in range(2):
        before = metrics.read_text().count("\n") if metrics.exists() else 0
        child = subprocess.Popen([sys.executable, "-c", CHILD, *configs], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") > before) and child.poll() is None:
            if time.monotonic() > deadline:
                child.kill()
                raise AssertionError("the child trained no step in 300 s")
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if child.poll() is not None:
            assert child.returncode == 0, child.stderr.read().decode()[-2000:]
            break
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += 1
    assert kills, f"no kill landed (seed {seed})"
    out = train_fused([load_config(p) for p in configs], resume=True)
    assert [s["status"] for s in out] == ["completed", "completed"], seed
    for i in range(2):
        assert_bitwise(tmp_path / f"run{i}", uninterrupted / f"run{i}")


def test_activation_checkpointing_in_a_group_equals_solo(model_dir, tmp_path):
    kw = dict(train__gradient_checkpointing=True, train__max_steps=3, eval__every=0)
    out = train_fused(group_cfgs(model_dir, tmp_path / "g", **kw))
    assert [s["status"] for s in out] == ["completed", "completed"]
    train(make_cfg(model_dir, tmp_path / "solo", **{**SHARED, **VARIANTS[0], **kw}))
    train(make_cfg(model_dir, tmp_path / "plain", **{**SHARED, **VARIANTS[0], "train__max_steps": 3,
                                                      "eval__every": 0}))
    for solo in ("solo", "plain"):
        for key in ("train_loss", "grad_norm"):
            a = [r[key] for r in train_rows(tmp_path / solo)]
            assert [r[key] for r in train_rows(tmp_path / "g" / "run0")] == pytest.approx(a, rel=1e-4), (solo, key)
    sa, sb = adapter(tmp_path / "solo"), adapter(tmp_path / "g" / "run0")
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) <= 2e-4


def oom_above(monkeypatch, limit: int, *, in_eval: bool = False) -> None:
    """torch.OutOfMemoryError for micro batches of more than ``limit`` examples (per run), in
    training or (in_eval) only in evaluation."""
    original = core.run_losses

    def wrapped(model, batch, n_runs, autocast):
        if batch["input_ids"].shape[0] > limit and (torch.is_grad_enabled() != in_eval):
            raise torch.OutOfMemoryError(f"injected: micro batch {batch['input_ids'].shape[0]} > {limit}")
        return original(model, batch, n_runs, autocast)

    for module in (core, evaluation):  # the training and the evaluation forwards
        monkeypatch.setattr(module, "run_losses", wrapped)


@pytest.mark.parametrize("in_eval", [False, True])
def test_auto_micro_batch_in_a_group(model_dir, tmp_path, monkeypatch, in_eval):
    kw = dict(train__max_steps=3, eval__every=0, data__packing=False)  # padded: the injected error counts rows
    reference = train_fused(group_cfgs(model_dir, tmp_path / "ref", **kw, train__micro_batch_size=1))
    oom_above(monkeypatch, 1, in_eval=in_eval)
    out = train_fused(group_cfgs(model_dir, tmp_path / "auto", **kw, train__auto_micro_batch=True))
    step = 4 if in_eval else 1  # in evaluation: after step 3, so the next step (none) would use it
    for s, ref in zip(out, reference, strict=True):
        assert s["status"] == "completed" and s["micro_batch_size"] == 1
        assert s["micro_batch_changes"] == [{"step": step, "from": 2, "to": 1}]
        assert s["final_eval_loss"] == pytest.approx(ref["final_eval_loss"], rel=1e-4)
    if not in_eval:  # the same run as one started at micro batch 1
        for i in range(2):
            a, b = adapter(tmp_path / "auto" / f"run{i}"), adapter(tmp_path / "ref" / f"run{i}")
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_out_of_memory_in_evaluation_is_out_of_memory(model_dir, tmp_path, monkeypatch):
    oom_above(monkeypatch, 1, in_eval=True)
    with pytest.raises(LoralabError, match="loralab estimate"):
        train_fused(group_cfgs(model_dir, tmp_path, train__max_steps=2, eval__every=0))
    for i in range(2):
        s = json.loads((tmp_path / f"run{i}" / "summary.json").read_text())
        assert s["status"] == "out_of_memory" and s["estimated_memory_bytes"] > 0 and s["peak_memory_bytes"] > 0


def test_eval_batch_is_the_micro_batch_on_a_gpu_and_at_least_8_on_cpu(model_dir, tmp_path, monkeypatch):
    seen = []
    original = evaluation.evaluate_losses

    def spy(*args, batch_size, **kw):
        seen.append(batch_size)
        return original(*args, batch_size=batch_size, **kw)

    monkeypatch.setattr(evaluation, "evaluate_losses", spy)
    cfg = make_cfg(model_dir, tmp_path / "r", **{**SHARED, **VARIANTS[0], "train__max_steps": 2})
    train(cfg)
    assert cfg.train.micro_batch_size == 2 and seen == [8]  # CPU: no gradients, memory rarely the limit
    shrunk = TrainState(micro_batch_size=2, micro_batch_changes=[{"step": 1, "from": 4, "to": 2}])
    assert core.eval_batch_size(cfg, TrainState(), torch.device("cuda")) == 2  # what the estimate checked
    assert core.eval_batch_size(cfg, shrunk, torch.device("cpu")) == 2  # after an out-of-memory


def test_final_evaluation_after_a_skipped_last_step(model_dir, tmp_path, monkeypatch):
    original = core.forward_backward
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        losses, tokens = original(*args, **kw)
        return (torch.full_like(losses, float("nan")) if calls["n"] == 3 else losses), tokens

    monkeypatch.setattr(core, "forward_backward", poisoned)
    out = train_fused(group_cfgs(model_dir, tmp_path, train__max_steps=3, eval__every=0, train__on_nonfinite="skip"))
    for i, s in enumerate(out):
        assert s["status"] == "completed" and s["skipped_steps"] == 1
        assert [r["step"] for r in rows(tmp_path / f"run{i}") if "eval_loss" in r] == [3]
        assert s["final_eval_loss"] == s["final_eval_loss"]  # not NaN: the adapter after step 2 was evaluated
