"""The training core: ONE loop over a group of K >= 1 LoRA runs that share a frozen base.

    from loralab.train.core import run_group
    from loralab.train.group_adapters import FusedAdapters, SoloAdapters
    summaries, setup = run_group([cfg], [Path("runs/a")], SoloAdapters)   # a solo run: the PEFT model
    summaries, _ = run_group(cfgs, dirs, FusedAdapters, resume=True)      # K runs, one batched layer

A solo run is a group of one (loralab.train.loop.train); a fused group is K runs over one base
(loralab.train.fused.train_fused). The adapters of either stand behind one interface
(loralab.train.group_adapters.GroupAdapters), and everything else is written once and holds for
both: each step builds the shared micro batches once, stacks one copy per run along the batch
dimension and runs the base once, run k's rows through run k's adapters; then the step,
non-finite handling, logging, when to evaluate, checkpoints (one per run, in its own run
directory, in the same format), stop_at_step, auto micro batch, trackers, the summary and the
mapping from exceptions to statuses. Set-up is loralab.train.setup, evaluation
loralab.train.evaluation, starting and resuming loralab.train.resume, a run's own state
loralab.train.runs.

Shared time is attributed in equal shares: each step's time among the runs training at that
step, set-up among all runs, each adapter save to its own run, so the wall times of a group
sum to its real wall time (a group of one gets all of it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from loralab.adapters import base_record
from loralab.config import Config, absolute_local_paths, dump_config
from loralab.data.dataset import Example, fingerprint
from loralab.data.packing import step_batches
from loralab.errors import ConfigError, DataError, DivergedError, LoralabError, ModelError, ResumeRefused
from loralab.halving import halving_rungs, keep_count, rank_key
from loralab.models import dtype_choice, model_width, pick_device
from loralab.progress import progress
from loralab.rundir import RunDir, RunSummary, Status, clear_run_outputs, write_atomic
from loralab.track import open_trackers
from loralab.train import distributed
from loralab.train.attention import segment_attention
from loralab.train.checkpoint import (
    DiskFullError,
    latest_checkpoint,
    pinned_arithmetic,
    prune_checkpoints,
    save_checkpoint,
)
from loralab.train.compiled import CompileReport, compile_choice, compile_layers, compute_dtype, eager, uncompile
from loralab.train.evaluation import eval_batch_size, evaluate
from loralab.train.group_adapters import GroupAdapters, RunsRejected, run_losses
from loralab.train.measure import PeakMemory, versions
from loralab.train.resume import check_resume_config, start_runs
from loralab.train.runs import Clock, Run, end_alone
from loralab.train.setup import Setup, load_group
from loralab.train.step import (
    autocast_dtype,
    best_of,
    count_labels,
    label_positions,
    plan_steps,
    stream_from,
    to_device,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


# ----------------------------------------------------------------------------- the group


def open_runs(cfgs: list[Config], run_dirs: list[Path], kind: type[GroupAdapters], *, resume: bool,
              group_extra: Callable[[Path], dict[str, Any]]) -> tuple[list[Run], list[dict | None]]:
    """The runs still to train (config.yaml and a running summary.json written before step 0,
    their trackers open), and the summaries a resume finds already finished (returned as they
    are; which statuses count as finished is ``kind.done_on_resume``)."""
    runs, done = [], []
    base = functools.cache(base_record)  # once per group: a group shares its base (offline, a hub id costs retries)
    for cfg, path in zip(cfgs, run_dirs, strict=True):
        rd = RunDir(path)
        absolute_local_paths(cfg)  # config.yaml names the model and data from anywhere
        before = None
        if resume:
            check_resume_config(cfg, rd)
            previous = rd.read_summary()
            if previous and previous.get("status") in kind.done_on_resume:
                log.info("%s is already %s; nothing to resume", path, previous["status"])
                done.append(previous)
                continue
            if previous and rd.config.is_file():
                before = (previous, rd.config.read_text(encoding="utf-8"))
        done.append(None)
        cfg.output.dir = str(path)
        if distributed.writes():  # several ranks: rank 0 writes the run directory
            rd.root.mkdir(parents=True, exist_ok=True)
            if not resume:
                clear_run_outputs(rd)
            dump_config(cfg, rd.config)
        summary = {"status": Status.RUNNING, "error": None, "run_dir": str(path), "versions": versions(),
                   "trust_remote_code": cfg.model.trust_remote_code,
                   "base": base(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code),
                   **group_extra(path)}
        tracker = open_trackers(cfg, path, resume=resume) if distributed.writes() else None
        run = Run(len(runs), cfg, rd, summary, tracker=tracker, before=before)
        run.record()
        runs.append(run)
    return runs, done


def run_group(cfgs: list[Config], run_dirs: list[Path], kind: type[GroupAdapters], *, resume: bool = False,
              show_progress: bool = False, prune: Prune | None = None,
              group_extra: Callable[[Path], dict[str, Any]] = lambda path: {},
              ) -> tuple[list[dict[str, Any]], Setup | None]:
    """Train ``cfgs`` as one group, their adapters of ``kind``; every run directory always gets
    its summary.json.

    A run that diverges or is pruned ends alone and the rest train on; a failure of the whole
    group (loading, data, memory, disk) is recorded in every unfinished run and raised: bad
    config, data or model found before the first step is ``invalid``, out of memory
    ``out_of_memory`` with the estimate beside the measured peak, anything else ``failed``.
    Returns one summary per config, in order, and the set-up (its model and tokenizer: None
    when nothing trained).
    """
    runs, done = open_runs(cfgs, run_dirs, kind, resume=resume, group_extra=group_extra)
    if not runs:
        return done, None
    clock = Clock()
    setup = None
    try:
        setup = load_group([r.cfg for r in runs], kind, progress=show_progress)
        for r in runs:  # a run whose own adapters cannot be built is invalid alone
            if r.index in setup.adapters.rejected:
                end_alone(r, Status.INVALID, str(setup.adapters.rejected[r.index]))
        shared = fit([r for r in runs if r.status is Status.RUNNING], setup, resume=resume,
                     show_progress=show_progress, prune=prune, clock=clock)
    except (Exception, KeyboardInterrupt) as exc:
        replacement = record_failure(runs, exc, started=setup is not None)
        finish_tracking(runs)
        if len(runs) == 1 and isinstance(replacement or exc, (LoralabError, KeyboardInterrupt)):
            (replacement or exc).summary = runs[0].summary  # what --json prints with the error
        if replacement is None:
            raise
        raise replacement from None
    record_results(runs, setup, clock, shared)
    finish_tracking(runs)
    it = iter(r.summary for r in runs)
    return [d if d is not None else next(it) for d in done], setup


def record_results(runs: list[Run], setup: Setup, clock: Clock, shared: dict[str, Any]) -> None:
    """The summary of every run that completed or paused, with its share of the group's time."""
    group_wall = time.perf_counter() - clock.start
    ended = [r for r in runs if r.status in (Status.COMPLETED, Status.PAUSED)]
    # What no phase counted goes to the runs whose summaries are still to be written.
    leftover = group_wall - sum(r.session_wall_s for r in runs)
    for r in ended or runs:
        r.session_wall_s += leftover / len(ended or runs)
    extra = setup.adapters.summary_extra(group_size=len(runs), wall_s=group_wall,
                                         train_s=shared["group_train_time_s"])
    extra.update(distributed.rank_record(runs[0].cfg, shared["peak_memory_bytes"],  # several ranks: each one's
                                         runs[0].state.micro_batch_size))  # peak and micro batch
    for r in ended:
        r.record(status=r.status, error=None, **run_result(r, setup, steps=shared["steps"], extra=extra,
                                                           peak_memory_bytes=shared["peak_memory_bytes"]))


def record_failure(runs: list[Run], exc: BaseException, *, started: bool) -> Exception | None:
    """Record a failure of the whole group in every unfinished run; the exception to raise in
    its place (None: raise it as it is). Bad input found before the first step is invalid;
    Ctrl-C (SIGINT) leaves each run interrupted, saying how to continue it."""
    if isinstance(exc, RunsRejected):
        for r in runs:
            r.record(status=Status.INVALID, error=str(exc.errors[r.index]))
        return None
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (errors.Terminated)
        signame = getattr(exc, "signal_name", "SIGINT")
        for r in running(runs):
            how = f"continue it with: loralab train --resume {r.dir.root}"
            if latest_checkpoint(r.dir.root) is None:
                how += (" (it starts again from step 0: no checkpoint was written, train.checkpoint_every "
                        f"= {r.cfg.train.checkpoint_every})")
            r.record(status=Status.INTERRUPTED, error=f"interrupted ({signame}); {how}")
            log.warning("%s: interrupted (%s); %s", r.dir.root, signame, how)
        exc.reported = True  # said per run: the command line adds no bare "interrupted"
        return None
    status, error, extra, replacement = Status.FAILED, f"{type(exc).__name__}: {exc}", {}, None
    if isinstance(exc, LoralabError):
        before_first_step = not started or isinstance(exc, ResumeRefused)
        invalid = before_first_step and isinstance(exc, (ConfigError, DataError, ModelError, ResumeRefused))
        status, error = (Status.INVALID if invalid else Status.FAILED), str(exc)
    elif isinstance(exc, torch.OutOfMemoryError):
        cfg = runs[0].cfg
        extra = oom_details(cfg, pick_device(cfg.model.device))
        status, error = Status.OUT_OF_MEMORY, str(exc).splitlines()[0]
        est = extra["estimated_memory_bytes"]
        replacement = LoralabError(
            f"out of memory at micro batch {cfg.train.micro_batch_size}: measured peak "
            f"{extra['peak_memory_bytes'] / 2**20:.0f} MiB, loralab estimate "
            f"{'n/a' if est is None else f'{est / 2**20:.0f} MiB'}; lower train.micro_batch_size "
            f"or set train.auto_micro_batch=true ({error})")
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        last = latest_checkpoint(runs[0].dir.root)
        error = f"disk full while writing the run ({exc}); the last complete checkpoint is {last or 'none'}"
        replacement = DiskFullError(error)
    for r in running(runs):
        if status is Status.INVALID and r.before is not None:  # a resume refused: the run stays as it was
            summary, config = r.before
            if distributed.writes():
                write_atomic(r.dir.config, config, fsync=False)
            r.summary.clear()
            r.record(**{**summary, "resume_error": f"--resume refused before its first step: {error}"})  # the latest
            continue
        r.record(status=status, error=error, **extra)
    return replacement


# ----------------------------------------------------------------------------- the loop


def fit(runs: list[Run], setup: Setup, *, resume: bool, show_progress: bool, prune: Prune | None,
        clock: Clock) -> dict[str, Any]:
    """Train every run of the group; checkpoint, evaluate, prune, save. Statuses and summaries
    of runs that end early are recorded as they end; returns the group's shared figures."""
    cfg, adapters, device = runs[0].cfg, setup.adapters, setup.device
    steps = plan_steps(cfg, len(setup.splits.train))
    stop = min(steps, cfg.train.stop_at_step or steps)
    step = start_runs(runs, adapters, steps=steps, resume=resume, device=device, fp16=setup.fp16,
                      data=fingerprint(setup.splits))
    rungs = set(prune.rungs(steps)) if prune is not None else set()
    data = StepData.start(cfg, runs[0].state, len(setup.splits.train))
    peak = PeakMemory(device)
    peak.reset()
    group_train_s = 0.0
    clock.charge(runs)  # set-up, in equal shares

    adapters.model.train()
    with loop_scope(runs, setup, step=step, steps=steps, show_progress=show_progress) as bar:
        setup.compiled = compile_for_training(setup, runs, data, steps=steps, step=step)
        clock.charge(runs)  # the compile is set-up, not training time
        peak.reset()
        while step < stop and (live := running(runs)):
            t0, cpu0 = time.perf_counter(), time.process_time()
            attempt = functools.partial(train_micro_batches, setup, live, data)
            step_indices, step_loss, tokens = retry_on_oom(attempt, data, live, done=step, peak=peak,
                                                           where="in training")
            step += 1
            losses = optimizer_step(live, step_loss, step=step, steps=steps, step_indices=step_indices, tokens=tokens)
            dt = time.perf_counter() - t0
            group_train_s += dt
            clock.charge(live, train_s=dt, cpu_s=time.process_time() - cpu0)
            going = running(live)
            if going and ((cfg.eval.every and step % cfg.eval.every == 0) or step == stop or step in rungs):
                retry_on_oom(functools.partial(evaluate_now, setup, going, data, step=step, first=runs[0]), data,
                             going, done=step, peak=peak, where="in evaluation")
                clock.charge(going)
                going = running(going)  # a run whose evaluation failed ended alone
            if step in rungs:
                stop_worst(going, prune, step=step, steps=steps, setup=setup)
                going = running(going)
            # every rank: fsdp gathers the shards for rank 0, the only one that writes
            if going and step < steps and (step == stop or (cfg.train.checkpoint_every
                                                            and step % cfg.train.checkpoint_every == 0)):
                save_checkpoints(going, adapters, clock=clock, keep_last=cfg.train.keep_last, device=device)
            bar.update(1)
            if going:
                bar.set_postfix(loss=f"{sum(losses[r] for r in going) / len(going):.4f}")
    if setup.compiled.on:
        uncompile(adapters.model)  # what the model is used for next (saving, generation) runs eager
    end_runs(runs, adapters, clock=clock, completed=stop == steps)
    return {"steps": steps, "group_train_time_s": group_train_s, "peak_memory_bytes": peak.bytes()}


def running(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.status is Status.RUNNING]


@contextlib.contextmanager
def loop_scope(runs: list[Run], setup: Setup, *, step: int, steps: int, show_progress: bool) -> Iterator[Any]:
    """What holds for the whole loop: a resumed group's pinned arithmetic, the progress bar, and
    per-example attention for packed rows (activation checkpointing repeats forwards in backward)."""
    with contextlib.ExitStack() as scope:
        if step > 0:
            scope.enter_context(pinned_arithmetic(runs[0].state.arithmetic, where=str(runs[0].dir.root)))
        bar = scope.enter_context(progress(steps, unit="step", initial=step, enabled=show_progress))
        if setup.attention == "per_example":
            scope.enter_context(segment_attention(setup.adapters.model))
        yield bar


def end_runs(runs: list[Run], adapters: GroupAdapters, *, clock: Clock, completed: bool) -> None:
    """After the last step: metrics closed, adapters saved, the runs still training completed
    (or paused at train.stop_at_step)."""
    finished = running(runs)
    for r in runs:
        if r.metrics is not None and not r.metrics.f.closed:
            r.metrics.close()
    saved = [r for r in finished if r.cfg.output.save_adapter]  # every rank: fsdp gathers, rank 0 writes
    if saved:
        adapters.save(saved, clock.charge_to)
    for r in finished:
        if r.status is Status.RUNNING:  # not a run whose save failed alone
            r.status = Status.COMPLETED if completed else Status.PAUSED


# ----------------------------------------------------------------------------- the data and the step


class StepData:
    """The training examples as optimizer steps of micro batches, at the micro batch in force:
    ``cfg`` is the group's config with it (train.auto_micro_batch may halve it)."""

    def __init__(self, cfg: Config, n_train: int, *, skip: int):
        self.cfg, self.n_train = cfg, n_train
        self.stream = stream_from(n_train, cfg, skip=skip)

    @classmethod
    def start(cls, cfg: Config, state, n_train: int) -> StepData:
        """The stream where ``state`` (a run's train state) left it, at its micro batch."""
        micro = dataclasses.replace(cfg.train, micro_batch_size=state.micro_batch_size)
        return cls(dataclasses.replace(cfg, train=micro), n_train, skip=state.micro_batches)

    def next_step(self) -> list[tuple[int, list[int]]]:
        """One optimizer step's micro batches: (epoch, example indices) each."""
        return [next(self.stream) for _ in range(self.cfg.grad_accum)]

    def restart(self, *, skip: int) -> None:
        self.stream = stream_from(self.n_train, self.cfg, skip=skip)


def retry_on_oom(attempt: Callable[[], T], data: StepData, runs: list[Run], *, done: int, peak: PeakMemory,
                 where: str) -> T:
    """``attempt()``; after an out-of-memory error, with train.auto_micro_batch, again at half
    the micro batch (same global batch, so the maths is unchanged) until it fits."""
    while True:
        try:
            return attempt()
        except torch.OutOfMemoryError:
            for r in runs:
                r.opt.zero_grad(set_to_none=True)
            if not (data.cfg.train.auto_micro_batch and data.cfg.train.micro_batch_size > 1):
                raise
            halve_micro_batch(data.cfg, runs, done=done, peak=peak, where=where)
            data.restart(skip=runs[0].state.micro_batches)


def train_micro_batches(setup: Setup, runs: list[Run], data: StepData) -> tuple[list, torch.Tensor, int]:
    """The next step's micro batches and every run's accumulated gradient of them: (the step's
    (epoch, indices) pairs, (runs,) mean losses on the device, useful tokens)."""
    step_indices = data.next_step()
    step_loss, tokens = forward_backward(setup.adapters, runs, setup.splits.train, step_indices, data.cfg,
                                         pad_id=setup.tokenizer.pad_token_id, device=setup.device,
                                         attention=setup.attention)
    return step_indices, step_loss, tokens


def evaluate_now(setup: Setup, runs: list[Run], data: StepData, *, step: int, first: Run) -> None:
    with eager():  # no_grad forwards would compile graphs of their own
        evaluate(setup, runs, step=step, batch_size=eval_batch_size(data.cfg, first.state, setup.device))


def optimizer_step(runs: list[Run], step_loss: torch.Tensor, *, step: int, steps: int, step_indices: list,
                   tokens: int) -> dict[Run, float]:
    """Clip and apply every run's gradient (or its non-finite handling); each run's loss."""
    for r in runs:
        if r.scaler is not None:
            r.scaler.unscale_(r.opt)  # on the device: no sync
    # fsdp: the gradients are shards (DTensors); their norm is the whole gradient's, on every rank
    with distributed.sharded_collectives(distributed.CLIPPING, runs[0].cfg.distributed.timeout_s):
        norms = [distributed.whole(torch.nn.utils.clip_grad_norm_(r.params, r.cfg.train.grad_clip or float("inf")))
                 for r in runs]
    # the step's one host-device sync: every run's loss and gradient norm at once
    values = torch.cat([step_loss, torch.stack(norms).to(step_loss)]).tolist()
    for r, loss, norm in zip(runs, values[:len(runs)], values[len(runs):], strict=True):
        take_step(r, step=step, steps=steps, loss=loss, grad_norm=norm, step_indices=step_indices, tokens=tokens)
        r.state.step = step
    return dict(zip(runs, values[:len(runs)], strict=True))


def host_layout(examples: list[Example], step_indices: list[tuple[int, list[int]]], cfg: Config, *, pad_id: int,
                attention: str | None) -> tuple[list[dict], int, int]:
    """One optimizer step's micro batches on the host, laid out once for every run (padded,
    length-grouped or packed, data.packing), each with its label positions; the step's response
    tokens (the loss divisor) and useful tokens. All counted on the host before anything moves,
    so the step never waits for the device to learn them."""
    batches = step_batches([examples[i] for _, idx in step_indices for i in idx],
                           micro_batch_size=cfg.train.micro_batch_size,
                           row_len=cfg.data.max_seq_length, pad_id=pad_id, device=torch.device("cpu"),
                           packing=attention is not None, segments=attention == "per_example",
                           group_by_length=cfg.train.group_by_length)
    n_loss = sum(count_labels(b["labels"]) for b in batches)
    tokens = sum(int(b.pop("n_tokens")) for b in batches)
    for b in batches:
        b["positions"] = label_positions(b["labels"])
    return batches, n_loss, tokens


def forward_backward(adapters, runs: list[Run], examples: list[Example], step_indices: list[tuple[int, list[int]]],
                     cfg: Config, *, pad_id: int, device: torch.device, attention: str | None
                     ) -> tuple[torch.Tensor, int]:
    """Accumulate every run's gradient of one optimizer step; ((runs,) mean losses, on the
    device, and the step's useful tokens). Each run's loss is the sum over the step's response
    tokens divided by their count, in every layout; nothing here waits for the device."""
    batches, n_loss, tokens = host_layout(examples, step_indices, cfg, pad_id=pad_id, attention=attention)
    step_loss = torch.zeros(len(runs), dtype=torch.float64, device=device)
    first = runs[0].state.micro_batches  # the micro batches before this step (equal in every live run)
    out_of_memory = False
    try:
        for j, batch, weight in distributed.my_share(batches):  # several ranks: micro batch j on rank j % N
            batch = to_device(batch, device)
            # backward inside the routing: activation checkpointing recomputes forwards during it;
            # draw numbers the micro batch (unique: a step has at most batch_size of them, packed or
            # not); with each run's seed it seeds the run's dropout masks, the same in any group
            draw = first * cfg.train.batch_size + j
            with (adapters.routed([r.index for r in runs], rows_each=batch["input_ids"].shape[0], draw=draw),
                  distributed.sharded_collectives(distributed.PASSES, cfg.distributed.timeout_s)):
                # weight 0: fsdp's filler pass of a rank short of a micro batch (distributed.my_share)
                losses = run_losses(adapters.model, batch, len(runs), runs[0].cfg.train.autocast) / n_loss * weight
                if runs[0].scaler is None:
                    losses.sum().backward()
                else:  # fp16: each run's loss times its own scale, so small gradients stay representable
                    torch.stack([r.scaler.scale(loss) for r, loss in zip(runs, losses, strict=True)]).sum().backward()
            step_loss += losses.detach()
    except torch.OutOfMemoryError:
        if not distributed.active():
            raise
        out_of_memory = True  # several ranks (ddp): every rank learns it in the sum below and drops the step
    # several ranks: the gradients and losses of the whole step, summed over the ranks
    step_loss = distributed.sum_over_ranks([p for r in runs for p in r.params], step_loss,
                                           timeout_s=cfg.distributed.timeout_s, out_of_memory=out_of_memory)
    return step_loss, tokens


def compile_for_training(setup: Setup, runs: list[Run], data: StepData, *, steps: int, step: int) -> CompileReport:
    """train.compile for this session: as the run started when resuming, else decided from the
    tokens still to train; when on, checked on the next step's micro batches (then thrown away)."""
    state0, train = runs[0].state, setup.splits.train
    if distributed.sharded():  # train.compile true is refused with fsdp (distributed.check_fsdp)
        on, reason = False, "distributed.strategy fsdp: compiled layers under fully_shard are not checked"
    elif step > 0 and state0.compiled is not None:
        on, reason = state0.compiled, f"as the run started (train.compile: {data.cfg.train.compile})"
    else:
        mean = sum(len(e.input_ids) for e in train) / max(1, len(train))
        base = sum(p.numel() for p in setup.adapters.model.parameters() if not p.requires_grad)
        dtype = autocast_dtype(data.cfg.train.autocast) or compute_dtype(setup.adapters.model)
        on, reason = compile_choice(data.cfg.train.compile, setup.device,
                                    int((steps - step) * data.cfg.train.batch_size * mean), base, dtype=dtype)
    report = CompileReport(False, reason)
    if on:
        # the next step's examples, from a copy of the stream: nothing is taken from the run's
        step_indices = StepData.start(data.cfg, state0, len(train)).next_step()

        def probe(model) -> torch.Tensor:
            losses, _ = forward_backward(setup.adapters, runs, train, step_indices, data.cfg,
                                         pad_id=setup.tokenizer.pad_token_id, device=setup.device,
                                         attention=setup.attention)
            return losses

        report = compile_layers(setup.adapters.model, probe, reason)
        if not report.on:
            log.warning("%s: %s", runs[0].dir.root, report.reason)
    for r in runs:
        r.state.compiled = report.on
    return report


def take_step(run: Run, *, step: int, steps: int, loss: float, grad_norm: float, step_indices, tokens: int) -> None:
    """Run ``run``'s optimizer step, or its non-finite handling: skipped (on_nonfinite skip) or
    diverged (stop: the run ends here, nothing from after it is saved)."""
    st = run.state
    st.micro_batches += len(step_indices)
    st.tokens_seen += tokens
    st.epoch = step_indices[-1][0]
    if run.scaler is not None and math.isfinite(loss) and not math.isfinite(grad_norm):
        # fp16 overflow: the scaler's business, not divergence; the step is skipped, the scale lowered
        run.opt.zero_grad(set_to_none=True)
        run.scaler.update()
        st.skipped_steps += 1
        run.metrics.write(step=step, event="fp16_overflow", train_loss=loss, skipped_steps=st.skipped_steps)
        return
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        run.opt.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.update()
        if run.cfg.train.on_nonfinite == "stop":
            diverge(run, step, f"non-finite loss or gradient at step {step} (loss {loss}, gradient norm {grad_norm})",
                    train_loss=loss, grad_norm=grad_norm)
            return
        st.skipped_steps += 1
        run.metrics.write(step=step, event="skipped_nonfinite", train_loss=loss, skipped_steps=st.skipped_steps)
        return
    try:
        run.opt.step()  # gradients known finite (unscaled already with fp16): no scaler.step and its sync
    except torch.OutOfMemoryError:
        raise  # the group's: its micro batch is halved (train_step)
    except RuntimeError as exc:  # this run's own update (a learning rate so large that it overflows)
        run.opt.zero_grad(set_to_none=True)
        why = f"the optimizer step at step {step} failed ({exc}; learning rate {run.sched.get_last_lr()[0]:g})"
        if "overflow" in str(exc):
            diverge(run, step, why, train_loss=loss, grad_norm=grad_norm)
        else:
            end_alone(run, Status.FAILED, why)
        return
    if run.scaler is not None:
        run.scaler.update()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    if step % run.cfg.train.log_every == 0 or step == steps:
        run.metrics.write(step=step, epoch=st.epoch, train_loss=loss, lr=run.sched.get_last_lr()[0],
                          tokens_seen=st.tokens_seen, grad_norm=grad_norm)


def diverge(run: Run, step: int, why: str, **values: float) -> None:
    """``run`` ends ``diverged`` at ``step`` (the rest of its group goes on): nothing from after
    it is saved; its summary names the last good checkpoint."""
    run.metrics.write(step=step, event=Status.DIVERGED, **values)
    last = latest_checkpoint(run.dir.root)
    run.status = Status.DIVERGED
    run.record(status=Status.DIVERGED, diverged_at_step=step, last_good_checkpoint=str(last) if last else None,
               error=f"{why}; no adapter from after it is saved; last good checkpoint: {last or 'none'}")
    run.metrics.close()


def halve_micro_batch(data_cfg: Config, runs: list[Run], *, done: int, peak: PeakMemory, where: str) -> None:
    """After an out-of-memory error: at most half the micro batch, more accumulation. Recorded in
    every run's state (and so in checkpoints and summaries); the peak is measured anew."""
    micro = data_cfg.train.micro_batch_size
    # The largest divisor of the global batch at most half the old micro batch: whole micro
    # batches still make up each step, so the maths is unchanged.
    smaller = max(d for d in range(1, micro // 2 + 1) if data_cfg.train.batch_size % d == 0)
    data_cfg.train.micro_batch_size = smaller
    for run in runs:
        run.state.micro_batch_size = smaller
        run.state.micro_batch_changes.append({"step": done + 1, "from": micro, "to": smaller})
        run.state.micro_batches = done * data_cfg.grad_accum
    peak.reset()
    log.warning("out of memory %s at step %d with micro batch %d: retrying with %d (accumulation %d)",
                where, done + 1, micro, smaller, data_cfg.grad_accum)



# ----------------------------------------------------------------------------- halving, checkpoints, summaries


@dataclass
class Prune:
    """Successive halving inside a group: at each rung step the live runs are ranked on
    ``metric`` and only the best ``ceil(n / eta)`` train on (as the study's process-level
    halving); the rest end with status stopped_early at that step. The lr schedule stays the
    full run's, so a survivor's result is what it would have been without pruning."""

    eta: int = 3
    min_steps: int = 10
    metric: str = "eval_loss"
    goal: str = "min"

    def rungs(self, steps: int) -> list[int]:
        return halving_rungs(self.min_steps, self.eta, steps)

    def score(self, run: Run) -> float:
        s = run.state
        value = s.eval_loss if self.metric == "eval_loss" else (s.task_history.get(self.metric) or [float("nan")])[-1]
        return rank_key(value, self.goal)


def stop_worst(going: list[Run], prune: Prune, *, step: int, steps: int, setup: Setup) -> None:
    """Successive halving at a rung: the runs not among the best ceil(n / eta) stop here."""
    ranked = sorted(going, key=prune.score)
    for r in ranked[keep_count(len(ranked), prune.eta):]:
        r.status = Status.STOPPED_EARLY
        r.metrics.write(step=step, event=Status.STOPPED_EARLY, rung=step)
        r.metrics.close()
        r.record(status=Status.STOPPED_EARLY, stopped_at_step=step,
                 **run_result(r, setup, steps=steps,
                              extra={"fused": {"stopped_by": "successive halving in the group"}}))


def save_checkpoints(runs: list[Run], adapters, *, clock: Clock, keep_last: int, device: torch.device) -> None:
    """One checkpoint per run, each in its own run directory; old ones are pruned only once every
    run has saved this step, so a kill in between leaves a step all runs can resume from."""
    for r in runs:
        with clock.charge_to(r):
            r.state.wall_time_s = r.state.wall_time_s + r.session_wall_s
            r.state.grad_scaler = r.scaler.state_dict() if r.scaler is not None else None
            try:
                with distributed.sharded_collectives(distributed.SAVING, r.cfg.distributed.timeout_s):
                    r.checkpoint = save_checkpoint(r.dir.root, r.state, params=adapters.named_params(r.index),
                                                   opt=r.opt, sched=r.sched, device=device)
            finally:
                r.state.wall_time_s -= r.session_wall_s
    for r in runs:
        if distributed.writes():
            prune_checkpoints(r.dir.checkpoints, keep_last)


def run_result(run: Run, setup: Setup, *, steps: int, extra: dict[str, Any] | None = None,
               peak_memory_bytes: int | None = None) -> dict[str, Any]:
    """The summary fields a run measured (the same for a solo run and a member of a group)."""
    st, splits = run.state, setup.splits
    trainable, total = setup.adapters.counts(run.index)
    dtype, dtype_reason = dtype_choice(run.cfg.model, setup.device, width=model_width(setup.adapters.model.config))
    return RunSummary(
        steps=steps,
        steps_done=st.step,
        skipped_steps=st.skipped_steps,
        resumed_from_step=run.resumed_from,
        checkpoint=str(run.checkpoint) if run.checkpoint else None,
        micro_batch_size=st.micro_batch_size,
        micro_batch_changes=st.micro_batch_changes,
        packed_attention=setup.attention,
        train_examples=len(splits.train),
        val_examples=len(splits.val),
        dropped_by_length_filter=splits.dropped_by_length,
        truncated_to_no_response=splits.truncated_to_nothing,
        data_stats=splits.stats,
        data=st.data,
        final_eval_loss=st.eval_loss,
        best_eval_loss=st.best_eval_loss,
        final_eval_tasks={k: v[-1] for k, v in st.task_history.items()},
        best_eval_tasks={k: best_of(k, v) for k, v in st.task_history.items()},
        wall_time_s=st.wall_time_s + run.session_wall_s,
        train_time_s=st.train_time_s,
        train_cpu_time_s=st.train_cpu_time_s,
        tokens_seen=st.tokens_seen,
        tokens_per_s=st.tokens_seen / st.train_time_s if st.train_time_s else 0.0,
        peak_memory_bytes=peak_memory_bytes if peak_memory_bytes is not None else PeakMemory(setup.device).bytes(),
        trainable_params=trainable,
        total_params=total,
        device=str(setup.device),
        dtype=dtype,
        dtype_reason=dtype_reason,
        compiled=setup.compiled.on,
        compile_reason=setup.compiled.reason,
        compile_time_s=setup.compiled.seconds,
        extra=extra or {},
    ).to_dict()


def oom_details(cfg: Config, device: torch.device) -> dict[str, Any]:
    """The estimate beside the measured peak, for a run that ran out of memory."""
    out: dict[str, Any] = {"peak_memory_bytes": PeakMemory(device).bytes(), "estimated_memory_bytes": None}
    try:
        from loralab.estimate import estimate_run

        out["estimated_memory_bytes"] = estimate_run(cfg, device=device.type).memory_bytes["total"]
    except Exception as exc:  # an estimate is a courtesy here; the failure is reported either way
        out["estimate_error"] = f"{type(exc).__name__}: {exc}"
    return out


def finish_tracking(runs: list[Run]) -> None:
    """Each solo run's summary (and adapter) to its trackers; a failing tracker only warns."""
    for r in runs:
        if r.tracker is not None:
            r.tracker.finish(r.summary)


def raise_if_diverged(summary: dict[str, Any]) -> None:
    """A solo run that diverged raises DivergedError (exit code 3), as the CLI expects."""
    if summary.get("status") == Status.DIVERGED:
        exc = DivergedError(summary["error"])
        exc.step, exc.last_checkpoint = summary.get("diverged_at_step"), summary.get("last_good_checkpoint")
        exc.summary = summary
        raise exc

