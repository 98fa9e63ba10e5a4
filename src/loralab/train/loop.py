"""One LoRA / QLoRA fine-tuning run, measured, written to a run directory.

    from loralab.config import load_config
    from loralab.train.loop import train
    summary = train(load_config("run.yaml", ["lora.r=16"]))

A solo run is a group of one in the training core (loralab.train.core), which also trains
fused groups (loralab.train.fused): both have the same loop, checkpoints and summary.
The run directory (loralab.rundir) holds config.yaml (resolved), metrics.jsonl,
summary.json, adapter/ (PEFT format) and, with train.checkpoint_every or
train.stop_at_step, checkpoints/. summary.json is written at the start (status running) and
at the end: completed, paused (train.stop_at_step), invalid (bad config, data or model found
before the first step), failed, diverged or out_of_memory, so a run always says why it ended.

    train(cfg, resume=True)   # continue cfg.output.dir from its newest complete checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loralab.config import Config
from loralab.errors import ConfigError
from loralab.resolve import resolve_config
from loralab.rundir import run_dir_of
from loralab.train.core import raise_if_diverged, run_group
from loralab.train.evaluation import evaluate_losses
from loralab.train.group_adapters import SoloAdapters


def evaluate_loss(model, examples, *, batch_size: int, pad_id: int, device, autocast: str) -> float:
    """Mean cross-entropy per response token of a (PEFT or plain) model over ``examples``."""
    return evaluate_losses(SoloAdapters(model), [0], examples, batch_size=batch_size, pad_id=pad_id,
                           device=device, autocast=autocast)[0]


@dataclass
class Trained:
    """A run's summary and, when this call trained it, its PEFT model and tokenizer (None for a
    run a resume found completed)."""

    summary: dict[str, Any]
    model: Any = None
    tokenizer: Any = None


def train(cfg: Config, *, show_progress: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg``; always leaves summary.json. Raises LoralabError after recording a failure
    (DivergedError, exit code 3, for a run stopped by a non-finite loss or gradient).

    ``resume=True`` continues ``cfg.output.dir`` from its newest complete checkpoint (from
    step 0 when there is none, or when the directory was never started); a completed run is
    returned as it is, so re-running a study is safe.
    """
    return train_with_model(cfg, show_progress=show_progress, resume=resume).summary


def train_with_model(cfg: Config, *, show_progress: bool = False, resume: bool = False) -> Trained:
    """As :func:`train`, keeping the trained model and its tokenizer (quickstart, tests)."""
    if resume and not cfg.output.dir:
        raise ConfigError("resume needs output.dir: the run directory to continue")
    cfg = resolve_config(cfg)[0]  # train.micro_batch_size: auto -> a number, as a study resolves it
    run_dir = run_dir_of(cfg)
    (summary,), setup = run_group([cfg], [run_dir], SoloAdapters, resume=resume, show_progress=show_progress)
    raise_if_diverged(summary)
    if setup is None:
        return Trained(summary)
    return Trained(summary, setup.adapters.model, setup.tokenizer)
