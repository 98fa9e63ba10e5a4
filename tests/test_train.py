"""End-to-end training runs on tiny models: numbers, files, reload, optimizers, QLoRA, errors."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from loralab.adapters import attach_lora
from loralab.config import LoraConfig, load_config
from loralab.errors import ConfigError, DataError, LoralabError, ModelError
from loralab.models import resolve_model_path
from loralab.train.loop import train, train_with_model
from loralab.train.optim import lr_factor

SUMMARY_KEYS = {"status", "error", "wall_time_s", "train_time_s", "tokens_per_s", "peak_memory_bytes",
                "trainable_params", "total_params", "final_eval_loss"}


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir) if "lr" in r]


def load_adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- (a) rsLoRA


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r", [2, 4, 16])
def test_rslora_scaling(tiny_model_dir, rslora, r):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")))
    peft = attach_lora(model, LoraConfig(r=r, alpha=8.0, rslora=rslora, targets=["query", "value"]), seed=0)
    layers = [m for n, m in peft.named_modules() if n.endswith("q_proj") and hasattr(m, "scaling")]
    assert len(layers) == 2
    expected = 8.0 / math.sqrt(r) if rslora else 8.0 / r
    for layer in layers:
        assert layer.scaling["default"] == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- (b, c) real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    cfg = make_cfg("builtin:tiny", out, "lora.targets=query,key,value,projection,mlp",
                   train__max_steps=10, train__lr=2e-3, train__scheduler="constant",
                   train__batch_size=8, train__micro_batch_size=8, eval__every=5, lora__dropout=0.0,
                   data__limit=80)
    trained = train_with_model(cfg)
    return cfg, out, trained


@pytest.mark.slow
def test_real_run_loss_decreases(tiny_run):
    _, run_dir, trained = tiny_run
    summary = trained.summary
    losses = train_losses(run_dir)
    assert len(losses) == 10
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] > losses[-1]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] * 1.5
    assert summary["final_eval_loss"] == pytest.approx(evals[-1]["eval_loss"])


@pytest.mark.slow
def test_real_run_summary(tiny_run):
    _, run_dir, trained = tiny_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["status"] == "completed" and on_disk["error"] is None
    assert on_disk["steps"] == 10
    assert on_disk["wall_time_s"] >= on_disk["train_time_s"] > 0
    assert on_disk["tokens_per_s"] == pytest.approx(on_disk["tokens_seen"] / on_disk["train_time_s"])
    assert on_disk["peak_memory_bytes"] is None or on_disk["peak_memory_bytes"] >= 0
    model = trained.model
    trainable, total = model.get_nb_trainable_parameters()
    assert on_disk["trainable_params"] == trainable > 0
    assert on_disk["total_params"] == total
    assert on_disk["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert math.isfinite(on_disk["final_eval_loss"])


@pytest.mark.slow
def test_real_run_metrics_and_files(tiny_run):
    cfg, run_dir, _ = tiny_run
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 11))
    for r in train_rows:
        assert {"step", "train_loss", "lr", "tokens_seen"} <= set(r)
        assert r["lr"] == pytest.approx(2e-3)
    seen = [r["tokens_seen"] for r in train_rows]
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False))
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert load_config(run_dir / "config.yaml") == cfg


@pytest.mark.slow
def test_peft_reload_matches_in_memory(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run_dir, trained = tiny_run
    mem = trained.model.eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny"))
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    ids = torch.tensor([[0, 17, 250, 33, 900, 5, 6, 7, 8, 42, 1]])
    with torch.no_grad():
        a = mem(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # the adapter must actually change the output (B moved away from zero)
    with reloaded.disable_adapter(), torch.no_grad():
        plain = reloaded(input_ids=ids).logits
    assert (plain - a).abs().max() > 1e-3


# ----------------------------------------------------------------------------- (d) optimizers


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor", "adamw8bit"])
def test_optimizers(tiny_model_dir, cfg_factory, optimizer):
    cfg = cfg_factory(tiny_model_dir("llama"), train__optimizer=optimizer, train__momentum=0.9,
                      train__lr=1e-2, lora__dropout=0.0)
    summary = train(cfg)
    losses = train_losses(cfg.output.dir)
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    tensors = load_adapter_tensors(cfg.output.dir)
    b = [t for k, t in tensors.items() if "lora_B" in k]
    assert b and all(torch.isfinite(t).all() for t in tensors.values())
    assert max(t.abs().max().item() for t in b) > 0  # the optimizer moved B off its zero init


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_schedulers_run(tiny_model_dir, cfg_factory, scheduler):
    cfg = cfg_factory(tiny_model_dir("llama"), train__scheduler=scheduler, train__warmup_steps=1,
                      train__max_steps=4, train__lr=1e-3)
    train(cfg)
    rows = [r for r in read_metrics(cfg.output.dir) if "lr" in r]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    # the lr logged after step s is the factor of step s (0-based index s) times the peak
    for r in rows:
        expected = 1e-3 * lr_factor(r["step"], total=4, warmup=1, kind=scheduler)
        assert r["lr"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_factor_warmup(kind):
    assert [lr_factor(s, total=100, warmup=4, kind=kind) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, total=100, warmup=4, kind=kind) == pytest.approx(1.0)


def test_lr_factor_values():
    assert lr_factor(100, total=100, warmup=10, kind="constant") == 1.0
    assert lr_factor(55, total=100, warmup=10, kind="linear") == pytest.approx(0.5)
    assert lr_factor(100, total=100, warmup=10, kind="linear") == pytest.approx(0.0)
    assert lr_factor(55, total=100, warmup=10, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(100, total=100, warmup=10, kind="cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(32.5, total=100, warmup=10, kind="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(200, total=100, warmup=10, kind="linear") == 0.0  # clamped
    assert lr_factor(0, total=10, warmup=0, kind="linear") == 1.0


# ----------------------------------------------------------------------------- (e) accumulation


def test_gradient_accumulation_equivalence(tiny_model_dir, cfg_factory):
    common = dict(train__batch_size=8, train__max_steps=3, train__lr=1e-2, lora__dropout=0.0,
                  data__shuffle="true", train__seed=7, train__optimizer="sgd")
    one = cfg_factory(tiny_model_dir("llama"), train__micro_batch_size=8, **common)
    four = cfg_factory(tiny_model_dir("llama"), train__micro_batch_size=2, **common)
    assert four.grad_accum == 4
    train(one)
    train(four)
    la, lb = train_losses(one.output.dir), train_losses(four.output.dir)
    assert len(la) == len(lb) == 3
    for a, b in zip(la, lb, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    ta, tb = load_adapter_tensors(one.output.dir), load_adapter_tensors(four.output.dir)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-7)
    assert any("lora_B" in k and ta[k].abs().max() > 0 for k in ta)


def test_gradient_accumulation_equivalence_adamw(tiny_model_dir, cfg_factory):
    common = dict(train__batch_size=8, train__max_steps=3, train__lr=1e-3, lora__dropout=0.0,
                  train__seed=7)
    one = cfg_factory(tiny_model_dir("llama"), train__micro_batch_size=8, **common)
    four = cfg_factory(tiny_model_dir("llama"), train__micro_batch_size=2, **common)
    train(one)
    train(four)
    for a, b in zip(train_losses(one.output.dir), train_losses(four.output.dir), strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    ta, tb = load_adapter_tensors(one.output.dir), load_adapter_tensors(four.output.dir)
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- (f) QLoRA


@pytest.fixture(scope="module")
def unquantized_trainable(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama_h64")))
    peft = attach_lora(model, LoraConfig(r=4, targets=["query", "value", "mlp"]), seed=0)
    return peft.get_nb_trainable_parameters()[0]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_activation_checkpointing_keeps_the_loss_curve(cfg_factory, packing):
    kw = dict(lora__dropout=0.0, train__max_steps=4, train__lr=3e-3, data__packing=packing, train__micro_batch_size=4)
    plain = cfg_factory("builtin:tiny", **kw)
    checkpointed = cfg_factory("builtin:tiny", train__gradient_checkpointing=True, **kw)
    a, trained = train(plain), train_with_model(checkpointed)
    b = trained.summary
    assert trained.model.get_base_model().is_gradient_checkpointing  # it was on, so equality means something
    # packed: backward's recomputed forwards also attend per example (a cross-example recompute would differ)
    assert (a["packed_attention"], b["packed_attention"]) == (("per_example",) * 2 if packing else (None, None))
    losses = train_losses(plain.output.dir)
    assert losses[-1] < losses[0]
    assert train_losses(checkpointed.output.dir) == pytest.approx(losses, rel=1e-5)
    assert b["final_eval_loss"] == pytest.approx(a["final_eval_loss"], rel=1e-5)


def test_activation_checkpointing_is_estimated_and_fused_only_with_its_like(cfg_factory):
    from loralab.estimate import estimate_run
    from loralab.train.fused import fuse_key

    cfg = cfg_factory("builtin:tiny", train__gradient_checkpointing=True)
    on, off = estimate_run(cfg), estimate_run(cfg_factory("builtin:tiny"))
    assert on.memory_bytes["activations"] < off.memory_bytes["activations"]
    assert fuse_key(cfg) != fuse_key(cfg_factory("builtin:tiny"))  # a shared key: groups have it or not


@pytest.mark.parametrize("compute_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_qlora(tiny_model_dir, cfg_factory, unquantized_trainable, mode, compute_dtype):
    import bitsandbytes as bnb

    cfg = cfg_factory(tiny_model_dir("llama_h64"), "lora.targets=query,value,mlp", lora__r=4,
                      quant__mode=mode, quant__compute_dtype=compute_dtype, train__max_steps=2)
    trained = train_with_model(cfg)
    summary = trained.summary
    assert summary["status"] == "completed"
    assert summary["trainable_params"] == unquantized_trainable
    assert all(math.isfinite(x) for x in train_losses(cfg.output.dir))
    assert math.isfinite(summary["final_eval_loss"])
    model = trained.model
    bases = {n: m.base_layer for n, m in model.named_modules() if hasattr(m, "base_layer")}
    assert len(bases) == 2 * 5
    for m in bases.values():
        assert isinstance(m, bnb.nn.Linear4bit)
        assert m.weight.quant_state.quant_type == mode
    # unwrapped linear layers of the decoder (k_proj, o_proj) are quantized too
    k_proj = dict(model.named_modules())["base_model.model.model.layers.0.self_attn.k_proj"]
    assert isinstance(k_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("model_dtype", ["auto", "bf16"])
def test_4bit_compute_dtype_auto_follows_the_base(tiny_model_dir, cfg_factory, model_dtype):
    """quant.compute_dtype auto (the default) dequantizes to the dtype the base resolved to: on a
    CPU that emulates bf16 (AVX2 alone multiplies a bf16 matmul about 100x slower than fp32) a
    QLoRA run whose base is fp32 must not compute in bf16; over a bf16 base it is bf16, as QLoRA."""
    import bitsandbytes as bnb

    from loralab.estimate import estimate_run

    cfg = cfg_factory(tiny_model_dir("llama_h64"), lora__r=4, quant__mode="nf4", model__dtype=model_dtype,
                      train__max_steps=1, eval__every=0)
    assert cfg.quant.compute_dtype == "auto"
    trained = train_with_model(cfg)
    resolved = trained.summary["dtype"]
    assert resolved == ("fp32" if model_dtype == "auto" else "bf16")  # the 64-wide base: fp32 by auto on any CPU
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[resolved]
    layers = [m for m in trained.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {want}
    # the estimate's dequantization buffer is in the same dtype: twice as large over an fp32 base
    buffers = {d: estimate_run(replace(cfg, quant=replace(cfg.quant, compute_dtype=d))).memory_bytes["dequant_buffer"]
               for d in ("fp32", "bf16")}
    assert buffers["fp32"] == 2 * buffers["bf16"]
    assert estimate_run(cfg).memory_bytes["dequant_buffer"] == buffers[resolved]


def test_qlora_trains_the_same_with_evaluations_between_steps(tiny_model_dir, cfg_factory):
    """bitsandbytes repacks a CPU 4-bit weight for inference on its first eval-mode forward and
    then multiplies with a kernel autograd cannot go through: training after an evaluation (or
    after the packed-attention check, itself a forward in eval mode) would silently lose the
    gradient through every frozen 4-bit layer. (On a CPU without AVX512-BF16 bitsandbytes never
    repacks and the runs agree either way.)"""
    kw = dict(lora__r=4, lora__dropout=0.0, quant__mode="nf4", quant__compute_dtype="fp32", train__max_steps=4,
              train__lr=3e-3)
    runs = {name: cfg_factory(tiny_model_dir("llama_h64"), "lora.targets=query,value,mlp", **kw, **extra)
            for name, extra in (("quiet", dict(eval__every=0)), ("evaluated", dict(eval__every=1)),
                                ("packed", dict(eval__every=1, data__packing=True)))}
    summaries = {name: train(cfg) for name, cfg in runs.items()}
    assert summaries["packed"]["packed_attention"] == "per_example"
    quiet = train_losses(runs["quiet"].output.dir)
    assert quiet[-1] < quiet[0]  # it trains, so agreement below means something
    assert train_losses(runs["evaluated"].output.dir) == pytest.approx(quiet, rel=1e-5)
    assert train_losses(runs["packed"].output.dir) == pytest.approx(quiet, rel=1e-4)
    for name in ("evaluated", "packed"):
        assert summaries[name]["final_eval_loss"] == pytest.approx(summaries["quiet"]["final_eval_loss"], rel=1e-4)


# ----------------------------------------------------------------------------- (g) bad input


def assert_failed_run(cfg, exc_type, *needles):
    with pytest.raises(exc_type) as exc:
        train(cfg)
    assert isinstance(exc.value, LoralabError)
    msg = str(exc.value)
    for n in needles:
        assert n in msg, (n, msg)
    run_dir = Path(cfg.output.dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "invalid"  # bad input found before the first step
    assert summary["error"] == msg
    assert not (run_dir / "adapter").exists()
    return msg


def test_missing_dataset_file(tiny_model_dir, cfg_factory, tmp_path):
    missing = tmp_path / "nope.jsonl"
    cfg = cfg_factory(tiny_model_dir("llama"), data__path=missing)
    assert_failed_run(cfg, DataError, str(missing), "does not exist")


def test_malformed_jsonl(tiny_model_dir, cfg_factory, small_alpaca_file):
    p = small_alpaca_file()
    lines = p.read_text().splitlines()
    lines[2] = '{"instruction": "x", "output": '
    p.write_text("\n".join(lines) + "\n")
    cfg = cfg_factory(tiny_model_dir("llama"), data__path=p)
    assert_failed_run(cfg, DataError, f"{p}:3", "malformed JSON")


def test_missing_field(tiny_model_dir, cfg_factory, small_alpaca_file):
    p = small_alpaca_file([{"instruction": "a", "output": "1"}, {"instruction": "b"},
                           {"instruction": "c", "output": "3"}])
    cfg = cfg_factory(tiny_model_dir("llama"), data__path=p)
    assert_failed_run(cfg, DataError, f"{p}:2", "missing field output")


def test_empty_after_length_filter(tiny_model_dir, cfg_factory, small_alpaca_file):
    p = small_alpaca_file()
    cfg = cfg_factory(tiny_model_dir("llama"), data__path=p, data__min_response_chars=50)
    assert_failed_run(cfg, DataError, "no training examples left", "dropped by the response-length filter")


def test_truncated_to_no_response(tiny_model_dir, cfg_factory):
    cfg = cfg_factory(tiny_model_dir("llama"), data__max_seq_length=4)
    assert_failed_run(cfg, DataError, "data.max_seq_length = 4", "every response token")


def test_unknown_target_role(tiny_model_dir, cfg_factory):
    cfg = cfg_factory(tiny_model_dir("llama"), "lora.targets=querry")
    assert_failed_run(cfg, ModelError, "'querry'", "query, key, value")


def test_rank_zero_is_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.r must be > 0"):
        make_cfg(tiny_model_dir("llama"), tmp_path / "r0", lora__r=0)
    assert not (tmp_path / "r0").exists()


def test_model_dir_without_weights(tiny_model_dir, cfg_factory, tmp_path):
    src = tiny_model_dir("llama")
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, bare / f.name)
    cfg = cfg_factory(bare)
    assert_failed_run(cfg, ModelError, str(bare), "safetensors")


def test_model_dir_without_config(cfg_factory, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    cfg = cfg_factory(empty)
    assert_failed_run(cfg, ModelError, "config.json")
