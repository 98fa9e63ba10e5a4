"""loralab estimate: seed figures, counts cross-checked against real PEFT, memory parts, errors."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from loralab.cli.estimate import estimate_from_args
from loralab.config import config_from_dict
from loralab.errors import ConfigError, ModelError
from loralab.estimate import (
    OPTIMIZER_BYTES_PER_PARAM,
    base_weight_bytes,
    describe_model,
    estimate_run,
    known_presets,
    lora_modules,
    lora_tensor_shapes,
    optimizer_state_bytes,
    quantized_bytes,
    resolve_model_config,
)
from loralab.units import parse_bytes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads on a shared CPU
ALL_BUT_HEAD = ["query", "key", "value", "projection", "mlp"]


def cfg(model: str, **sections):
    raw = {"model": {"path": model}}
    for key, value in sections.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw)


def trainable(model: str, targets: list[str], r: int = 8, **kw) -> int:
    return estimate_run(cfg(model, lora__targets=targets, lora__r=r, **kw)).trainable_params


# ----------------------------------------------------------------------------- seed figures


def test_llama2_7b_seed_counts():
    est = estimate_run(cfg("llama2-7b", lora__r=8, lora__targets=["query", "value"]))
    assert est.base_params == 6_738_415_616 and est.total_params == 6_738_415_616 + 4_194_304
    assert est.trainable_params == 4_194_304


def test_llama2_7b_all_layers_exceeds_20_million():
    # q, k, v, o and the three MLP matrices in 32 layers: 19,988,480, just under 20M.
    assert trainable("llama2-7b", ALL_BUT_HEAD) == 19_988_480
    # Lit-GPT's "all layers" (lora_query/key/value/projection/mlp/head all True) also wraps
    # the output head: + 8 x (4096 + 32000) = 288,768 -> 20,277,248, the seed's "> 20 million".
    all_layers = trainable("llama2-7b", ALL_BUT_HEAD + ["head"])
    assert all_layers == 20_277_248 > 20_000_000


def test_adamw_state_for_seed_default_is_16_78_mb():
    shape = describe_model("llama2-7b")
    tensors = lora_tensor_shapes(shape, lora_modules(shape, ["query", "value"]), 8, False)
    # Lit-GPT keeps the adapters (and so the two AdamW moments) in bf16: 2 x 2 bytes/param.
    assert optimizer_state_bytes("adamw", tensors, param_bytes=2) == 16_777_216
    assert optimizer_state_bytes("adamw", tensors, param_bytes=4) == 8 * 4_194_304


def test_optimizer_bytes_per_param():
    assert OPTIMIZER_BYTES_PER_PARAM["adamw"] == 8  # seed: "Adam uses 8 bytes per parameter"
    assert OPTIMIZER_BYTES_PER_PARAM["adafactor"] == 4  # seed: "Adafactor uses only 4"
    # The seed's 4 bytes is one fp32 second moment per parameter: exactly what Adafactor
    # keeps for a vector; for a matrix it factors it into a row and a column vector.
    assert optimizer_state_bytes("adafactor", [(4096,)]) == 4 * 4096
    assert optimizer_state_bytes("adafactor", [(8, 4096)]) == 4 * (8 + 4096) < 4 * 8 * 4096
    assert optimizer_state_bytes("adamw", [(10, 10)]) == 800
    assert optimizer_state_bytes("sgd", [(10, 10)]) == 0
    assert optimizer_state_bytes("sgd", [(10, 10)], momentum=0.9) == 400
    assert 200 <= optimizer_state_bytes("adamw8bit", [(10, 10)]) <= 210


def test_optimizer_part_follows_config():
    parts = {o: estimate_run(cfg("llama2-7b", train__optimizer=o)).memory_bytes["optimizer_state"]
             for o in OPTIMIZER_BYTES_PER_PARAM}
    assert parts["adamw"] == 8 * 4_194_304
    assert parts["sgd"] == 0
    assert parts["adafactor"] < parts["adamw8bit"] < parts["adamw"]


# ----------------------------------------------------------------------------- presets


def test_presets_match_published_sizes():
    published = {
        "llama2-13b": 13_015_864_320,
        "llama2-70b": 68_976_648_192,
        "llama3-8b": 8_030_261_248,
        "mistral-7b": 7_241_732_096,
        "qwen2-7b": 7_615_616_512,
        "qwen2-1.5b": 1_543_714_304,
        "phi3-mini": 3_821_079_552,
    }
    for name, total in published.items():
        assert describe_model(name).total_params == total, name
    assert set(published) | {"llama2-7b", "tiny"} <= set(known_presets())


def test_70b_answers_quickly():
    start = time.perf_counter()
    est = estimate_run(cfg("llama2-70b", quant__mode="nf4", lora__targets=["all"]), budget_bytes=80 * 2**30)
    assert time.perf_counter() - start < 20
    assert est.memory_bytes["base_weights"] < 0.6 * est.base_params  # ~4.1-4.5 bits/weight


def test_builtin_tiny():
    try:
        resolve_model_config("builtin:tiny")
    except ModelError:
        pytest.skip("tiny base not built yet")
    est = estimate_run(cfg("builtin:tiny"))
    assert est.trainable_params > 0 and est.memory_bytes["total"] > 0


# ----------------------------------------------------------------------------- against PEFT


def _save_tiny(tmp_path, name: str, config) -> str:
    path = tmp_path / name
    config.save_pretrained(path)
    return str(path)


def _tiny_configs():
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Phi3Config, Qwen2Config

    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=101)
    return {
        "llama_gqa": (LlamaConfig(num_key_value_heads=2, **small), ["query", "value"]),
        "llama_tied": (LlamaConfig(tie_word_embeddings=True, **small), ALL_BUT_HEAD + ["head"]),
        "qwen2_bias": (Qwen2Config(num_key_value_heads=2, **small), ["all"]),
        "phi3_fused": (Phi3Config(pad_token_id=0, **small), ["query", "key", "value", "mlp"]),
        "gpt2_conv1d": (GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97),
                        ["query", "key", "value", "projection"]),
        "opt": (OPTConfig(hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                          word_embed_proj_dim=48), ["query", "value", "mlp"]),
    }


@pytest.mark.parametrize("arch", list(_tiny_configs()))
@pytest.mark.parametrize(("r", "rslora", "dora"), [(4, False, False), (8, True, False), (2, False, True)])
def test_counts_match_peft(tmp_path, arch, r, rslora, dora):
    import peft
    from transformers import AutoModelForCausalLM

    from loralab.roles import head_module_name, linear_module_names, resolve_targets

    config, targets = _tiny_configs()[arch]
    path = _save_tiny(tmp_path, arch, config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    t = resolve_targets(model_type=config.model_type, linear_names=linear_module_names(model),
                        head_name=head_module_name(model), targets=targets)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=16, target_modules=t.peft,
                                                         use_rslora=rslora, use_dora=dora))
    peft_trainable, peft_all = wrapped.get_nb_trainable_parameters()
    est = estimate_run(cfg(path, lora__r=r, lora__targets=targets, lora__rslora=rslora, lora__dora=dora))
    assert est.trainable_params == peft_trainable
    assert est.total_params == peft_all == est.base_params + est.trainable_params  # as a run's summary counts
    assert est.lora_modules == len(t.modules)
    # every size these configs leave out has a meaning of its own (GPT-2's n_inner None: 4 x n_embd)
    assert not any(note.startswith("guessed") for note in est.approximate)
    assert describe_model(path).intermediate == (4 * 48 if arch == "gpt2_conv1d" else config.to_dict().get(
        "intermediate_size", config.to_dict().get("ffn_dim")))


def test_rslora_adds_nothing_and_dora_adds_out_features():
    plain = trainable("llama2-7b", ["query", "value"])
    assert trainable("llama2-7b", ["query", "value"], lora__rslora=True) == plain
    # DoRA: one magnitude per output feature of each wrapped layer (64 layers x 4096).
    assert trainable("llama2-7b", ["query", "value"], lora__dora=True) == plain + 64 * 4096


# ----------------------------------------------------------------------------- memory parts


def test_4bit_bytes_match_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 200)
    for double in (False, True):
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type="nf4")
        real = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
        if double:
            real += state.state2.absmax.numel() * 4 + 4  # second-level scales and the offset
        assert quantized_bytes(w.numel(), double_quant=double, block_size=64) == real
    # 0.5 byte/weight + 4/64 (fp32 absmax) = 4.5 bits; double quant ~4.127 bits
    assert quantized_bytes(64 * 256 * 100, double_quant=False) * 8 / (64 * 256 * 100) == 4.5
    assert 4.12 < quantized_bytes(64 * 256 * 100, double_quant=True) * 8 / (64 * 256 * 100) < 4.13


def test_4bit_keeps_embeddings_and_head_unquantized():
    shape = describe_model("llama2-7b")
    assert "lm_head" not in shape.quantizable and len(shape.quantizable) == 32 * 7
    embed_head = 2 * 32000 * 4096
    nf4 = base_weight_bytes(shape, dtype="bf16", quant="nf4", double_quant=True, block_size=64)
    linear = shape.total_params - embed_head - 65 * 4096  # minus the norms
    expected = (embed_head + 65 * 4096) * 2 + 32 * sum(
        quantized_bytes(n, double_quant=True) for n in [4096 * 4096] * 4 + [4096 * 11008] * 3
    )
    assert nf4 == expected
    assert math.isclose(nf4, (shape.total_params - linear) * 2 + linear * 4.127 / 8, rel_tol=0.001)


def test_memory_parts_and_total():
    est = estimate_run(cfg("llama2-7b", model__dtype="bf16", quant__mode="nf4", train__micro_batch_size=1,
                           train__batch_size=1, data__max_seq_length=512))
    mem = est.memory_bytes
    assert {"base_weights", "lora_weights", "gradients", "optimizer_state", "activations",
            "backward_transient", "dequant_buffer", "allocator_slack", "framework"} <= set(mem)
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert mem["lora_weights"] == mem["gradients"] == 4 * 4_194_304
    assert 3.5e9 < mem["base_weights"] < 4.0e9
    assert est.approximate


def test_activations_scale_and_checkpointing():
    def act(**kw):
        return estimate_run(cfg("llama2-7b", **kw)).memory_bytes["activations"]

    base = act(train__micro_batch_size=1, train__batch_size=1)
    assert act(train__micro_batch_size=2, train__batch_size=2) == 2 * base
    assert act(train__micro_batch_size=1, train__batch_size=1, data__max_seq_length=512) == 2 * base
    gc = estimate_run(cfg("llama2-7b", train__micro_batch_size=1, train__batch_size=1), grad_checkpointing=True)
    assert gc.memory_bytes["activations"] < base / 5


def test_budget_fit_and_max_micro_batch():
    est = estimate_from_args(model="llama2-7b", quant="nf4", dtype="bf16", micro_batch=1, seq_len=512, budget="24GB")
    assert est.fits is True and est.max_micro_batch >= 1
    at_max = estimate_from_args(model="llama2-7b", quant="nf4", dtype="bf16", micro_batch=est.max_micro_batch,
                                seq_len=512)
    above = estimate_from_args(model="llama2-7b", quant="nf4", dtype="bf16", micro_batch=est.max_micro_batch + 1,
                               seq_len=512)
    assert at_max.memory_bytes["total"] <= 24e9 < above.memory_bytes["total"]
    big = estimate_from_args(model="llama2-70b", dtype="bf16", budget="24GB")
    assert big.fits is False and big.max_micro_batch == 0


def test_time_per_step_with_throughput():
    est = estimate_from_args(model="llama2-7b", micro_batch=1, seq_len=256, throughput=100e12)
    # ~4 x 6.5e9 matmul weights x 256 tokens (+ attention) at 100 TFLOP/s
    assert 0.06 < est.time_per_step_s < 0.08
    assert estimate_from_args(model="llama2-7b").time_per_step_s is None


def test_the_time_estimate_times_the_matmuls_in_the_runs_dtype():
    """tune and study --dry-run time a run at the matmul rate of its own dtype: a bf16 run on a CPU
    that emulates bf16 is about 100x slower than fp32 (AMD EPYC, AVX2), several times faster on
    one with AMX; a 4-bit base at its compute dtype (auto: the base's)."""
    from loralab.estimate import estimate_run, matmul_throughput
    from loralab.models import cpu_bf16_feature

    asked = []

    def rate(dtype: str) -> float:
        asked.append(dtype)
        return {"fp32": 1e11, "bf16": 1e12}[dtype]

    def seconds(**kw) -> float:
        return estimate_run(cfg("llama2-7b", model__device="cpu", train__micro_batch_size=1, data__max_seq_length=256,
                                **kw), device="cpu", throughput=rate).time_per_step_s

    fp32, bf16 = seconds(model__dtype="fp32"), seconds(model__dtype="bf16")
    assert asked == ["fp32", "bf16"] and fp32 == pytest.approx(10 * bf16)
    asked.clear()
    seconds(model__dtype="fp32", quant__mode="nf4")  # compute_dtype auto: the base's fp32
    seconds(model__dtype="fp32", quant__mode="nf4", quant__compute_dtype="bf16")
    assert asked == ["fp32", "bf16"]
    # the rates themselves, on this machine: bf16 above fp32 only where the CPU has bf16 units
    native = cpu_bf16_feature() is not None
    assert (matmul_throughput("cpu", "bf16") > matmul_throughput("cpu", "fp32")) == native


def test_parse_bytes():
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("1.5e9") == 1_500_000_000
    for bad in ("0GB", "-3GB", "lots", "24XB"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_bytes(bad)
    # a unit left out: 24 bytes would skip every run of a study as over its memory, and exit 0
    with pytest.raises(ConfigError, match=r"--max-memory '24' would be 24 bytes: give the unit, e.g. 24GB or 24GiB"):
        parse_bytes("24", "--max-memory")
    assert parse_bytes("25000000000") == 25 * 10**9  # a plain byte count stays one


# ----------------------------------------------------------------------------- bad input


def test_unknown_preset_lists_known():
    with pytest.raises(ModelError, match="llama2-7b.*mistral-7b"):
        estimate_from_args(model="llama-9000")


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [("r", 0, "lora.r"), ("micro_batch", 0, "train.micro_batch_size"), ("seq_len", -5, "data.max_seq_length")],
)
def test_nonpositive_sizes_name_the_key(flag, value, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        estimate_from_args(model="llama2-7b", **{flag: value})


def test_nonpositive_in_config_file(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model: {path: llama2-7b}\nlora: {r: -1}\n")
    with pytest.raises(ConfigError, match=r"lora\.r must be > 0"):
        estimate_from_args(str(run))
    with pytest.raises(ConfigError, match=r"--budget must be > 0"):
        estimate_from_args(str(run), ["lora.r=8"], budget="0GB")


def test_unreadable_config_json_names_file(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"broken/config\.json.*not a readable"):
        estimate_from_args(model=str(broken))
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "hidden_size": 8}))
    with pytest.raises(ModelError, match=r"broken/config\.json.*transformers cannot read"):
        estimate_from_args(model=str(broken))
    (broken / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelError, match="model_type"):
        estimate_from_args(model=str(broken))
    with pytest.raises(ModelError, match="no config.json"):
        estimate_from_args(model=str(tmp_path))


def test_unknown_architecture_falls_back_to_module_counting(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM, GPTBigCodeConfig

    config = GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64)
    path = _save_tiny(tmp_path, "bigcode", config)
    est = estimate_from_args(model=path, targets="all", r=4)
    assert any("not one loralab models" in note for note in est.approximate)
    model = AutoModelForCausalLM.from_config(config)
    n_lin = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and n != "lm_head"]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=n_lin))
    assert est.trainable_params == wrapped.get_nb_trainable_parameters()[0]


# ----------------------------------------------------------------------------- CLI


def test_cli_json(capsys):
    from loralab.cli import main

    code = main(["estimate", "--model", "llama2-7b", "--r", "8", "--targets", "query,value", "--quant", "nf4",
                 "--micro-batch", "1", "--seq-len", "512", "--budget", "24GB", "--throughput", "100e12", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["base_params"] == 6_738_415_616 and out["trainable_params"] == 4_194_304
    assert out["total_params"] == 6_738_415_616 + 4_194_304
    assert out["memory_bytes"]["total"] == sum(v for k, v in out["memory_bytes"].items() if k != "total")
    assert {"fits", "max_micro_batch", "time_per_step_s", "approximate", "trainable_share"} <= set(out)


def test_cli_config_file_and_table(tmp_path, capsys):
    from loralab.cli import main

    run = tmp_path / "run.yaml"
    run.write_text("model: {path: llama2-7b}\nlora: {r: 16, targets: [query, value]}\n"
                   "train: {micro_batch_size: 2, batch_size: 8}\n")
    assert main(["estimate", str(run), "--set", "lora.r=8"]) == 0
    text = capsys.readouterr().out
    assert "4,194,304" in text and "activations" in text and "total" in text


def test_cli_errors_exit_2(capsys):
    from loralab.cli import main

    assert main(["estimate", "--model", "nope-7b"]) == 2
    assert "known" in capsys.readouterr().err
    assert main(["estimate"]) == 2
    assert main(["estimate", "--model", "llama2-7b", "--micro-batch", "0"]) == 2
    assert "micro_batch_size" in capsys.readouterr().err
    # a rank a run would refuse: refused the same way, naming the module (not estimated as if it could run)
    assert main(["estimate", "--model", "tiny", "--r", "256"]) == 2
    assert ("lora.r = 256 is larger than the dimensions of model.layers.0.self_attn.q_proj (192 x 192)"
            in capsys.readouterr().err)


def test_auto_micro_batch_is_estimated_per_example_and_says_so():
    auto = estimate_run(cfg("llama2-7b", train__micro_batch_size="auto", train__batch_size=16), budget_bytes=80 * 2**30)
    one = estimate_run(cfg("llama2-7b", train__micro_batch_size=1, train__batch_size=16), budget_bytes=80 * 2**30)
    assert auto.memory_bytes == one.memory_bytes and auto.settings["micro_batch_size"] == 1
    assert auto.max_micro_batch == one.max_micro_batch > 1
    assert any("micro_batch_size: auto" in n for n in auto.approximate)


def test_a_sequence_length_past_the_models_context_is_estimated_at_the_context(tiny_model_dir):
    """A run refuses examples longer than the model's positions (256 here), so rows of 512 never
    happen: the estimate is the one at 256, and says why, instead of a figure for rows no run forms."""
    model = str(tiny_model_dir("llama"))
    at_context = estimate_from_args(model=model, seq_len=256, micro_batch=4, device="cpu")
    past = estimate_from_args(model=model, seq_len=512, micro_batch=4, device="cpu")
    assert past.memory_bytes == at_context.memory_bytes and past.settings["seq_len"] == 256
    assert ("data.max_seq_length 512 is more than the model's context of 256 positions: estimated at 256; a run "
            "refuses any example longer than the context") in past.approximate
    shorter = estimate_from_args(model=model, seq_len=128, micro_batch=4, device="cpu")
    assert shorter.memory_bytes["activations"] < past.memory_bytes["activations"]


def test_a_config_naming_its_data_is_estimated_on_that_data(tiny_model_dir, tmp_path):
    """`loralab estimate run.yaml` where run.yaml names the user's data: the activations are taken
    at the fullest micro batch that data makes (as a study's scheduler takes them), not at full
    rows of data.max_seq_length, which instruction data of real lengths never fills (1.3-2.8x
    over the measured peak on such data). --seq-len asks for full rows again."""
    from loralab.train.step import fullest_micro_batch
    from userdata import instruction_records, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", instruction_records(64, seed=5))
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {{path: {tiny_model_dir('llama')}, device: cpu}}\n"
                   f"data: {{path: {data}, max_seq_length: 256}}\n"
                   "train: {batch_size: 8, micro_batch_size: 8, max_steps: 4}\n")
    est = estimate_from_args(str(run))
    fullest = fullest_micro_batch(config_from_dict({"model": {"path": str(tiny_model_dir("llama")), "device": "cpu"},
                                                    "data": {"path": str(data), "max_seq_length": 256},
                                                    "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 4}}))
    assert est.settings["micro_batch_tokens"] == fullest and fullest < 0.75 * 8 * 256
    full_rows = estimate_from_args(str(run), seq_len=256)
    assert "micro_batch_tokens" not in full_rows.settings
    ratio = est.memory_bytes["activations"] / full_rows.memory_bytes["activations"]
    assert ratio == pytest.approx(fullest / (8 * 256), rel=0.02)
