"""Evaluation during training: validation losses in shared forwards, tasks run by run."""

from __future__ import annotations

import math

import torch

from loralab.config import Config
from loralab.data.dataset import Example, collate
from loralab.rundir import Status
from loralab.train import distributed
from loralab.train.checkpoint import TrainState
from loralab.train.group_adapters import GroupAdapters, run_losses
from loralab.train.runs import Run, fails_alone
from loralab.train.setup import Setup
from loralab.train.step import count_labels, finite_or_none, label_positions, to_device


@torch.no_grad()
def evaluate_losses(adapters: GroupAdapters, runs: list[int], examples: list[Example], *, batch_size: int,
                    pad_id: int, device: torch.device, autocast: str) -> list[float]:
    """Each run's (by index) mean cross-entropy per response token over ``examples`` (one
    forward per batch for all of them)."""
    if not examples:
        return [float("nan")] * len(runs)
    model = adapters.model
    was_training = model.training
    model.eval()
    totals, count = torch.zeros(len(runs), dtype=torch.float64, device=device), 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, torch.device("cpu"))
        count += count_labels(batch["labels"])
        batch["positions"] = label_positions(batch["labels"])
        batch = to_device(batch, device)
        with adapters.routed(runs, rows_each=batch["input_ids"].shape[0]):
            totals += run_losses(model, batch, len(runs), autocast)
    model.train(was_training)
    return [t / max(1, count) for t in totals.tolist()]


def run_eval_tasks(model, tokenizer, tasks, *, batch_size: int) -> dict[str, float]:
    """Each task's metrics as {"task/metric": value}, for metrics.jsonl and the summary."""
    model.eval()
    out = {}
    for t in tasks:
        for metric, score in t.run(model, tokenizer, batch_size=batch_size).items():
            out[f"{t.name}/{metric}"] = score.value
    model.train()
    return out


def eval_batch_size(data_cfg: Config, state: TrainState, device: torch.device) -> int:
    """Examples per evaluation forward. On an accelerator the micro batch, the size the memory
    estimate checked. On CPU at least 8: no gradients are kept, memory is rarely the limit, and a
    micro batch of 1 would score the validation set one example at a time (a fifth of a short
    run's time); once an out-of-memory has shrunk the micro batch, the micro batch."""
    micro = data_cfg.train.micro_batch_size
    return micro if device.type != "cpu" or state.micro_batch_changes else max(micro, 8)


def evaluate(setup: Setup, runs: list[Run], *, step: int, batch_size: int) -> None:
    """Validation loss of every run in shared forwards, tasks run by run; into metrics.jsonl
    and each run's state."""
    runs = [r for r in runs if r.status is Status.RUNNING]  # a retried evaluation skips runs that ended in the last try
    cfg = runs[0].cfg
    values: dict[int, dict] = {}
    # several ranks: an out-of-memory on any rank is raised on every rank before anything is written
    with distributed.out_of_memory_together("in evaluation", cfg.distributed.timeout_s):
        losses = evaluate_losses(setup.adapters, [r.index for r in runs], setup.splits.val, batch_size=batch_size,
                                 pad_id=setup.tokenizer.pad_token_id, device=setup.device, autocast=cfg.train.autocast)
        for run, eval_loss in zip(runs, losses, strict=True):
            state = run.state
            state.eval_loss = finite_or_none(eval_loss)
            if state.eval_loss is not None:
                state.best_eval_loss = min(state.best_eval_loss or math.inf, state.eval_loss)
            with setup.adapters.only(run.index), fails_alone(run, runs, f"evaluation at step {step}"):
                values[run.index] = run_eval_tasks(setup.adapters.model, setup.tokenizer, setup.tasks,
                                                   batch_size=batch_size)
    for run, eval_loss in zip(runs, losses, strict=True):
        if run.status is not Status.RUNNING:
            continue
        for k, v in values[run.index].items():
            run.state.task_history.setdefault(k, []).append(v)
        run.metrics.write(step=step, eval_loss=eval_loss if setup.splits.val else None,
                          tokens_seen=run.state.tokens_seen, **values[run.index])
