"""Loading a base causal LM and its tokenizer, optionally quantized to 4 bits.

    model, tokenizer = load_base(cfg.model, cfg.quant)

The device and dtype are decided here, once: :func:`choose_device` (``model.device``: auto,
cpu, cuda; a CUDA that is asked for but not usable is an error, never a silent CPU run) and
:func:`resolve_dtype` (``model.dtype: auto`` = bf16 on GPUs of compute capability >= 8, fp16
on older GPUs, fp32 on CPU). An unquantized base is loaded straight onto its device with
``device_map``, never into host memory first.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from loralab.config import ModelConfig, QuantConfig
from loralab.errors import ModelError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"builtin:tiny": ASSETS / "tiny-base"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_warned: set[str] = set()  # each device warning is shown once per process, however often the device is picked


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


@functools.cache
def nvidia_driver_answers() -> bool:
    """Whether ``nvidia-smi -L`` lists a GPU: the machine has an NVIDIA driver, whatever torch thinks."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def cuda_problem() -> str | None:
    """Why this torch cannot use CUDA here, in words; None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch "
                "(scripts/setup.sh picks one matching the driver, docs/gpu.md)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "CUDA_VISIBLE_DEVICES is set and empty, which hides every GPU from torch"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - torch's own explanation (driver too old, no device, ...) is the reason
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot initialise CUDA: {first}"
    return f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA device"


def choose_device(name: str) -> tuple[torch.device, str | None]:
    """(device, note) for ``model.device``; the note says why ``auto`` fell back to the CPU on a
    machine whose NVIDIA driver answers (None otherwise), for the run's summary to record.

    cuda that is not usable raises ModelError with the reason; auto without a usable CUDA runs on
    the CPU, with a loud warning where nvidia-smi shows a GPU (a torch build too new for the
    driver, a CPU-only torch, hidden devices), since a GPU-sized run on the CPU would crawl.
    """
    if name == "cpu":
        return torch.device("cpu"), None
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda", torch.cuda.current_device()), None
    if name == "cuda":
        raise ModelError(f"model.device is cuda but CUDA is not usable: {problem}")
    if not nvidia_driver_answers():
        return torch.device("cpu"), None
    note = f"model.device auto ran on the CPU although nvidia-smi shows an NVIDIA GPU: {problem}"
    if note not in _warned:
        _warned.add(note)
        log.warning("WARNING: %s. Set model.device=cuda to make this an error, or model.device=cpu to "
                    "silence it.", note)
    return torch.device("cpu"), note


def pick_device(name: str) -> torch.device:
    """The device of :func:`choose_device`, without its note."""
    return choose_device(name)[0]


def resolve_dtype(cfg_or_name: ModelConfig | str, device: torch.device | str) -> str:
    """The dtype name (fp32, bf16, fp16) ``model.dtype`` means on ``device``.

    auto: fp32 on the CPU (so CPU numbers are those of an fp32 run), bf16 on a GPU of compute
    capability >= 8 (Ampere and newer), fp16 on older GPUs. For a CUDA device that is not
    here (an estimate made on a laptop) auto means bf16, today's GPUs.
    """
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.dtype
    if name != "auto":
        return name
    dev = torch.device(device)
    if dev.type != "cuda":
        return "fp32"
    if not torch.cuda.is_available():
        return "bf16"
    major, _minor = torch.cuda.get_device_capability(dev)
    return "bf16" if major >= 8 else "fp16"


def enable_tf32() -> None:
    """fp32 matmuls on TF32 tensor cores where the GPU has them (the LoRA matrices stay fp32)."""
    torch.set_float32_matmul_precision("high")


def check_attention(model: ModelConfig, device: torch.device, dtype: str, quant: QuantConfig) -> str:
    """``model.attn_implementation``, checked where it can be: flash_attention_2 needs its package,
    a CUDA device and half precision."""
    impl = model.attn_implementation
    if impl != "flash_attention_2":
        return impl
    if importlib.util.find_spec("flash_attn") is None:
        raise ModelError("model.attn_implementation flash_attention_2 needs the flash-attn package, which is not "
                         "installed (pip install flash-attn --no-build-isolation, on a CUDA machine); or use sdpa")
    if device.type != "cuda":
        raise ModelError(f"model.attn_implementation flash_attention_2 runs on CUDA only (the device is {device}); "
                         "use sdpa")
    if dtype == "fp32" and quant.mode == "none":
        raise ModelError("model.attn_implementation flash_attention_2 needs model.dtype bf16 or fp16 (got fp32)")
    return impl


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
    check_cpu_4bit_widths({name: module.in_features for name, module in lm.named_modules()
                           if type(module).__name__ == "Linear4bit" and getattr(module, "in_features", None)}, quant)


def check_cpu_4bit_widths(in_features: dict[str, int], quant: QuantConfig) -> None:
    """check_cpu_4bit on {quantized layer: in_features}, for a loaded or a meta-device model."""
    for name, width in in_features.items():
        if width < quant.block_size:
            raise ModelError(
                f"quant.mode {quant.mode} cannot run on this machine's CPU for {name}: in_features {width} is "
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


def load_base(model: ModelConfig, quant: QuantConfig, *, progress: bool = False):
    """(model, tokenizer) with every base weight frozen, loaded straight onto the chosen device.
    ``progress``: transformers' loading (and download) bars on stderr, terminals only."""
    from transformers import AutoModelForCausalLM

    from loralab.progress import library_bars

    path = resolve_model_path(model.path)
    device = pick_device(model.device)
    dtype = resolve_dtype(model, device)
    attn = check_attention(model, device, dtype, quant)
    tokenizer = load_tokenizer(model.path, trust_remote_code=model.trust_remote_code)
    kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attn, trust_remote_code=model.trust_remote_code,
                  use_safetensors=True)
    bnb = quantization_config(quant)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if device.type == "cuda":
        enable_tf32()
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    elif bnb is not None:
        kwargs["device_map"] = {"": "cpu"}
    try:
        with library_bars(progress):
            lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise ModelError(f"model.path {model.path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if bnb is not None and device.type == "cpu":
        check_cpu_4bit(lm, quant)
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.config.use_cache = False
    return lm, tokenizer
