"""Packing and length grouping change the layout of a step, never its maths."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from loralab.config import load_config
from loralab.data.dataset import IGNORE, Example, load_splits
from loralab.data.packing import collate_packed, model_inputs, pack_rows, step_batches
from loralab.models import load_base
from loralab.train.loop import train
from loralab.train.step import micro_batches

CPU = torch.device("cpu")


def varied_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca records whose responses run from one word to ~60 words."""
    rng = random.Random(seed)
    words = ["alpha", "river", "seven", "north", "bright", "stone", "quiet", "market"]
    return [{"instruction": f"Say {k} words.", "input": "",
             "output": " ".join(rng.choice(words) for _ in range(k))}
            for k in (rng.choice([1, 2, 3, 5, 8, 20, 40, 60]) for _ in range(n))]


def test_pack_rows_places_every_example_once_within_the_row_length():
    rng = random.Random(3)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    rows = pack_rows(lengths, 128)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # first fit decreasing wastes little: within 15% of the ideal row count here
    assert len(rows) <= 1.15 * sum(lengths) / 128 + 1
    assert pack_rows([200, 10], 128) == [[0], [1]]  # too long for a row: a row of its own


def test_packed_logits_equal_each_example_alone():
    cfg = load_config(None, ["model.device=cpu", "model.dtype=fp32"])  # a maths check to 1e-5
    model, tok = load_base(cfg.model, cfg.quant)
    examples = load_splits(cfg.data, tok, seed=0).train[:7]
    batch = collate_packed([examples[:4], examples[4:]], tok.pad_token_id, CPU)  # two rows, 3-4 examples each
    assert int(batch["n_tokens"]) == sum(len(e.input_ids) for e in examples)
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits  # (rows, width, vocab)
        at = {0: 0, 1: 0}
        for k, e in enumerate(examples):
            r, n = int(k >= 4), len(e.input_ids)
            assert batch["input_ids"][r, at[r] : at[r] + n].tolist() == e.input_ids
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            assert torch.allclose(packed[r, at[r] : at[r] + n], alone, atol=1e-4, rtol=1e-4)
            at[r] += n
        # the same row with a full causal mask (no restart) gives different logits: the test can fail
        crossed = model(input_ids=batch["input_ids"][:1]).logits[0]
        n0 = len(examples[0].input_ids)
        assert not torch.allclose(crossed[n0 : n0 + 5], packed[0, n0 : n0 + 5], atol=1e-3)


def test_rows_are_as_long_as_the_longest_example_and_fill_the_token_budget():
    examples = [Example([0] * n, [IGNORE] + [1] * (n - 1)) for n in (100, 60, 40, 30, 20, 10, 10, 5)]
    batches = step_batches(examples, micro_batch_size=1, row_len=400, pad_id=2, device=CPU, packing=True)
    # rows of 100 tokens (the longest example), 400 // 100 = 4 rows per forward
    assert [tuple(b["input_ids"].shape) for b in batches] == [(3, 100)]
    assert sum(int(b["n_tokens"]) for b in batches) == 275
    small = step_batches(examples, micro_batch_size=1, row_len=100, pad_id=2, device=CPU, packing=True)
    assert [b["input_ids"].shape[0] for b in small] == [1, 1, 1]  # budget of one 100-token row each


def test_packed_labels_never_cross_an_example_boundary():
    a = Example([0, 5, 6, 7, 1], [0, 5, 6, 7, 1])  # train_on_prompt: every label set
    b = Example([0, 8, 9, 1], [0, 8, 9, 1])
    batch = collate_packed([[a, b]], 2, CPU)
    assert batch["input_ids"][0].tolist() == [0, 5, 6, 7, 1, 0, 8, 9, 1]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    # b's first token is not a target of a's last one
    assert batch["labels"][0].tolist() == [IGNORE, 5, 6, 7, 1, IGNORE, 8, 9, 1]


@pytest.mark.parametrize("packing,group", [(True, False), (False, True)])
def test_every_example_exactly_once_per_epoch(packing, group):
    examples = [Example(list(range(i % 37 + 2)), [IGNORE] + list(range(1, i % 37 + 2))) for i in range(48)]
    cfg = load_config(None, ["train.batch_size=8", "train.micro_batch_size=2"])
    stream = micro_batches(len(examples), cfg)
    seen = []
    for _ in range(len(examples) // cfg.train.batch_size):
        idx = [i for _ in range(cfg.grad_accum) for i in next(stream)[1]]
        for b in step_batches([examples[i] for i in idx], micro_batch_size=2, row_len=64, pad_id=0,
                              device=CPU, packing=packing, group_by_length=group):
            key = "position_ids" if packing else "attention_mask"
            for r in range(b["input_ids"].shape[0]):
                if packing:  # split the row at position 0 restarts, drop the padding segment
                    pos = b["position_ids"][r].tolist()
                    starts = [j for j, p in enumerate(pos) if p == 0] + [len(pos)]
                    for s, t in zip(starts, starts[1:], strict=False):
                        if b["labels"][r, s + 1 : t].ne(IGNORE).any():
                            seen.append(b["input_ids"][r, s:t].tolist())
                else:
                    n = int(b[key][r].sum())
                    seen.append(b["input_ids"][r, :n].tolist())
    assert sorted(seen) == sorted(e.input_ids for e in examples)


def _run(cfg_factory, data, **kw):
    cfg = cfg_factory("builtin:tiny", data__path=str(data), data__val_fraction=0.1, data__limit="null",
                      data__max_seq_length=128, train__max_steps=4, train__batch_size=8,
                      train__micro_batch_size=2, train__lr=3e-3, lora__dropout=0.0, **kw)
    summary = train(cfg)
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return summary, [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_and_grouped_training_follow_the_padded_loss_curve(cfg_factory, small_alpaca_file, train_on_prompt,
                                                                  monkeypatch):
    import loralab.train.step as step

    data = small_alpaca_file(varied_records(40))
    kw = {"data__train_on_prompt": train_on_prompt}
    padded, base = _run(cfg_factory, data, data__packing=False, **kw)
    packed, pk = _run(cfg_factory, data, data__packing=True, **kw)
    grouped, gr = _run(cfg_factory, data, data__packing=False, train__group_by_length=True, **kw)
    monkeypatch.setattr(step, "supports_segments", lambda model: False)  # as for a model that fails the check
    masked, mk = _run(cfg_factory, data, data__packing=True, **kw)
    assert (packed["packed_attention"], masked["packed_attention"], padded["packed_attention"]) == (
        "per_example", "block_mask", None)
    assert len(base) == len(pk) == len(gr) == len(mk) == 4
    assert base[-1] < base[0]  # it trains: the curve moves, so equality below means something
    for a, *others in zip(base, pk, gr, mk, strict=True):
        assert all(abs(b - a) <= 1e-4 * abs(a) for b in others)
    for run in (packed, masked):
        assert abs(run["final_eval_loss"] - padded["final_eval_loss"]) <= 1e-4 * padded["final_eval_loss"]
    assert packed["tokens_seen"] == padded["tokens_seen"] == grouped["tokens_seen"] == masked["tokens_seen"]


def test_segment_batches_hold_whole_examples_end_to_end_without_padding():
    examples = [Example(list(range(10, 10 + n)), [IGNORE] + list(range(11, 10 + n)))
                for n in (100, 60, 40, 30, 20, 10, 10, 5)]
    batches = step_batches(examples, micro_batch_size=1, row_len=128, pad_id=2, device=CPU, packing=True, segments=True)
    assert all(b["input_ids"].shape[0] == 1 for b in batches)
    assert all(b["input_ids"].shape[1] == int(b["n_tokens"]) <= 128 for b in batches)  # no padding, within budget
    assert sum(int(b["n_tokens"]) for b in batches) == 275
    seen = []
    for b in batches:
        bounds = b["segments"]
        assert bounds[0] == 0 and bounds[-1] == b["input_ids"].shape[1]
        for s, t in itertools.pairwise(bounds):
            assert b["position_ids"][0, s:t].tolist() == list(range(t - s))
            assert b["labels"][0, s] == IGNORE  # never predicted from the previous example
            seen.append(b["input_ids"][0, s:t].tolist())
    assert sorted(seen) == sorted(e.input_ids for e in examples)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # grouped-query attention, a Qwen bias, absolute positions
def test_per_example_attention_gives_each_example_its_logits_alone(tiny_model_dir, arch):
    from transformers import AutoModelForCausalLM

    from loralab.data.packing import collate_segments
    from loralab.train.attention import segment_attention

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir(arch))).eval()
    g = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(3, 1000, (n,), generator=g).tolist(), [IGNORE] * n) for n in (40, 7, 23, 1, 64)]
    batch = collate_segments(examples, CPU)
    with torch.no_grad(), segment_attention(model):
        packed = model(**model_inputs(batch)).logits[0]
    with torch.no_grad():
        crossed = model(input_ids=batch["input_ids"]).logits[0]  # the row as one long example: attends across
        for e, (s, t) in zip(examples, itertools.pairwise(batch["segments"]), strict=True):
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            assert torch.allclose(packed[s:t], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(crossed[40:], packed[40:], atol=1e-3)  # so the comparison above can fail


def test_models_whose_attention_is_more_than_a_causal_softmax_keep_block_masks(cfg_factory):
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from loralab.train.attention import supports_segments
    from loralab.train.step import packed_attention

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1280)
    torch.manual_seed(0)
    softcapped = AutoModelForCausalLM.from_config(tf.Gemma2Config(head_dim=8, **small))
    windowed = AutoModelForCausalLM.from_config(tf.MistralConfig(sliding_window=4, **small))
    plain = AutoModelForCausalLM.from_config(tf.MistralConfig(sliding_window=None, **small))
    assert not supports_segments(softcapped)  # attention logit soft-capping
    assert not supports_segments(windowed)  # an example longer than the window
    assert supports_segments(plain)
    cfg = cfg_factory("builtin:tiny", data__packing=True, data__max_seq_length=64)
    assert packed_attention(cfg, plain) == "per_example"
    assert packed_attention(
        cfg, AutoModelForCausalLM.from_config(tf.MistralConfig(sliding_window=32, **small))) == "block_mask"
    windowed_32 = AutoModelForCausalLM.from_config(tf.MistralConfig(sliding_window=32, **small))
    auto = cfg_factory("builtin:tiny", data__max_seq_length=64)  # data.packing: auto, the default
    assert auto.data.packing == "auto"
    assert packed_attention(auto, plain) == "per_example"
    assert packed_attention(auto, windowed_32) is None  # a block mask computes the masked blocks: padded instead
    assert packed_attention(cfg_factory("builtin:tiny", data__packing=False), plain) is None  # not packed


def test_the_loss_needs_logits_at_label_positions_only():
    import torch.nn.functional as F

    from loralab.data.dataset import collate
    from loralab.train.step import forward_logits, keeps_logits, label_positions, token_loss_sum

    cfg = load_config(None, ["model.device=cpu", "model.dtype=fp32"])  # a maths check to 1e-5
    model, tok = load_base(cfg.model, cfg.quant)
    examples = load_splits(cfg.data, tok, seed=0).train[:5]
    batch = collate(examples, tok.pad_token_id, CPU)
    positions = label_positions(batch["labels"])
    assert keeps_logits(model) and 0 < len(positions) < batch["input_ids"].shape[1] - 1  # prompts are skipped
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        full = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE,
                               reduction="sum")
        kept = token_loss_sum(forward_logits(model, batch, "none", positions), batch["labels"], positions)
        assert torch.allclose(kept, full, rtol=1e-5)
