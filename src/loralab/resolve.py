"""Settings that follow from the model, the data and the machine, filled in before a run.

    cfg, notes = resolve_config(load_config("run.yaml"))
    cfg.train.micro_batch_size   # 16: "auto" became the largest divisor of the batch that fits
    notes                        # {"train.micro_batch_size": "auto: ..."} (why each value is what it is)

``loralab train`` and ``loralab study run`` both call this, so a study's runs and a single run
resolve alike. ``train.micro_batch_size: auto`` is the same maths as any other micro batch
(loralab's loss per step does not depend on it); it only decides how much of the device a
forward uses.
"""

from __future__ import annotations

import dataclasses
import os

from loralab.config import Config
from loralab.errors import LoralabError

CPU_SHARE = 0.5  # of physical RAM: leave the rest to other workers and the OS


def device_budget_bytes(device: str) -> int:
    """Memory one run may plan for: the GPU's total memory, or half of the machine's RAM."""
    if device.startswith("cuda"):  # cuda or cuda:N
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[1] * 0.9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CPU_SHARE)


def _device(cfg: Config) -> str:
    if cfg.model.device != "auto":
        return cfg.model.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_micro_batch(cfg: Config, *, budget_bytes: int | None = None) -> tuple[int, str]:
    """(largest divisor of train.batch_size whose estimated memory fits, why)."""
    from loralab.estimate import estimate_run, human_bytes

    device = _device(cfg)
    budget = budget_bytes if budget_bytes is not None else device_budget_bytes(device)
    probe = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=1))
    try:
        est = estimate_run(probe, budget_bytes=budget, device=device.split(":")[0])  # cuda:N estimates as cuda
    except LoralabError as exc:  # no estimate (the model cannot be described): the safe choice
        return 1, f"auto: no memory estimate ({str(exc).splitlines()[0]}), so micro batch 1"
    fits = est.max_micro_batch or 0
    batch = cfg.train.batch_size
    micro = max(d for d in range(1, batch + 1) if batch % d == 0 and (d <= fits or d == 1))
    why = (f"auto: the largest divisor of batch {batch} that the estimate fits in {human_bytes(budget)} "
           f"of {device} memory (fits up to {fits}); same maths as any micro batch")
    return micro, why


def resolve_config(cfg: Config, *, budget_bytes: int | None = None) -> tuple[Config, dict[str, str]]:
    """A copy of ``cfg`` with every ``auto`` value this module knows filled in, and
    {key: why} for each value it filled."""
    notes: dict[str, str] = {}
    if cfg.train.micro_batch_size == "auto":
        micro, notes["train.micro_batch_size"] = auto_micro_batch(cfg, budget_bytes=budget_bytes)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))
    return cfg, notes


def describe_hardware() -> dict[str, str]:
    """The machine a study is driven from: CPU, cores, RAM and GPU (name and memory)."""
    import platform

    out = {"cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count() or "?"),
           "ram": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            out["cpu"] = names[0]
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        out["gpu"] = "none"
    return out
