"""How one optimizer step's examples become micro batches: padded, length-grouped or packed.

    batches = step_batches(examples, micro_batch_size=4, row_len=256, pad_id=2,
                           device=torch.device("cpu"), packing=True)

The set of examples in a step never changes here, only their layout, so the step's loss
("sum over the step's response tokens / their count") and its gradient are the same maths
in every layout; only float rounding differs.

* padded (default): micro batches of ``micro_batch_size`` examples in data order, right-padded
  to the longest example of the micro batch.
* ``group_by_length``: the step's examples sorted by length before they are cut into micro
  batches, so examples of similar length share a micro batch and little is padded.
* ``packing`` with ``segments`` (models that pass ``loralab.train.attention.supports_segments``):
  each forward is one row of whole examples end to end, no padding at all, filled first fit
  (longest first) up to ``micro_batch_size * row_len`` tokens; position ids restart at 0 for
  every example and the batch carries the examples' boundaries, so attention runs per example
  (``loralab.train.attention``) and nothing is computed across examples or on padding.
* ``packing`` without ``segments`` (any other model): examples placed whole into rows (first
  fit, longest first) as long as the step's longest example (at most ``row_len``), as many rows
  per forward as fit in ``micro_batch_size * row_len`` tokens. Each example's position ids
  restart at 0 and no 2D attention mask is passed, which transformers (>= 4.54) reads as packed
  sequences and turns into a block-diagonal causal mask for sdpa, eager and flash attention,
  so no token attends across an example boundary; the masked blocks are computed and thrown away.

A packed forward holds at most ``micro_batch_size * row_len`` tokens, the memory bound of an
unpacked micro batch of full-length examples, with far less padding and fewer, larger matmuls.
"""

from __future__ import annotations

import itertools

import torch

from loralab.data.dataset import IGNORE, Example, collate


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """Indices of examples per row: first fit decreasing into rows of ``row_len`` tokens.

    Every index appears in exactly one row; an example longer than ``row_len`` gets a row
    of its own (examples are already truncated to data.max_seq_length, so this is rare).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_len - lengths[i])
    return rows


def collate_packed(rows: list[list[Example]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids, position_ids, labels (rows, width): examples side by side, positions restarting.

    The first label of each example is IGNORE: it would be predicted from the previous
    example's last token, a prediction an unpacked batch never makes. Padding at the end of
    a row is a segment of its own (positions from 0) with IGNORE labels.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:])
            pos[r, at : at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)
    n_tokens = sum(len(e.input_ids) for row in rows for e in row)
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": labels.to(device),
            "n_tokens": torch.tensor(n_tokens)}


def collate_segments(examples: list[Example], device: torch.device) -> dict:
    """collate_packed's single row of ``examples`` end to end (no padding), plus ``segments``,
    the examples' boundaries (0, n1, n1 + n2, ...)."""
    return {**collate_packed([examples], 0, device),  # one row as long as its examples: no pad id is ever written
            "segments": tuple(itertools.accumulate((len(e.input_ids) for e in examples), initial=0))}


def model_inputs(batch: dict) -> dict:
    """The keyword arguments for the model's forward: a packed batch has no attention mask; a
    batch of segments passes the examples' boundaries to loralab's attention and an all-ones
    mask (so transformers builds none: loralab.train.attention keeps attention inside examples)."""
    if "segments" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "attention_mask": torch.ones_like(batch["input_ids"]),
                "loralab_segments": torch.tensor(batch["segments"])}  # a tensor: compiled layers never specialize on it
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def step_batches(examples: list[Example], *, micro_batch_size: int, row_len: int, pad_id: int,
                 device: torch.device, packing: bool = False, segments: bool = False,
                 group_by_length: bool = False) -> list[dict]:
    """The micro batches of one optimizer step (see the module docstring for the layouts)."""
    lengths = [len(e.input_ids) for e in examples]
    if packing and segments:
        forwards = pack_rows(lengths, micro_batch_size * row_len)
        return [collate_segments([examples[i] for i in forward], device) for forward in forwards]
    if packing:
        # Rows as long as the step's longest example: attention is computed over whole rows
        # (masked blocks included), so rows longer than needed cost work that is thrown away.
        width = min(row_len, max(lengths))
        per_forward = max(1, micro_batch_size * row_len // width)  # same token bound as unpacked
        rows = [[examples[i] for i in row] for row in pack_rows(lengths, width)]
        rows.sort(key=lambda row: -sum(len(e.input_ids) for e in row))  # similar widths per forward
        return [collate_packed(rows[i : i + per_forward], pad_id, device)
                for i in range(0, len(rows), per_forward)]
    if group_by_length:
        examples = sorted(examples, key=lambda e: -len(e.input_ids))
    out = []
    for i in range(0, len(examples), micro_batch_size):
        batch = collate(examples[i : i + micro_batch_size], pad_id, device)
        batch["n_tokens"] = batch["attention_mask"].sum()
        out.append(batch)
    return out
