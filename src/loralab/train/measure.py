"""Measurements: peak memory of the run and library versions."""

from __future__ import annotations

import os
import resource
import sys

import torch


class PeakMemory:
    """The process's peak memory on the training device, as the estimate counts it.

    CUDA: the caching allocator's peak reserved bytes (what the process held, cache included,
    not only what tensors used) plus the CUDA context, which the allocator never sees (NVML's
    figure for this process where pynvml is installed, else loralab.estimate's 0.5 GiB).
    CPU: the process's own peak resident set size (:func:`own_peak_rss`). ``reset()`` starts a
    new peak (auto micro batch calls it when it halves the micro batch, so the peak is the size
    the run goes on with).
    """

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_reserved(self.device)) + cuda_context_bytes(self.device)
        hwm = own_peak_rss()
        if hwm is not None:
            return hwm
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def own_peak_rss() -> int | None:
    """The peak resident set of this process's own memory (Linux: VmHWM), None elsewhere.
    Not ``ru_maxrss``: Linux carries that over from the parent across fork and exec, so a unit
    a study starts (its parent holding torch) would report at least the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def cuda_context_bytes(device: torch.device) -> int:
    """Device memory this process holds outside torch's allocator (context, kernels)."""
    from loralab.estimate import CUDA_CONTEXT

    try:
        import pynvml
    except ImportError:
        return CUDA_CONTEXT
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        used = next((p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                     if p.pid == os.getpid() and p.usedGpuMemory), None)
    except pynvml.NVMLError:
        return CUDA_CONTEXT
    if used is None:  # e.g. inside a container whose PIDs NVML does not see
        return CUDA_CONTEXT
    return max(0, int(used) - int(torch.cuda.memory_reserved(device)))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("loralab", "torch", "transformers", "peft", "bitsandbytes", "safetensors", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out
