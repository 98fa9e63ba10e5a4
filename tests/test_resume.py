"""Checkpoints and exact resume: a run killed anywhere, resumed, equals an uninterrupted run bit for bit.

The runs are deterministic CPU runs of a tiny random-init Llama (2 torch threads, here and in
the subprocesses) with dropout on, gradient accumulation, warmup + cosine and several epochs, so
the RNG, optimizer, scheduler and data position all have to come back exactly.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loralab
from conftest import make_cfg, torch_threads
from loralab.cli import main
from loralab.config import dump_config
from loralab.errors import ConfigError
from loralab.train.checkpoint import complete_checkpoints, latest_checkpoint, verify
from loralab.train.loop import train

STEPS = 16
RUN = dict(train__max_steps=STEPS, train__batch_size=8, train__micro_batch_size=4, train__warmup_steps=2,
           train__scheduler="cosine", train__lr=2e-3, lora__dropout=0.1, data__limit=24, train__seed=11)
SRC = Path(loralab.__file__).resolve().parents[1]
# The CLI in a fresh process, with the same thread count as this one (conftest sets 2).
CHILD = ("import sys, torch; torch.set_num_threads(2); from loralab.cli import main; "
         "raise SystemExit(main(sys.argv[1:]))")
# CHILD, sleeping 1 s inside each checkpoint write after the payload, before the manifest and the
# rename, so a test can SIGKILL it exactly there.
CHILD_PAUSED_IN_WRITE = (
    "import time\n"
    "from loralab.train import checkpoint as ck\n"
    "_write_json = ck._write_json\n"
    "def _paused(path, obj):\n"
    "    if path.name == ck.MANIFEST:\n"
    "        time.sleep(1.0)\n"
    "    _write_json(path, obj)\n"
    "ck._write_json = _paused\n"
) + CHILD


def child_signalled_at(step: int, sig: signal.Signals) -> str:
    """CHILD, sending itself ``sig`` right after it logs the train row of ``step``: a real signal,
    handled where a Ctrl-C mid-run is, with no race against the run's end (a signal sent from
    outside once a few rows are logged can land after a short run completed, in its teardown,
    and the process then exits 0)."""
    return (
        "import os\n"
        "from loralab.rundir import MetricsWriter\n"
        "_write = MetricsWriter.write\n"
        "def _signalled(self, **row):\n"
        "    _write(self, **row)\n"
        f"    if row.get('step') == {step} and 'train_loss' in row:\n"
        f"        os.kill(os.getpid(), {int(sig)})\n"
        "MetricsWriter.write = _signalled\n"
    ) + CHILD


@pytest.fixture(autouse=True, scope="module")
def _two_threads_as_the_children():
    """The child processes below train with 2 torch threads (CHILD), and a bit-for-bit
    comparison needs the same count in this process, whatever the suite's (conftest)."""
    with torch_threads(2):
        yield


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def run_cfg(model: Path, out: Path, **kw):
    return make_cfg(model, out, **{**RUN, **kw})


def line_count(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "train_loss" in r]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_bit_identical(run_dir: Path, ref_dir: Path) -> None:
    """Same adapter bit for bit, the same train lines (loss, lr, tokens, grad norm) each step exactly once."""
    a, b = adapter(run_dir), adapter(ref_dir)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert train_rows(run_dir) == train_rows(ref_dir)
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, STEPS + 1))
    s = json.loads((run_dir / "summary.json").read_text())
    ref = json.loads((ref_dir / "summary.json").read_text())
    assert s["status"] == "completed"
    assert s["final_eval_loss"] == ref["final_eval_loss"]
    assert s["tokens_seen"] == ref["tokens_seen"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir) -> Path:
    """The uninterrupted run (checkpointing every 2 steps, which must not change the maths)."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    summary = train(run_cfg(model_dir, out, train__checkpoint_every=2, train__keep_last=2))
    assert summary["status"] == "completed" and summary["steps_done"] == STEPS
    return out


def test_checkpoint_layout_and_keep_last(reference):
    ckpts = complete_checkpoints(reference / "checkpoints")
    # written at steps 2, 4, ..., 14 (none at the final step: the adapter is the result); newest 2 kept
    assert [p.name for p in ckpts] == ["step-000012", "step-000014"]
    assert not list((reference / "checkpoints").glob(".tmp-*"))
    newest = ckpts[-1]
    names = sorted(p.name for p in newest.iterdir())
    assert names == ["adapter.safetensors", "manifest.json", "optimizer.json", "optimizer.safetensors",
                     "rng.json", "rng.safetensors", "scheduler.json", "trainer_state.json"]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["step"] == 14 and set(manifest["files"]) == set(names) - {"manifest.json"}
    assert verify(newest) is None
    state = json.loads((newest / "trainer_state.json").read_text())
    # 14 steps x 2 micro batches; 24 examples / 8 per step = 3 steps per epoch, so epoch 4 (0-based)
    assert (state["step"], state["micro_batches"], state["epoch"], state["micro_batch_size"]) == (14, 28, 4, 4)
    assert state["tokens_seen"] == [r for r in train_rows(reference) if r["step"] == 14][0]["tokens_seen"]
    sched = json.loads((newest / "scheduler.json").read_text())
    assert sched["last_epoch"] == 14
    opt = load_file(str(newest / "optimizer.safetensors"))
    assert any(k.endswith("/exp_avg_sq") for k in opt) and all(torch.isfinite(v).all() for v in opt.values())


def test_stop_at_step_then_resume_equals_uninterrupted(reference, model_dir, tmp_path):
    out = tmp_path / "paused"
    cfg = run_cfg(model_dir, out, train__stop_at_step=3)
    paused = train(cfg)
    assert paused["status"] == "paused" and paused["steps_done"] == 3 and paused["steps"] == STEPS
    assert json.loads((out / "summary.json").read_text())["status"] == "paused"
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-000003"]
    # the lr schedule is the full run's: at step 3 the same lr as the uninterrupted run
    assert train_rows(out) == train_rows(reference)[:3]
    # a second pause further on, through the CLI, then the rest
    assert main(["train", "--resume", str(out), "--set", "train.stop_at_step=5"]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "paused"
    assert main(["train", "--resume", str(out), "--set", "train.stop_at_step=null"]) == 0
    assert_bit_identical(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 5
    # each pause evaluated the adapter it left, so a study can rank paused runs
    assert [r["step"] for r in metrics(out) if "eval_loss" in r] == [3, 5, STEPS]


def _paused_at_6(model_dir: Path, out: Path) -> None:
    train(run_cfg(model_dir, out, train__stop_at_step=6))
    state = json.loads((out / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["arithmetic"]["threads"] == 2  # this module's count, recorded at step 0


def _resume_with_one_thread(model_dir: Path, out: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a process set up otherwise: a study worker's single thread
    try:
        train(run_cfg(model_dir, out), resume=True)
        assert torch.get_num_threads() == 1  # the process's own setting is back after the run
    finally:
        torch.set_num_threads(before)


def test_resume_in_a_process_with_another_thread_count_is_exact(reference, model_dir, tmp_path, caplog):
    out = tmp_path / "threads"
    _paused_at_6(model_dir, out)
    with caplog.at_level("INFO", logger="loralab.train.checkpoint"):
        _resume_with_one_thread(model_dir, out)
    assert "threads 2 (this process had 1)" in caplog.text
    assert_bit_identical(out, reference)


def test_the_thread_check_can_fail(reference, model_dir, tmp_path, monkeypatch):
    """Without the recorded settings put back, the same resume is not bit-exact on this CPU: the
    test above would see it."""
    import contextlib

    from loralab.train import core

    monkeypatch.setattr(core, "pinned_arithmetic", lambda recorded, where: contextlib.nullcontext())
    out = tmp_path / "unpinned"
    _paused_at_6(model_dir, out)
    _resume_with_one_thread(model_dir, out)
    a, b = adapter(out), adapter(reference)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bf16_pause_and_resume_equals_the_uninterrupted_bf16_run(model_dir, tmp_path, caplog):
    """bf16, the default where the CPU multiplies it natively, resumes bit for bit too. On a CPU
    that would emulate bf16 the run says how slow that is."""
    from loralab.models import cpu_bf16_feature

    whole = tmp_path / "whole"
    with caplog.at_level(logging.WARNING, logger="loralab.models"):
        summary = train(run_cfg(model_dir, whole, model__dtype="bf16"))
    assert summary["dtype"] == "bf16"
    assert summary["dtype_reason"] == ("set in the config" if cpu_bf16_feature() else
                                       "set in the config; this CPU has neither AMX-BF16 nor AVX512-BF16, so bf16 "
                                       "matmuls are emulated, about 100x slower than fp32")
    warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert warned == ([] if cpu_bf16_feature() else [
        "model.dtype bf16 on a CPU with neither AMX-BF16 nor AVX512-BF16, so bf16 matmuls are emulated, about 100x "
        "slower than fp32; auto (or fp32) trains in fp32 here"])
    out = tmp_path / "paused"
    assert train(run_cfg(model_dir, out, model__dtype="bf16", train__stop_at_step=5))["status"] == "paused"
    assert main(["train", "--resume", str(out), "--set", "train.stop_at_step=null"]) == 0
    assert_bit_identical(out, whole)


def test_resume_refuses_a_change_of_maths(model_dir, tmp_path):
    out = tmp_path / "changed"
    train(run_cfg(model_dir, out, train__stop_at_step=2))
    code = main(["train", "--resume", str(out), "--set", "train.lr=1e-2"])
    assert code == 2
    with pytest.raises(ConfigError, match=r"train\.lr \(0\.002 -> 0\.01\)"):
        train(run_cfg(model_dir, out, train__lr=1e-2), resume=True)
    assert main(["train", "--resume", str(tmp_path / "never-ran")]) == 2  # the CLI needs RUN_DIR/config.yaml


def test_resume_of_a_never_started_or_completed_run(reference, model_dir, tmp_path):
    """train(cfg, resume=True) is safe to repeat: it starts, continues or returns the finished run."""
    out = tmp_path / "fresh"
    first = train(run_cfg(model_dir, out, train__checkpoint_every=2, train__keep_last=2), resume=True)
    assert first["status"] == "completed" and first["resumed_from_step"] == 0
    assert_bit_identical(out, reference)
    mtime = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = train(run_cfg(model_dir, out, train__checkpoint_every=2, train__keep_last=2), resume=True)
    assert again["status"] == "completed" and again["tokens_seen"] == first["tokens_seen"]
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime  # not retrained


def test_damaged_or_partial_checkpoints_are_ignored(reference, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    root = run / "checkpoints"
    (root / "step-000015").mkdir()  # no manifest: an interrupted write renamed by hand, say
    shutil.copy(root / "step-000014" / "adapter.safetensors", root / "step-000015" / "adapter.safetensors")
    assert latest_checkpoint(run).name == "step-000014"
    blob = root / "step-000014" / "optimizer.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the payload
    blob.write_bytes(bytes(data))
    assert "does not match the manifest" in verify(root / "step-000014")
    assert latest_checkpoint(run).name == "step-000012"


def write_run_dir(model_dir: Path, out: Path, **kw) -> None:
    """config.yaml only: `train --resume` starts such a directory from step 0."""
    out.mkdir(parents=True)
    cfg = run_cfg(model_dir, out, **kw)
    dump_config(cfg, out / "config.yaml")


def start_child(out: Path, code: str = CHILD) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-c", code, "train", "--resume", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll until ``predicate()``; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out; stderr: {proc.stderr.read().decode()[-2000:]}")


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_during_checkpoint_write(reference, model_dir, tmp_path):
    out = tmp_path / "killed-in-write"
    write_run_dir(model_dir, out, train__checkpoint_every=3)
    child = start_child(out, CHILD_PAUSED_IN_WRITE)
    writing = lambda: any((p / "trainer_state.json").exists()  # noqa: E731
                          for p in (out / "checkpoints").glob(".tmp-step-000006-*"))
    assert wait_for(writing, child), child.stderr.read().decode()[-2000:]
    sigkill(child)
    root = out / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-000003"]
    assert len(list(root.glob(".tmp-step-000006-*"))) == 1  # the half-written one, without a manifest
    assert json.loads((out / "summary.json").read_text())["status"] == "running"  # as a killed run leaves it
    train(run_cfg(model_dir, out, train__checkpoint_every=3), resume=True)
    assert_bit_identical(out, reference)
    assert not list(root.glob(".tmp-*"))  # cleaned when the resume started
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 3


@pytest.mark.slow
def test_sigkill_at_random_points(reference, model_dir, tmp_path):
    """Kill a checkpointing-every-step run three times at random moments of training, resume each time."""
    seed = int(os.environ.get("LORALAB_KILL_SEED", "7"))  # fixed, so a failure replays; vary it to explore
    rng = random.Random(seed)
    out = tmp_path / "killed"
    write_run_dir(model_dir, out, train__checkpoint_every=1, train__keep_last=2)
    kills = []
    for _ in range(3):
        lines_before = line_count(out)
        child = start_child(out)
        # wait until this session has trained at least one step, then a random moment more
        started = wait_for(lambda n=lines_before: line_count(out) > n, child)
        if not started:
            break  # it finished before a kill could land: nothing to resume
        time.sleep(rng.uniform(0.0, 0.5))
        if child.poll() is not None:
            break
        sigkill(child)
        kills.append(line_count(out))
    assert kills, f"no kill landed (seed {seed})"
    train(run_cfg(model_dir, out, train__checkpoint_every=1, train__keep_last=2), resume=True)
    assert_bit_identical(out, reference)
    assert len(complete_checkpoints(out / "checkpoints")) <= 2


def test_checkpoint_keeps_nan_scores(tmp_path):
    """A NaN eval value (e.g. a task with nothing scorable) is stored and read back, not a crash."""
    import math

    from loralab.train.checkpoint import TrainState, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = TrainState(step=2, micro_batch_size=1, eval_loss=float("nan"), task_history={"t/mc1": [0.5, float("nan")]})
    params = dict(model.named_parameters())
    ckpt = save_checkpoint(tmp_path, state, params=params, opt=opt, sched=sched)
    back = load_checkpoint(ckpt, params=params, opt=opt, sched=sched)
    assert back.step == 2 and math.isnan(back.eval_loss)
    assert back.task_history["t/mc1"][0] == 0.5 and math.isnan(back.task_history["t/mc1"][1])


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, every", [(signal.SIGINT, 130, 2), (signal.SIGTERM, 143, 0)])
def test_ctrl_c_leaves_the_run_interrupted_with_how_to_continue(reference, model_dir, tmp_path, sig, code, every):
    """SIGINT (Ctrl-C) or SIGTERM (kill, timeout, a batch scheduler) mid-run: exit 130 / 143,
    summary.json says interrupted and how to continue (it said running, as after a kill; for
    SIGTERM it still did), and --resume from its checkpoint ends where the uninterrupted run
    ends. Without checkpoints (train.checkpoint_every 0) it says that a resume starts from step 0."""
    out = tmp_path / "ctrl-c"
    write_run_dir(model_dir, out, train__checkpoint_every=every, train__keep_last=2)
    child = start_child(out, child_signalled_at(3, sig))
    assert child.wait(timeout=120) == code, child.stderr.read().decode()[-2000:]
    err = child.stderr.read().decode()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    how = f"continue it with: loralab train --resume {out}"
    if not every:
        how += " (it starts again from step 0: no checkpoint was written, train.checkpoint_every = 0)"
    assert summary["error"] == f"interrupted ({sig.name}); {how}"
    assert f"{out}: interrupted ({sig.name}); {how}" in err
    assert "\ninterrupted\n" not in err  # the run's own line is the message, with no bare one after it
    if every:  # from its checkpoint (from step 0 a resume is a fresh run, as every child here starts)
        train(run_cfg(model_dir, out, train__checkpoint_every=every, train__keep_last=2), resume=True)
        assert_bit_identical(out, reference)
