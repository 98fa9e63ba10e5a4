"""A group's set-up before its first step: data and tasks checked, base loaded, adapters in."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from loralab.config import Config
from loralab.data.dataset import Splits
from loralab.errors import ConfigError
from loralab.models import (
    base_dropout,
    check_optimizer_device,
    load_base,
    load_tokenizer,
    pick_device,
    read_config,
)
from loralab.resolve import resolve_data
from loralab.train import distributed
from loralab.train.compiled import CompileReport
from loralab.train.group_adapters import GroupAdapters
from loralab.train.step import packed_attention, plan_steps, seed_everything

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """Everything loaded before the first step; bad input fails while building it."""

    adapters: GroupAdapters
    tokenizer: Any
    splits: Splits
    tasks: list
    device: torch.device
    attention: str | None
    fp16: bool = False  # the base computes in fp16: gradients go through a GradScaler
    compiled: CompileReport = CompileReport(False, "not trained yet")  # train.compile, decided as training starts


def load_group(cfgs: list[Config], kind: type[GroupAdapters], *, progress: bool = False) -> Setup:
    """Read and check the data and evaluation tasks (with the tokenizer and config.json: bad
    data fails before any weights load), then load the base once and put in the runs' adapters
    with ``kind`` (``progress``: transformers' loading bar, on a terminal)."""
    cfg = cfgs[0]  # every shared key is equal across a group (fused.check_group)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.model.device)
    check_optimizer_device(cfg.train.optimizer, device)  # paged optimizers: CUDA only, refused before loading
    # config.json first: a hub id that cannot be reached fails there once, not again for each of
    # the files the tokenizer looks for
    model_config = read_config(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    splits, tasks = load_data_and_tasks(cfg, model_config, tokenizer)
    base, tokenizer = load_base(cfg.model, cfg.quant, progress=progress, tokenizer=tokenizer)
    if len(cfgs) > 1 or distributed.world_size() > 1:
        note_base_dropout(base, runs=len(cfgs), processes=distributed.world_size())
    attention = packed_attention(cfg, base)  # a property of the base, checked before the adapters go in
    # Adapters are seeded per run: a group resumed with fewer runs still rebuilds the same ones.
    adapters = kind.attach(base, cfgs)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(base, cfg.model.path)
    distributed.shard(adapters.model)  # distributed.strategy fsdp on several processes: base and adapters sharded
    trainable, total = adapters.counts(min(k for k in range(len(cfgs)) if k not in adapters.rejected))
    # debug: the run's summary says it; at info it read as PEFT's own line beside loralab's (-v shows it)
    log.debug("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}",
              100 * trainable / total)
    return Setup(adapters, tokenizer, splits, tasks, device, attention, needs_grad_scaler(base, cfg.train.autocast))


def note_base_dropout(base, *, runs: int, processes: int) -> None:
    """Say so when the base's own dropout (GPT-2's and OPT's configs turn it on) trains in a fused
    group or on several processes: its masks come from the process's random stream, so such a run
    equals its solo, one-process run in distribution, not number for number (LoRA's own masks are
    drawn per run, loralab.train.group)."""
    found = base_dropout(base)
    if not found:
        return
    where = f"fused with {runs - 1} other run(s)" if runs > 1 else f"on {processes} processes"
    said = ", ".join(f"{name} p {p:g}" for name, p in list(found.items())[:4]) + (", ..." if len(found) > 4 else "")
    log.warning("note: the base model's own dropout is on in training (%s), as transformers' Trainer trains it; "
                "its masks come from the process's random stream, so this run %s equals its solo, one-process "
                "run in distribution, not number for number (LoRA's own dropout is drawn per run)", said, where)


def needs_grad_scaler(model, autocast: str) -> bool:
    """Whether the forward computes in fp16, read from the loaded model (fp16 weights, or 4-bit
    layers with an fp16 compute dtype), whatever config key set it, or from train.autocast."""
    if autocast == "fp16":
        return True
    return any(p.dtype == torch.float16 for p in model.parameters()) or any(
        getattr(m, "compute_dtype", None) == torch.float16 for m in model.modules())


def enable_activation_checkpointing(base, model_path: str) -> None:
    """train.gradient_checkpointing: transformers' non-reentrant activation checkpointing of every
    decoder layer (non-reentrant: gradients reach the adapters though the frozen inputs need none).
    A fused group's backward runs inside its row routing, so recomputed forwards route as the first."""
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(base).__name__} ({model_path}) does not support "
                          "activation checkpointing; set it to false")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_data_and_tasks(cfg: Config, model_config, tokenizer) -> tuple[Splits, list]:
    """The run's splits, checked against the model's context (``model_config``: its transformers
    config, or the model), and its evaluation tasks (resolved before training, so a bad task file
    fails at once)."""
    model_config = getattr(model_config, "config", model_config)
    splits = resolve_data(cfg, tokenizer, model_config)  # data.max_seq_length: auto, as loralab tune resolves it
    if splits.truncated_to_nothing:
        log.warning("%d examples lost every response token to truncation at max_seq_length=%d and were skipped",
                    splits.truncated_to_nothing, cfg.data.max_seq_length)
    warn_if_warmup_outlasts(cfg, plan_steps(cfg, len(splits.train)))
    tasks = []
    if cfg.eval.tasks:
        from loralab.evaluate.task_list import resolve_tasks
        from loralab.evaluate.tasks import Task

        tasks = resolve_tasks(",".join(cfg.eval.tasks), cfg.eval.limit)
        template = "chat" if splits.stats["format"] == "messages" else cfg.data.template
        for t in tasks:  # prompted as the run's examples are (a run on chat data: its chat template)
            if isinstance(t, Task):
                t.template = template
    return splits, tasks


def warn_if_warmup_outlasts(cfg: Config, steps: int) -> None:
    """train.warmup_steps beyond the run's steps: the learning rate never reaches train.lr."""
    warmup = cfg.train.warmup_steps
    if warmup > steps:
        log.warning("WARNING: train.warmup_steps = %d is more than the run's %d step%s: the learning rate never "
                    "reaches train.lr = %g (it peaks at %d/%d of it, %.3g); set train.warmup_steps %s",
                    warmup, steps, "" if steps == 1 else "s", cfg.train.lr, steps, warmup,
                    cfg.train.lr * steps / warmup, "to 0" if steps == 1 else f"below {steps}")
