"""What CUDA would see, simulated on CPU: the RNG state a checkpoint keeps (the training
device's only, resumable on any device layout) and the peak memory a run reports."""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

import loralab.train.checkpoint as ckpt
import loralab.train.core as core
from conftest import make_cfg
from loralab.estimate import CUDA_CONTEXT
from loralab.rundir import RunDir
from loralab.train.checkpoint import TrainState, load_checkpoint, rng_parts, save_checkpoint
from loralab.train.measure import PeakMemory


class FakeCuda:
    """torch.cuda's generator functions for ``n`` simulated GPUs: GPU i's state is 64 bytes of i."""

    def __init__(self, monkeypatch, n: int):
        self.n, self.set_calls = n, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(i) for i in range(self.n)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def index(self, device) -> int:
        d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        index = d.index if d.index is not None else 0
        if index >= self.n:
            raise RuntimeError(f"invalid device ordinal {index} (of {self.n})")
        return index

    def get(self, device="cuda") -> torch.Tensor:
        return torch.full((64,), self.index(device), dtype=torch.uint8)

    def set(self, state: torch.Tensor, device="cuda") -> None:
        self.set_calls.append((self.index(device), int(state[0])))

    def set_all(self, states) -> None:
        raise AssertionError("restores every GPU's state: fails with fewer GPUs than were saved")


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def tiny_training_objects():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_checkpoint_keeps_the_training_device_rng_only(monkeypatch):
    FakeCuda(monkeypatch, 8)
    tensors, _ = rng_parts(torch.device("cuda", 3))
    assert sorted(tensors) == ["torch_cpu", "torch_device"]
    assert torch.equal(tensors["torch_device"], torch.full((64,), 3, dtype=torch.uint8))
    assert sorted(rng_parts(torch.device("cpu"))[0]) == ["torch_cpu"]  # a CPU run keeps no GPU state


def test_checkpoint_saved_with_8_gpus_resumes_with_1(monkeypatch, tmp_path):
    FakeCuda(monkeypatch, 8)
    model, opt, sched = tiny_training_objects()
    path = save_checkpoint(tmp_path, TrainState(step=1), params=trainable(model), opt=opt, sched=sched,
                           device=torch.device("cuda", 5))
    one = FakeCuda(monkeypatch, 1)  # a study child sees one GPU
    state = load_checkpoint(path, params=trainable(model), opt=opt, sched=sched, device=torch.device("cuda", 0))
    assert state.step == 1
    assert one.set_calls == [(0, 5)]  # the training device's state, onto the one GPU there is


def test_legacy_checkpoint_with_every_gpu_restores_the_right_one(monkeypatch, tmp_path):
    """Format-1 checkpoints kept torch_cuda_<i> for all GPUs; with 11 of them, a string sort
    would put torch_cuda_10 second. The training device's own entry is the one restored."""
    model, opt, sched = tiny_training_objects()
    path = save_checkpoint(tmp_path, TrainState(step=1), params=trainable(model), opt=opt, sched=sched)
    save_file({"torch_cpu": torch.get_rng_state(),
               **{f"torch_cuda_{i}": torch.full((64,), i, dtype=torch.uint8) for i in range(11)}},
              str(path / "rng.safetensors"))
    fake = FakeCuda(monkeypatch, 11)
    ckpt._restore_rng(path, torch.device("cuda", 10))
    assert fake.set_calls == [(10, 10)]


def patch_cuda_memory(monkeypatch, reserved_peak: int) -> dict[str, int]:
    calls = {"reset": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: reserved_peak)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved_peak // 2)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: reserved_peak // 4)

    def reset(device=None):
        calls["reset"] += 1

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    return calls


def test_cuda_peak_is_reserved_memory_plus_context(monkeypatch):
    patch_cuda_memory(monkeypatch, 3 << 30)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: the estimate's context size
    assert PeakMemory(torch.device("cuda", 0)).bytes() == (3 << 30) + CUDA_CONTEXT


def test_cuda_context_from_nvml_for_this_process(monkeypatch):
    import os
    import types

    patch_cuda_memory(monkeypatch, 2 << 30)

    class NVMLError(Exception):
        pass

    proc = types.SimpleNamespace
    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [proc(pid=os.getpid() + 1, usedGpuMemory=9 << 30),
                                                          proc(pid=os.getpid(), usedGpuMemory=(1 << 30) + (300 << 20))])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    # NVML's 1.3 GiB for this process, minus the 1 GiB torch holds now: 300 MiB of context
    assert PeakMemory(torch.device("cuda", 0)).bytes() == (2 << 30) + (300 << 20)


def test_peak_is_reset_when_the_micro_batch_changes(monkeypatch, tmp_path):
    calls = patch_cuda_memory(monkeypatch, 1 << 30)
    cfg = make_cfg("builtin:tiny", tmp_path / "r", train__batch_size=8, train__micro_batch_size=4)
    runs = [core.Run(k, cfg, RunDir(tmp_path / f"r{k}"), {}, state=TrainState(micro_batch_size=4)) for k in range(2)]
    core.halve_micro_batch(cfg, runs, done=3, peak=PeakMemory(torch.device("cuda", 0)), where="in training")
    assert calls["reset"] == 1
    assert cfg.train.micro_batch_size == 2
    for r in runs:
        assert r.state.micro_batch_size == 2 and r.state.micro_batches == 3 * 4
        assert r.state.micro_batch_changes == [{"step": 4, "from": 4, "to": 2}]


def test_cpu_peak_is_the_process_rss():
    assert PeakMemory(torch.device("cpu")).bytes() > 50 << 20
