"""At most one host-device sync per optimizer step in loralab's hot path, solo and fused.

On a GPU every ``item()``, ``tolist()``, ``nonzero()``, ``int(t)``, ``float(t)`` and
``bool(t)`` of a device tensor waits for the device. There is no GPU here, so the counter
patches those methods and counts the calls made from loralab's own code during training,
except where loralab works on host batches before they move (``core.host_layout``) and in
evaluation, which is not the hot path.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

import loralab.train.attention as attention
import loralab.train.core as core
import loralab.train.step as step
from conftest import make_cfg
from loralab.train.fused import train_fused
from loralab.train.loop import train

SYNCING = ("item", "tolist", "nonzero", "__int__", "__float__", "__bool__")
LORALAB = str(Path(core.__file__).resolve().parents[1])


class SyncCounter:
    def __init__(self, monkeypatch):
        self.count, self.where, self.paused = 0, [], 0
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self.counting(getattr(torch.Tensor, name), name))

    def counting(self, original, name: str):
        counter = self

        def wrapped(t, *args, **kwargs):
            caller = sys._getframe(1)
            if not counter.paused and caller.f_code.co_filename.startswith(LORALAB):
                counter.count += 1
                counter.where.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(t, *args, **kwargs)

        return wrapped

    def pause_in(self, monkeypatch, module, name: str) -> None:
        original = getattr(module, name)

        def paused(*args, **kwargs):
            self.paused += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.paused -= 1

        monkeypatch.setattr(module, name, paused)


@contextlib.contextmanager
def counting_syncs(monkeypatch):
    counter = SyncCounter(monkeypatch)
    counter.pause_in(monkeypatch, core, "host_layout")
    counter.pause_in(monkeypatch, core, "evaluate")
    counter.pause_in(monkeypatch, attention, "_agrees_alone")  # set-up: the one check of packed attention
    yield counter


STEPS = 4
KW = dict(train__max_steps=STEPS, train__batch_size=4, train__micro_batch_size=2, eval__every=0, data__limit=16,
          data__val_max_examples=4, lora__dropout=0.0, train__optimizer="sgd", train__momentum=0.9)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def test_solo_step_syncs_once(model_dir, tmp_path, monkeypatch):
    with counting_syncs(monkeypatch) as syncs:
        summary = train(make_cfg(model_dir, tmp_path / "solo", **KW))
    assert summary["status"] == "completed"
    # two micro batches a step: per-micro-batch syncs would make it at least 2 * STEPS
    assert syncs.count <= STEPS, syncs.where
    assert syncs.count == STEPS and all("tolist" in w for w in syncs.where)  # the one: losses and norms read together


def test_fused_step_syncs_once(model_dir, tmp_path, monkeypatch):
    cfgs = [make_cfg(model_dir, tmp_path / f"f{i}", **KW, lora__r=2 + 2 * i, train__lr=1e-3 * (i + 1))
            for i in range(3)]
    with counting_syncs(monkeypatch) as syncs:
        out = train_fused(cfgs)
    assert [s["status"] for s in out] == ["completed"] * 3
    # three runs: a per-run loss or gradient norm read would make it at least 3 * STEPS
    assert syncs.count <= STEPS, syncs.where
    assert syncs.count == STEPS and all("tolist" in w for w in syncs.where)  # the one: losses and norms read together


def test_the_counter_sees_a_sync(monkeypatch):
    """The counter is live: a loralab-side item() counts (so the budgets above can fail)."""
    with counting_syncs(monkeypatch) as syncs:
        step.finite_or_none(torch.tensor(1.0).item())  # called from this test file: not counted
        step.count_labels(torch.tensor([[0, 5, 6]]))  # loralab code, outside host_layout: counted
    assert syncs.count == 1 and "step.py" in syncs.where[0]
