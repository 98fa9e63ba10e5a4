"""fp16 training: a GradScaler per run when the base computes in fp16 (read from the loaded
model) or with train.autocast=fp16; its state goes into checkpoints. Run on CPU (torch
supports fp16 autocast there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_cfg
from loralab.train.loop import train
from loralab.train.setup import needs_grad_scaler

KW = dict(train__max_steps=4, train__batch_size=4, train__micro_batch_size=2, train__lr=3e-3, lora__dropout=0.0,
          data__limit=16, data__val_max_examples=4, eval__every=0, train__autocast="fp16")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def test_scaler_follows_the_model_compute_dtype(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert not needs_grad_scaler(model, "none") and not needs_grad_scaler(model, "bf16")
    assert needs_grad_scaler(model, "fp16")
    assert needs_grad_scaler(model.half(), "none")  # fp16 weights, whatever config key loaded them


def test_fp16_training_checkpoints_its_scaler_and_resumes_exactly(model_dir, tmp_path):
    full = train(make_cfg(model_dir, tmp_path / "full", **KW))
    fp32 = train(make_cfg(model_dir, tmp_path / "fp32", **{**KW, "train__autocast": "none"}))
    assert full["status"] == "completed" and full["skipped_steps"] == 0
    # fp16 rounding, not a different run
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "fp32"), rel=2e-2)
    assert full["final_eval_loss"] == pytest.approx(fp32["final_eval_loss"], rel=2e-2)
    paused = train(make_cfg(model_dir, tmp_path / "resumed", **KW, train__stop_at_step=2))
    assert paused["status"] == "paused"
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 65536.0 and state["grad_scaler"]["_growth_tracker"] == 2
    train(make_cfg(model_dir, tmp_path / "resumed", **KW), resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("resumed", "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)
