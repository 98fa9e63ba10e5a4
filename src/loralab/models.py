"""Loading a base causal LM and its tokenizer, optionally quantized to 4 bits.

    model, tokenizer = load_base(cfg.model, cfg.quant)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loralab.config import ModelConfig, QuantConfig
from loralab.errors import ModelError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"builtin:tiny": ASSETS / "tiny-base"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_model_path(path: str) -> str:
    """builtin:NAME -> the shipped directory; a local directory is checked; else a hub id."""
    if path.startswith("builtin:"):
        if path not in BUILTIN_MODELS:
            raise ModelError(f"model.path {path!r}: unknown built-in model (known: {', '.join(BUILTIN_MODELS)})")
        return str(BUILTIN_MODELS[path])
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model.path {p}: no config.json in this directory, so it is not a Hugging Face model")
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.safetensors.index.json")):
            raise ModelError(
                f"model.path {p}: no *.safetensors weights (loralab loads safetensors only, never pickled .bin files)"
            )
        return str(p)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelError(f"model.path {path}: no such directory")
    return path  # a hub id: works where the user has network


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("model.device is cuda but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def quantization_config(quant: QuantConfig):
    """transformers' BitsAndBytesConfig for quant.mode nf4/fp4, after checking bitsandbytes."""
    if quant.mode == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelError(f"quant.mode {quant.mode} needs bitsandbytes >= 0.49 (pip install bitsandbytes): {exc}") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=torch.uint8,
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_cpu_4bit(lm, quant: QuantConfig) -> None:
    """bitsandbytes' CPU 4-bit kernels fail (a bare RuntimeError) on layers narrower than a block."""
    for name, module in lm.named_modules():
        in_features = getattr(module, "in_features", None)
        if type(module).__name__ == "Linear4bit" and in_features is not None and in_features < quant.block_size:
            raise ModelError(
                f"quant.mode {quant.mode} cannot run on this machine's CPU for {name}: in_features {in_features} is "
                f"below the 4-bit block size {quant.block_size} that bitsandbytes' CPU kernels need; use "
                "quant.mode none here, or a CUDA device"
            )


def keep_4bit_trainable(lm) -> None:
    """Keep bitsandbytes' 4-bit weights in their training layout on CPU.

    bitsandbytes (0.49, 0.50) repacks a CPU 4-bit weight into an inference layout the first
    time its layer runs in eval mode on an input without grad (on CPUs with AVX512-BF16), and
    from then on multiplies with a kernel autograd cannot go through, also in train mode: every
    step after an evaluation would silently lose the gradient through the frozen 4-bit layers.
    A base that is going to be trained never repacks.
    """
    for module in lm.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    local = Path(resolve_model_path(path))
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"model.path {path}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)}); "
                         "copy the tokenizer files of the base model next to its weights")
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path {path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model: ModelConfig, quant: QuantConfig):
    """(model, tokenizer) with every base weight frozen, on the chosen device."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model.path)
    device = pick_device(model.device)
    tokenizer = load_tokenizer(model.path, trust_remote_code=model.trust_remote_code)
    kwargs = dict(dtype=DTYPES[model.dtype], trust_remote_code=model.trust_remote_code, use_safetensors=True)
    bnb = quantization_config(quant)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"model.path {model.path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if bnb is None:
        lm.to(device)
    elif device.type == "cpu":
        check_cpu_4bit(lm, quant)
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.config.use_cache = False
    return lm, tokenizer
