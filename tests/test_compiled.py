"""train.compile: decoder layers compiled with torch.compile, the same maths as eager, eager on failure.

Real compiles (inductor's C++ backend on this CPU) on random-init models saved with
save_pretrained, trained on instruction data of mixed lengths, packed (per-example attention)
and padded; a compile that fails falls back to eager and says why.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_cfg
from loralab.train.compiled import MIN_WORK, compile_choice, decoder_layers
from loralab.train.loop import train
from userdata import instruction_records, write_jsonl


def _cfg(model, tmp_path, name: str, **kw):
    data = write_jsonl(tmp_path / "data.jsonl", instruction_records(48, seed=3))
    return make_cfg(model, tmp_path / name, data__path=str(data), data__max_seq_length=160, train__max_steps=4,
                    train__batch_size=8, train__micro_batch_size=4, lora__dropout=0.0,
                    output__save_adapter=False, **{"eval__every": 0, **kw})


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r and "event" not in r]


def test_auto_compiles_only_runs_long_enough_to_repay_it():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert MIN_WORK["cpu"] == 2e13
    # the bench's 20-step run of a 50M-parameter model: far too short to repay a compile
    assert compile_choice("auto", cpu, 40_960, 50_000_000, dtype=bf16) == (
        False, "auto: 40,960 tokens x 50.0M parameters planned (2.0e+12), compiled from 2e+13 on cpu")
    # 2,000 steps of the same: compiled
    on, why = compile_choice("auto", cpu, 4_096_000, 50_000_000, dtype=bf16)
    assert on and why == "auto: 4,096,000 tokens x 50.0M parameters planned (2.0e+14), compiled from 2e+13 on cpu"
    # in fp32 on the CPU compiling gained nothing measurable (docs/performance.md): never by auto
    assert compile_choice("auto", cpu, 4_096_000, 50_000_000, dtype=torch.float32) == (
        False, "auto: not compiled in fp32 on the CPU, where it gains nothing measurable")
    assert compile_choice("auto", torch.device("cuda"), 10**8, 10**8, dtype=torch.float32)[0]  # 1e16: compiled
    assert compile_choice("auto", torch.device("mps"), 10**9, 10**9, dtype=bf16) == (False, "auto: not compiled on mps")
    assert compile_choice(True, cpu, 1, 1, dtype=torch.float32) == (True, "train.compile: true")
    assert compile_choice(False, cpu, 10**12, 10**9, dtype=bf16) == (False, "train.compile: false")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_decoder_layers_are_the_models_repeated_blocks(tiny_model_dir, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch))
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert len({type(m) for m in layers}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_a_compiled_run_trains_like_the_eager_run(tiny_model_dir, tmp_path, packing):
    model = tiny_model_dir("llama")
    eager = train(_cfg(model, tmp_path, "eager", data__packing=packing, train__compile=False))
    compiled = train(_cfg(model, tmp_path, "compiled", data__packing=packing, train__compile=True))
    assert (eager["compiled"], compiled["compiled"]) == (False, True), compiled["compile_reason"]
    assert compiled["compile_reason"] == "train.compile: true: 2 decoder layers compiled"
    assert compiled["compile_time_s"] > 0 and eager["compile_time_s"] == 0
    assert compiled["packed_attention"] == ("per_example" if packing else None)
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(a) == len(b) == 4
    # fp32 with fused element-wise kernels: the same sums in another order
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    assert abs(eager["final_eval_loss"] - compiled["final_eval_loss"]) < 1e-4 * eager["final_eval_loss"]
    assert compiled["tokens_seen"] == eager["tokens_seen"]


def test_a_compile_that_fails_trains_eager_and_says_why(tiny_model_dir, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    model = tiny_model_dir("llama")
    eager = train(_cfg(model, tmp_path, "eager", train__compile=False))
    fallback = train(_cfg(model, tmp_path, "fallback", train__compile=True))
    assert fallback["status"] == "completed" and fallback["compiled"] is False
    assert fallback["compile_reason"] == "compile failed, eager: RuntimeError: no C++ compiler found"
    # the probe's step left nothing behind: the same run as one never probed, bit for bit
    assert _losses(tmp_path / "fallback") == _losses(tmp_path / "eager")
    assert fallback["final_eval_loss"] == eager["final_eval_loss"]


def test_the_command_line_says_how_the_steps_ran(tiny_model_dir, tmp_path, capsys):
    import yaml

    from loralab.cli import main

    data = write_jsonl(tmp_path / "data.jsonl", instruction_records(48, seed=3))
    config = {"model": {"path": str(tiny_model_dir("llama")), "device": "cpu"},
              "data": {"path": str(data), "max_seq_length": 160},
              "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 4, "warmup_steps": 0},
              "output": {"save_adapter": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    # a 32-wide model: fp32 by auto; packed rows by auto; eager by auto (fp32 on the CPU is never compiled by it)
    assert ("layout:  fp32, packed rows, attention per example, eager (auto: not compiled in fp32 on the CPU, "
            "where it gains nothing measurable)") in out, out


# A fused group mixing rank, targets and learning rate (loralab.train.fused).
GROUP = [dict(lora__r=2, train__lr=1e-3), dict(lora__r=8, train__lr=3e-3, lora__targets="query,key,value,mlp"),
         dict(lora__r=4, train__lr=2e-3, lora__targets="value")]


@pytest.mark.slow
def test_a_compiled_fused_group_trains_like_the_eager_group(tiny_model_dir, tmp_path):
    from loralab.train.fused import train_fused

    model = tiny_model_dir("llama")

    def group(name: str, compile_: bool) -> list[dict]:
        return train_fused([_cfg(model, tmp_path, f"{name}{k}", train__compile=compile_, eval__every=2, **kw)
                            for k, kw in enumerate(GROUP)])

    eager, compiled = group("eager", False), group("compiled", True)
    assert [s["compiled"] for s in eager + compiled] == [False] * 3 + [True] * 3, compiled[0]["compile_reason"]
    assert compiled[0]["compile_reason"] == "train.compile: true: 2 decoder layers compiled"
    for k, (e, c) in enumerate(zip(eager, compiled, strict=True)):
        a, b = _losses(tmp_path / f"eager{k}"), _losses(tmp_path / f"compiled{k}")
        assert len(a) == len(b) == 4
        # fp32: measured equal to the last bit on this CPU (torch 2.x inductor, 3 runs x 4 steps); the
        # tolerance leaves room for inductor's reordered sums elsewhere, as the solo test does
        assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) < 1e-5, (k, a, b)
        evals_e, evals_c = _evals(tmp_path / f"eager{k}"), _evals(tmp_path / f"compiled{k}")
        assert len(evals_e) == len(evals_c) == 2
        assert max(abs(x - y) / x for x, y in zip(evals_e, evals_c, strict=True)) < 1e-5, (k, evals_e, evals_c)
        assert abs(e["final_eval_loss"] - c["final_eval_loss"]) < 1e-5 * e["final_eval_loss"]
        assert c["tokens_seen"] == e["tokens_seen"] and c["extra"]["fused"]["group_size"] == 3


def _evals(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
