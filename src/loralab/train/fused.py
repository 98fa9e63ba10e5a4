"""Several LoRA runs trained together over one frozen base, in one process.

    from loralab.train.fused import fuse_key, train_fused
    groups: dict[tuple, list[Config]] = {}
    for cfg in cfgs:                       # runs with equal keys can share a base
        groups.setdefault(fuse_key(cfg), []).append(cfg)
    for group in groups.values():
        summaries = train_fused(group)     # one summary per run, in order
    train_fused(group, resume=True)        # after a kill: each run from its newest checkpoint

A fused group is a group of K runs in the training core (loralab.train.core), the loop a solo
run also goes through: the base is loaded once; each step builds the shared micro batches
once (every run of a group sees the same data in the same order), stacks one copy per run
along the batch dimension, and runs the base once over all of them; run k's rows go through
run k's own adapters (loralab.train.group). Losses, gradient clipping, optimizer, schedule,
metrics, checkpoints and the run directory are each run's own, exactly as train(cfg) writes
them, with two additions to summary.json: "fused_with" (the other run directories of the
group) and "fused" (the group's size and its shared times, attributed in equal shares). Each
run has its own tracker runs (loralab.track), fed as it trains, as a solo run's are.

With lora.dropout = 0 a fused run follows its solo run within float rounding (the tests hold
loss curves to 1e-4 relative); with dropout the masks come from a different random stream.
A run that diverges stops alone (status diverged); the rest of the group trains on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from loralab.config import Config
from loralab.errors import ConfigError
from loralab.rundir import default_run_dir
from loralab.train.core import Prune, run_group
from loralab.train.group import refuse_dora
from loralab.train.group_adapters import FusedAdapters

__all__ = ["PER_RUN_KEYS", "Prune", "check_group", "fuse_key", "train_fused"]

log = logging.getLogger(__name__)

# The keys runs of one group may differ in: the adapter, its optimizer and schedule, and where
# the run is written. Every other key (base, quantization, dtype, data, seed, batch sizes,
# steps, evaluation, and any key added later) must be equal, so the shared forward is the
# forward each run would have done alone.
PER_RUN_KEYS: dict[str, set[str]] = {
    "lora": {"r", "alpha", "dropout", "rslora", "init", "targets"},
    "train": {"optimizer", "lr", "momentum", "betas", "weight_decay", "scheduler", "warmup_steps",
              "grad_clip", "log_every", "on_nonfinite"},
    "output": {"dir", "save_adapter"},
}


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):  # data.columns
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def fuse_key(cfg: Config) -> tuple:
    """Runs with equal keys can be trained together by train_fused.

    Raises ConfigError for a run that can never be fused (DoRA, distributed.strategy fsdp):
    train it alone. Checkpoints, stop_at_step, auto micro batch and activation checkpointing
    are shared keys: a group has them as a solo run does.
    """
    refuse_dora(cfg.lora)
    if cfg.distributed.strategy == "fsdp":
        raise ConfigError("distributed.strategy fsdp: a run sharded over several processes cannot be fused (a fused "
                          "group trains on one process); train it alone, or set distributed.strategy=ddp")
    if cfg.distributed.nproc > 1:
        raise ConfigError(f"distributed.nproc {cfg.distributed.nproc}: a run on several processes trains alone (a "
                          "fused group trains on one process)")
    return tuple(
        (f"{section}.{key}", _hashable(value))
        for section, values in cfg.to_dict().items()
        for key, value in values.items()
        if key not in PER_RUN_KEYS.get(section, set())
    )


def check_group(cfgs: list[Config]) -> None:
    """ConfigError unless every config fuses with the first and the run directories differ."""
    if not cfgs:
        raise ConfigError("train_fused needs at least one config")
    first = fuse_key(cfgs[0])
    for k, cfg in enumerate(cfgs[1:], 1):
        key = fuse_key(cfg)
        if key != first:
            diff = [f"{name} ({a!r} vs {b!r})" for (name, a), (_, b) in zip(first, key, strict=True) if a != b]
            raise ConfigError(f"runs 0 and {k} cannot be fused: they differ in {', '.join(diff)}; "
                              "only lora.*, the optimizer and schedule keys, and output.* may differ")
    dirs = [c.output.dir for c in cfgs if c.output.dir]
    repeated = sorted({d for d in dirs if dirs.count(d) > 1})
    if repeated:
        raise ConfigError(f"output.dir {repeated[0]} is given to more than one run of the group")


def group_dirs(cfgs: list[Config]) -> list[Path]:
    """Each run's directory: output.dir, else one timestamped stem for the group with -0, -1, ..."""
    stem = default_run_dir(cfgs[0].model.path)
    return [Path(c.output.dir) if c.output.dir else stem.with_name(f"{stem.name}-{k}") for k, c in enumerate(cfgs)]


def train_fused(cfgs: list[Config], show_progress: bool = False, prune: Prune | None = None,
                resume: bool = False) -> list[dict[str, Any]]:
    """Train ``cfgs`` (one fuse_key) together; one summary per run, in order. With ``prune``,
    successive halving runs inside the group (runs stopped at a rung end stopped_early).

    Every run directory always gets its summary.json. A run that diverges is recorded as
    diverged and the others go on; a failure of the whole group (loading, data, memory) is
    recorded in every unfinished run and raised, as train(cfg) raises. ``resume=True``
    continues each run from its newest complete checkpoint (all from the newest step every
    unfinished run has); a run already completed, diverged or stopped early returns its summary.
    """
    from loralab.resolve import resolve_config

    cfgs = [resolve_config(c)[0] for c in cfgs]  # train.micro_batch_size: auto -> a number
    check_group(cfgs)
    if resume and not all(c.output.dir for c in cfgs):
        raise ConfigError("resume needs output.dir for every run of the group: the run directories to continue")
    run_dirs = group_dirs(cfgs)
    others = {str(d): [str(o) for o in run_dirs if o != d] for d in run_dirs}
    summaries, _ = run_group(cfgs, run_dirs, FusedAdapters, resume=resume, show_progress=show_progress, prune=prune,
                             group_extra=lambda path: {"fused_with": others[str(path)]})
    return summaries
