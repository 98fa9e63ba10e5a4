"""Shared fixtures: tiny random-init models of several architectures, configs, data files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from loralab.config import load_config
from loralab.models import BUILTIN_MODELS

TINY_BASE = BUILTIN_MODELS["builtin:tiny"]
VOCAB = 1280
BOS, EOS, PAD = 0, 1, 2
ARCHS = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "phi3", "gemma"]


# pytest-xdist runs the suite in 2 worker processes (pyproject's addopts): each worker, and each
# process its tests start, then uses 1 torch thread, so the 2 workers share the 2 cores without
# OpenMP threads spinning against each other (measured: 2 threads each doubled the CPU time).
# Run alone (pytest -p no:xdist, or -n 0), the suite uses the machine's 2 threads.
SUITE_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if SUITE_THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"  # the processes the tests start inherit it


def pytest_collection_modifyitems(config, items):
    """Files with the most slow tests first, each file's tests in their own order: xdist's
    loadfile hands files to its workers in this order, so the long files start early and quick
    files, not a long one, end the suite while the other worker waits."""
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: files stay whole


@contextlib.contextmanager
def torch_threads(n: int):
    """This process's torch threads set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _suite_threads():
    """The suite's torch threads in this process (SUITE_THREADS); restored after."""
    with torch_threads(SUITE_THREADS):
        yield


@pytest.fixture
def one_thread():
    """One torch thread for a test that gains nothing from more on a shared CPU; restored after."""
    with torch_threads(1):
        yield


def _hf_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    llama_like = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **common,
    )
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "llama_h64":  # bitsandbytes' CPU 4-bit kernels need in_features >= blocksize (64)
        return tf.LlamaConfig(**{**llama_like, "hidden_size": 64, "intermediate_size": 128,
                                 "num_key_value_heads": 4})
    if arch == "llama_512":  # hidden 512: model.dtype auto is bf16 on a CPU with AMX/AVX512-BF16
        return tf.LlamaConfig(**{**llama_like, "hidden_size": 512, "intermediate_size": 1024,
                                 "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 512})
    if arch == "llama_vocab600":  # fewer embedding rows than its tokenizer has tokens (not resized)
        return tf.LlamaConfig(**{**llama_like, "vocab_size": 600})
    if arch == "llama_wide":  # every adapted matrix at least 256 wide: every rank loralab tune searches fits
        return tf.LlamaConfig(**{**llama_like, "hidden_size": 256, "intermediate_size": 512,
                                 "num_key_value_heads": 4})
    if arch == "mistral":
        return tf.MistralConfig(**llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=8, **llama_like)
    if arch == "gemma2":  # soft-caps its logits after the output head, low enough to bite at random init
        return tf.Gemma2Config(head_dim=8, final_logit_softcapping=0.5, **llama_like)
    if arch == "phi3":
        return tf.Phi3Config(**llama_like)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "gpt2_h64":  # wide enough for bitsandbytes' CPU 4-bit kernels
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, **common,
        )
    if arch == "opt":
        return tf.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=256, **common,
        )
    raise ValueError(arch)


def build_tiny_model(arch: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(arch))
    model.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_BASE / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir("gpt2") -> a directory with a random-init model + tokenizer."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"model-{arch}"))
        return cache[arch]

    return make


@pytest.fixture
def small_alpaca_file(tmp_path):
    """Writer: small_alpaca_file(records=None, name="data.jsonl") -> path of a JSONL file."""

    def write(records=None, name: str = "data.jsonl") -> Path:
        if records is None:
            records = [
                {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
                for a, b in zip(range(10, 42), range(50, 82), strict=True)
            ]
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return p

    return write


def make_cfg(model_path, out_dir, *overrides: str, **kw):
    """A small Config; keyword overrides use '__' for '.', e.g. train__lr=1e-3."""
    base = {
        "model.path": str(model_path),
        "model.device": "cpu",
        # fp32: these configs serve maths checks to 1e-6 (fused = solo, packed = padded, resumed =
        # uninterrupted); bf16, auto's choice on CPUs with AMX/AVX512-BF16, has tests of its own.
        "model.dtype": "fp32",
        "data.path": "builtin:arithmetic_2ds",
        "data.limit": 64,
        "data.val_max_examples": 16,
        "data.max_seq_length": 64,
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.micro_batch_size": 4,
        "train.warmup_steps": 0,
        "train.log_every": 1,
        "output.dir": str(out_dir),
    }
    for k, v in kw.items():
        base[k.replace("__", ".")] = v
    items = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in base.items()]
    return load_config(None, items + list(overrides))


@pytest.fixture
def cfg_factory(tmp_path):
    """cfg_factory(model_path, *overrides, **kw) with output.dir under tmp_path."""
    counter = iter(range(10_000))

    def make(model_path="builtin:tiny", *overrides: str, **kw):
        return make_cfg(model_path, tmp_path / f"run{next(counter)}", *overrides, **kw)

    return make
