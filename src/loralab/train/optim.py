"""Optimizers and learning-rate schedules, chosen by name through explicit branches."""

from __future__ import annotations

import math

import torch

from loralab.config import TrainConfig
from loralab.errors import ModelError


def build_optimizer(params: list[torch.nn.Parameter], t: TrainConfig) -> torch.optim.Optimizer:
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed lr (the schedule below drives it), as the seeds' Trainer runs use it.
        return Adafactor(params, lr=t.lr, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ModelError("train.optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if t.optimizer in ("paged_adamw", "paged_adamw8bit"):  # on CUDA only (models.check_optimizer_device)
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ModelError(f"train.optimizer {t.optimizer} needs bitsandbytes (pip install bitsandbytes)") from None
        paged = bnb.optim.PagedAdamW if t.optimizer == "paged_adamw" else bnb.optim.PagedAdamW8bit
        return paged(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    raise ValueError(t.optimizer)


def lr_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(kind)


def build_scheduler(opt: torch.optim.Optimizer, t: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total=total_steps, warmup=t.warmup_steps, kind=t.scheduler)
    )
