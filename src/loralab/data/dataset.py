"""Datasets: read records, template them, tokenize with a response-only loss mask, batch.

    splits = load_splits(cfg.data, tokenizer, seed=1337, context=2048)
    splits.train[0].input_ids, splits.stats["max_seq_length"]

Formats: Alpaca (``instruction``, ``input``, ``output``), prompt/completion, and chat
(``messages`` or ShareGPT ``conversations``, see loralab.data.chat), from the files and
datasets loralab.data.sources reads; ``data.columns`` maps the fields to other column names.
Errors name the file and the line (JSON/JSONL) or row (everything read with ``datasets``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import statistics
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralab.config import DataConfig
from loralab.data.chat import assistant_tokens, check_chat_template, conversation
from loralab.data.sources import json_rows, load_rows, read_records  # noqa: F401  (read_records: shared reader)
from loralab.data.templates import chat_messages, format_prompt
from loralab.errors import DataError

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"
IGNORE = -100  # label value ignored by the loss


def builtin_files(name: str, split: str) -> list[Path]:
    """builtin:arithmetic (2 + 4 digits), builtin:arithmetic_2ds, builtin:arithmetic_4ds."""
    parts = {"builtin:arithmetic": ["arithmetic_2ds", "arithmetic_4ds"],
             "builtin:arithmetic_2ds": ["arithmetic_2ds"], "builtin:arithmetic_4ds": ["arithmetic_4ds"]}
    if name not in parts:
        raise DataError(f"data.path {name!r}: unknown built-in dataset (known: {', '.join(parts)})")
    return [DATA_DIR / f"{p}_{split}.jsonl" for p in parts[name]]


FIELDS = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}


@dataclass
class Record:
    """One example before tokenization: a prompt and its response, or a conversation."""

    where: str  # "file:line" or "file, row N", for error messages
    prompt: dict[str, str] | None = None  # {"instruction", "input"} or {"prompt"}
    response: str = ""
    messages: list[dict[str, str]] | None = None  # chat records

    @property
    def response_chars(self) -> int:
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages if m["role"] == "assistant")
        return len(self.response)


def record_format(record: Record) -> str:
    """The format a Record was read in: messages, prompt_completion or alpaca."""
    if record.messages is not None:
        return "messages"
    return "prompt_completion" if "prompt" in (record.prompt or {}) else "alpaca"


def detect_format(rec: Any, columns: dict[str, str]) -> str:
    """data.format auto: messages/conversations -> messages, prompt -> prompt_completion, else alpaca."""
    if not isinstance(rec, dict):
        return "alpaca"
    if columns.get("messages", "messages") in rec or columns.get("conversations", "conversations") in rec:
        return "messages"
    return "prompt_completion" if columns.get("prompt", "prompt") in rec else "alpaca"


def to_records(rows: list[tuple[str, Any]], fmt: str, columns: dict[str, str], *,
               empty_ok: bool = False) -> list[Record]:
    """Normalize rows to Records and check their fields (the first bad row is named). An empty
    response is an error unless ``empty_ok`` (data.min_response_chars set: its filter drops them)."""
    if fmt == "auto":
        fmt = detect_format(rows[0][1] if rows else {}, columns)
    out = []
    for where, rec in rows:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if fmt == "messages":
            out.append(Record(where, messages=conversation(rec, where, columns, empty_ok=empty_ok)))
            continue
        col = {k: columns.get(k, k) for k in (*FIELDS[fmt], "input")}
        missing = [col[k] for k in FIELDS[fmt] if col[k] not in rec]
        if missing:
            mapped = [f"data.columns maps {k} to {col[k]}" for k in FIELDS[fmt] if col[k] in missing and col[k] != k]
            raise DataError(f"{where}: missing field {', '.join(missing)} (format {fmt} needs "
                            f"{', '.join(col[k] for k in FIELDS[fmt])}{'; ' + '; '.join(mapped) if mapped else ''}); "
                            + columns_hint(fmt, rec, columns))
        values = {k: rec.get(col[k]) for k in col}
        if values["input"] is None:  # absent, or an empty cell of a CSV/parquet column
            values["input"] = ""
        for k in (*FIELDS[fmt], "input"):
            if values[k] is None:  # null in JSON, an empty cell in a CSV or parquet column
                raise DataError(f"{where}: field {col[k]} is empty (null); it needs text")
            if not isinstance(values[k], str):
                raise DataError(f"{where}: field {col[k]} must be a string (got {type(values[k]).__name__})")
        response = FIELDS[fmt][-1]
        if not values[response].strip() and not empty_ok:  # as a null: it would teach the model to answer nothing
            raise DataError(f"{where}: field {col[response]} is {'empty' if not values[response] else 'only spaces'}"
                            "; a record needs a response to train on (data.min_response_chars: 1 drops records with "
                            "an empty one instead)")
        if fmt == "alpaca":
            out.append(Record(where, {"instruction": values["instruction"], "input": values["input"]},
                              values["output"]))
        else:
            out.append(Record(where, {"prompt": values["prompt"]}, values["completion"]))
    return out


# Column names datasets often use for loralab's fields, most likely first (the hint of a missing-field error).
LIKELY_COLUMNS = {"instruction": ("question", "query", "prompt", "problem", "instruction_text", "text", "input_text"),
                  "output": ("answer", "response", "completion", "target", "solution", "output_text", "label"),
                  "prompt": ("question", "instruction", "query", "text", "input_text"),
                  "completion": ("answer", "response", "output", "target", "solution", "label")}


def columns_hint(fmt: str, rec: dict[str, Any], columns: dict[str, str]) -> str:
    """The record's columns and the data.columns line that would map them to ``fmt``'s fields."""
    free = [c for c in rec if c not in columns.values()]
    mapping = dict(columns)
    for field_name in FIELDS[fmt]:
        if mapping.get(field_name, field_name) in rec:
            continue
        guess = next((c for c in LIKELY_COLUMNS[field_name] if c in free), None)
        mapping[field_name] = guess or f"<your {field_name} column>"
        if guess:
            free.remove(guess)
    line = "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"
    return (f"the record has columns {', '.join(map(str, rec)) or '(none)'}: map them to loralab's fields with "
            f"data.columns, e.g. --set data.columns=\"{line}\" (in the YAML, under data: columns: {line})")


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


def encode(prompt: str, response: str, tokenizer, *, max_len: int | None, train_on_prompt: bool) -> Example:
    """Tokenize prompt + response + eos; truncate to ``max_len`` from the right (None: keep all)."""
    # verbose=False: examples are tokenized whole before truncation; no "longer than the model" warning
    p = tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = (list(p) if train_on_prompt else [IGNORE] * len(p)) + r
    return Example((p + r)[:max_len], labels[:max_len])


def encode_record(rec: Record, cfg: DataConfig, tokenizer) -> Example:
    """The whole example, not truncated: prompt/response, or a conversation in the chat template.
    An instruction record in the chat template is encoded as its conversation (chat_messages), so
    its response ends as the template ends a turn (ChatML's <|im_end|>), not with the tokenizer's
    eos, and a template that writes its own BOS is not given a second one."""
    messages = rec.messages
    if messages is None and cfg.template == "chat" and "prompt" not in rec.prompt:
        messages = chat_messages(rec.prompt["instruction"], rec.prompt["input"], rec.response, tokenizer=tokenizer)
    if messages is None:
        return encode(prompt_text(rec.prompt, cfg, tokenizer), rec.response, tokenizer,
                      max_len=None, train_on_prompt=cfg.train_on_prompt)
    ids, mask = assistant_tokens(messages, tokenizer, where=rec.where)
    return Example(ids, list(ids) if cfg.train_on_prompt
                   else [t if m else IGNORE for t, m in zip(ids, mask, strict=True)])


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    dropped_by_length: int  # response-length filter
    truncated_to_nothing: int  # examples whose response was cut away entirely
    stats: dict[str, Any] = field(default_factory=dict)  # data_stats of summary.json (see load_splits)


def fingerprint(splits: Splits) -> dict[str, Any]:
    """What a resume checks it trains on the same examples: the number of training and validation
    examples and a SHA-256 of their tokens and labels, in order."""
    h = hashlib.sha256()
    for examples in (splits.train, splits.val):
        h.update(len(examples).to_bytes(8, "little"))
        for e in examples:
            h.update(len(e.input_ids).to_bytes(8, "little"))
            h.update(array("q", e.input_ids).tobytes())
            h.update(array("q", e.labels).tobytes())
    return {"train": len(splits.train), "val": len(splits.val), "sha256": h.hexdigest()}


def fingerprint_change(then: dict[str, Any], now: dict[str, Any]) -> str:
    """How two fingerprints differ, for a message: "the same number of examples, other tokens",
    or the counts then and now."""
    if (then["train"], then["val"]) == (now["train"], now["val"]):
        return "the same number of examples, other tokens"
    return (f"{then['train']} training and {then['val']} validation examples then, {now['train']} and {now['val']} "
            "now, other tokens")


def _load_records(path: str, cfg: DataConfig, split: str) -> list[Record]:
    if path.startswith("builtin:"):
        records: list[Record] = []
        for f in builtin_files(path, split):
            records += to_records(json_rows(f), "alpaca", {})
        return records
    rows = load_rows(path)
    if not rows:
        raise DataError(f"{path}: no records")
    return to_records(rows, cfg.format, cfg.columns, empty_ok=cfg.min_response_chars > 0)


def split_records(cfg: DataConfig, *, seed: int) -> tuple[list[Record], list[Record], dict[str, Any]]:
    """Train and validation records and how the validation split was made: the built-ins' fixed
    splits, data.val_path, or data.val_fraction held out (data.val_seed, else ``seed``)."""
    if cfg.path.startswith("builtin:"):
        return _load_records(cfg.path, cfg, "train"), _load_records(cfg.path, cfg, "val"), {"val_source": "builtin"}
    train = _load_records(cfg.path, cfg, "train")
    if cfg.val_path:
        val = _load_records(cfg.val_path, cfg, "train")
        if train and val and record_format(val[0]) != record_format(train[0]):
            raise DataError(f"data.val_path {cfg.val_path}: its records are {record_format(val[0])} ({val[0].where}), "
                            f"the training data's are {record_format(train[0])} ({train[0].where}); evaluated in "
                            "another format, the eval loss would score another prompt layout: give both files one "
                            "format (docs/data.md)")
        return train, val, {"val_source": "val_path", "val_path": cfg.val_path}
    val_seed = cfg.val_seed if cfg.val_seed is not None else seed
    order = list(range(len(train)))
    random.Random(val_seed).shuffle(order)
    n_val = int(round(len(order) * cfg.val_fraction))
    if cfg.val_fraction > 0 and len(order) > 1:
        n_val = max(1, n_val)
    held_out = {"val_source": "held_out", "val_fraction": cfg.val_fraction, "val_seed": val_seed}
    return [train[i] for i in sorted(order[n_val:])], [train[i] for i in order[:n_val]], held_out


def model_context(config) -> int | None:
    """The positions a model was built for, from its transformers config (max_position_embeddings;
    n_positions for GPT-2; max_sequence_length), or None. The one reader of a model's context."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_max_seq_length(setting: int | str, lengths: list[int], context: int | None) -> int:
    """data.max_seq_length: a number as set; auto = the longest example rounded up to a multiple
    of 8 (tensor-core friendly), at most the model's context."""
    if setting != "auto":
        return int(setting)
    longest = 8 * math.ceil(max(lengths) / 8)
    return min(longest, context) if context else longest


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min / median / p90 (nearest rank) / max of token lengths."""
    s = sorted(lengths)
    return {"min": s[0], "median": statistics.median(s), "p90": s[math.ceil(0.9 * len(s)) - 1], "max": s[-1]}


def load_splits(cfg: DataConfig, tokenizer, *, seed: int, context: int | None = None) -> Splits:
    """Tokenized train/validation examples and their statistics (``Splits.stats``).

    ``context`` is the model's context window: the ceiling of data.max_seq_length: auto.
    Examples longer than the resolved length are cut from the right (the beginning is kept:
    prompt or system turn first); those left with no response token are dropped and counted.
    """
    train_recs, val_recs, split_info = split_records(cfg, seed=seed)

    def keep(rec: Record) -> bool:
        n = rec.response_chars
        return n >= cfg.min_response_chars and (cfg.max_response_chars is None or n <= cfg.max_response_chars)

    kept = [r for r in train_recs if keep(r)]
    dropped = len(train_recs) - len(kept)
    val_recs = [r for r in val_recs if keep(r)][: cfg.val_max_examples]
    if cfg.limit:
        kept = kept[: cfg.limit]
    if not kept:
        raise DataError(
            f"{cfg.path}: no training examples left after filtering ({dropped} dropped by the response-length "
            f"filter data.min_response_chars = {cfg.min_response_chars}, data.max_response_chars = "
            f"{cfg.max_response_chars})"
        )
    if any(r.messages is not None for r in kept + val_recs):
        check_chat_template(tokenizer)
    full_train = [encode_record(r, cfg, tokenizer) for r in kept]
    full_val = [encode_record(r, cfg, tokenizer) for r in val_recs]
    lengths = [len(e.input_ids) for e in full_train]
    max_len = resolve_max_seq_length(cfg.max_seq_length, lengths + [len(e.input_ids) for e in full_val], context)

    def cut(examples: list[Example]) -> tuple[list[Example], int, int]:
        out = [Example(e.input_ids[:max_len], e.labels[:max_len]) for e in examples]
        truncated = sum(len(e.input_ids) > max_len for e in examples)
        return [e for e in out if e.n_loss_tokens], truncated, sum(not e.n_loss_tokens for e in out)

    train, truncated, empty = cut(full_train)
    val, truncated_val, empty_val = cut(full_val)
    how = f"auto, capped by the model's context of {context}" if cfg.max_seq_length == "auto" else "as set"
    if not train:
        raise DataError(
            f"{cfg.path}: all {empty} training examples lose every response token to truncation at "
            f"data.max_seq_length = {max_len} ({how}); raise it (or set it to auto) or shorten the prompts"
        )
    if full_val and not val:  # evaluation would score nothing: refused before training, not a NaN loss
        source = cfg.val_path or f"{cfg.path} (the held-out data.val_fraction = {cfg.val_fraction})"
        raise DataError(
            f"{source}: all {empty_val} validation examples are longer than data.max_seq_length = {max_len} "
            f"({how}) and lose every response token to truncation, so the run could not be evaluated; raise "
            "data.max_seq_length (or set it to auto) or shorten the prompts"
        )
    if not full_val:
        log.warning("no validation examples (%s): the run trains without evaluation and its final_eval_loss is null",
                    "data.val_fraction = 0" if not cfg.val_path and cfg.val_fraction == 0 else
                    f"none in {cfg.val_path or cfg.path} after the response-length filter and the split")
    stats = {
        "format": ("messages" if kept[0].messages is not None
                   else ("prompt_completion" if "prompt" in kept[0].prompt else "alpaca")),
        "n_train": len(train), "n_val": len(val), **split_info,
        "token_lengths": length_stats(lengths),  # of the training examples before truncation
        "max_seq_length": max_len, "max_seq_length_setting": cfg.max_seq_length, "context": context,
        "truncated": truncated, "truncated_val": truncated_val, "truncated_to_no_response": empty,
        "truncated_to_no_response_val": empty_val, "dropped_by_length_filter": dropped,
    }
    if empty_val:  # the evaluation scores fewer examples than the split holds: said, not silent
        log.warning("%d of %d validation examples lost every response token to truncation at max_seq_length=%d "
                    "and are not scored: the eval loss is over the other %d", empty_val, len(full_val), max_len,
                    len(val))
    if cfg.max_seq_length == "auto":
        log.info(
            "data.max_seq_length: auto -> %d (longest example %d tokens, context %s)", max_len, max(lengths), context)
    if truncated and not (context and max_len > context):  # past the context the run is refused (check_context)
        if truncated >= 0.1 * len(full_train) and cfg.max_seq_length != "auto":  # a tenth or more: said loudly
            fits = resolve_max_seq_length("auto", lengths, context)
            log.warning("WARNING: %d of %d training examples (%.0f%%) are longer than data.max_seq_length = %d tokens "
                        "and were cut from the right, so the ends of their responses are not learned; "
                        "data.max_seq_length: auto would be %d here (%s)", truncated, len(full_train),
                        100 * truncated / len(full_train), max_len, fits,
                        "the model's context" if fits < max(lengths) else "the longest example, rounded up to 8")
        else:
            log.info("%d of %d training examples are longer than %d tokens and were cut from the right",
                     truncated, len(full_train), max_len)
    return Splits(train=train, val=val, dropped_by_length=dropped, truncated_to_nothing=empty, stats=stats)


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
