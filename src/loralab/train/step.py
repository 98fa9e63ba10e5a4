"""The pieces of a training step the core calls: data order, loss, logits, evaluation loss.

    stream = micro_batches(len(train), cfg)          # (epoch, example indices), forever
    positions = label_positions(batch["labels"])     # the only logits a loss needs
    loss = token_loss_sum(forward_logits(model, batch, "none", positions), batch["labels"], positions)
"""

from __future__ import annotations

import functools
import inspect
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loralab.config import Config
from loralab.data.dataset import IGNORE, epoch_order
from loralab.data.packing import model_inputs, step_batches
from loralab.train.attention import NAME as ATTENTION
from loralab.train.attention import supports_segments


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def stream_from(n_train: int, data_cfg: Config, *, skip: int):
    """The seeded micro batch stream with its first ``skip`` micro batches already taken."""
    stream = micro_batches(n_train, data_cfg)
    for _ in range(skip):
        next(stream)
    return stream


def fullest_micro_batch(cfg: Config) -> int | None:
    """Tokens, padding included, of the fullest micro batch the run ``cfg`` forms from its data:
    its examples tokenized and cut as a run does, its steps drawn in the run's seeded order and
    laid out as the run lays them out (packed one row per forward with data.packing true, or
    auto on a model loralab models layer by layer, which attends per example; padded otherwise).
    Real instruction data is mostly shorter than data.max_seq_length, so this is often half of
    micro batch x max_seq_length, the estimate's figure without it. None where the micro batch
    is auto (it is resolved from the estimate) or the model is not a local directory (no hub
    look-ups). Reads the tokenizer and the data, not the weights: what
    ``loralab.estimate.estimate_run(cfg, tokens=...)`` takes the activations at."""
    from loralab.data.dataset import load_splits, model_context
    from loralab.estimate import describe_model, load_model_config, resolve_model_config
    from loralab.models import load_tokenizer, resolve_model_path

    if cfg.train.micro_batch_size == "auto" or not Path(resolve_model_path(cfg.model.path)).is_dir():
        return None  # auto: resolved from the estimate; a hub id: the estimate stays offline
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    context = model_context(load_model_config(resolve_model_config(cfg.model.path)))
    splits = load_splits(cfg.data, tokenizer, seed=cfg.train.seed, context=context)
    train, row_len = splits.train, splits.stats["max_seq_length"]
    packed = cfg.data.packing is True or (cfg.data.packing == "auto" and describe_model(cfg.model.path).known_layout)
    stream, per_step = micro_batches(len(train), cfg), cfg.grad_accum
    fullest = 0
    for _ in range(plan_steps(cfg, len(train))):
        examples = [train[i] for _ in range(per_step) for i in next(stream)[1]]
        batches = step_batches(examples, micro_batch_size=cfg.train.micro_batch_size, row_len=row_len, pad_id=0,
                               device=torch.device("cpu"), packing=packed, segments=packed,
                               group_by_length=cfg.train.group_by_length)
        fullest = max(fullest, *(b["input_ids"].numel() for b in batches))
    return fullest or None


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a label in any row: the only logits a loss needs.
    Computed on the host batch before it moves (``nonzero`` on a GPU tensor waits for it)."""
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()


def count_labels(labels: torch.Tensor) -> int:
    """Response tokens a batch's loss is summed over (host tensor: no device sync)."""
    return int((labels[:, 1:] != IGNORE).sum())


def keeps_logits(model) -> bool:
    """Whether the model's forward takes transformers' ``logits_to_keep`` (then the output head
    runs at label positions only, with the model's own logit scaling or soft-capping)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _takes_logits_to_keep(type(base))


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def autocast_dtype(autocast: str) -> torch.dtype | None:
    """train.autocast as a torch dtype; None for "none"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)


def forward_logits(model, batch: dict, autocast: str, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits for a collated or packed batch: (batch, seq, vocab), or
    (batch, len(positions), vocab) at the given positions."""
    kwargs = model_inputs(batch)
    if "segments" in batch and model.config._attn_implementation != ATTENTION:  # would attend across examples
        raise RuntimeError("a batch of packed examples needs the model inside segment_attention(model)")
    if positions is not None and keeps_logits(model):
        kwargs["logits_to_keep"] = positions
        positions = None
    dtype = autocast_dtype(autocast)
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(**kwargs).logits
    return logits if positions is None else logits[:, positions]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over label positions (not averaged); ``logits`` are the
    model's at ``positions`` (label_positions), predicting the labels one token on."""
    targets = labels[:, positions + 1]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def packed_attention(cfg: Config, model) -> str | None:
    """How packed examples are kept apart: "per_example" (one attention call per example,
    loralab.train.attention) where the model supports it, else "block_mask"; None unpacked
    (data.packing false, or auto on a model that needs the block mask)."""
    if cfg.data.packing is False:
        return None
    uses_window = getattr(model.config, "use_sliding_window", True)
    window = getattr(model.config, "sliding_window", None) if uses_window else None
    longest = cfg.data.max_seq_length
    if longest == "auto":  # not resolved yet (a group decides before loading data): at most the context
        from loralab.data.dataset import model_context

        longest = model_context(model.config) or 0
    per_example = not (window is not None and window < longest) and supports_segments(model)  # else masks handle it
    if per_example:
        return "per_example"
    return "block_mask" if cfg.data.packing is True else None


def to_device(batch: dict, device: torch.device) -> dict:
    """A host batch on ``device``: pinned, non-blocking copies on CUDA (no wait for the copy)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def best_of(key: str, values: list[float]) -> float:
    from loralab.evaluate.tasks import lower_is_better

    finite = [v for v in values if math.isfinite(v)] or [float("nan")]
    return min(finite) if lower_is_better(key) else max(finite)


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
