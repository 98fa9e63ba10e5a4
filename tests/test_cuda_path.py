"""The CUDA path, tested on a CPU machine by simulating what CUDA would show.

torch.cuda's functions are patched (``fake_cuda``), from_pretrained is wrapped to capture what
loralab asks of it (``captured``) and then loads on the CPU, and nvidia-smi is a script on PATH.
"""

from __future__ import annotations

import itertools
import json
import os
import stat

import pytest
import torch
import transformers
import yaml

from loralab import models
from loralab.cli import main
from loralab.config import ModelConfig, QuantConfig
from loralab.errors import ModelError
from loralab.models import choose_device, load_base, resolve_dtype


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    models.nvidia_driver_answers.cache_clear()
    yield
    torch.set_float32_matmul_precision(before)
    models.nvidia_driver_answers.cache_clear()


def fake_cuda(monkeypatch, capability: tuple[int, int] = (9, 0)) -> None:
    """torch.cuda answers as on a machine with one GPU of ``capability``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def captured(monkeypatch):
    """The keyword arguments of each from_pretrained call; the model itself is loaded on the CPU."""
    calls: list[dict] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def fake(path, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("device_map", None)
        if kwargs.get("attn_implementation") == "flash_attention_2":
            kwargs["attn_implementation"] = "sdpa"
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    return calls


def fake_nvidia_smi(tmp_path, monkeypatch, *, ok: bool = True, cuda_version: str = "12.4") -> None:
    """An ``nvidia-smi`` on PATH that lists one H100 (or fails, like a driver that is not loaded)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    if ok:
        script.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"; exit 0; fi\n'
            f'echo "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: {cuda_version} |"\n')
    else:
        script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the "
                          "NVIDIA driver.'\nexit 9\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


# --- dtype -------------------------------------------------------------------------------------


def test_auto_dtype_is_bf16_where_the_device_multiplies_it_natively(monkeypatch):
    assert ModelConfig().dtype == "auto"
    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: "AMX-BF16")
    name, why = models.dtype_choice("auto", "cpu")
    assert name == "bf16" and "the CPU has AMX-BF16" in why
    # a narrow model trains faster in fp32 even there (the shipped base: width 192)
    name, why = models.dtype_choice("auto", "cpu", width=192)
    assert name == "fp32" and "hidden size 192 (under 512)" in why
    assert resolve_dtype("auto", "cpu", width=640) == "bf16"
    assert resolve_dtype("auto", "cuda", width=192) == "bf16"  # GPUs: bf16 whatever the width
    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: None)  # an older CPU: bf16 would be emulated
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert "neither AMX-BF16 nor AVX512-BF16" in models.dtype_choice("auto", "cpu")[1]
    assert resolve_dtype(ModelConfig(dtype="bf16"), "cpu") == "bf16"
    assert resolve_dtype("fp16", torch.device("cpu")) == "fp16"
    assert resolve_dtype("auto", "cuda") == "bf16"  # a GPU that is not here (estimates): today's GPUs
    fake_cuda(monkeypatch, (8, 0))  # A100
    assert resolve_dtype("auto", "cuda") == "bf16"
    fake_cuda(monkeypatch, (7, 5))  # T4: no bf16
    assert resolve_dtype("auto", torch.device("cuda", 0)) == "fp16"
    assert resolve_dtype("fp32", "cuda") == "fp32"


def test_this_cpus_bf16_feature_is_read_from_the_hardware():
    """The detection agrees with the kernel's own list of CPU flags."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    want = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    assert models.cpu_bf16_feature() == want
    assert resolve_dtype("auto", "cpu") == ("fp32" if want is None else "bf16")


def test_load_base_goes_straight_to_the_gpu_in_bf16(monkeypatch, captured):
    fake_cuda(monkeypatch, (9, 0))
    torch.set_float32_matmul_precision("highest")
    model, _ = load_base(ModelConfig(), QuantConfig())
    (kw,) = captured
    assert kw["device_map"] == {"": 0}
    assert kw["dtype"] is torch.bfloat16
    assert kw["attn_implementation"] == "sdpa"
    assert torch.get_float32_matmul_precision() == "high"  # TF32 matmuls
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())


def test_load_base_on_an_older_gpu_is_fp16(monkeypatch, captured):
    fake_cuda(monkeypatch, (7, 0))  # V100
    load_base(ModelConfig(), QuantConfig())
    assert captured[0]["dtype"] is torch.float16


def test_load_base_on_cpu_has_no_device_map_and_auto_follows_the_cpu(captured, monkeypatch, caplog):
    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: None)
    model, _ = load_base(ModelConfig(device="cpu"), QuantConfig())
    assert "device_map" not in captured[-1] and captured[-1]["dtype"] is torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: "AVX512-BF16")
    monkeypatch.setattr(models, "CPU_BF16_MIN_WIDTH", 64)  # the shipped base (width 192) counts as wide here
    with caplog.at_level("INFO", logger="loralab.models"):
        model, _ = load_base(ModelConfig(device="cpu"), QuantConfig())
    assert captured[-1]["dtype"] is torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    assert "model.dtype: auto -> bf16 (the CPU has AVX512-BF16" in caplog.text
    monkeypatch.setattr(models, "CPU_BF16_MIN_WIDTH", 512)
    with caplog.at_level("INFO", logger="loralab.models"):
        model, _ = load_base(ModelConfig(device="cpu"), QuantConfig())
    assert captured[-1]["dtype"] is torch.float32 and "hidden size 192 (under 512) fp32 trains faster" in caplog.text


def test_attention_implementation_is_passed_and_flash_needs_its_package(monkeypatch, captured, cfg_factory):
    model, _ = load_base(ModelConfig(device="cpu", attn_implementation="eager"), QuantConfig())
    assert captured[-1]["attn_implementation"] == "eager"
    assert model.config._attn_implementation == "eager"
    fake_cuda(monkeypatch)
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    with pytest.raises(ModelError, match="flash-attn package"):
        load_base(ModelConfig(attn_implementation="flash_attention_2"), QuantConfig())
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    with pytest.raises(ModelError, match="bf16 or fp16"):
        load_base(ModelConfig(attn_implementation="flash_attention_2", dtype="fp32"), QuantConfig())
    load_base(ModelConfig(attn_implementation="flash_attention_2"), QuantConfig())
    assert captured[-1]["attn_implementation"] == "flash_attention_2"
    assert captured[-1]["dtype"] is torch.bfloat16


def test_fp16_base_forward_on_cpu_matches_fp32():
    """model.dtype fp16 loads and runs on CPU; its logits are the fp32 ones to half precision."""
    ids = torch.tensor([[0, 17, 99, 250, 3, 8, 41]])
    logits = {}
    for dtype in ("fp32", "fp16", "bf16"):
        model, _ = load_base(ModelConfig(device="cpu", dtype=dtype), QuantConfig())
        assert next(model.parameters()).dtype == models.DTYPES[dtype]
        with torch.no_grad():
            logits[dtype] = model(input_ids=ids).logits.float()
    scale = logits["fp32"].abs().max()
    assert (logits["fp16"] - logits["fp32"]).abs().max() / scale < 1e-2
    assert (logits["bf16"] - logits["fp32"]).abs().max() / scale < 5e-2
    assert (logits["fp16"] - logits["fp32"]).abs().max() > 0  # really computed in half precision


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_base_trains_on_cpu(cfg_factory, tiny_model_dir, dtype):
    """A LoRA run on a bf16 / fp16 base (adapters in fp32): finite losses that go down. (fp16 here
    runs without a gradient scaler: the adapters and their gradients are fp32.)"""
    from loralab.train.loop import train

    cfg = cfg_factory(tiny_model_dir("llama"), model__dtype=dtype, train__max_steps=4, train__lr=3e-2,
                      data__val_max_examples=4)
    summary = train(cfg)
    assert summary["status"] == "completed"
    losses = [json.loads(line) for line in open(f"{cfg.output.dir}/metrics.jsonl", encoding="utf-8")]
    train_losses = [r["train_loss"] for r in losses if "train_loss" in r]
    assert len(train_losses) == 4 and all(torch.isfinite(torch.tensor(train_losses)))
    assert train_losses[-1] < train_losses[0]


# --- devices -----------------------------------------------------------------------------------


def test_cuda_asked_for_but_not_usable_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ModelError, match="model.device is cuda but CUDA is not usable: .*CPU-only build"):
        choose_device("cuda")
    rc = main(["generate", "--device", "cuda", "--max-new-tokens", "2", "hello"])
    assert rc == 2
    assert "CPU-only build" in capsys.readouterr().err


def test_cuda_problem_names_a_driver_torch_cannot_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).")

    monkeypatch.setattr(torch.cuda, "init", init)
    assert models.cuda_problem() == (f"torch {torch.__version__} (built for CUDA 13.0) cannot initialise CUDA: "
                                     "The NVIDIA driver on your system is too old (found version 11040).")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES" in models.cuda_problem()


def test_auto_with_a_driver_but_no_usable_cuda_warns_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    fake_nvidia_smi(tmp_path, monkeypatch)
    models._warned.clear()
    with caplog.at_level("WARNING", logger="loralab.models"):
        device, note = choose_device("auto")
        assert choose_device("auto") == (device, note)
    assert device.type == "cpu"
    assert note.startswith("model.device auto ran on the CPU although nvidia-smi shows an NVIDIA GPU")
    assert "CPU-only build" in note
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and note in warnings[0].getMessage()  # loud, once


def test_auto_without_a_driver_is_a_quiet_cpu(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_nvidia_smi(tmp_path, monkeypatch, ok=False)
    with caplog.at_level("WARNING", logger="loralab.models"):
        assert choose_device("auto") == (torch.device("cpu"), None)
    assert not caplog.records
    fake_cuda(monkeypatch)
    assert choose_device("auto") == (torch.device("cuda", 0), None)


def test_estimate_resolves_auto_for_its_device(monkeypatch):
    from loralab.cli.estimate import estimate_from_args

    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: "AMX-BF16")
    assert estimate_from_args(model="llama2-7b", dtype="auto", device="cpu").settings["dtype"] == "bf16"
    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: None)

    cpu = estimate_from_args(model="llama2-7b", dtype="auto", device="cpu")
    gpu = estimate_from_args(model="llama2-7b", dtype="auto", device="cuda")
    assert cpu.settings["dtype"] == "fp32" and gpu.settings["dtype"] == "bf16"
    assert cpu.memory_bytes["base_weights"] == estimate_from_args(model="llama2-7b", dtype="fp32").memory_bytes[
        "base_weights"]
    assert gpu.memory_bytes["base_weights"] * 2 == cpu.memory_bytes["base_weights"]
    fp16 = estimate_from_args(model="llama2-7b", dtype="fp16", device="cuda")
    assert fp16.memory_bytes["base_weights"] == gpu.memory_bytes["base_weights"]


# --- command-line flags --------------------------------------------------------------------------


@pytest.fixture
def loaded(monkeypatch):
    """The (ModelConfig, QuantConfig) of each load_base call, which then loads for real."""
    calls = []
    real = models.load_base

    def spy(model_cfg, quant, **kw):  # kw: progress
        calls.append((model_cfg, quant))
        return real(model_cfg, quant, **kw)

    monkeypatch.setattr(models, "load_base", spy)
    return calls


def test_eval_flags_reach_the_base_and_the_harness(monkeypatch, loaded, capsys):
    rc = main(["eval", "--model", "builtin:tiny", "--tasks", "arithmetic_2ds", "--limit", "2", "--json",
               "--dtype", "bf16", "--device", "cpu"])
    assert rc == 0
    (model_cfg, quant), = loaded
    assert (model_cfg.dtype, model_cfg.device, quant.mode) == ("bf16", "cpu", "none")
    assert json.loads(capsys.readouterr().out)["results"][0]["n"] == 2

    from loralab.evaluate import harness

    seen = {}
    monkeypatch.setattr(harness, "evaluate_harness", lambda *a, **kw: seen.update(kw) or [])
    assert main(["eval", "--harness", "world_mc", "--model", "builtin:tiny", "--quant", "nf4", "--dtype", "fp16",
                 "--device", "cuda", "--json"]) == 0
    assert (seen["dtype"], seen["device"], seen["quant"]) == ("fp16", "cuda", "nf4")
    assert main(["eval", "--harness", "world_mc", "--model", "builtin:tiny", "--json"]) == 0
    assert (seen["dtype"], seen["device"], seen["quant"]) == ("auto", "auto", "none")


def test_generate_flags_load_the_base_as_asked(loaded, capsys):
    rc = main(["generate", "--model", "builtin:tiny", "--dtype", "bf16", "--device", "cpu", "--max-new-tokens", "3",
               "--json", "What is 2 plus 2?"])
    assert rc == 0
    (model_cfg, quant), = loaded
    assert (model_cfg.dtype, model_cfg.device, quant.mode) == ("bf16", "cpu", "none")
    assert len(json.loads(capsys.readouterr().out)["generations"]) == 1


# --- merge into a 4-bit base ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A run directory as a QLoRA run leaves it: config.yaml with quant.mode nf4 and an adapter
    whose B matrices are non-zero (a fresh adapter would merge to nothing)."""
    from loralab.adapters import attach_lora, save_adapter
    from loralab.config import LoraConfig

    run = tmp_path_factory.mktemp("qlora-run")
    base, _ = load_base(ModelConfig(device="cpu"), QuantConfig())
    peft_model = attach_lora(base, LoraConfig(r=4, targets=["query", "value"]), seed=0)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    save_adapter(peft_model, run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"path": "builtin:tiny", "dtype": "auto", "device": "auto"},
         "quant": {"mode": "nf4", "double_quant": True, "compute_dtype": "fp32", "block_size": 64}}))
    return run


def test_a_4bit_base_evaluates_with_the_arithmetic_it_trains_with():
    """Evaluation (eval mode, no grad) multiplies a CPU 4-bit base exactly as training does, in
    quant.compute_dtype; bitsandbytes' own eval-mode default on AVX512-BF16 CPUs is a bf16 kernel."""
    from bitsandbytes.functional import has_avx512bf16

    quant = QuantConfig(mode="nf4", compute_dtype="fp32")
    model, _ = load_base(ModelConfig(device="cpu"), quant)
    ids = torch.tensor([[0, 5, 77, 300, 12, 9, 41, 3]])
    with torch.no_grad():
        trained = model.train()(input_ids=ids).logits
        scored = model.eval()(input_ids=ids).logits
        again = model.train()(input_ids=ids).logits  # an evaluation changes nothing for the steps after it
    assert torch.equal(trained, scored) and torch.equal(trained, again)
    if has_avx512bf16():  # the kernel loralab keeps bitsandbytes from switching to: visibly other arithmetic
        raw, _ = load_base(ModelConfig(device="cpu"), quant)
        for m in raw.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = True
        with torch.no_grad():
            assert (raw.eval()(input_ids=ids).logits - trained).abs().max() > 1e-4


def test_merge_refuses_a_4bit_base_and_says_how(qlora_run, tmp_path, capsys):
    rc = main(["merge", str(qlora_run), str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "4 bits (nf4, from the run's quant.mode" in err and "--dequantize" in err and "--quant none" in err
    assert not (tmp_path / "merged").exists()
    assert main(["merge", str(qlora_run), str(tmp_path / "merged"), "--quant", "fp4"]) == 2
    assert "4 bits (fp4, from --quant)" in capsys.readouterr().err


def test_merge_dequantize_gives_the_model_the_adapter_was_trained_on(qlora_run, tmp_path):
    """--dequantize: the merged model's logits are the 4-bit base + adapter's logits."""
    from loralab.adapters import load_adapter

    out = tmp_path / "merged"
    assert main(["merge", str(qlora_run), str(out), "--dequantize", "--device", "cpu"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
    quant = QuantConfig(mode="nf4", compute_dtype="fp32")
    base, _ = load_base(ModelConfig(device="cpu", dtype="fp32"), quant)  # like with like: the merge is fp32
    trained_on = load_adapter(base, qlora_run).eval()
    plain, _ = load_base(ModelConfig(device="cpu", dtype="fp32"), QuantConfig())
    ids = torch.tensor([[0, 5, 77, 300, 12, 9]])
    with torch.no_grad():
        want = trained_on(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        unquantized = plain(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-3
    assert (unquantized - want).abs().max() > 10 * (got - want).abs().max()  # 4-bit rounding is visible
    # Module by module: each merged weight is the dequantized 4-bit weight plus the adapter's delta.
    import bitsandbytes.functional as bnbf

    merged_modules = dict(merged.named_modules())
    adapted = [(n, m) for n, m in trained_on.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(adapted) == 2 * merged.config.num_hidden_layers  # query and value of every layer
    for name, layer in adapted:
        w4 = layer.base_layer.weight
        expected = bnbf.dequantize_4bit(w4.data, w4.quant_state).float() + layer.get_delta_weight("default").float()
        got_w = merged_modules[name.removeprefix("base_model.model.")].weight
        assert (got_w - expected).abs().max() < 1e-6, name

    out2 = tmp_path / "merged-full"
    assert main(["merge", str(qlora_run), str(out2), "--quant", "none"]) == 0  # the original weights
    full = transformers.AutoModelForCausalLM.from_pretrained(str(out2), dtype=torch.float32)
    with torch.no_grad():
        assert (full(input_ids=ids).logits - got).abs().max() > 1e-3


# --- generation stops --------------------------------------------------------------------------


def _forward_counter(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_generation_stops_at_every_end_token_of_the_model(tiny_model_dir):
    from loralab.evaluate.exact_match import end_token_ids, greedy_generate

    model, tok = load_base(ModelConfig(path=str(tiny_model_dir("llama")), device="cpu"), QuantConfig())
    prompt = "What is 12 plus 30?"
    enc = tok([prompt], return_tensors="pt")
    free = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    assert len(free) == 8
    second_end = free[2]  # a token the model produces third, not before
    assert second_end not in free[:2] and second_end != tok.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, second_end]  # as chat models list two ends
    assert end_token_ids(model, tok) == [tok.eos_token_id, second_end]
    calls = _forward_counter(model)
    (out,) = greedy_generate(model, tok, [prompt], max_new_tokens=8)
    assert calls[0] == 3  # prefill + 2 steps: stopped at the third token, not after 8
    assert out == tok.decode(free[:2], skip_special_tokens=True)


def test_generation_stops_at_the_stop_string_as_it_goes(tiny_model_dir):
    from loralab.evaluate.exact_match import greedy_generate

    model, tok = load_base(ModelConfig(path=str(tiny_model_dir("llama")), device="cpu"), QuantConfig())
    model.generation_config.eos_token_id = None
    prompts = ["What is 12 plus 30?", "Name a colour."]
    full = greedy_generate(model, tok, prompts, max_new_tokens=12)
    enc = tok(prompts[:1], return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    stop = next(s for s in (tok.decode(ids[k : k + 1]).strip() for k in range(3, 8)) if s)
    want = [f.split(stop)[0] for f in full]
    calls = _forward_counter(model)
    got = greedy_generate(model, tok, prompts, max_new_tokens=12, stop=stop)
    assert got == want and want[0] != full[0]
    # the batch ended when both rows had their stop, or at 12 tokens when one never has it
    assert calls[0] < 12 or stop not in full[1]
    calls[0] = 0
    greedy_generate(model, tok, prompts[:1], max_new_tokens=12, stop=stop)
    assert calls[0] < 12


# --- evaluation memory -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_equal_the_full_log_softmax(dtype):
    from loralab.evaluate.metrics import token_logprobs

    torch.manual_seed(0)
    pred = (torch.randn(7, 1000) * 6).to(dtype)
    pred[3, 999] = 40.0  # the argmax in the last, partial chunk
    targets = torch.tensor([0, 5, 999, 999, 500, 128, 127])
    full = torch.log_softmax(pred.double(), dim=-1).gather(1, targets[:, None])[:, 0]
    for chunk in (128, 333, 1000, 4096):
        lp, greedy = token_logprobs(pred, targets, chunk=chunk)
        assert lp.dtype == torch.float64
        assert (lp - full).abs().max() < 1e-12
        assert greedy.tolist() == (pred.double().argmax(-1) == targets).tolist()
    assert greedy[3] and not greedy[0]


# --- packed attention kernels --------------------------------------------------------------------


@pytest.fixture
def gqa_model(tiny_model_dir):
    """The conftest llama: 4 query heads sharing 2 key/value heads."""
    from loralab.train import attention

    model, _ = load_base(ModelConfig(path=str(tiny_model_dir("llama")), device="cpu", dtype="fp32"), QuantConfig())
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    before = dict(attention._chosen)
    yield model.eval()
    attention._chosen.clear()
    attention._chosen.update(before)


def _packed_logits(model, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from loralab.train.attention import segment_attention

    row = torch.cat(rows)[None]
    pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
    bounds = (0, *itertools.accumulate(len(r) for r in rows))
    with torch.no_grad():
        with segment_attention(model):
            packed = model(input_ids=row, position_ids=pos, attention_mask=torch.ones_like(row),
                           loralab_segments=bounds).logits[0]
        alone = torch.cat([model(input_ids=r[None]).logits[0] for r in rows])
    return packed, alone


def test_grouped_query_attention_reads_heads_in_place(gqa_model, monkeypatch):
    from loralab.train import attention

    assert attention.TORCH_GQA
    monkeypatch.setattr(torch.Tensor, "repeat_interleave",
                        lambda *a, **k: pytest.fail("a key/value head was copied"))
    assert attention.supports_segments(gqa_model)
    assert attention._chosen["cpu"] == "per_example" and attention.last_kernel == "per_example"
    rows = [torch.arange(5, 14), torch.arange(100, 103), torch.arange(40, 57)]
    packed, alone = _packed_logits(gqa_model, rows)
    assert (packed - alone).abs().max() < 1e-4


def test_flex_attention_document_mask_equals_examples_alone(gqa_model):
    """The CUDA varlen path (FlexAttention, here eager on the CPU) gives the examples' own logits."""
    from loralab.train import attention

    assert attention.supports_segments(gqa_model, kernels=["flex"])
    rows = [torch.arange(5, 14), torch.arange(100, 103), torch.arange(40, 57)]
    packed, alone = _packed_logits(gqa_model, rows)
    assert attention.last_kernel == "flex"
    assert (packed - alone).abs().max() < 1e-4
    attention._chosen["cpu"] = "per_example"
    per_example, _ = _packed_logits(gqa_model, rows)
    assert attention.last_kernel == "per_example"
    assert (packed - per_example).abs().max() < 1e-4


def test_kernel_choice_by_device_and_fallback(gqa_model, monkeypatch):
    from loralab.train import attention

    assert attention.kernel_candidates(torch.device("cpu")) == ["per_example"]
    real_find_spec = attention.importlib.util.find_spec
    monkeypatch.setattr(attention.importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    assert attention.kernel_candidates(torch.device("cuda")) == ["flex", "per_example"]
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name, *a: object())
    assert attention.kernel_candidates(torch.device("cuda")) == ["flash_varlen", "flex", "per_example"]
    # flash-attn cannot run here: the check moves on to the next kernel that agrees
    assert attention.supports_segments(gqa_model, kernels=["flash_varlen", "per_example"])
    assert attention._chosen["cpu"] == "per_example"
    assert not attention.supports_segments(gqa_model, kernels=["flash_varlen"])
    assert "cpu" not in attention._chosen


def test_merge_of_a_gpt2_qlora_run_with_an_adapted_tied_head(tiny_model_dir, tmp_path):
    """GPT-2 keeps its attention and MLP weights in Conv1D layers (transposed) and ties its output
    head to the input embeddings. Merged after --dequantize, the model loads as a GPT-2 and gives
    the 4-bit base + adapter's logits; the adapted head is saved apart and the input embeddings
    stay the base's. Before: the Conv1D weights were saved transposed (a model that would not
    load), and the head's delta was merged into the shared embeddings too."""
    from loralab.adapters import attach_lora, load_adapter, save_adapter
    from loralab.config import LoraConfig

    model_dir = tiny_model_dir("gpt2_h64")
    quant = QuantConfig(mode="nf4", compute_dtype="fp32")
    base4, _ = load_base(ModelConfig(path=str(model_dir), device="cpu", dtype="fp32"), quant)
    peft_model = attach_lora(base4, LoraConfig(r=4, targets=["all", "head"]), seed=0)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    run = tmp_path / "run"
    save_adapter(peft_model, run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"path": str(model_dir), "dtype": "fp32", "device": "cpu"},
         "quant": {"mode": "nf4", "double_quant": True, "compute_dtype": "fp32", "block_size": 64}}))
    out = tmp_path / "merged"
    assert main(["merge", str(run), str(out), "--dequantize"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for name, module in plain.named_modules():  # every layer of the architecture's own kind and shape
        if isinstance(module, transformers.pytorch_utils.Conv1D):
            assert merged.get_submodule(name).weight.shape == module.weight.shape, name
    assert torch.equal(merged.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    assert not merged.config.tie_word_embeddings
    base4, _ = load_base(ModelConfig(path=str(model_dir), device="cpu", dtype="fp32"), quant)
    trained_on = load_adapter(base4, run).eval()
    ids = torch.tensor([[0, 5, 77, 300, 12, 9]])
    with torch.no_grad():
        want, got = trained_on(input_ids=ids).logits, merged(input_ids=ids).logits
        untouched = plain(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4
    assert (untouched - want).abs().max() > 0.1  # the adapter (and 4-bit rounding) visibly matter
