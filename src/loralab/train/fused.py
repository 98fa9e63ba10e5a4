"""Several LoRA runs trained together over one frozen base, in one process.

    from loralab.train.fused import fuse_key, train_fused
    groups: dict[tuple, list[Config]] = {}
    for cfg in cfgs:                       # runs with equal keys can share a base
        groups.setdefault(fuse_key(cfg), []).append(cfg)
    for group in groups.values():
        summaries = train_fused(group)     # one summary per run, in order

The base is loaded once. Each step builds the shared micro batches once (every run of a
group sees the same data in the same order), stacks one copy per run along the batch
dimension, and runs the base once over all of them; run k's rows go through run k's own
adapters (loralab.batched_lora). Losses, gradient clipping, optimizer, schedule, metrics and
the run directory are each run's own, exactly as train(cfg) writes them, with two additions
to summary.json: "fused_with" (the other run directories of the group) and "fused" (the
group's size and its shared times). Shared time is attributed in equal shares: each step's
time is split equally among the runs still training at that step, setup equally among all
runs, each adapter save to its own run; so the wall times of a group sum to its real wall
time, and tokens_per_s is a run's tokens over its share of the step time.

With lora.dropout = 0 a fused run follows its solo run within float rounding (the tests hold
loss curves to 1e-4 relative); with dropout the masks come from a different random stream.
A run that diverges stops alone (status diverged); the rest of the group trains on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralab.batched_lora import (
    AdapterInit,
    Routing,
    initial_adapter,
    install,
    remove,
    run_parameters,
    save_trained_adapter,
    trained_weights,
)
from loralab.config import Config, dump_config
from loralab.data.dataset import IGNORE, Example, collate
from loralab.data.packing import step_batches
from loralab.errors import ConfigError, DataError, LoralabError, ModelError
from loralab.halving import halving_rungs, keep_count, rank_key
from loralab.models import keep_4bit_trainable, load_base, pick_device
from loralab.track import track_finished
from loralab.train.attention import segment_attention
from loralab.train.loop import (
    MetricsWriter,
    best_of,
    clear_run_outputs,
    default_run_dir,
    forward_logits,
    label_positions,
    load_data_and_tasks,
    micro_batches,
    packed_attention,
    plan_steps,
    progress,
    run_eval_tasks,
    seed_everything,
    token_loss_sum,
    write_json,
)
from loralab.train.measure import peak_memory_bytes, versions
from loralab.train.optim import build_optimizer, build_scheduler

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

    Raises ConfigError for a run that can never be fused (DoRA, checkpoints, activation
    checkpointing, auto micro batch):
    train it alone.
    """
    if cfg.lora.dora:
        raise ConfigError("lora.dora: DoRA runs cannot be fused (the batched LoRA layer has no "
                          "magnitude vector); train them alone")
    for key in ("checkpoint_every", "stop_at_step"):  # resumable checkpoints are per solo run
        if getattr(cfg.train, key, None):
            raise ConfigError(f"train.{key}: fused runs do not checkpoint; train this run alone or set it to 0/null")
    if cfg.train.auto_micro_batch:
        raise ConfigError("train.auto_micro_batch: a fused group does not shrink its micro batch on out of memory; "
                          "train this run alone or set it to false")
    if cfg.train.gradient_checkpointing:  # backward's recomputed forwards would run outside the group's row routing
        raise ConfigError("train.gradient_checkpointing: fused runs keep their activations; train this run alone "
                          "or set it to false")
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


@dataclass
class Member:
    """One run of a fused group: its config, adapter, optimizer and what it has measured."""

    index: int
    cfg: Config
    run_dir: Path
    init: AdapterInit
    params: list[torch.nn.Parameter] = field(default_factory=list)
    opt: torch.optim.Optimizer | None = None
    sched: Any = None
    metrics: MetricsWriter | None = None
    status: str = "running"
    tokens_seen: int = 0
    train_time: float = 0.0  # its share of the group's step time
    wall_time: float = 0.0  # its share of the group's wall time
    skipped: int = 0
    eval_loss: float = float("nan")
    best_eval: float = float("inf")
    task_history: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Prune:
    """Successive halving inside a fused group: at each rung step the live runs are ranked on
    ``metric`` and only the best ``ceil(n / eta)`` train on (as the study's process-level
    halving); the rest end with status stopped_early at that step. The lr schedule stays the
    full run's, so a survivor's result is what it would have been without pruning."""

    eta: int = 3
    min_steps: int = 10
    metric: str = "eval_loss"
    goal: str = "min"

    def rungs(self, steps: int) -> list[int]:
        return halving_rungs(self.min_steps, self.eta, steps)

    def score(self, m: Member) -> float:
        value = m.eval_loss if self.metric == "eval_loss" else (m.task_history.get(self.metric) or [float("nan")])[-1]
        return rank_key(value, self.goal)


def stack_runs(batch: dict, n: int) -> dict:
    """n copies of a collated batch along the batch dimension: (n * batch, seq); a packed
    batch's example boundaries are the same in every copy."""
    return {k: v.repeat(n, 1) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items() if k not in ("labels", "n_tokens")}


def fused_backward(model, routing: Routing, live: list[Member], batch: dict[str, torch.Tensor], *,
                   n_loss: int, autocast: str) -> list[float]:
    """One forward over every live run's copy of ``batch``, one backward of the summed losses.

    Each run's loss is its response-token sum over its own rows divided by the step's response
    tokens, as in loop.fit; adapters are disjoint, so each run's gradients are its own.
    """
    rows = batch["input_ids"].shape[0]
    positions = label_positions(batch["labels"])
    with routing.rows([m.index for m in live], rows_each=rows):
        logits = forward_logits(model, stack_runs(batch, len(live)), autocast, positions)  # (runs * rows, positions, vocab)
    losses = [token_loss_sum(logits[j * rows:(j + 1) * rows], batch["labels"], positions) / n_loss
              for j in range(len(live))]
    stacked = torch.stack(losses)
    stacked.sum().backward()
    return stacked.tolist()


@torch.no_grad()
def evaluate_losses(model, routing: Routing, runs: list[int], examples: list[Example], *, batch_size: int,
                    pad_id: int, device, autocast: str) -> list[float]:
    """Each run's mean cross-entropy per response token over ``examples`` (one forward per batch)."""
    if not examples:
        return [float("nan")] * len(runs)
    was_training = model.training
    model.eval()
    totals, count = [0.0] * len(runs), 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, device)
        rows = batch["input_ids"].shape[0]
        positions = label_positions(batch["labels"])
        with routing.rows(runs, rows_each=rows):
            logits = forward_logits(model, stack_runs(batch, len(runs)), autocast, positions)
        for j in range(len(runs)):
            totals[j] += token_loss_sum(logits[j * rows:(j + 1) * rows], batch["labels"], positions).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    return [t / max(1, count) for t in totals]


def charge(members: list[Member], seconds: float, *, train: bool = False) -> None:
    """Split ``seconds`` of shared time equally among ``members``."""
    for m in members:
        m.wall_time += seconds / len(members)
        if train:
            m.train_time += seconds / len(members)


def fit_fused(cfgs: list[Config], run_dirs: list[Path], *, record: Callable[..., None],
              show_progress: bool, prune: Prune | None = None,
              on_first_step: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Load once, train every run of the group, save each adapter. ``record(k, **fields)``
    updates run k's summary.json (a diverged run is recorded the moment it diverges);
    ``on_first_step()`` is called once base, adapters and data are ready."""
    t_start = time.perf_counter()
    cfg = cfgs[0]  # every shared key is equal across the group (check_group)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.model.device)
    base, tokenizer = load_base(cfg.model, cfg.quant)
    keep_4bit_trainable(base)
    members = [Member(k, c, d, initial_adapter(base, c.lora, seed=c.train.seed))
               for k, (c, d) in enumerate(zip(cfgs, run_dirs, strict=True))]
    attention = packed_attention(cfg, base)  # a property of the base model, checked before the adapters go in
    routing = install(base, [m.init.weights for m in members])
    splits, tasks = load_data_and_tasks(cfg, base, tokenizer)
    steps = plan_steps(cfg, len(splits.train))
    rungs = set(prune.rungs(steps)) if prune is not None else set()
    for m in members:
        m.params = run_parameters(base, m.index)
        m.opt = build_optimizer(m.params, m.cfg.train)
        m.sched = build_scheduler(m.opt, m.cfg.train, steps)
        m.metrics = MetricsWriter(m.run_dir / "metrics.jsonl")
    pad_id = tokenizer.pad_token_id
    eval_kw = dict(batch_size=max(cfg.train.micro_batch_size, 8), pad_id=pad_id, device=device, autocast=cfg.train.autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    group_train_time = 0.0
    charge(members, time.perf_counter() - t_start)

    on_first_step()
    base.train()
    stream = micro_batches(len(splits.train), cfg)
    with contextlib.ExitStack() as scope:
        if attention == "per_example":  # for the whole loop, as in loop.fit
            scope.enter_context(segment_attention(base))
        for step in range(1, steps + 1):
            live = [m for m in members if m.status == "running"]
            if not live:
                break
            t0 = time.perf_counter()
            group = [next(stream) for _ in range(cfg.grad_accum)]
            # The same layout as a solo run's step (padded, length-grouped or packed): same maths.
            batches = step_batches([splits.train[i] for _, idx in group for i in idx],
                                   micro_batch_size=cfg.train.micro_batch_size, row_len=cfg.data.max_seq_length,
                                   pad_id=pad_id, device=device, packing=cfg.data.packing,
                                   segments=attention == "per_example", group_by_length=cfg.train.group_by_length)
            n_loss = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            step_loss = [0.0] * len(live)
            for batch in batches:
                losses = fused_backward(base, routing, live, batch, n_loss=n_loss, autocast=cfg.train.autocast)
                step_loss = [a + b for a, b in zip(step_loss, losses, strict=True)]
                tokens = int(batch["n_tokens"])
                for m in live:
                    m.tokens_seen += tokens
            stepped, grad_norms = [], {}
            for m, loss in zip(live, step_loss, strict=True):
                grad_norm = torch.nn.utils.clip_grad_norm_(m.params, m.cfg.train.grad_clip or float("inf"))
                if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                    m.opt.zero_grad(set_to_none=True)
                    if m.cfg.train.on_nonfinite == "stop":
                        m.metrics.write(step=step, event="diverged", train_loss=loss)
                        m.metrics.close()
                        m.status = "diverged"
                        record(m.index, status="diverged",
                               error=f"non-finite loss or gradient at step {step} (loss {loss}); no adapter from after it is saved")
                    else:
                        m.skipped += 1
                    continue
                m.opt.step()
                m.sched.step()
                m.opt.zero_grad(set_to_none=True)
                stepped.append(m)
                grad_norms[m.index] = float(grad_norm)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            group_train_time += dt
            charge(live, dt, train=True)
            epoch = group[-1][0]
            losses_by_run = {m.index: loss for m, loss in zip(live, step_loss, strict=True)}
            for m in stepped:
                if step % m.cfg.train.log_every == 0 or step == steps:
                    m.metrics.write(step=step, epoch=epoch, train_loss=losses_by_run[m.index], lr=m.sched.get_last_lr()[0],
                                    tokens_seen=m.tokens_seen, grad_norm=grad_norms[m.index])
            rung = step in rungs
            if stepped and ((cfg.eval.every and step % cfg.eval.every == 0) or step == steps or rung):
                t_eval = time.perf_counter()
                evaluate_group(base, routing, tokenizer, stepped, splits.val, tasks, step=step, eval_kw=eval_kw)
                charge(stepped, time.perf_counter() - t_eval)
            if rung:
                ranked = sorted((m for m in members if m.status == "running"), key=prune.score)
                for m in ranked[keep_count(len(ranked), prune.eta):]:
                    m.status = "stopped_early"
                    m.metrics.write(step=step, event="stopped_early", rung=step)
                    m.metrics.close()
                    record(m.index, status="stopped_early", stopped_at_step=step,
                           **run_result(m, splits, steps, device, {"stopped_by": "successive halving in the fused group"}, attention))
            if stepped:
                progress(step, steps, sum(losses_by_run[m.index] for m in stepped) / len(stepped), show_progress)

    for m in members:
        if m.status == "running":
            m.metrics.close()
    finished = [m for m in members if m.status == "running"]
    weights = {m.index: trained_weights(base, m.index) for m in finished}
    remove(base)
    for m in finished:
        if m.cfg.output.save_adapter:
            t_save = time.perf_counter()
            save_trained_adapter(base, m.cfg.lora, seed=m.cfg.train.seed, weights=weights[m.index],
                                 out_dir=m.run_dir / "adapter")
            m.wall_time += time.perf_counter() - t_save
    group_wall = time.perf_counter() - t_start
    # What no phase above counted goes to the runs whose summaries are still to be written.
    charge(finished or members, group_wall - sum(m.wall_time for m in members))
    shared = {
        "group_size": len(members),
        "group_wall_time_s": group_wall,
        "group_train_time_s": group_train_time,
        "time_attribution": "equal shares: step time among the runs training at that step, setup and "
                            "unattributed time among all runs, each adapter save to its own run",
        "peak_memory": "peak_memory_bytes is the whole group's process",
    }
    for m in finished:
        record(m.index, status="completed", **run_result(m, splits, steps, device, shared, attention))
    return shared


def evaluate_group(model, routing: Routing, tokenizer, members: list[Member], val: list[Example], tasks, *,
                   step: int, eval_kw: dict[str, Any]) -> None:
    """Eval loss of every member in shared forwards; eval tasks run member by member."""
    losses = evaluate_losses(model, routing, [m.index for m in members], val, **eval_kw)
    for m, eval_loss in zip(members, losses, strict=True):
        m.eval_loss = eval_loss
        m.best_eval = min(m.best_eval, eval_loss)
        with routing.only(m.index):
            task_values = run_eval_tasks(model, tokenizer, tasks, batch_size=eval_kw["batch_size"])
        for k, v in task_values.items():
            m.task_history.setdefault(k, []).append(v)
        m.metrics.write(step=step, eval_loss=eval_loss, tokens_seen=m.tokens_seen, **task_values)


def run_result(m: Member, splits, steps: int, device, shared: dict[str, Any], attention: str | None) -> dict[str, Any]:
    """The summary fields loop.fit reports, for one member of the group."""
    return {
        "steps": steps,
        "packed_attention": attention,
        "skipped_steps": m.skipped,
        "train_examples": len(splits.train),
        "val_examples": len(splits.val),
        "dropped_by_length_filter": splits.dropped_by_length,
        "truncated_to_no_response": splits.truncated_to_nothing,
        "data_stats": splits.stats,
        "final_eval_loss": m.eval_loss,
        "best_eval_loss": m.best_eval if math.isfinite(m.best_eval) else None,
        "final_eval_tasks": {k: v[-1] for k, v in m.task_history.items()},
        "best_eval_tasks": {k: best_of(k, v) for k, v in m.task_history.items()},
        "wall_time_s": m.wall_time,
        "train_time_s": m.train_time,
        "tokens_seen": m.tokens_seen,
        "tokens_per_s": m.tokens_seen / m.train_time if m.train_time else 0.0,
        "peak_memory_bytes": peak_memory_bytes(device),
        "trainable_params": m.init.trainable_params,
        "total_params": m.init.total_params,
        "device": str(device),
        "fused": shared,
    }


def prepare_run_dirs(cfgs: list[Config]) -> list[Path]:
    """Create each run directory and write its resolved config.yaml (before step 0, as train does)."""
    dirs = []
    stem = default_run_dir(cfgs[0])  # one timestamp for the group; -0, -1, ... tell the runs apart
    for k, cfg in enumerate(cfgs):
        run_dir = Path(cfg.output.dir) if cfg.output.dir else stem.with_name(f"{stem.name}-{k}")
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_run_outputs(run_dir)
        cfg.output.dir = str(run_dir)
        dump_config(cfg, run_dir / "config.yaml")
        dirs.append(run_dir)
    return dirs


def train_fused(cfgs: list[Config], show_progress: bool = False, prune: Prune | None = None) -> list[dict[str, Any]]:
    """Train ``cfgs`` (one fuse_key) together; one summary per run, in order. With ``prune``,
    successive halving runs inside the group (runs stopped at a rung end stopped_early).

    Every run directory always gets its summary.json. A run that diverges is recorded as
    diverged and the others go on; a failure of the whole group (loading, data, memory) is
    recorded in every unfinished run and raised, as train(cfg) raises.
    """
    check_group(cfgs)
    run_dirs = prepare_run_dirs(cfgs)
    common = {"error": None, "versions": versions(), "trust_remote_code": cfgs[0].model.trust_remote_code}
    summaries = [{"status": "running", "run_dir": str(d), **common,
                  "fused_with": [str(o) for o in run_dirs if o != d]} for d in run_dirs]

    def record(k: int, **fields: Any) -> None:
        summaries[k].update(fields)
        write_json(run_dirs[k] / "summary.json", summaries[k])

    for k in range(len(cfgs)):
        record(k)

    def fail_unfinished(status: str, error: str) -> None:
        for k, s in enumerate(summaries):
            if s["status"] == "running":
                record(k, status=status, error=error)

    started = False

    def first_step() -> None:
        nonlocal started
        started = True

    try:
        fit_fused(cfgs, run_dirs, record=record, show_progress=show_progress, prune=prune, on_first_step=first_step)
    except LoralabError as exc:
        # as train(cfg): bad config, data or model found before the first step is invalid input
        invalid = not started and isinstance(exc, (ConfigError, DataError, ModelError))
        fail_unfinished("invalid" if invalid else "failed", str(exc))
        raise
    except torch.OutOfMemoryError as exc:
        fail_unfinished("out_of_memory", str(exc).splitlines()[0])
        raise LoralabError(f"out of memory: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        fail_unfinished("failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:  # each run of the group goes to its trackers as a run of its own (loralab.track)
        track_finished(cfgs, run_dirs)
    return summaries
