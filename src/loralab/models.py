"""Loading a base causal LM and its tokenizer, optionally quantized to 4 bits.

    model, tokenizer = load_base(cfg.model, cfg.quant)

The device and dtype are decided here, once: :func:`choose_device` (``model.device``: auto,
cpu, cuda; a CUDA that is asked for but not usable is an error, never a silent CPU run) and
:func:`resolve_dtype` (``model.dtype: auto`` = bf16 on GPUs of compute capability >= 8 and on
CPUs with AMX-BF16 or AVX512-BF16, fp16 on older GPUs, fp32 on other CPUs). An unquantized base is
loaded straight onto its device with ``device_map``, never into host memory first.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
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
    if problem is None and name.startswith("cuda:"):
        index, count = int(name.split(":")[1]), torch.cuda.device_count()
        if index >= count:
            raise ModelError(f"model.device is {name} but this process sees {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1} (CUDA_VISIBLE_DEVICES renumbers them from 0)")
        return torch.device("cuda", index), None
    if problem is None:
        return torch.device("cuda", torch.cuda.current_device()), None
    if name.startswith("cuda"):
        raise ModelError(f"model.device is {name} but CUDA is not usable: {problem}")
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


@functools.cache
def cpu_bf16_feature() -> str | None:
    """The instruction set that makes this CPU multiply bf16 natively, faster than fp32
    ("AMX-BF16", "AVX512-BF16"); None where it has neither and bf16 would be emulated."""
    get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    caps = get() if get is not None else {}
    if not caps:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            flags = []
        caps = {flag: True for flag in flags}
    for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")):
        if caps.get(key):
            return name
    return None


# Below this model width fp32 trains faster than bf16 on a CPU even with AMX-BF16: the matmuls
# are too small to gain, while every layer pays bf16 <-> fp32 conversions (norms, the fp32
# adapters). Measured on this project's CPU: the shipped base (width 192) trains its quickstart
# in 20 s in fp32 and 33 s in bf16; a width-640 Llama trains 1.69x faster in bf16.
CPU_BF16_MIN_WIDTH = 512


def model_width(config) -> int | None:
    """The hidden size of a transformers config (hidden_size, n_embd or d_model); None if unknown."""
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# What a run's reason, its warning and a preset's plan say of a CPU that would emulate bf16.
EMULATED_BF16 = "neither AMX-BF16 nor AVX512-BF16, so bf16 matmuls are emulated, about 100x slower than fp32"


def emulates_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls on ``device`` would be emulated: a CPU with neither AMX-BF16 nor
    AVX512-BF16 (AVX2 alone: about 100x slower than fp32)."""
    return torch.device(device).type == "cpu" and cpu_bf16_feature() is None


def dtype_choice(cfg_or_name: ModelConfig | str, device: torch.device | str, *,
                 width: int | None = None) -> tuple[str, str]:
    """(dtype name, why) for ``model.dtype`` on ``device``, for a model of hidden size ``width``
    (None: unknown, taken as large): see :func:`resolve_dtype`."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.dtype
    dev = torch.device(device)
    if name == "bf16" and emulates_bf16(dev):
        return name, f"set in the config; this CPU has {EMULATED_BF16}"
    if name != "auto":
        return name, "set in the config"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "bf16", "auto: a CUDA device that is not on this machine, taken as a current GPU"
        major, minor = torch.cuda.get_device_capability(dev)
        if major >= 8:
            return "bf16", f"auto: the GPU (compute capability {major}.{minor}) multiplies bf16 natively"
        return "fp16", f"auto: the GPU (compute capability {major}.{minor}) has no native bf16"
    feature = cpu_bf16_feature()
    if feature is not None and width is not None and width < CPU_BF16_MIN_WIDTH:
        return "fp32", (f"auto: the CPU has {feature}, but at hidden size {width} (under {CPU_BF16_MIN_WIDTH}) fp32 "
                        "trains faster: bf16's conversions outweigh its small matmuls")
    if feature is not None:
        return "bf16", f"auto: the CPU has {feature}, so bf16 matmuls run natively, several times faster than fp32"
    return "fp32", f"auto: the CPU has {EMULATED_BF16}"


def resolve_dtype(cfg_or_name: ModelConfig | str, device: torch.device | str, *, width: int | None = None) -> str:
    """The dtype name (fp32, bf16, fp16) ``model.dtype`` means on ``device``.

    auto: bf16 wherever the device multiplies bf16 natively and faster than fp32 (GPUs of
    compute capability >= 8, CPUs with AMX-BF16 or AVX512-BF16 for models of hidden size 512
    and up), fp16 on older GPUs, fp32 on other CPUs and for narrower models on a CPU. For a CUDA
    device that is not here (an estimate made on a laptop) auto means bf16, today's GPUs. bf16 is
    the base's dtype only: the adapters, their gradients, the optimizer state and the loss stay
    fp32 (docs/performance.md, "Precision").
    """
    return dtype_choice(cfg_or_name, device, width=width)[0]


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


def quantization_config(quant: QuantConfig, model_dtype: str):
    """transformers' BitsAndBytesConfig for quant.mode nf4/fp4, after checking bitsandbytes;
    ``model_dtype``: the base's resolved dtype."""
    if quant.mode == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelError(
            f"quant.mode {quant.mode} needs bitsandbytes >= 0.49 (pip install bitsandbytes): {exc}") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype_for(model_dtype)],
        bnb_4bit_quant_storage=torch.uint8,
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_cpu_4bit(lm, quant: QuantConfig) -> None:
    """bitsandbytes' CPU 4-bit kernels fail (a bare RuntimeError) on layers narrower than a block."""
    check_cpu_4bit_widths({name: module.in_features for name, module in lm.named_modules()
                           if type(module).__name__ == "Linear4bit" and getattr(module, "in_features", None)}, quant)


def check_optimizer_device(optimizer: str, device: torch.device) -> None:
    """bitsandbytes' paged optimizers page their state through CUDA unified memory; on any
    other device (bitsandbytes 0.50 on the CPU: a warning and plain AdamW) they are refused."""
    if optimizer.startswith("paged_") and device.type != "cuda":
        plain = optimizer.removeprefix("paged_")
        raise ModelError(f"train.optimizer {optimizer} pages optimizer state between a CUDA GPU and the host; this "
                         f"run is on {device.type}, where bitsandbytes has nothing to page (it would be plain "
                         f"{plain}): set train.optimizer={plain}")


def check_cpu_4bit_widths(in_features: dict[str, int], quant: QuantConfig) -> None:
    """check_cpu_4bit on {quantized layer: in_features}, for a loaded or a meta-device model."""
    for name, width in in_features.items():
        if width < quant.block_size:
            raise ModelError(
                f"quant.mode {quant.mode} cannot run on this machine's CPU for {name}: in_features {width} is "
                f"below the 4-bit block size {quant.block_size} that bitsandbytes' CPU kernels need; use "
                "quant.mode none here, or a CUDA device"
            )


def pin_4bit_kernel(lm) -> None:
    """Give every CPU 4-bit layer one kernel, in training and in evaluation alike.

    bitsandbytes (0.49, 0.50) repacks a CPU 4-bit weight into an inference layout the first
    time its layer runs in eval mode on an input without grad (on CPUs with AVX512-BF16), and
    from then on multiplies with that layout's kernel, which computes in bf16 whatever
    ``quant.compute_dtype`` says (7e-3 from the fp32 product on a 256x256 layer) and which
    autograd cannot go through, also in train mode. Left alone, a QLoRA run would be scored
    with other arithmetic than it was trained with, ``loralab eval`` would score the same
    adapter differently on different CPUs, and every step after an evaluation would lose the
    gradient through the frozen 4-bit layers. So no base loralab loads ever repacks: the
    dequantize-and-multiply path in ``quant.compute_dtype`` serves every forward.
    """
    for module in lm.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def remote_code_hint(error: str, trusted: bool) -> str:
    """How to allow a model's (or its tokenizer's) own Python code, when transformers refused to run it."""
    if trusted or "custom code" not in error:
        return ""
    return ("; the model ships Python code of its own (auto_map in its config files), which loralab runs only "
            "with model.trust_remote_code: true: set it if you trust that code (docs/security.md)")


def hub_id_hint(path: str) -> str:
    """Where ``path`` was taken for a hub id because no such directory is here: say so, since a
    relative model.path is relative to the working directory (a study or config moved elsewhere)."""
    if path.startswith("builtin:") or Path(path).expanduser().exists():
        return ""
    return (f"; {path} is no directory under the working directory ({Path.cwd()}), so it was looked up as a "
            "Hugging Face hub id: give the model's directory as an absolute path, or relative to where loralab runs")


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    local = Path(resolve_model_path(path))
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"model.path {path}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)}); "
                         "copy the tokenizer files of the base model next to its weights")
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path {path}: cannot load a tokenizer ({str(exc).splitlines()[0]})"
                         f"{remote_code_hint(str(exc), trust_remote_code)}{hub_id_hint(path)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def read_config(path: str, *, trust_remote_code: bool = False):
    """The transformers config of the model at ``path`` (config.json alone: no weights are read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        local = path.startswith("builtin:") or Path(path).expanduser().exists()
        what = "" if local else "no such local directory, and as a hub id "
        raise ModelError(f"model.path {path}: {what}its config.json cannot be read ({str(exc).splitlines()[0]})"
                         f"{remote_code_hint(str(exc), trust_remote_code)}{hub_id_hint(path)}") from None


def stored_dtype(path: str, *, trust_remote_code: bool = False) -> str | None:
    """The dtype name (fp32, bf16, fp16) the base's weights are stored in, from config.json; None
    when it does not say."""
    stored = getattr(read_config(path, trust_remote_code=trust_remote_code), "dtype", None)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return names.get(stored)


def base_dropout(model) -> dict[str, float]:
    """The base model's own dropout that is on in training: {what: p} for its ``nn.Dropout``
    modules of p > 0 (LoRA's own left out), by module name with layer numbers taken out, and the
    config's rates that models apply as a function (OPT's ``dropout``, ``attention_dropout``, ...)."""
    found: dict[str, float] = {}
    for name, module in model.named_modules():
        if type(module) is torch.nn.Dropout and module.p > 0 and "lora_dropout" not in name:
            found[re.sub(r"\.\d+\.", ".N.", name)] = module.p
    config = getattr(model, "config", None)
    for key in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout"):
        p = getattr(config, key, None)
        if isinstance(p, float) and p > 0:
            found[f"config.{key}"] = p
    return found


def warn_emulated_bf16(device: torch.device, dtype: str, compute_dtype: str | None) -> None:
    """A warning when a run set to bf16 (``model.dtype``, or a 4-bit base's ``compute_dtype``)
    trains on a CPU that would emulate it: with AVX2 alone a bf16 matmul runs about 100x slower
    than fp32. auto never picks bf16 there, nor does a preset's seed setup on this machine
    (:func:`loralab.resolve.seed_dtype_here`); an explicit setting does, and so does a seed's on Ray."""
    if "bf16" not in (dtype, compute_dtype) or not emulates_bf16(device):
        return
    keys = " and ".join(k for k, v in (("model.dtype", dtype), ("quant.compute_dtype", compute_dtype)) if v == "bf16")
    log.warning("%s bf16 on a CPU with %s; auto (or fp32) trains in fp32 here", keys, EMULATED_BF16)


def load_base(model: ModelConfig, quant: QuantConfig, *, progress: bool = False, tokenizer=None):
    """(model, tokenizer) with every base weight frozen, loaded straight onto the chosen device.
    ``progress``: transformers' loading (and download) bars on stderr, terminals only;
    ``tokenizer``: one already loaded (by :func:`load_tokenizer`), else it is loaded here."""
    from transformers import AutoModelForCausalLM

    from loralab.progress import library_bars

    path = resolve_model_path(model.path)
    device = pick_device(model.device)
    width = None
    if model.dtype == "auto" and device.type == "cpu":
        width = model_width(read_config(model.path, trust_remote_code=model.trust_remote_code))
    dtype, why = dtype_choice(model, device, width=width)
    if model.dtype == "auto":
        log.info("model.dtype: auto -> %s (%s)", dtype, why.removeprefix("auto: "))
    attn = check_attention(model, device, dtype, quant)
    tokenizer = tokenizer or load_tokenizer(model.path, trust_remote_code=model.trust_remote_code)
    kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attn, trust_remote_code=model.trust_remote_code,
                  use_safetensors=True)
    bnb = quantization_config(quant, dtype)
    if bnb is not None and quant.compute_dtype == "auto":
        log.info("quant.compute_dtype: auto -> %s (the base's dtype)", quant.compute_dtype_for(dtype))
    warn_emulated_bf16(device, dtype, quant.compute_dtype_for(dtype) if bnb is not None else None)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if device.type == "cuda":
        enable_tf32()
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    elif bnb is not None:
        kwargs["device_map"] = {"": "cpu"}
    try:
        with library_bars(progress):
            try:
                lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            except ValueError as exc:
                if attn != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                    raise
                # an architecture transformers has no SDPA attention for (Gemma2): the same maths, eagerly
                log.warning("model.attn_implementation: sdpa -> eager (%s has no SDPA attention in transformers; "
                            "set model.attn_implementation: eager to say so)", str(exc).split()[0])
                lm = AutoModelForCausalLM.from_pretrained(path, **{**kwargs, "attn_implementation": "eager"})
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise ModelError(f"model.path {model.path}: cannot load the model ({str(exc).splitlines()[0]})"
                         f"{remote_code_hint(str(exc), model.trust_remote_code)}") from None
    if bnb is not None and device.type == "cpu":
        check_cpu_4bit(lm, quant)
        pin_4bit_kernel(lm)
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.config.use_cache = False
    return lm, tokenizer
