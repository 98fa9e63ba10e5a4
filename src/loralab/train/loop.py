"""One LoRA / QLoRA fine-tuning run, measured, written to a run directory.

    from loralab.config import load_config
    from loralab.train.loop import train
    summary = train(load_config("run.yaml", ["lora.r=16"]))

The run directory holds config.yaml (resolved), metrics.jsonl, summary.json and
adapter/ (PEFT format). summary.json is written at the start (status running) and at the
end (completed, failed or diverged), so a failed run always says why.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loralab.adapters import attach_lora, count_params, save_adapter
from loralab.config import Config, dump_config
from loralab.data.dataset import IGNORE, Example, collate, epoch_order, load_splits
from loralab.errors import DivergedError, LoralabError
from loralab.models import load_base, pick_device
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

    def __init__(self, path: Path):
        self.f = path.open("a", encoding="utf-8")

    def write(self, **row: Any) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def forward_logits(model, batch: dict[str, torch.Tensor], autocast: str) -> torch.Tensor:
    """The model's logits for a collated batch, (batch, seq, vocab)."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over label positions (not averaged); fused training shares it."""
    logits = logits[:, :-1].float()  # (batch, seq-1, vocab)
    labels = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def response_loss_sum(model, batch: dict[str, torch.Tensor], autocast: str) -> torch.Tensor:
    """Sum of next-token cross-entropy over label positions (not averaged)."""
    return token_loss_sum(forward_logits(model, batch, autocast), batch["labels"])


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
    lower_is_better = key.endswith(("/loss", "/perplexity"))
    finite = [v for v in values if math.isfinite(v)] or [float("nan")]
    return min(finite) if lower_is_better else max(finite)


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


def fit(cfg: Config, run_dir: Path, *, show_progress: bool) -> dict[str, Any]:
    """Load, attach LoRA, train, evaluate, save. Returns the summary fields it measured."""
    t_start = time.perf_counter()
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.model.device)
    base, tokenizer = load_base(cfg.model, cfg.quant)
    model = attach_lora(base, cfg.lora, seed=cfg.train.seed)
    trainable, total = count_params(model)
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    splits = load_splits(cfg.data, tokenizer, seed=cfg.train.seed)
    if splits.truncated_to_nothing:
        log.warning("%d examples lost every response token to truncation at max_seq_length=%d and were skipped",
                    splits.truncated_to_nothing, cfg.data.max_seq_length)
    tasks = []
    if cfg.eval.tasks:  # resolved before training, so a bad task file fails at once
        from loralab.evaluate.tasks import resolve_tasks

        tasks = resolve_tasks(",".join(cfg.eval.tasks), cfg.eval.limit)
    task_history: dict[str, list[float]] = {}
    steps = plan_steps(cfg, len(splits.train))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.train)
    sched = build_scheduler(opt, cfg.train, steps)
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    pad_id = tokenizer.pad_token_id
    eval_kw = dict(batch_size=max(cfg.train.micro_batch_size, 8), pad_id=pad_id, device=device, autocast=cfg.train.autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.train()
    stream = micro_batches(len(splits.train), cfg)
    tokens_seen, train_time, skipped, best_eval, eval_loss = 0, 0.0, 0, float("inf"), float("nan")
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        group = [next(stream) for _ in range(cfg.grad_accum)]
        batches = [collate([splits.train[i] for i in idx], pad_id, device) for _, idx in group]
        n_loss = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        step_loss = 0.0
        for batch in batches:
            loss = response_loss_sum(model, batch, cfg.train.autocast) / n_loss
            loss.backward()
            step_loss += loss.item()
            tokens_seen += int(batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
        if not (math.isfinite(step_loss) and torch.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            if cfg.train.on_nonfinite == "stop":
                metrics.write(step=step, event="diverged", train_loss=step_loss)
                raise DivergedError(f"non-finite loss or gradient at step {step} (loss {step_loss}); no adapter from after it is saved")
            skipped += 1
            continue
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        epoch = group[-1][0]
        if step % cfg.train.log_every == 0 or step == steps:
            metrics.write(step=step, epoch=epoch, train_loss=step_loss, lr=sched.get_last_lr()[0],
                          tokens_seen=tokens_seen, grad_norm=float(grad_norm))
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == steps:
            eval_loss = evaluate_loss(model, splits.val, **eval_kw)
            best_eval = min(best_eval, eval_loss)
            task_values = run_eval_tasks(model, tokenizer, tasks, batch_size=eval_kw["batch_size"])
            for k, v in task_values.items():
                task_history.setdefault(k, []).append(v)
            metrics.write(step=step, eval_loss=eval_loss, tokens_seen=tokens_seen, **task_values)
        progress(step, steps, step_loss, show_progress)
    metrics.close()
    if cfg.output.save_adapter:
        save_adapter(model, run_dir / "adapter")
    return {
        "steps": steps,
        "skipped_steps": skipped,
        "train_examples": len(splits.train),
        "val_examples": len(splits.val),
        "dropped_by_length_filter": splits.dropped_by_length,
        "truncated_to_no_response": splits.truncated_to_nothing,
        "final_eval_loss": eval_loss,
        "best_eval_loss": best_eval if math.isfinite(best_eval) else None,
        "final_eval_tasks": {k: v[-1] for k, v in task_history.items()},
        "best_eval_tasks": {k: best_of(k, v) for k, v in task_history.items()},
        "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": train_time,
        "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_seen / train_time if train_time else 0.0,
        "peak_memory_bytes": peak_memory_bytes(device),
        "trainable_params": trainable,
        "total_params": total,
        "device": str(device),
        "_model": model,
        "_tokenizer": tokenizer,
    }


def train(cfg: Config, *, show_progress: bool = False, keep_model: bool = False) -> dict[str, Any]:
    """Run ``cfg``; always leaves summary.json. Raises LoralabError after recording a failure."""
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.output.dir = str(run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    summary: dict[str, Any] = {"status": "running", "error": None, "run_dir": str(run_dir), "versions": versions(),
                               "trust_remote_code": cfg.model.trust_remote_code}
    write_json(run_dir / "summary.json", summary)
    try:
        result = fit(cfg, run_dir, show_progress=show_progress)
    except DivergedError as exc:
        summary.update(status="diverged", error=str(exc))
        write_json(run_dir / "summary.json", summary)
        raise
    except LoralabError as exc:
        summary.update(status="failed", error=str(exc))
        write_json(run_dir / "summary.json", summary)
        raise
    except torch.OutOfMemoryError as exc:
        summary.update(status="out_of_memory", error=str(exc).splitlines()[0])
        write_json(run_dir / "summary.json", summary)
        raise LoralabError(f"out of memory: {summary['error']}") from None
    except Exception as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        write_json(run_dir / "summary.json", summary)
        raise
    model, tokenizer = result.pop("_model"), result.pop("_tokenizer")
    summary.update(status="completed", **result)
    write_json(run_dir / "summary.json", summary)
    if keep_model:
        summary["_model"], summary["_tokenizer"] = model, tokenizer
    return summary
