"""Starting a group's runs, fresh or from their common checkpoint; what a resume may change."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from loralab.config import Config, TrackingConfig, absolute_local_paths, flat_keys, load_config
from loralab.data.dataset import fingerprint_change
from loralab.errors import ConfigError, ResumeRefused
from loralab.rundir import MetricsWriter, RunDir, checkpoint_step_of, trim_metrics
from loralab.train import distributed
from loralab.train.checkpoint import (
    MANIFEST,
    TrainState,
    arithmetic_settings,
    clean_temporaries,
    complete_checkpoints,
    load_checkpoint,
    recorded_data,
    verify,
)
from loralab.train.group_adapters import GroupAdapters
from loralab.train.optim import build_optimizer, build_scheduler
from loralab.train.runs import Run

log = logging.getLogger(__name__)

# Keys that ``--resume`` may change: they decide when to stop, log or checkpoint, never the
# maths of a step, so the resumed run still equals an uninterrupted one.
RESUME_MAY_CHANGE = frozenset({
    "train.stop_at_step", "train.checkpoint_every", "train.keep_last", "train.log_every",
    "train.auto_micro_batch", "output.dir", "output.save_adapter",
}) | {f"tracking.{f.name}" for f in dataclasses.fields(TrackingConfig)} | {
    "distributed.strategy", "distributed.nproc", "distributed.timeout_s"}  # how the ranks share a step, not its maths


def check_resume_config(cfg: Config, run_dir: RunDir) -> None:
    """Refuse a resume whose config changes anything but RESUME_MAY_CHANGE."""
    if not run_dir.config.is_file():
        return  # never started: the run starts from step 0
    saved_cfg = load_config(run_dir.config)
    absolute_local_paths(saved_cfg)  # a run recorded with paths relative to this directory (older loralab)
    saved = flat_keys(saved_cfg.to_dict())
    now = flat_keys(cfg.to_dict())
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        detail = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed)
        raise ConfigError(
            f"cannot resume {run_dir.root} with a changed {detail}: the result would no longer equal an "
            f"uninterrupted run; on resume only {', '.join(sorted(RESUME_MAY_CHANGE))} may change"
        )


def resume_config(run_dir: str | Path, overrides: list[str], *, force: bool, force_how: str = "--force",
                  set_how: str = "--set {}") -> Config:
    """The config a resume of ``run_dir`` trains with (its config.yaml, ``overrides`` applied),
    after the checks every resume makes before anything loads, for the command line and the
    Python API alike: a changed key outside RESUME_MAY_CHANGE is refused (a launcher's ranks
    skip this: their launcher checked it), and so is another base than the one the run trained
    on, unless ``force``. ``force_how`` and ``set_how`` spell force and an override as the
    caller takes them, for the messages."""
    from loralab.preflight import check_adapter_base
    from loralab.rundir import CONFIG

    run = RunDir(run_dir)
    if not run.config.is_file():
        raise ConfigError(f"resume {run.root}: no {CONFIG} there, so it is not a loralab run directory")
    cfg = load_config(run.config, list(overrides) + [f"output.dir={run.root}"])
    if not distributed.launched():
        absolute_local_paths(cfg)  # as the run compares them: a run recorded with relative paths (older loralab)
        check_resume_config(cfg, run)
    check_not_paused_again(run, cfg, set_how)
    check_adapter_base(run.root, cfg.model.path, force=force, trust_remote_code=cfg.model.trust_remote_code,
                       force_how=force_how, fix="put the base it trained on back at model.path")
    return cfg


def check_not_paused_again(run: RunDir, cfg: Config, set_how: str = "--set {}") -> None:
    """Say so when a paused run is resumed with the train.stop_at_step it paused at: it pauses
    again at once (a warning, not an error: a study's driver may resume a run to the same rung)."""
    from loralab.rundir import Status

    summary = run.read_summary() or {}
    at, stop = summary.get("steps_done"), cfg.train.stop_at_step
    if summary.get("status") == Status.PAUSED and at is not None and stop is not None and stop <= at:
        log.warning("WARNING: resume %s: the run is paused at step %d by train.stop_at_step = %d and pauses again at "
                    "once; finish it with %s, or pause later with %s (N > %d)", run.root, at, stop,
                    set_how.format("train.stop_at_step=null"), set_how.format("train.stop_at_step=N"), at)


def resume_step(runs: list[Run]) -> int:
    """The newest step at which every run has a complete checkpoint (0: none). The runs of a
    group save at the same steps and prune only once all have saved, so after a kill in the
    middle of a save the previous step is still there for every run."""
    for run in runs:
        if run.dir.checkpoints.is_dir() and distributed.writes():
            clean_temporaries(run.dir.checkpoints)  # half-written by a killed session
    first = runs[0]
    for path in reversed(complete_checkpoints(first.dir.checkpoints)):
        paths = [path, *(r.dir.checkpoints / path.name for r in runs[1:])]
        problems = {p: verify(p) if (p / MANIFEST).is_file() else "missing or without a manifest" for p in paths}
        if not any(problems.values()):
            return checkpoint_step_of(path)
        for p, problem in problems.items():
            if problem:
                log.warning("ignoring checkpoint %s (step of every run of the group): %s", p, problem)
    return 0


def check_same_examples(runs: list[Run], step: int, now: dict[str, Any]) -> None:
    """Refuse (ResumeRefused: the runs stay as the resume found them) a resume whose examples,
    ``now`` (loralab.data.dataset.fingerprint), are not those its checkpoints at ``step`` trained
    on: a data file edited, cut or appended to, another tokenizer or template. A checkpoint from
    before loralab recorded them resumes unchecked."""
    changed = [(r, then) for r in runs if (then := recorded_data(r.dir.checkpoint(step))) not in (None, now)]
    if not changed:
        return
    then = changed[0][1]
    whose, who = ("its", "it") if len(changed) == 1 else ("their", "they")
    raise ResumeRefused(
        f"cannot resume {', '.join(str(r.dir.root) for r, _ in changed)}: {whose} examples are not those "
        f"{who} trained on until step {step} ({fingerprint_change(then, now)}; data.path {runs[0].cfg.data.path}): "
        "the data or the tokenizer changed since, and the result would no longer equal an uninterrupted run; put "
        "the data back to resume it, or train afresh on the new data in a new run directory (loralab train "
        "--overwrite replaces this one; a study starts afresh with --name NEW_NAME)")


def start_runs(runs: list[Run], adapters: GroupAdapters, *, steps: int, resume: bool, device: torch.device,
               fp16: bool, data: dict[str, Any]) -> int:
    """Each run's optimizer, schedule, gradient scaler (fp16) and state: fresh, or the common
    checkpoint's when resuming, which must have trained on the same examples (``data``,
    loralab.data.dataset.fingerprint of this session's). Returns the step the group starts after."""
    for run in runs:
        run.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        run.params = list(adapters.named_params(run.index).values())
        run.opt = build_optimizer(run.params, run.cfg.train)
        run.sched = build_scheduler(run.opt, run.cfg.train, steps)  # planned for the full run, also when pausing
    step = resume_step(runs) if resume else 0
    if step:
        check_same_examples(runs, step, data)
    if resume and step == 0:
        log.info("no complete checkpoint in %s: starting from step 0", ", ".join(str(r.dir.root) for r in runs))
    for run in runs:
        if step == 0:
            if distributed.writes():
                run.dir.metrics.unlink(missing_ok=True)
            run.state = TrainState(micro_batch_size=run.cfg.train.micro_batch_size, arithmetic=arithmetic_settings(),
                                   data=data)
        else:
            path = run.dir.checkpoint(step)
            run.state = load_checkpoint(path, params=adapters.named_params(run.index), opt=run.opt, sched=run.sched,
                                        device=device)
            if run.scaler is not None and run.state.grad_scaler:
                run.scaler.load_state_dict(run.state.grad_scaler)
            if distributed.writes():
                trim_metrics(run.dir.metrics, step)
            run.checkpoint = path
            log.info("resuming %s from %s (step %d)", run.dir.root, path, step)
        run.resumed_from = run.state.step if resume else None
        # several ranks: rank 0 writes metrics.jsonl, the others' lines go nowhere
        run.metrics = MetricsWriter(run.dir.metrics if distributed.writes() else Path(os.devnull), run.tracker)
    distributed.start_together([p for r in runs for p in r.params], step,
                               micro_batch_size=runs[0].state.micro_batch_size,
                               timeout_s=runs[0].cfg.distributed.timeout_s)
    return step
