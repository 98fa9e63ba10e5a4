"""The loss in chunks of positions: the same numbers as the whole logits, one chunk's logits kept."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import loralab.train.chunked_loss as chunked
from loralab.data.dataset import IGNORE
from loralab.train.group_adapters import run_losses
from loralab.train.loop import train
from loralab.train.step import label_positions
from userdata import instruction_records, write_jsonl

CHUNK = 16  # positions per chunk, set through CHUNK_LOGITS for the model's vocabulary


def _peft_model(model_dir: Path, targets: tuple[str, ...] = ("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).requires_grad_(False)
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets),
                                           init_lora_weights=False))


def _batch(vocab: int, rows: int = 3, seq: int = 48) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, :12] = IGNORE  # the prompt
    labels[0, 40:] = IGNORE  # a shorter row
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "positions": label_positions(labels)}


def _loss_and_grads(model, batch, monkeypatch, chunk_logits: int):
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", chunk_logits)
    model.zero_grad()
    torch.manual_seed(2)  # gpt2 keeps its own dropout: the same draws on both paths
    saved = {}  # storage -> bytes: what the graph keeps for the backward, each storage once

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = run_losses(model, batch, 1, "none")
    loss.sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("arch, targets", [("llama", ("q_proj", "v_proj")), ("gpt2", ("c_attn",))])
def test_the_chunked_loss_equals_the_whole_logits_and_keeps_one_chunk(arch, targets, tiny_model_dir, monkeypatch):
    model = _peft_model(tiny_model_dir(arch), targets)
    vocab = model.get_output_embeddings().out_features
    batch = _batch(vocab)
    whole, whole_grads, whole_saved = _loss_and_grads(model, batch, monkeypatch, 1 << 40)
    part, part_grads, part_saved = _loss_and_grads(model, batch, monkeypatch, CHUNK * vocab)
    n = 3 * len(batch["positions"])
    assert n > 4 * CHUNK  # several chunks
    assert torch.allclose(part, whole, rtol=1e-6, atol=0)
    assert torch.allclose(part_grads, whole_grads, rtol=0, atol=1e-6 * whole_grads.abs().max().item())
    # the whole path keeps the step's fp32 log-probabilities for the backward; chunks keep none
    assert whole_saved - part_saved >= 0.9 * n * vocab * 4, (whole_saved, part_saved)
    # a fused group's forward: the runs' copies of the batch, each run's loss from its own rows
    model.eval()
    with torch.no_grad():
        monkeypatch.setattr(chunked, "CHUNK_LOGITS", CHUNK * vocab)
        both = run_losses(model, batch, 2, "none")
    assert torch.allclose(both, whole.expand(2), rtol=1e-6, atol=0)


def test_a_model_that_soft_caps_its_logits_keeps_the_whole_logits(tiny_model_dir, monkeypatch, caplog):
    model = _peft_model(tiny_model_dir("gemma2"))
    vocab = model.get_output_embeddings().out_features
    batch = _batch(vocab)
    whole, whole_grads, _ = _loss_and_grads(model, batch, monkeypatch, 1 << 40)
    with caplog.at_level(logging.INFO, logger="loralab"):
        part, part_grads, _ = _loss_and_grads(model, batch, monkeypatch, CHUNK * vocab)
    assert "the loss is not chunked: gemma2 changes its logits after the output head" in caplog.text
    assert torch.equal(part, whole) and torch.equal(part_grads, whole_grads)
    # the check itself can fail: chunking the capped model would give other numbers
    monkeypatch.setattr(chunked, "head_output_is_the_logits", lambda *a: True)
    chunked._head_is_last.clear()
    wrong, _, _ = _loss_and_grads(model, batch, monkeypatch, CHUNK * vocab)
    assert not torch.allclose(wrong, whole, rtol=1e-3)


def test_a_run_with_the_loss_in_chunks_trains_as_with_whole_logits(tiny_model_dir, cfg_factory, tmp_path,
                                                                     monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", instruction_records(48))

    calls = []
    real = chunked.chunked_loss_sum
    monkeypatch.setattr(chunked, "chunked_loss_sum", lambda *a: calls.append(1) or real(*a))

    def losses(chunk_logits: int) -> list[float]:
        monkeypatch.setattr(chunked, "CHUNK_LOGITS", chunk_logits)
        cfg = cfg_factory(tiny_model_dir("llama"), data__path=str(data), data__limit="null", data__max_seq_length=256,
                          train__max_steps=3, train__batch_size=4, train__micro_batch_size=4, lora__dropout=0.0)
        summary = train(cfg)
        rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r] + [summary["final_eval_loss"]]

    whole = losses(1 << 40)
    assert not calls
    part = losses(CHUNK * 1276)  # the tiny tokenizer's vocabulary
    assert len(calls) >= 3 and len(whole) == 4  # every step's loss, and the evaluation's, in chunks
    assert part == pytest.approx(whole, rel=1e-5)


@pytest.mark.slow
def test_the_estimate_counts_the_loss_in_chunks(tmp_path, monkeypatch):
    """A Llama 3-sized vocabulary (128,256) on a small model: the run's own peak against the
    estimate at its fullest micro batch, which counts one chunk of logits, not the step's."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    import loralab.estimate as estimate
    from loralab.config import load_config
    from loralab.estimate import estimate_run
    from loralab.models import cpu_bf16_feature
    from loralab.train.step import fullest_micro_batch

    # bf16 where the CPU multiplies it natively; a CPU that emulates bf16 (AVX2 alone) takes minutes
    # over this head in bf16, so there the run and its estimate are fp32
    dtype = "bf16" if cpu_bf16_feature() else "fp32"
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=128256, max_position_embeddings=2048,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(__file__).parents[1] / "src/loralab/assets/tiny-base" / name, model_dir / name)
    data = write_jsonl(tmp_path / "data.jsonl", instruction_records(64))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir), "device": "cpu", "dtype": dtype},
        "data": {"path": str(data), "max_seq_length": 1024, "val_max_examples": 8},
        "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 8, "warmup_steps": 0},
        "output": {"save_adapter": False}}), encoding="utf-8")
    src = str(Path(__file__).parents[1] / "src")
    done = subprocess.run([sys.executable, "-m", "loralab.cli", "train", str(config), "--out", str(tmp_path / "run"),
                           "--json"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
    assert done.returncode == 0, done.stderr[-2000:]
    peak = json.loads((tmp_path / "run" / "summary.json").read_text())["peak_memory_bytes"]
    cfg = load_config(config)
    tokens = fullest_micro_batch(cfg)
    assert tokens * 128256 > estimate.CHUNK_LOGITS  # the run computed its loss in chunks
    chunked_estimate = estimate_run(cfg, tokens=tokens).memory_bytes["total"]
    # measured: 945 MiB estimated (fullest micro batch 1,457 tokens) against a 998 MiB peak in bf16 (Xeon, AMX)
    assert 0.75 <= chunked_estimate / peak <= 1.25, (chunked_estimate, peak)
    monkeypatch.setattr(estimate, "CHUNK_LOGITS", 1 << 60)  # the step's whole logits: what the run did not hold
    assert estimate_run(cfg, tokens=tokens).memory_bytes["total"] > 3 * peak
