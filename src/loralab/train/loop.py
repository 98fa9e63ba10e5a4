"""One LoRA / QLoRA fine-tuning run, measured, written to a run directory.

    from loralab.config import load_config
    from loralab.train.loop import train
    summary = train(load_config("run.yaml", ["lora.r=16"]))

The run directory holds config.yaml (resolved), metrics.jsonl, summary.json, adapter/
(PEFT format) and, with train.checkpoint_every or train.stop_at_step, checkpoints/.
summary.json is written at the start (status running) and at the end: completed, paused
(train.stop_at_step), invalid (bad config, data or model found before the first step),
failed, diverged or out_of_memory, so a run always says why it ended.

    train(cfg, resume=True)   # continue cfg.output.dir from its newest complete checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import inspect
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loralab.adapters import attach_lora, count_params, save_adapter
from loralab.config import Config, TrackingConfig, dump_config, load_config
from loralab.data.dataset import (
    IGNORE,
    Example,
    Splits,
    collate,
    epoch_order,
    load_splits,
    model_context,
)
from loralab.data.packing import model_inputs, step_batches
from loralab.errors import ConfigError, DataError, DivergedError, LoralabError, ModelError
from loralab.evaluate.tasks import lower_is_better
from loralab.models import keep_4bit_trainable, load_base, pick_device
from loralab.resolve import resolve_config
from loralab.track import Tracker, open_trackers
from loralab.train.attention import NAME as ATTENTION
from loralab.train.attention import segment_attention, supports_segments
from loralab.train.checkpoint import (
    DiskFullError,
    TrainState,
    checkpoint_root,
    clean_temporaries,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from loralab.train.measure import peak_memory_bytes, versions
from loralab.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def default_run_dir(cfg: Config) -> Path:
    stem = Path(cfg.model.path.replace("builtin:", "")).name or "model"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


class MetricsWriter:
    """One JSON object per line; flushed so a killed run keeps what it logged."""

    def __init__(self, path: Path, tracker: Tracker | None = None):
        self.f = path.open("a", encoding="utf-8")
        self.tracker = tracker  # experiment trackers get each row too (loralab.track)

    def write(self, **row: Any) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tracker is not None:
            self.tracker.log(row)

    def close(self) -> None:
        self.f.close()


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a label in any row: the only logits a loss needs."""
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()


def keeps_logits(model) -> bool:
    """Whether the model's forward takes transformers' ``logits_to_keep`` (then the output head
    runs at label positions only, with the model's own logit scaling or soft-capping)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _takes_logits_to_keep(type(base))


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def forward_logits(model, batch: dict, autocast: str, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits for a collated or packed batch: (batch, seq, vocab), or
    (batch, len(positions), vocab) at the given positions."""
    kwargs = model_inputs(batch)
    if "segments" in batch and model.config._attn_implementation != ATTENTION:  # would attend across examples
        raise RuntimeError("a batch of packed examples needs the model inside segment_attention(model)")
    if positions is not None and keeps_logits(model):
        kwargs["logits_to_keep"] = positions
        positions = None
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        logits = model(**kwargs).logits
    return logits if positions is None else logits[:, positions]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over label positions (not averaged); ``logits`` are the
    model's at ``positions`` (label_positions), predicting the labels one token on. Fused training shares it."""
    targets = labels[:, positions + 1]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def response_loss_sum(model, batch: dict, autocast: str) -> torch.Tensor:
    """Sum of next-token cross-entropy over label positions (not averaged)."""
    positions = label_positions(batch["labels"])
    return token_loss_sum(forward_logits(model, batch, autocast, positions), batch["labels"], positions)


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], *, batch_size: int, pad_id: int, device, autocast: str) -> float:
    """Mean cross-entropy per response token over ``examples``."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, device)
        total += response_loss_sum(model, batch, autocast).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    return total / max(1, count)


def run_eval_tasks(model, tokenizer, tasks, *, batch_size: int) -> dict[str, float]:
    """Each task's metrics as {"task/metric": value}, for metrics.jsonl and the summary."""
    model.eval()
    out = {}
    for t in tasks:
        for metric, score in t.run(model, tokenizer, batch_size=batch_size).items():
            out[f"{t.name}/{metric}"] = score.value
    model.train()
    return out


def best_of(key: str, values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)] or [float("nan")]
    return min(finite) if lower_is_better(key) else max(finite)


def plan_steps(cfg: Config, n_train: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_train / cfg.train.batch_size))


def micro_batches(n: int, cfg: Config):
    """Yield (epoch, list of example indices) per micro batch, forever, in seeded order."""
    epoch = 0
    while True:
        order = epoch_order(n, seed=cfg.train.seed, epoch=epoch, shuffle=cfg.data.shuffle)
        mb = cfg.train.micro_batch_size
        # Whole global batches only, so every step sees batch_size examples.
        usable = len(order) - len(order) % cfg.train.batch_size if len(order) >= cfg.train.batch_size else len(order)
        for i in range(0, usable, mb):
            yield epoch, order[i : i + mb]
        epoch += 1


def progress(step: int, total: int, loss: float, enabled: bool) -> None:
    if not enabled:
        return
    width = 30
    done = int(width * step / total)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {loss:.4f}")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


# Keys that ``--resume`` may change: they decide when to stop, log or checkpoint, never the
# maths of a step, so the resumed run still equals an uninterrupted one.
RESUME_MAY_CHANGE = frozenset({
    "train.stop_at_step", "train.checkpoint_every", "train.keep_last", "train.log_every",
    "train.auto_micro_batch", "output.dir", "output.save_adapter",
}) | {f"tracking.{f.name}" for f in dataclasses.fields(TrackingConfig)}


@dataclass
class Setup:
    """Everything loaded before the first step; bad input fails while building it."""

    model: Any
    tokenizer: Any
    splits: Splits
    tasks: list
    device: torch.device
    trainable: int
    total: int


def prepare(cfg: Config) -> Setup:
    """Load base, attach LoRA, read data and evaluation tasks."""
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.model.device)
    base, tokenizer = load_base(cfg.model, cfg.quant)
    keep_4bit_trainable(base)
    model = attach_lora(base, cfg.lora, seed=cfg.train.seed)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(base, cfg.model.path)
    trainable, total = count_params(model)
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    splits, tasks = load_data_and_tasks(cfg, model, tokenizer)
    return Setup(model, tokenizer, splits, tasks, device, trainable, total)


def enable_activation_checkpointing(base, model_path: str) -> None:
    """train.gradient_checkpointing: transformers' non-reentrant activation checkpointing of every
    decoder layer (non-reentrant: gradients reach the adapters though the frozen inputs need none)."""
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(base).__name__} ({model_path}) does not support "
                          "activation checkpointing; set it to false")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_data_and_tasks(cfg: Config, model, tokenizer) -> tuple[Splits, list]:
    """The run's splits, checked against the model's context, and its evaluation tasks
    (resolved before training, so a bad task file fails at once)."""
    splits = load_splits(cfg.data, tokenizer, seed=cfg.train.seed, context=model_context(model.config))
    cfg.data.max_seq_length = splits.stats["max_seq_length"]  # data.max_seq_length: auto, resolved from the data
    check_context(cfg, model, splits)
    if splits.truncated_to_nothing:
        log.warning("%d examples lost every response token to truncation at max_seq_length=%d and were skipped",
                    splits.truncated_to_nothing, cfg.data.max_seq_length)
    tasks = []
    if cfg.eval.tasks:
        from loralab.evaluate.tasks import resolve_tasks

        tasks = resolve_tasks(",".join(cfg.eval.tasks), cfg.eval.limit)
    return splits, tasks


def check_context(cfg: Config, model, splits: Splits) -> None:
    """Refuse examples longer than the positions the model was built for (before they crash a step)."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not context:
        return
    longest = max(len(e.input_ids) for e in splits.train + splits.val)
    if longest > context:
        raise DataError(
            f"{cfg.data.path}: an example is {longest} tokens long, more than the model's context of {context} "
            f"positions (max_position_embeddings in {cfg.model.path}/config.json); set data.max_seq_length "
            f"<= {context} (now {cfg.data.max_seq_length})"
        )


def packed_attention(cfg: Config, model) -> str | None:
    """How packed examples are kept apart: "per_example" (one attention call per example,
    loralab.train.attention) where the model supports it, else "block_mask"; None unpacked."""
    if not cfg.data.packing:
        return None
    window = getattr(model.config, "sliding_window", None) if getattr(model.config, "use_sliding_window", True) else None
    longest = cfg.data.max_seq_length if cfg.data.max_seq_length != "auto" else model_context(model.config) or 0  # auto: at most the context
    if window is not None and window < longest:  # examples may outgrow the window: masks handle it
        return "block_mask"
    return "per_example" if supports_segments(model) else "block_mask"


def forward_backward(model, examples: list[Example], group: list[tuple[int, list[int]]], cfg: Config, *,
                     pad_id: int, device: torch.device, segments: bool = False) -> tuple[float, int]:
    """Accumulate the gradient of one optimizer step's micro batches; (mean loss, useful tokens).

    The step's examples are laid out padded, length-grouped or packed (data.packing); the loss
    is the sum over the step's response tokens divided by their count in every layout.
    """
    batches = step_batches([examples[i] for _, idx in group for i in idx], micro_batch_size=cfg.train.micro_batch_size,
                           row_len=cfg.data.max_seq_length, pad_id=pad_id, device=device,
                           packing=cfg.data.packing, segments=segments, group_by_length=cfg.train.group_by_length)
    n_loss = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    step_loss, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches:
        loss = response_loss_sum(model, batch, cfg.train.autocast) / n_loss
        loss.backward()
        step_loss += loss.detach()  # summed on the device: one host sync per step, not per micro batch
        tokens += int(batch["n_tokens"])
    return step_loss.item(), tokens


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines up to ``last_step`` (and drop a line cut off by a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


def clear_run_outputs(run_dir: Path) -> None:
    """What an earlier run left in ``run_dir`` that a fresh run must not inherit: checkpoints
    (never to be resumed), metric lines (never to be appended to) and the adapter (never to
    stand for this run if it fails)."""
    shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def start_state(cfg: Config, run_dir: Path, *, resume: bool, model, opt, sched) -> tuple[TrainState, Path | None]:
    """A fresh state, or the newest complete checkpoint's when resuming."""
    if resume and checkpoint_root(run_dir).is_dir():
        clean_temporaries(checkpoint_root(run_dir))  # half-written by a killed session
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is None:
        if resume:
            log.info("no complete checkpoint in %s: starting from step 0", run_dir)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        return TrainState(micro_batch_size=cfg.train.micro_batch_size), None
    state = load_checkpoint(ckpt, model=model, opt=opt, sched=sched)
    trim_metrics(run_dir / "metrics.jsonl", state.step)
    log.info("resuming from %s (step %d)", ckpt, state.step)
    return state, ckpt


def stream_from(n_train: int, data_cfg: Config, *, skip: int):
    """The seeded micro batch stream with its first ``skip`` micro batches already taken."""
    stream = micro_batches(n_train, data_cfg)
    for _ in range(skip):
        next(stream)
    return stream


def halve_micro_batch(data_cfg: Config, state: TrainState, *, done: int, n_train: int):
    """After an out-of-memory error: at most half the micro batch, more accumulation, the stream
    repositioned after ``done`` steps. Recorded in the state (and so in checkpoints and summary)."""
    micro = data_cfg.train.micro_batch_size
    # The largest divisor of the global batch at most half the old micro batch: whole micro
    # batches still make up each step, so the maths is unchanged.
    smaller = max(d for d in range(1, micro // 2 + 1) if data_cfg.train.batch_size % d == 0)
    data_cfg.train.micro_batch_size = state.micro_batch_size = smaller
    state.micro_batch_changes.append({"step": done + 1, "from": micro, "to": smaller})
    state.micro_batches = done * data_cfg.grad_accum
    log.warning("out of memory at step %d with micro batch %d: retrying with %d (accumulation %d)",
                done + 1, micro, smaller, data_cfg.grad_accum)
    return stream_from(n_train, data_cfg, skip=state.micro_batches)


def fit(cfg: Config, run_dir: Path, setup: Setup, *, show_progress: bool, resume: bool = False,
        tracker: Tracker | None = None) -> dict[str, Any]:
    """Train, evaluate, checkpoint, save. Returns the summary fields it measured."""
    t_start = time.perf_counter()
    model, tokenizer, splits, device = setup.model, setup.tokenizer, setup.splits, setup.device
    steps = plan_steps(cfg, len(splits.train))
    stop = min(steps, cfg.train.stop_at_step or steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.train)
    sched = build_scheduler(opt, cfg.train, steps)  # planned for the full run, also when pausing
    state, ckpt = start_state(cfg, run_dir, resume=resume, model=model, opt=opt, sched=sched)
    resumed_from, wall_before = state.step, state.wall_time_s
    # The data stream at the micro batch size in force (auto_micro_batch may have halved it).
    data_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=state.micro_batch_size))
    stream = stream_from(len(splits.train), data_cfg, skip=state.micro_batches)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", tracker)
    pad_id = tokenizer.pad_token_id
    # Evaluation keeps no activations for backward, so it may batch wider, unless memory ran short.
    eval_batch = state.micro_batch_size if state.micro_batch_changes else max(cfg.train.micro_batch_size, 8)
    eval_kw = dict(batch_size=eval_batch, pad_id=pad_id, device=device, autocast=cfg.train.autocast)
    attention = packed_attention(cfg, model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.train()
    step = state.step
    with contextlib.ExitStack() as scope:
        if attention == "per_example":  # for the whole loop: activation checkpointing repeats forwards in backward
            scope.enter_context(segment_attention(model))
        while step < stop:
            step += 1
            t0, cpu0 = time.perf_counter(), time.process_time()
            group = [next(stream) for _ in range(data_cfg.grad_accum)]
            try:
                step_loss, tokens = forward_backward(model, splits.train, group, data_cfg, pad_id=pad_id, device=device,
                                                     segments=attention == "per_example")
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                if not cfg.train.auto_micro_batch or data_cfg.train.micro_batch_size == 1:
                    raise
                # Same global batch, half the micro batch: the step is redone from its start.
                step -= 1
                stream = halve_micro_batch(data_cfg, state, done=step, n_train=len(splits.train))
                eval_kw["batch_size"] = min(eval_kw["batch_size"], state.micro_batch_size)
                continue
            state.micro_batches += len(group)
            state.tokens_seen += tokens
            state.epoch = group[-1][0]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
            if not (math.isfinite(step_loss) and torch.isfinite(grad_norm)):
                opt.zero_grad(set_to_none=True)
                if cfg.train.on_nonfinite == "stop":
                    metrics.write(step=step, event="diverged", train_loss=step_loss, grad_norm=float(grad_norm))
                    last = latest_checkpoint(run_dir)
                    exc = DivergedError(f"non-finite loss or gradient at step {step} (loss {step_loss}, gradient norm "
                                        f"{float(grad_norm)}); no adapter from after it is saved; last good checkpoint: {last or 'none'}")
                    exc.step, exc.last_checkpoint = step, str(last) if last else None
                    raise exc
                state.skipped_steps += 1
                metrics.write(step=step, event="skipped_nonfinite", train_loss=step_loss, skipped_steps=state.skipped_steps)
            else:
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if step % cfg.train.log_every == 0 or step == steps:
                    metrics.write(step=step, epoch=state.epoch, train_loss=step_loss, lr=sched.get_last_lr()[0],
                                  tokens_seen=state.tokens_seen, grad_norm=float(grad_norm))
            state.train_time_s += time.perf_counter() - t0
            state.train_cpu_time_s += time.process_time() - cpu0
            state.step = step
            if (cfg.eval.every and step % cfg.eval.every == 0) or step == stop:
                evaluate(model, tokenizer, splits, setup.tasks, state, metrics, eval_kw)
            if step < steps and (step == stop or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)):
                state.wall_time_s = wall_before + time.perf_counter() - t_start
                ckpt = save_checkpoint(run_dir, state, model=model, opt=opt, sched=sched, keep_last=cfg.train.keep_last)
            progress(step, steps, step_loss, show_progress)
    metrics.close()
    if cfg.output.save_adapter:
        save_adapter(model, run_dir / "adapter")
    train_time = state.train_time_s
    return {
        "status": "completed" if stop == steps else "paused",
        "steps": steps,
        "steps_done": state.step,
        "skipped_steps": state.skipped_steps,
        "resumed_from_step": resumed_from if resume else None,
        "checkpoint": str(ckpt) if ckpt else None,
        "micro_batch_size": state.micro_batch_size,
        "micro_batch_changes": state.micro_batch_changes,
        "packed_attention": attention,
        "train_examples": len(splits.train),
        "val_examples": len(splits.val),
        "dropped_by_length_filter": splits.dropped_by_length,
        "truncated_to_no_response": splits.truncated_to_nothing,
        "data_stats": splits.stats,
        "final_eval_loss": state.eval_loss if state.eval_loss is not None else float("nan"),
        "best_eval_loss": state.best_eval_loss,
        "final_eval_tasks": {k: v[-1] for k, v in state.task_history.items()},
        "best_eval_tasks": {k: best_of(k, v) for k, v in state.task_history.items()},
        "wall_time_s": wall_before + time.perf_counter() - t_start,
        "train_time_s": train_time,
        "train_cpu_time_s": state.train_cpu_time_s,  # CPU seconds of training: steadier than wall time on a shared machine
        "tokens_seen": state.tokens_seen,
        "tokens_per_s": state.tokens_seen / train_time if train_time else 0.0,
        "peak_memory_bytes": peak_memory_bytes(device),
        "trainable_params": setup.trainable,
        "total_params": setup.total,
        "device": str(device),
        "_model": model,
        "_tokenizer": tokenizer,
    }


def evaluate(model, tokenizer, splits: Splits, tasks: list, state: TrainState, metrics: MetricsWriter,
             eval_kw: dict[str, Any]) -> None:
    """Validation loss and tasks at ``state.step``, into metrics.jsonl and the state's bookkeeping."""
    eval_loss = evaluate_loss(model, splits.val, **eval_kw)
    state.eval_loss = finite_or_none(eval_loss)
    if state.eval_loss is not None:
        state.best_eval_loss = min(state.best_eval_loss or math.inf, state.eval_loss)
    task_values = run_eval_tasks(model, tokenizer, tasks, batch_size=eval_kw["batch_size"])
    for k, v in task_values.items():
        state.task_history.setdefault(k, []).append(v)
    metrics.write(step=state.step, eval_loss=eval_loss, tokens_seen=state.tokens_seen, **task_values)


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """Refuse a resume whose config changes anything but RESUME_MAY_CHANGE."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return  # never started: the run starts from step 0
    saved = flat_config(load_config(saved_path))
    now = flat_config(cfg)
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        detail = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed)
        raise ConfigError(
            f"cannot resume {run_dir} with a changed {detail}: the result would no longer equal an uninterrupted "
            f"run; on resume only {', '.join(sorted(RESUME_MAY_CHANGE))} may change"
        )


def flat_config(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def oom_details(cfg: Config, device: torch.device) -> dict[str, Any]:
    """The estimate beside the measured peak, for a run that ran out of memory."""
    out: dict[str, Any] = {"peak_memory_bytes": peak_memory_bytes(device), "estimated_memory_bytes": None}
    try:
        from loralab.estimate import estimate_run

        out["estimated_memory_bytes"] = estimate_run(cfg, device=device.type).memory_bytes["total"]
    except Exception as exc:  # an estimate is a courtesy here; the failure is reported either way
        out["estimate_error"] = f"{type(exc).__name__}: {exc}"
    return out


def train(cfg: Config, *, show_progress: bool = False, keep_model: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg``; always leaves summary.json. Raises LoralabError after recording a failure.

    ``resume=True`` continues ``cfg.output.dir`` from its newest complete checkpoint (from
    step 0 when there is none, or when the directory was never started); a completed run is
    returned as it is, so re-running a study is safe.
    """
    if resume and not cfg.output.dir:
        raise ConfigError("resume needs output.dir: the run directory to continue")
    cfg = resolve_config(cfg)[0]  # train.micro_batch_size: auto -> a number, as a study resolves it
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    if resume:
        check_resume_config(cfg, run_dir)
        previous = read_summary(run_dir)
        if previous and previous.get("status") == "completed":
            log.info("%s is already completed; nothing to resume", run_dir)
            return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.output.dir = str(run_dir)
    if not resume:
        clear_run_outputs(run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    summary: dict[str, Any] = {"status": "running", "error": None, "run_dir": str(run_dir), "versions": versions(),
                               "trust_remote_code": cfg.model.trust_remote_code}
    write_json(run_dir / "summary.json", summary)
    phase = "prepare"
    tracker = open_trackers(cfg, run_dir, resume=resume)

    def record(status: str, error: str, **extra: Any) -> None:
        summary.update(status=status, error=error, **extra)
        write_json(run_dir / "summary.json", summary)
        if tracker is not None:
            tracker.finish(summary)

    try:
        setup = prepare(cfg)
        phase = "train"
        result = fit(cfg, run_dir, setup, show_progress=show_progress, resume=resume, tracker=tracker)
    except DivergedError as exc:
        record("diverged", str(exc), diverged_at_step=getattr(exc, "step", None),
               last_good_checkpoint=getattr(exc, "last_checkpoint", None))
        raise
    except LoralabError as exc:
        invalid = phase == "prepare" and isinstance(exc, (ConfigError, DataError, ModelError))
        record("invalid" if invalid else "failed", str(exc))
        raise
    except torch.OutOfMemoryError as exc:
        device = pick_device(cfg.model.device)
        details = oom_details(cfg, device)
        est = details["estimated_memory_bytes"]
        record("out_of_memory", str(exc).splitlines()[0], **details)
        raise LoralabError(
            f"out of memory at micro batch {cfg.train.micro_batch_size}: measured peak {details['peak_memory_bytes'] / 2**20:.0f} MiB, "
            f"loralab estimate {'n/a' if est is None else f'{est / 2**20:.0f} MiB'}; lower train.micro_batch_size "
            f"or set train.auto_micro_batch=true ({summary['error']})"
        ) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            record("failed", f"{type(exc).__name__}: {exc}")
            raise
        record("failed", f"disk full while writing the run ({exc}); the last complete checkpoint is "
                         f"{latest_checkpoint(run_dir) or 'none'}")
        raise DiskFullError(summary["error"]) from None
    except Exception as exc:
        record("failed", f"{type(exc).__name__}: {exc}")
        raise
    model, tokenizer = result.pop("_model"), result.pop("_tokenizer")
    summary.update(error=None, **result)
    write_json(run_dir / "summary.json", summary)
    if tracker is not None:
        tracker.finish(summary)
    if keep_model:
        summary["_model"], summary["_tokenizer"] = model, tokenizer
    return summary
