"""The training core: ONE loop over a group of K >= 1 LoRA runs that share a frozen base.

    from loralab.train.core import run_group
    summaries, _ = run_group([cfg], [Path("runs/a")], fused=False)   # a solo run: the PEFT model
    summaries, _ = run_group(cfgs, dirs, fused=True, resume=True)    # K runs, one batched adapter layer

A solo run is a group of one over the PEFT model (loralab.train.loop.train); a fused group
is K runs over one base with the batched adapter layer (loralab.train.fused.train_fused):
each step builds the shared micro batches once, stacks one copy per run along the batch
dimension and runs the base once; run k's rows go through run k's adapters. Everything
else is written once here and holds for both: set-up, the step, non-finite handling,
logging, when to evaluate, evaluation, checkpoints and resume (one checkpoint per run, in
its own run directory, in the same format), stop_at_step, auto micro batch, the summary,
and the mapping from exceptions to statuses.

Shared time is attributed in equal shares: each step's time among the runs training at that
step, set-up among all runs, each adapter save to its own run, so the wall times of a group
sum to its real wall time (a group of one gets all of it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralab.adapters import attach_lora, base_record, count_params, save_adapter
from loralab.config import Config, TrackingConfig, dump_config, flat_keys, load_config
from loralab.data.dataset import Example, Splits, collate
from loralab.data.packing import step_batches
from loralab.errors import ConfigError, DataError, DivergedError, LoralabError, ModelError
from loralab.halving import halving_rungs, keep_count, rank_key
from loralab.models import (
    dtype_choice,
    load_base,
    load_tokenizer,
    model_width,
    pick_device,
    read_config,
)
from loralab.progress import progress
from loralab.resolve import resolve_data
from loralab.rundir import (
    FINAL,
    MetricsWriter,
    RunDir,
    RunSummary,
    Status,
    checkpoint_step_of,
    clear_run_outputs,
    trim_metrics,
    write_atomic,
)
from loralab.track import Tracker, open_trackers
from loralab.train.attention import segment_attention
from loralab.train.checkpoint import (
    MANIFEST,
    DiskFullError,
    TrainState,
    arithmetic_settings,
    clean_temporaries,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    pinned_arithmetic,
    prune_checkpoints,
    save_checkpoint,
    verify,
)
from loralab.train.group import (
    initial_adapter,
    install,
    named_run_parameters,
    remove,
    save_trained_adapter,
    trained_weights,
)
from loralab.train.measure import PeakMemory, versions
from loralab.train.optim import build_optimizer, build_scheduler
from loralab.train.step import (
    best_of,
    count_labels,
    finite_or_none,
    forward_logits,
    label_positions,
    packed_attention,
    plan_steps,
    seed_everything,
    stream_from,
    to_device,
    token_loss_sum,
)

log = logging.getLogger(__name__)

# Keys that ``--resume`` may change: they decide when to stop, log or checkpoint, never the
# maths of a step, so the resumed run still equals an uninterrupted one.
RESUME_MAY_CHANGE = frozenset({
    "train.stop_at_step", "train.checkpoint_every", "train.keep_last", "train.log_every",
    "train.auto_micro_batch", "output.dir", "output.save_adapter",
}) | {f"tracking.{f.name}" for f in dataclasses.fields(TrackingConfig)}


# ----------------------------------------------------------------------------- the adapters of a group


class SoloAdapters:
    """A group of one: the PEFT model. ``routed`` and ``only`` have nothing to route. Its run's
    failures are the run's: none is ``rejected`` alone, and a failing save raises."""

    rejected: dict[int, LoralabError] = {}

    def __init__(self, model):
        self.model = model
        self.trainable, self.total = count_params(model)

    def routed(self, runs: list[int], *, rows_each: int, draw: int | None = None):
        return contextlib.nullcontext()  # PEFT's own dropout draws from the global generator

    def only(self, run: int):
        return contextlib.nullcontext()

    def named_params(self, run: int) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def counts(self, run: int) -> tuple[int, int]:
        return self.trainable, self.total

    def save(self, runs: list[Run], charge_to) -> None:
        for r in runs:
            with charge_to(r):
                save_adapter(self.model, r.dir.adapter)


class FusedAdapters:
    """K runs' adapters in loralab.train.group's layer over one base; run k owns a block of rows.

    A run whose adapters cannot be built (its rank, its roles against this base) is
    ``rejected`` alone, with its own error: it gets no adapter and the others train on."""

    def __init__(self, base, cfgs: list[Config]):
        self.model = base
        self.cfgs = cfgs
        self.inits: dict[int, Any] = {}
        self.rejected: dict[int, LoralabError] = {}
        for k, c in enumerate(cfgs):
            try:
                self.inits[k] = initial_adapter(base, c.lora, seed=c.train.seed)
            except (ConfigError, ModelError) as exc:  # raised before PEFT touches the base
                self.rejected[k] = exc
        if not self.inits:
            raise RunsRejected(self.rejected)
        self.routing = None

    def install(self) -> None:
        self.routing = install(self.model, [self.inits[k].weights if k in self.inits else {}
                                            for k in range(len(self.cfgs))], seeds=[c.train.seed for c in self.cfgs])

    def routed(self, runs: list[int], *, rows_each: int, draw: int | None = None):
        return self.routing.rows(runs, rows_each=rows_each, draw=draw)

    def only(self, run: int):
        return self.routing.only(run)

    def named_params(self, run: int) -> dict[str, torch.nn.Parameter]:
        """Run ``run``'s parameters under the names PEFT gives them in a solo run, in the same
        order, so a checkpoint has one format whether its run trained alone or in a group."""
        return named_run_parameters(self.model, run, prefix="base_model.model.")

    def counts(self, run: int) -> tuple[int, int]:
        return self.inits[run].trainable_params, self.inits[run].total_params

    def save(self, runs: list[Run], charge_to) -> None:
        weights = {r.index: trained_weights(self.model, r.index) for r in runs}
        remove(self.model)  # PEFT's own layers go in to save
        for r in runs:
            with charge_to(r), fails_alone(r, runs, "saving its adapter"):
                save_trained_adapter(self.model, r.cfg.lora, seed=r.cfg.train.seed, weights=weights[r.index],
                                     out_dir=r.dir.adapter)


class RunsRejected(ModelError):
    """Every run of a group was rejected while its adapters were built; ``errors`` holds each
    run's own error, by run index."""

    def __init__(self, errors: dict[int, LoralabError]):
        super().__init__("; ".join(str(e) for e in errors.values()))
        self.errors = errors


@contextlib.contextmanager
def fails_alone(run: Run, group: list[Run], doing: str):
    """An error of ``run``'s own (its evaluation, its save) ends ``run`` alone, status failed with
    its own error, while another run of the group still trains. Raised as before when no other
    run is left (a solo run fails as a run), and always for out-of-memory and a full disk,
    which belong to the group."""
    try:
        yield
    except Exception as exc:
        others = [r for r in group if r is not run and r.status is Status.RUNNING]
        disk_full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        if not others or disk_full or isinstance(exc, torch.OutOfMemoryError):
            raise
        end_alone(run, Status.FAILED, f"{doing}: {type(exc).__name__}: {exc}")


def end_alone(run: Run, status: Status, error: str) -> None:
    """``run`` leaves its group with ``status`` and its own ``error``; the others go on."""
    log.warning("%s: %s; it ends alone, the rest of its group goes on", run.dir.root, error)
    run.status = status
    if run.metrics is not None and not run.metrics.f.closed:
        run.metrics.write(step=run.state.step, event=status)
        run.metrics.close()
    run.record(status=status, error=error)


def stack_runs(batch: dict, n: int) -> dict:
    """n copies of a batch along the batch dimension: (n * batch, seq); a packed batch's
    example boundaries are the same in every copy. One run: the batch itself."""
    if n == 1:
        return batch
    return {k: v.repeat(n, 1) if isinstance(v, torch.Tensor) and v.dim() == 2 else v
            for k, v in batch.items() if k not in ("labels", "n_tokens", "positions")}


def run_losses(model, batch: dict, n_runs: int, autocast: str) -> torch.Tensor:
    """(n_runs,): each run's sum of next-token cross-entropy over the batch's label positions,
    from one forward over n_runs stacked copies of the batch (its rows routed per run)."""
    rows = batch["input_ids"].shape[0]
    positions = batch["positions"]
    logits = forward_logits(model, stack_runs(batch, n_runs), autocast, positions)  # (runs * rows, positions, vocab)
    return torch.stack([token_loss_sum(logits[j * rows:(j + 1) * rows], batch["labels"], positions)
                        for j in range(n_runs)])


# ----------------------------------------------------------------------------- runs and set-up


@dataclass(eq=False)
class Run:
    """One run of a group: its config, directory, summary, optimizer and train state."""

    index: int
    cfg: Config
    dir: RunDir
    summary: dict[str, Any]
    params: list[torch.nn.Parameter] = field(default_factory=list)
    opt: Any = None
    sched: Any = None
    state: TrainState = field(default_factory=TrainState)
    metrics: MetricsWriter | None = None
    status: Status = Status.RUNNING
    checkpoint: Path | None = None
    resumed_from: int | None = None
    session_wall_s: float = 0.0  # this session's share of the group's wall time
    scaler: torch.amp.GradScaler | None = None  # fp16: the run's own loss scale
    tracker: Tracker | None = None  # experiment trackers of a solo run (a fused group's are replayed at its end)

    def record(self, **fields: Any) -> None:
        """Update summary.json (atomically)."""
        self.summary.update(fields)
        write_atomic(self.dir.summary, self.summary)


@dataclass
class Setup:
    """Everything loaded before the first step; bad input fails while building it."""

    adapters: SoloAdapters | FusedAdapters
    tokenizer: Any
    splits: Splits
    tasks: list
    device: torch.device
    attention: str | None
    fp16: bool = False  # the base computes in fp16: gradients go through a GradScaler


def needs_grad_scaler(model, autocast: str) -> bool:
    """Whether the forward computes in fp16, read from the loaded model (fp16 weights, or 4-bit
    layers with an fp16 compute dtype), whatever config key set it, or from train.autocast."""
    if autocast == "fp16":
        return True
    return any(p.dtype == torch.float16 for p in model.parameters()) or any(
        getattr(m, "compute_dtype", None) == torch.float16 for m in model.modules())


def load_group(cfgs: list[Config], *, fused: bool, progress: bool = False) -> Setup:
    """Read and check the data and evaluation tasks (with the tokenizer and config.json: bad
    data fails before any weights load), then load the base once and put in the runs' adapters
    (``progress``: transformers' loading bar, on a terminal)."""
    cfg = cfgs[0]  # every shared key is equal across a group (fused.check_group)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.model.device)
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model_config = read_config(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    splits, tasks = load_data_and_tasks(cfg, model_config, tokenizer)
    base, tokenizer = load_base(cfg.model, cfg.quant, progress=progress, tokenizer=tokenizer)
    if fused:
        adapters = FusedAdapters(base, cfgs)
        attention = packed_attention(cfg, base)  # a property of the base, checked before the adapters go in
        adapters.install()
    else:
        adapters = SoloAdapters(attach_lora(base, cfg.lora, seed=cfg.train.seed))
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(base, cfg.model.path)
    if not fused:
        attention = packed_attention(cfg, adapters.model)
    trainable, total = adapters.counts(min(k for k in range(len(cfgs)) if k not in adapters.rejected))
    # debug: the run's summary says it; at info it read as PEFT's own line beside loralab's (-v shows it)
    log.debug("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}",
              100 * trainable / total)
    return Setup(adapters, tokenizer, splits, tasks, device, attention, needs_grad_scaler(base, cfg.train.autocast))


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

        tasks = resolve_tasks(",".join(cfg.eval.tasks), cfg.eval.limit)
    return splits, tasks


def warn_if_warmup_outlasts(cfg: Config, steps: int) -> None:
    """train.warmup_steps beyond the run's steps: the learning rate never reaches train.lr."""
    warmup = cfg.train.warmup_steps
    if warmup > steps:
        log.warning("WARNING: train.warmup_steps = %d is more than the run's %d steps: the learning rate never "
                    "reaches train.lr = %g (it peaks at %d/%d of it, %.3g); set train.warmup_steps below %d",
                    warmup, steps, cfg.train.lr, steps, warmup, cfg.train.lr * steps / warmup, steps)


# ----------------------------------------------------------------------------- resume


def resume_step(runs: list[Run]) -> int:
    """The newest step at which every run has a complete checkpoint (0: none). The runs of a
    group save at the same steps and prune only once all have saved, so after a kill in the
    middle of a save the previous step is still there for every run."""
    for run in runs:
        if run.dir.checkpoints.is_dir():
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


def start_runs(runs: list[Run], adapters, *, steps: int, resume: bool, device: torch.device, fp16: bool) -> int:
    """Each run's optimizer, schedule, gradient scaler (fp16) and state: fresh, or the common
    checkpoint's when resuming."""
    for run in runs:
        run.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        run.params = list(adapters.named_params(run.index).values())
        run.opt = build_optimizer(run.params, run.cfg.train)
        run.sched = build_scheduler(run.opt, run.cfg.train, steps)  # planned for the full run, also when pausing
    step = resume_step(runs) if resume else 0
    if resume and step == 0:
        log.info("no complete checkpoint in %s: starting from step 0", ", ".join(str(r.dir.root) for r in runs))
    for run in runs:
        if step == 0:
            run.dir.metrics.unlink(missing_ok=True)
            run.state = TrainState(micro_batch_size=run.cfg.train.micro_batch_size, arithmetic=arithmetic_settings())
        else:
            path = run.dir.checkpoint(step)
            run.state = load_checkpoint(path, params=adapters.named_params(run.index), opt=run.opt, sched=run.sched,
                                        device=device)
            if run.scaler is not None and run.state.grad_scaler:
                run.scaler.load_state_dict(run.state.grad_scaler)
            trim_metrics(run.dir.metrics, step)
            run.checkpoint = path
            log.info("resuming %s from %s (step %d)", run.dir.root, path, step)
        run.resumed_from = run.state.step if resume else None
        run.metrics = MetricsWriter(run.dir.metrics, run.tracker)
    return step


# ----------------------------------------------------------------------------- the step


def host_layout(examples: list[Example], group: list[tuple[int, list[int]]], cfg: Config, *, pad_id: int,
                segments: bool) -> tuple[list[dict], int, int]:
    """One optimizer step's micro batches on the host, laid out once for every run (padded,
    length-grouped or packed, data.packing), each with its label positions; the step's response
    tokens (the loss divisor) and useful tokens. All counted on the host before anything moves,
    so the step never waits for the device to learn them."""
    batches = step_batches([examples[i] for _, idx in group for i in idx], micro_batch_size=cfg.train.micro_batch_size,
                           row_len=cfg.data.max_seq_length, pad_id=pad_id, device=torch.device("cpu"),
                           packing=cfg.data.packing, segments=segments, group_by_length=cfg.train.group_by_length)
    n_loss = sum(count_labels(b["labels"]) for b in batches)
    tokens = sum(int(b.pop("n_tokens")) for b in batches)
    for b in batches:
        b["positions"] = label_positions(b["labels"])
    return batches, n_loss, tokens


def forward_backward(adapters, runs: list[Run], examples: list[Example], group: list[tuple[int, list[int]]],
                     cfg: Config, *, pad_id: int, device: torch.device, segments: bool) -> tuple[torch.Tensor, int]:
    """Accumulate every run's gradient of one optimizer step; ((runs,) mean losses, on the
    device, and the step's useful tokens). Each run's loss is the sum over the step's response
    tokens divided by their count, in every layout; nothing here waits for the device."""
    batches, n_loss, tokens = host_layout(examples, group, cfg, pad_id=pad_id, segments=segments)
    step_loss = torch.zeros(len(runs), dtype=torch.float64, device=device)
    first = runs[0].state.micro_batches  # the micro batches before this step (equal in every live run)
    for j, batch in enumerate(batches):
        batch = to_device(batch, device)
        # backward inside the routing: activation checkpointing recomputes forwards during it;
        # draw numbers the micro batch (unique: a step has at most batch_size of them, packed or
        # not); with each run's seed it seeds the run's dropout masks, the same in any group
        draw = first * cfg.train.batch_size + j
        with adapters.routed([r.index for r in runs], rows_each=batch["input_ids"].shape[0], draw=draw):
            losses = run_losses(adapters.model, batch, len(runs), runs[0].cfg.train.autocast) / n_loss
            if runs[0].scaler is None:
                losses.sum().backward()
            else:  # fp16: each run's loss times its own scale, so small gradients stay representable
                torch.stack([r.scaler.scale(loss) for r, loss in zip(runs, losses, strict=True)]).sum().backward()
        step_loss += losses.detach()
    return step_loss, tokens


@torch.no_grad()
def evaluate_losses(adapters, runs: list[int], examples: list[Example], *, batch_size: int, pad_id: int,
                    device: torch.device, autocast: str) -> list[float]:
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
    losses = evaluate_losses(setup.adapters, [r.index for r in runs], setup.splits.val, batch_size=batch_size,
                             pad_id=setup.tokenizer.pad_token_id, device=setup.device, autocast=cfg.train.autocast)
    for run, eval_loss in zip(runs, losses, strict=True):
        state = run.state
        state.eval_loss = finite_or_none(eval_loss)
        if state.eval_loss is not None:
            state.best_eval_loss = min(state.best_eval_loss or math.inf, state.eval_loss)
        task_values = {}
        with setup.adapters.only(run.index), fails_alone(run, runs, f"evaluation at step {step}"):
            task_values = run_eval_tasks(setup.adapters.model, setup.tokenizer, setup.tasks, batch_size=batch_size)
        if run.status is not Status.RUNNING:
            continue
        for k, v in task_values.items():
            state.task_history.setdefault(k, []).append(v)
        run.metrics.write(step=step, eval_loss=eval_loss if setup.splits.val else None, tokens_seen=state.tokens_seen,
                          **task_values)


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


def may_halve(cfg: Config, data_cfg: Config) -> bool:
    return bool(cfg.train.auto_micro_batch) and data_cfg.train.micro_batch_size > 1


# ----------------------------------------------------------------------------- the loop


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


class Clock:
    """Splits shared wall, step and CPU time among runs in equal shares."""

    def __init__(self) -> None:
        self.start = self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt

    def charge(self, runs: list[Run], *, train_s: float = 0.0, cpu_s: float = 0.0) -> None:
        dt = self.lap()
        for r in runs:
            r.session_wall_s += dt / len(runs)
            r.state.train_time_s += train_s / len(runs)
            r.state.train_cpu_time_s += cpu_s / len(runs)

    @contextlib.contextmanager
    def charge_to(self, run: Run):
        self.lap()
        yield
        self.charge([run])


def fit(runs: list[Run], setup: Setup, *, resume: bool, show_progress: bool, prune: Prune | None,
        clock: Clock, on_start) -> dict[str, Any]:
    """Train every run of the group; checkpoint, evaluate, prune, save. Statuses and summaries
    of runs that end early are recorded as they end; returns the group's shared figures."""
    cfg, adapters, splits, device = runs[0].cfg, setup.adapters, setup.splits, setup.device
    on_start()  # from here on, bad input is a failed run, not an invalid one
    steps = plan_steps(cfg, len(splits.train))
    stop = min(steps, cfg.train.stop_at_step or steps)
    step = start_runs(runs, adapters, steps=steps, resume=resume, device=device, fp16=setup.fp16)
    rungs = set(prune.rungs(steps)) if prune is not None else set()
    state0 = runs[0].state
    # The data stream at the micro batch size in force (auto_micro_batch may have halved it).
    data_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=state0.micro_batch_size))
    stream = stream_from(len(splits.train), data_cfg, skip=state0.micro_batches)
    pad_id = setup.tokenizer.pad_token_id
    peak = PeakMemory(device)
    peak.reset()
    group_train_s = 0.0
    clock.charge(runs)  # set-up, in equal shares

    adapters.model.train()
    with contextlib.ExitStack() as scope:
        if step > 0:
            scope.enter_context(pinned_arithmetic(state0.arithmetic, where=str(runs[0].dir.root)))
        bar = scope.enter_context(progress(steps, unit="step", initial=step, enabled=show_progress))
        if setup.attention == "per_example":  # for the whole loop: activation checkpointing repeats forwards in backward
            scope.enter_context(segment_attention(adapters.model))
        while step < stop:
            live = [r for r in runs if r.status is Status.RUNNING]
            if not live:
                break
            step += 1
            t0, cpu0 = time.perf_counter(), time.process_time()
            group = [next(stream) for _ in range(data_cfg.grad_accum)]
            try:
                step_loss, tokens = forward_backward(adapters, live, splits.train, group, data_cfg, pad_id=pad_id,
                                                     device=device, segments=setup.attention == "per_example")
            except torch.OutOfMemoryError:
                for r in live:
                    r.opt.zero_grad(set_to_none=True)
                if not may_halve(cfg, data_cfg):
                    raise
                # Same global batch, half the micro batch: the step is redone from its start.
                step -= 1
                halve_micro_batch(data_cfg, live, done=step, peak=peak, where="in training")
                stream = stream_from(len(splits.train), data_cfg, skip=live[0].state.micro_batches)
                continue
            for r in live:
                if r.scaler is not None:
                    r.scaler.unscale_(r.opt)  # on the device: no sync
            norms = [torch.nn.utils.clip_grad_norm_(r.params, r.cfg.train.grad_clip or float("inf")) for r in live]
            # the step's one host-device sync: every run's loss and gradient norm at once
            values = torch.cat([step_loss, torch.stack(norms).to(step_loss)]).tolist()
            for r, loss, norm in zip(live, values[:len(live)], values[len(live):], strict=True):
                take_step(r, step=step, steps=steps, loss=loss, grad_norm=norm, group=group, tokens=tokens)
            dt = time.perf_counter() - t0
            group_train_s += dt
            clock.charge(live, train_s=dt, cpu_s=time.process_time() - cpu0)
            for r in live:
                r.state.step = step
            going = [r for r in live if r.status is Status.RUNNING]
            rung = step in rungs
            if going and ((cfg.eval.every and step % cfg.eval.every == 0) or step == stop or rung):
                while True:
                    try:
                        evaluate(setup, going, step=step, batch_size=eval_batch_size(data_cfg, state0, device))
                        break
                    except torch.OutOfMemoryError:
                        if not may_halve(cfg, data_cfg):
                            raise
                        halve_micro_batch(data_cfg, going, done=step, peak=peak, where="in evaluation")
                        stream = stream_from(len(splits.train), data_cfg, skip=going[0].state.micro_batches)
                clock.charge(going)
                going = [r for r in going if r.status is Status.RUNNING]  # a run whose evaluation failed ended alone
            if rung:
                stop_worst(going, prune, step=step, steps=steps, setup=setup)
                going = [r for r in going if r.status is Status.RUNNING]
            if going and step < steps and (step == stop or (cfg.train.checkpoint_every
                                                            and step % cfg.train.checkpoint_every == 0)):
                save_checkpoints(going, adapters, clock=clock, keep_last=cfg.train.keep_last, device=device)
            bar.update(1)
            if going:
                bar.set_postfix(loss=f"{sum(values[i] for i, r in enumerate(live) if r in going) / len(going):.4f}")

    finished = [r for r in runs if r.status is Status.RUNNING]
    for r in runs:
        if r.metrics is not None and not r.metrics.f.closed:
            r.metrics.close()
    saved = [r for r in finished if r.cfg.output.save_adapter]
    if saved:
        adapters.save(saved, clock.charge_to)
    for r in finished:
        if r.status is Status.RUNNING:  # not a run whose save failed alone
            r.status = Status.COMPLETED if stop == steps else Status.PAUSED
    return {"steps": steps, "group_train_time_s": group_train_s, "peak_memory_bytes": peak.bytes()}


def take_step(run: Run, *, step: int, steps: int, loss: float, grad_norm: float, group, tokens: int) -> None:
    """Run ``run``'s optimizer step, or its non-finite handling: skipped (on_nonfinite skip) or
    diverged (stop: the run ends here, nothing from after it is saved)."""
    st = run.state
    st.micro_batches += len(group)
    st.tokens_seen += tokens
    st.epoch = group[-1][0]
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
            run.metrics.write(step=step, event=Status.DIVERGED, train_loss=loss, grad_norm=grad_norm)
            last = latest_checkpoint(run.dir.root)
            run.status = Status.DIVERGED
            run.record(status=Status.DIVERGED, diverged_at_step=step, last_good_checkpoint=str(last) if last else None,
                       error=f"non-finite loss or gradient at step {step} (loss {loss}, gradient norm {grad_norm}); "
                             f"no adapter from after it is saved; last good checkpoint: {last or 'none'}")
            run.metrics.close()
            return
        st.skipped_steps += 1
        run.metrics.write(step=step, event="skipped_nonfinite", train_loss=loss, skipped_steps=st.skipped_steps)
        return
    run.opt.step()  # gradients known finite (unscaled already with fp16): no scaler.step and its sync
    if run.scaler is not None:
        run.scaler.update()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    if step % run.cfg.train.log_every == 0 or step == steps:
        run.metrics.write(step=step, epoch=st.epoch, train_loss=loss, lr=run.sched.get_last_lr()[0],
                          tokens_seen=st.tokens_seen, grad_norm=grad_norm)


def stop_worst(going: list[Run], prune: Prune, *, step: int, steps: int, setup: Setup) -> None:
    """Successive halving at a rung: the runs not among the best ceil(n / eta) stop here."""
    ranked = sorted(going, key=prune.score)
    for r in ranked[keep_count(len(ranked), prune.eta):]:
        r.status = Status.STOPPED_EARLY
        r.metrics.write(step=step, event=Status.STOPPED_EARLY, rung=step)
        r.metrics.close()
        r.record(status=Status.STOPPED_EARLY, stopped_at_step=step,
                 **run_result(r, setup, steps=steps, extra={"fused": {"stopped_by": "successive halving in the group"}}))


def save_checkpoints(runs: list[Run], adapters, *, clock: Clock, keep_last: int, device: torch.device) -> None:
    """One checkpoint per run, each in its own run directory; old ones are pruned only once every
    run has saved this step, so a kill in between leaves a step all runs can resume from."""
    for r in runs:
        with clock.charge_to(r):
            r.state.wall_time_s = r.state.wall_time_s + r.session_wall_s
            r.state.grad_scaler = r.scaler.state_dict() if r.scaler is not None else None
            try:
                r.checkpoint = save_checkpoint(r.dir.root, r.state, params=adapters.named_params(r.index),
                                               opt=r.opt, sched=r.sched, keep_last=None, device=device)
            finally:
                r.state.wall_time_s -= r.session_wall_s
    for r in runs:
        prune_checkpoints(r.dir.checkpoints, keep_last)


# ----------------------------------------------------------------------------- summaries and failures


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


def check_resume_config(cfg: Config, run_dir: RunDir) -> None:
    """Refuse a resume whose config changes anything but RESUME_MAY_CHANGE."""
    if not run_dir.config.is_file():
        return  # never started: the run starts from step 0
    saved = flat_keys(load_config(run_dir.config).to_dict())
    now = flat_keys(cfg.to_dict())
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        detail = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed)
        raise ConfigError(
            f"cannot resume {run_dir.root} with a changed {detail}: the result would no longer equal an "
            f"uninterrupted run; on resume only {', '.join(sorted(RESUME_MAY_CHANGE))} may change"
        )


def open_runs(cfgs: list[Config], run_dirs: list[Path], *, resume: bool, fused: bool,
              group_extra) -> tuple[list[Run], list[dict]]:
    """The runs still to train (config.yaml and a running summary.json written before step 0),
    and the summaries of runs a resume finds already finished (returned as they are): completed
    runs, and in a group also runs that diverged or were stopped early (they left the group; a
    solo diverged run resumes from its last good checkpoint, as a study's retry expects)."""
    runs, done = [], []
    for cfg, path in zip(cfgs, run_dirs, strict=True):
        rd = RunDir(path)
        if resume:
            check_resume_config(cfg, rd)
            previous = rd.read_summary()
            if previous and previous.get("status") in (FINAL if fused else {Status.COMPLETED}):
                log.info("%s is already %s; nothing to resume", path, previous["status"])
                done.append(previous)
                continue
        done.append(None)
        rd.root.mkdir(parents=True, exist_ok=True)
        cfg.output.dir = str(path)
        if not resume:
            clear_run_outputs(rd)
        dump_config(cfg, rd.config)
        summary = {"status": Status.RUNNING, "error": None, "run_dir": str(path), "versions": versions(),
                   "trust_remote_code": cfg.model.trust_remote_code,
                   "base": base_record(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code),
                   **group_extra(path)}
        run = Run(len(runs), cfg, rd, summary)
        if not fused:  # a fused group's runs go to their trackers when the group ends (loralab.track)
            run.tracker = open_trackers(cfg, path, resume=resume)
        run.record()
        runs.append(run)
    return runs, done


def run_group(cfgs: list[Config], run_dirs: list[Path], *, fused: bool, resume: bool = False,
              show_progress: bool = False, prune: Prune | None = None,
              group_extra=lambda path: {}) -> tuple[list[dict[str, Any]], Setup | None]:
    """Train ``cfgs`` as one group; every run directory always gets its summary.json.

    A run that diverges or is pruned ends alone and the rest train on; a failure of the whole
    group (loading, data, memory, disk) is recorded in every unfinished run and raised: bad
    config, data or model found before the first step is ``invalid``, out of memory
    ``out_of_memory`` with the estimate beside the measured peak, anything else ``failed``.
    Returns one summary per config, in order, and the set-up (for keep_model).
    """
    runs, done = open_runs(cfgs, run_dirs, resume=resume, fused=fused, group_extra=group_extra)
    if not runs:
        return done, None
    clock = Clock()
    started = False

    def on_start() -> None:
        nonlocal started
        started = True

    def fail(status: Status, error: str, **extra: Any) -> None:
        for r in runs:
            if r.status is Status.RUNNING:
                r.record(status=status, error=error, **extra)
        finish_tracking(runs)

    setup = None
    try:
        # Adapters are seeded per run: a group resumed with fewer runs still rebuilds the same ones.
        setup = load_group([r.cfg for r in runs], fused=fused, progress=show_progress)
        for r in runs:  # a run whose own adapters cannot be built is invalid alone
            if r.index in setup.adapters.rejected:
                end_alone(r, Status.INVALID, str(setup.adapters.rejected[r.index]))
        shared = fit([r for r in runs if r.status is Status.RUNNING], setup, resume=resume,
                     show_progress=show_progress, prune=prune, clock=clock, on_start=on_start)
    except RunsRejected as exc:
        for r in runs:
            r.record(status=Status.INVALID, error=str(exc.errors[r.index]))
        finish_tracking(runs)
        raise
    except LoralabError as exc:
        invalid = not started and isinstance(exc, (ConfigError, DataError, ModelError))
        fail(Status.INVALID if invalid else Status.FAILED, str(exc))
        raise
    except torch.OutOfMemoryError as exc:
        cfg = runs[0].cfg
        details = oom_details(cfg, pick_device(cfg.model.device))
        first = str(exc).splitlines()[0]
        fail(Status.OUT_OF_MEMORY, first, **details)
        est = details["estimated_memory_bytes"]
        raise LoralabError(
            f"out of memory at micro batch {cfg.train.micro_batch_size}: measured peak "
            f"{details['peak_memory_bytes'] / 2**20:.0f} MiB, loralab estimate "
            f"{'n/a' if est is None else f'{est / 2**20:.0f} MiB'}; lower train.micro_batch_size "
            f"or set train.auto_micro_batch=true ({first})"
        ) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            fail(Status.FAILED, f"{type(exc).__name__}: {exc}")
            raise
        last = latest_checkpoint(runs[0].dir.root)
        error = f"disk full while writing the run ({exc}); the last complete checkpoint is {last or 'none'}"
        fail(Status.FAILED, error)
        raise DiskFullError(error) from None
    except Exception as exc:
        fail(Status.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    group_wall = time.perf_counter() - clock.start
    ended = [r for r in runs if r.status in (Status.COMPLETED, Status.PAUSED)]
    # What no phase counted goes to the runs whose summaries are still to be written.
    leftover = group_wall - sum(r.session_wall_s for r in runs)
    for r in ended or runs:
        r.session_wall_s += leftover / len(ended or runs)
    extra = {}
    if fused:
        extra["fused"] = {
            "group_size": len(runs),
            "group_wall_time_s": group_wall,
            "group_train_time_s": shared["group_train_time_s"],
            "time_attribution": "equal shares: step time among the runs training at that step, set-up and "
                                "unattributed time among all runs, each adapter save to its own run",
            "peak_memory": "peak_memory_bytes is the whole group's process",
        }
    for r in ended:
        r.record(status=r.status, error=None,
                 **run_result(r, setup, steps=shared["steps"], extra=extra, peak_memory_bytes=shared["peak_memory_bytes"]))
    finish_tracking(runs)
    it = iter(r.summary for r in runs)
    return [d if d is not None else next(it) for d in done], setup


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
        raise exc

