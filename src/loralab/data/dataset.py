"""Datasets: read records, template them, tokenize with a response-only loss mask, batch.

Formats: Alpaca (``instruction``, ``input``, ``output``) and prompt/completion, as a JSON
array or JSONL. Errors name the file and the line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from loralab.config import DataConfig
from loralab.data.templates import format_prompt
from loralab.errors import DataError

DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"
IGNORE = -100  # label value ignored by the loss


def builtin_files(name: str, split: str) -> list[Path]:
    """builtin:arithmetic (2 + 4 digits), builtin:arithmetic_2ds, builtin:arithmetic_4ds."""
    parts = {"builtin:arithmetic": ["arithmetic_2ds", "arithmetic_4ds"],
             "builtin:arithmetic_2ds": ["arithmetic_2ds"], "builtin:arithmetic_4ds": ["arithmetic_4ds"]}
    if name not in parts:
        raise DataError(f"data.path {name!r}: unknown built-in dataset (known: {', '.join(parts)})")
    return [DATA_DIR / f"{p}_{split}.jsonl" for p in parts[name]]


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a JSON array or JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file {p} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{p}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
        return [(0, r) for r in items]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{n}: malformed JSON line ({exc.msg}, column {exc.colno})") from None
    return out


def to_prompt_response(records: list[tuple[int, dict]], fmt: str, path: str) -> list[tuple[dict, str]]:
    """Normalize to ({instruction, input} or {prompt}, response) and check the fields."""
    if fmt == "auto":
        first = records[0][1] if records else {}
        fmt = "prompt_completion" if isinstance(first, dict) and "prompt" in first else "alpaca"
    need = ("instruction", "output") if fmt == "alpaca" else ("prompt", "completion")
    out = []
    for line, rec in records:
        where = f"{path}:{line}" if line else f"{path} (record {len(out) + 1})"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in need if k not in rec]
        if missing:
            raise DataError(f"{where}: missing field {', '.join(missing)} (format {fmt} needs {', '.join(need)})")
        for k in need + (("input",) if fmt == "alpaca" and "input" in rec else ()):
            if not isinstance(rec[k], str):
                raise DataError(f"{where}: field {k} must be a string")
        if fmt == "alpaca":
            out.append(({"instruction": rec["instruction"], "input": rec.get("input", "")}, rec["output"]))
        else:
            out.append(({"prompt": rec["prompt"]}, rec["completion"]))
    return out


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt (unless train_on_prompt) and padding

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def prompt_text(fields: dict, cfg: DataConfig, tokenizer) -> str:
    if "prompt" in fields:
        return fields["prompt"]
    return format_prompt(fields["instruction"], fields["input"], template=cfg.template, tokenizer=tokenizer)


def encode(prompt: str, response: str, tokenizer, *, max_len: int, train_on_prompt: bool) -> Example:
    """Tokenize prompt + response + eos; truncate to ``max_len`` from the right."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + r)[:max_len]
    labels = (list(p) if train_on_prompt else [IGNORE] * len(p)) + r
    return Example(ids, labels[:max_len])


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    dropped_by_length: int  # response-length filter
    truncated_to_nothing: int  # examples whose response was cut away entirely


def _load_pairs(cfg: DataConfig, split: str | None) -> list[tuple[dict, str]]:
    if cfg.path.startswith("builtin:"):
        files = builtin_files(cfg.path, split or "train")
        pairs: list[tuple[dict, str]] = []
        for f in files:
            pairs += to_prompt_response(read_records(f), "alpaca", str(f))
        return pairs
    records = read_records(cfg.path)
    if not records:
        raise DataError(f"{cfg.path}: no records")
    return to_prompt_response(records, cfg.format, cfg.path)


def load_splits(cfg: DataConfig, tokenizer, *, seed: int) -> Splits:
    """Train/validation examples: fixed splits for built-ins, else val_path or a seeded fraction."""
    if cfg.path.startswith("builtin:"):
        train_pairs, val_pairs = _load_pairs(cfg, "train"), _load_pairs(cfg, "val")
    else:
        train_pairs = _load_pairs(cfg, None)
        if cfg.val_path:
            val_pairs = to_prompt_response(read_records(cfg.val_path), cfg.format, cfg.val_path)
        else:
            order = list(range(len(train_pairs)))
            random.Random(seed).shuffle(order)
            n_val = int(round(len(order) * cfg.val_fraction))
            if cfg.val_fraction > 0 and len(order) > 1:
                n_val = max(1, n_val)
            val_pairs = [train_pairs[i] for i in order[:n_val]]
            train_pairs = [train_pairs[i] for i in sorted(order[n_val:])]

    def keep(resp: str) -> bool:
        n = len(resp)
        return n >= cfg.min_response_chars and (cfg.max_response_chars is None or n <= cfg.max_response_chars)

    kept = [pr for pr in train_pairs if keep(pr[1])]
    dropped = len(train_pairs) - len(kept)
    val_pairs = [pr for pr in val_pairs if keep(pr[1])]
    if cfg.limit:
        kept = kept[: cfg.limit]
    if not kept:
        raise DataError(
            f"{cfg.path}: no training examples left after filtering ({dropped} dropped by the response-length "
            f"filter data.min_response_chars = {cfg.min_response_chars}, data.max_response_chars = "
            f"{cfg.max_response_chars})"
        )

    def encode_all(pairs):
        out, empty = [], 0
        for fields, resp in pairs:
            ex = encode(prompt_text(fields, cfg, tokenizer), resp, tokenizer,
                        max_len=cfg.max_seq_length, train_on_prompt=cfg.train_on_prompt)
            if ex.n_loss_tokens == 0:
                empty += 1
            else:
                out.append(ex)
        return out, empty

    train, empty = encode_all(kept)
    val, _ = encode_all(val_pairs[: cfg.val_max_examples])
    if not train:
        raise DataError(
            f"{cfg.path}: all {empty} training examples lose every response token to truncation at "
            f"data.max_seq_length = {cfg.max_seq_length}; raise it or shorten the prompts"
        )
    return Splits(train=train, val=val, dropped_by_length=dropped, truncated_to_nothing=empty)


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a micro batch: input_ids, attention_mask, labels, each (batch, seq)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1000003 + epoch).shuffle(order)
    return order
