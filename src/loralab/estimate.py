"""``loralab estimate``: parameters, memory and time of a LoRA / QLoRA run before it starts.

The model is built from its config.json alone on the ``meta`` device (no weights are read),
so a 70B model answers in well under a second. Counts come from the meta model's module
shapes; memory is the sum of named parts::

    est = estimate_run(load_config("run.yaml"))
    est.trainable_params, est.memory_bytes["total"]

    loralab estimate --model llama2-7b --r 8 --targets query,value --quant nf4 --budget 24GB

Formulas (bytes; b = micro batch, s = sequence length, e = activation dtype bytes):

* base weights: params x dtype bytes; with nf4/fp4 every linear layer except the output
  head (and tied weights) as transformers' bitsandbytes integration quantizes them:
  0.5 byte/weight + one fp32 absmax per block of 64 weights; with double quantization the
  absmax is 8-bit plus an fp32 scale per 256 blocks. Embeddings, norms, head: model dtype.
* LoRA weights and their gradients: fp32 (PEFT keeps adapters in fp32 by default).
* optimizer state: AdamW 2 moments of the parameter dtype (8 bytes/param at fp32);
  8-bit AdamW ~2 bytes/param; SGD 0, or one buffer with momentum; Adafactor factored:
  a row and a column vector (fp32) per 2-D tensor, a full vector for 1-D tensors.
* activations: what autograd keeps for backward, per token and decoder layer (SDPA
  attention, no s^2 term): two RMSNorm inputs in fp32 (2 x 4h), q, k, v and the attention
  output (2 x q_dim + 2 x kv_dim) x e, the MLP's gate, SiLU and up outputs 3 x f x e, and
  per LoRA-wrapped module (adapters run in fp32) its input and dropout mask (2 x 4 x in;
  4 x in without dropout) and its rank-r hidden (4r); DoRA adds 2 x out x e. Frozen linears
  keep no activation (the weight suffices for the input gradient). The head keeps the
  logits and fp32 log-probs (V x (e + 4)), or past CHUNK_LOGITS logits a step (the loss in
  chunks) its input and that input's gradient (2 x h x e) and one chunk's logits at a time.
  With gradient checkpointing only each layer's input (h x e) is kept, plus one layer's
  activations recomputed during backward.
* backward transient: the log-probs' gradient (V x 4, + V x e below fp32), one layer's
  activation gradients (2h + 2f) x e per token, and for 4-bit one dequantized weight.
* framework: CUDA: 0.5 GiB context; CPU: baseline RSS of a process that imported torch,
  transformers, peft and a model's code (440 MiB measured).
* data_library: CPU, data read with the datasets library (parquet, arrow, CSV, saved datasets,
  the hub): the library, pyarrow and the table (90 MiB measured).
* allocator_slack: CUDA: 10% of the rest (caching allocator, not validated here); CPU:
  glibc keeps freed activation memory in its heaps, ~90% of activations + transient.

Tokens per micro batch: micro batch x max_seq_length (full-length sequences), or with
``tokens=loralab.train.step.fullest_micro_batch(cfg)`` the fullest micro batch the run forms from its data.
A fused group (``group_memory_bytes``): shared parts once, each run's own parts (its
activations included: the group stacks every run's copy of the micro batch), and on the CPU one
run's allocator slack plus 40% of each further run's activations + transient.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from loralab.config import Config
from loralab.data.sources import read_with_datasets
from loralab.errors import ConfigError, ModelError

GIB = 1024**3
# RSS of a fresh python after importing torch+transformers+peft (425 MiB measured) and
# loading a model's code (+~15 MiB); weights are counted separately.
CPU_BASELINE_RSS = 440 * 1024**2
# What reading data with the datasets library (parquet, arrow, CSV, saved datasets, the hub) adds to
# a CPU process: the library, pyarrow and the loaded table; the same run peaked 21-187 MiB higher
# from parquet or CSV than from JSONL (bench/bench_data_memory.py, docs/estimates.md).
CPU_DATASETS_RSS = 90 * 1024**2
CPU_HEAP_RETENTION = 0.9  # see allocator_slack_bytes
# A fused group (loralab.train.fused) on the CPU: glibc keeps one micro step's churn in its heaps
# (one run's allocator_slack), and each further run's stacked activations add about 40% of
# themselves on top (bench/bench_fused_memory.py: 1.3-1.4x their live bytes per added run).
CPU_GROUP_HEAP_RETENTION = 0.4
# Parts a fused group holds once, whatever its size: the frozen base, the dequantization buffer
# of a 4-bit base, the framework's own memory. Each run adds its adapter, gradients, optimizer
# state and the activations of its copy of the micro batch (all K copies are stacked in one forward).
GROUP_SHARED_PARTS = ("base_weights", "dequant_buffer", "framework", "data_library")
CUDA_CONTEXT = GIB // 2  # CUDA context + kernels; not seen by torch's allocator statistics
ALLOCATOR_SLACK = 0.10  # CUDA caching allocator headroom (not validated here: no GPU)
QUANT_TIME_FACTOR = 1.5  # seeds: nf4 QLoRA took 1.50x (fp4 1.40x) the time of bf16 LoRA
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CHUNK_LOGITS = 1 << 24  # a step with more logits computes its loss in chunks (loralab.train.chunked_loss)
LORA_PARAM_BYTES = 4  # PEFT autocasts adapter weights to fp32 (autocast_adapter_dtype=True)
# Architectures whose layer layout the activation formula describes exactly.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma", "gemma2"}
# Simple per-parameter figures (the seed: "Adam uses 8 bytes per parameter ... Adafactor
# only 4"). Adafactor's 4 is the unfactored second moment in fp32; factored (what
# estimate_run uses for matrices) it is (rows + cols) x 4 bytes per matrix, far less.
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2, "adafactor": 4, "sgd": 0, "paged_adamw": 8,
                             "paged_adamw8bit": 2}


# ----------------------------------------------------------------------------- model


def _asset(*parts: str) -> Path:
    return Path(str(resources.files("loralab").joinpath("assets", *parts)))


def model_preset_dir() -> Path:
    """The shipped model config.json presets (llama2-7b, ...); study presets are study.spec.preset_dir."""
    return _asset("model_configs")


def known_presets() -> list[str]:
    """Preset names: the shipped config.json files plus ``tiny`` (the builtin base)."""
    return sorted([p.stem for p in model_preset_dir().glob("*.json")] + ["tiny"])


def resolve_model_config(spec: str) -> Path:
    """Path of the config.json for a model directory, a .json file, a preset or builtin:tiny."""
    if spec in ("tiny", "builtin:tiny"):
        path = _asset("tiny-base", "config.json")
        if not path.is_file():
            raise ModelError(f"the builtin tiny base is not installed ({path} is missing)")
        return path
    if (model_preset_dir() / f"{spec}.json").is_file():
        return model_preset_dir() / f"{spec}.json"
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model directory {p} has no config.json")
        return p / "config.json"
    if p.is_file():
        return p
    raise ModelError(
        f"model {spec!r} is neither a local directory, a config.json, nor a known preset "
        f"({', '.join(known_presets())}); estimate works offline and never reads hub ids"
    )


def load_model_config(path: Path) -> Any:
    """A transformers config from a config.json; any problem names the file."""
    from transformers import AutoConfig

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable config.json ({exc})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelError(f"{path}: a config.json needs a model_type (for example \"llama\")")
    model_type = raw.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **raw)
    except Exception as exc:  # transformers raises ValueError/KeyError/TypeError here
        raise ModelError(f"{path}: transformers cannot read this config ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model, read off its meta-device instance."""

    source: str
    model_type: str
    total_params: int
    linears: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    quantizable: tuple[str, ...]  # linears that bitsandbytes 4-bit would replace
    head_name: str | None
    hidden: int
    layers: int
    intermediate: int
    q_dim: int
    kv_dim: int
    vocab: int
    known_layout: bool
    guessed: tuple[str, ...] = ()  # config attributes that had to be guessed


def _features(module: Any) -> tuple[int, int]:
    w = module.weight
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return int(module.in_features), int(module.out_features)


def _dims(cfg: Any) -> tuple[dict[str, int], list[str]]:
    """hidden, layers, intermediate, q/kv widths and vocab, with fallbacks for odd configs."""
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    guessed: list[str] = []

    def pick(names: tuple[str, ...], default: Any, label: str) -> int:
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and v > 0:
                return v
        guessed.append(label)
        return int(default)

    h = pick(("hidden_size", "n_embd", "d_model"), 0, "hidden size")
    heads = pick(("num_attention_heads", "n_head"), 1, "attention heads")
    head_dim = getattr(cfg, "head_dim", None) or h // max(heads, 1)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dims = {
        "hidden": h,
        "layers": pick(("num_hidden_layers", "n_layer", "num_layers"), 1, "layers"),
        # n_inner None (GPT-2 and its kind) means 4 x the hidden size: the config's own default, not a guess
        "intermediate": (4 * h if getattr(cfg, "n_inner", 0) is None else
                         pick(("intermediate_size", "n_inner", "ffn_dim"), 4 * h, "intermediate size")),
        "q_dim": heads * head_dim,
        "kv_dim": kv * head_dim,
        "vocab": pick(("vocab_size",), 0, "vocab size"),
    }
    return dims, guessed


@lru_cache(maxsize=32)
def describe_model(spec: str) -> ModelShape:
    """Build the model on the meta device and read its shapes (cached per spec)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    from loralab.roles import head_module_name, linear_module_names

    path = resolve_model_config(spec)
    cfg = load_model_config(path)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:
        raise ModelError(f"{path}: cannot build a causal LM from this config ({type(exc).__name__}: {exc})") from None
    modules = dict(model.named_modules())
    linears = {n: _features(modules[n]) for n in linear_module_names(model)}
    skip = set(get_keys_to_not_convert(model))
    quantizable = tuple(n for n in linears if n not in skip and not any(n.endswith("." + s) for s in skip))
    dims, guessed = _dims(cfg)
    return ModelShape(
        source=str(path),
        model_type=str(cfg.model_type),
        total_params=sum(p.numel() for p in model.parameters()),
        linears=linears,
        quantizable=quantizable,
        head_name=head_module_name(model),
        known_layout=cfg.model_type in LLAMA_LIKE,
        guessed=tuple(guessed),
        **dims,
    )


def lora_modules(shape: ModelShape, targets: list[str]) -> list[str]:
    """Full names of the modules PEFT wraps for these targets (roles, names or re:...)."""
    from loralab.roles import resolve_targets

    linear = list(shape.linears)
    return resolve_targets(model_type=shape.model_type, linear_names=linear, head_name=shape.head_name,
                           targets=targets).modules


def lora_tensor_shapes(shape: ModelShape, modules: list[str], r: int, dora: bool) -> list[tuple[int, ...]]:
    """Shapes of the trainable tensors PEFT creates: A (r, in), B (out, r), DoRA magnitude (out,)."""
    out: list[tuple[int, ...]] = []
    for name in modules:
        fan_in, fan_out = shape.linears[name]
        out += [(r, fan_in), (fan_out, r)] + ([(fan_out,)] if dora else [])
    return out


# ----------------------------------------------------------------------------- memory parts


def quantized_bytes(n_weights: int, *, double_quant: bool, block_size: int = 64) -> int:
    """Bytes of one 4-bit (nf4/fp4) weight tensor: packed nibbles plus block scales."""
    blocks = math.ceil(n_weights / block_size)
    packed = math.ceil(n_weights / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / 256) + 4  # 8-bit absmax, fp32 scales, offset


def optimizer_state_bytes(
    optimizer: str, tensor_shapes: list[tuple[int, ...]], param_bytes: int = 4, momentum: float = 0.0
) -> int:
    """Optimizer state for the trainable tensors (torch semantics: state dtype = param dtype).
    A paged optimizer's state is counted as on the device, as its unpaged twin's: bitsandbytes
    pages it to the host only under memory pressure (and never a tensor under 1e5 values)."""
    optimizer = optimizer.removeprefix("paged_")
    n = sum(math.prod(s) for s in tensor_shapes)
    if optimizer == "adamw":
        return 2 * param_bytes * n
    if optimizer == "adamw8bit":  # two uint8 moments + an fp32 absmax per 256 values each
        return 2 * (n + 4 * math.ceil(n / 256))
    if optimizer == "sgd":
        return param_bytes * n if momentum > 0 else 0
    if optimizer == "adafactor":  # factored second moment for matrices, full for vectors
        return sum(4 * (sum(s) if len(s) == 2 else math.prod(s)) for s in tensor_shapes)
    raise ConfigError(
        f"train.optimizer: unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZER_BYTES_PER_PARAM)})")


def base_weight_bytes(shape: ModelShape, *, dtype: str, quant: str, double_quant: bool, block_size: int) -> int:
    """Frozen base: everything in dtype, or 4-bit linears plus the rest in dtype."""
    e = DTYPE_BYTES[dtype]
    if quant == "none":
        return shape.total_params * e
    quantized = [shape.linears[n][0] * shape.linears[n][1] for n in shape.quantizable]
    rest = shape.total_params - sum(quantized)  # embeddings, norms, biases, head
    return rest * e + sum(quantized_bytes(n, double_quant=double_quant, block_size=block_size) for n in quantized)


def _lora_saved_per_token(shape: ModelShape, modules: list[str], r: int, e: int, dropout: float, dora: bool) -> int:
    """Per token: each adapter runs in fp32 (PEFT casts its input): lora_A keeps its input,
    dropout keeps a mask of the same size, lora_B keeps the rank-r hidden; DoRA also keeps
    the base output and the scaled LoRA output (out x e each)."""
    per_input = 2 * LORA_PARAM_BYTES if dropout > 0 else LORA_PARAM_BYTES
    total = 0
    for name in modules:
        fan_in, fan_out = shape.linears[name]
        total += fan_in * per_input + r * LORA_PARAM_BYTES + (2 * fan_out * e if dora else 0)
    return total


def activation_parts(
    shape: ModelShape, *, tokens: int, e: int, modules: list[str], r: int, dropout: float,
    dora: bool, grad_checkpointing: bool,
) -> dict[str, int]:
    """Activations kept for backward and the backward transient, for ``tokens`` = b x s."""
    h, f, L = shape.hidden, shape.intermediate, shape.layers
    layer = 2 * (4 * h + 4) + (2 * shape.q_dim + 2 * shape.kv_dim) * e + 3 * f * e
    lora = _lora_saved_per_token(shape, modules, r, e, dropout, dora)
    if grad_checkpointing:
        kept = L * h * e + layer + lora // max(L, 1)
    else:
        kept = L * layer + lora
    head_kept, head_transient = head_parts(shape, tokens=tokens, e=e)
    transient = (2 * h + 2 * f) * e  # one layer's gradients
    return {"activations": kept * tokens + head_kept, "backward_transient": transient * tokens + head_transient}


def head_parts(shape: ModelShape, *, tokens: int, e: int) -> tuple[int, int]:
    """(kept, transient) bytes of the output head and the loss for ``tokens`` positions: the
    final norm's input and every position's logits (e) and fp32 log-probs kept, their gradient
    in the backward (fp32, and its cast to e); past CHUNK_LOGITS logits the loss runs in chunks
    (loralab.train.chunked_loss): the head's input and its gradient kept, one chunk's fp32 logits
    (and below fp32 the head's output they are cast from), log-probs and gradient at a time. A
    model that soft-caps its logits after the head keeps the whole logits, which this does not
    know (an underestimate there)."""
    h, v = shape.hidden, shape.vocab
    if tokens * v <= CHUNK_LOGITS:
        return tokens * (v * (e + 4) + 4 * h), tokens * v * (4 + (e if e < 4 else 0))
    return tokens * (4 * h + 2 * h * e), CHUNK_LOGITS * (4 + 4 + (e if e < 4 else 0))


def dequant_buffer_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """One dequantized weight matrix (the largest) and its transpose during backward."""
    largest = max((shape.linears[n][0] * shape.linears[n][1] for n in shape.quantizable), default=0)
    return 2 * largest * compute_bytes


def allocator_slack_bytes(parts: dict[str, int], device: str) -> int:
    """CUDA: 10% of everything for the caching allocator. CPU: glibc keeps freed
    activation memory in its heaps, so peak RSS exceeds live tensors by ~90% of the
    activations + backward transient (measured by bench/bench_estimate.py)."""
    if device == "cpu":
        return int(CPU_HEAP_RETENTION * (parts["activations"] + parts["backward_transient"]))
    return int(ALLOCATOR_SLACK * sum(parts.values()))


def group_memory_bytes(parts: list[dict[str, int]], device: str) -> int:
    """Peak memory of runs trained as one fused group, from each run's estimate by part
    (``Estimate.memory_bytes``): the shared parts once, each run's own parts, and on the CPU
    the allocator slack of one run (the largest) plus CPU_GROUP_HEAP_RETENTION of every other
    run's activations and backward transient (CUDA: each run's 10%, not validated)."""
    shared = sum(parts[0].get(p, 0) for p in GROUP_SHARED_PARTS)
    total = sum(m["total"] for m in parts) - (len(parts) - 1) * shared
    if device != "cpu" or len(parts) == 1:
        return total
    first = max(range(len(parts)), key=lambda k: parts[k].get("allocator_slack", 0))
    others = [m for k, m in enumerate(parts) if k != first]
    return total - sum(m.get("allocator_slack", 0) for m in others) + int(
        CPU_GROUP_HEAP_RETENTION * sum(m["activations"] + m["backward_transient"] for m in others))


# ----------------------------------------------------------------------------- estimate


@dataclass
class Estimate:
    """The answer: counts, memory by part (bytes, with "total"), optional fit and time."""

    model: str
    model_type: str
    total_params: int  # base + adapter, as PEFT and a run's summary count them (the share's denominator)
    trainable_params: int
    trainable_share: float  # trainable_params / total_params
    base_params: int  # the base model alone (Llama 2 7B: 6,738,415,616)
    memory_bytes: dict[str, int]
    settings: dict[str, Any]
    lora_modules: int = 0
    budget_bytes: int | None = None
    fits: bool | None = None
    max_micro_batch: int | None = None
    flops_per_step: float | None = None
    time_per_step_s: float | None = None
    approximate: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _memory(shape: ModelShape, cfg: Config, modules: list[str], *, micro: int, gc: bool, device: str,
            tokens: int | None = None) -> dict[str, int]:
    """Memory by part; activations for ``tokens`` per micro batch (default: micro x max_seq_length)."""
    e = DTYPE_BYTES[cfg.model.dtype]
    tensors = lora_tensor_shapes(shape, modules, cfg.lora.r, cfg.lora.dora)
    n_train = sum(math.prod(s) for s in tensors)
    q = cfg.quant
    parts = {
        "base_weights": base_weight_bytes(shape, dtype=cfg.model.dtype, quant=q.mode, double_quant=q.double_quant,
                                          block_size=q.block_size),
        "lora_weights": n_train * LORA_PARAM_BYTES,
        "gradients": n_train * LORA_PARAM_BYTES,
        "optimizer_state": optimizer_state_bytes(cfg.train.optimizer, tensors, LORA_PARAM_BYTES, cfg.train.momentum),
    }
    parts |= activation_parts(
        shape, tokens=tokens or micro * cfg.data.max_seq_length, e=e, modules=modules, r=cfg.lora.r,
        dropout=cfg.lora.dropout, dora=cfg.lora.dora, grad_checkpointing=gc,
    )
    if q.mode != "none":
        parts["dequant_buffer"] = dequant_buffer_bytes(shape, DTYPE_BYTES[q.compute_dtype_for(cfg.model.dtype)])
    parts["allocator_slack"] = allocator_slack_bytes(parts, device)
    parts["framework"] = CPU_BASELINE_RSS if device == "cpu" else CUDA_CONTEXT
    if device == "cpu" and any(read_with_datasets(p) for p in (cfg.data.path, cfg.data.val_path)
                               if p and not p.startswith("builtin:")):
        parts["data_library"] = CPU_DATASETS_RSS
    parts["total"] = sum(parts.values())
    return parts


def max_micro_batch(fits_at: Any, limit: int = 1 << 20) -> int:
    """Largest micro batch b >= 0 with fits_at(b) true (memory grows with b)."""
    if not fits_at(1):
        return 0
    hi = 2
    while hi < limit and fits_at(hi):
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
    return lo


def step_flops(shape: ModelShape, cfg: Config, n_train: int, gc: bool) -> float:
    """FLOPs of one micro step: 2N forward, 2N input-gradient backward (frozen weights get
    no weight gradient), +2N recompute with checkpointing, 6 per trainable parameter and
    token for the adapters, and attention scores 4 s q_dim per layer per token (x3, x4 with
    checkpointing). N counts the linear (matmul) weights; embedding lookups are free."""
    tokens = cfg.train.micro_batch_size * cfg.data.max_seq_length
    matmul = sum(i * o for i, o in shape.linears.values())
    passes = 3 if gc else 2
    attention = 4 * cfg.data.max_seq_length * shape.q_dim * shape.layers
    return float(tokens * (2 * passes * matmul + 6 * n_train + attention * (passes + 1)))


@lru_cache(maxsize=8)
def matmul_throughput(device: str = "cpu", dtype: str = "fp32") -> float:
    """FLOP/s this machine's ``device`` reaches on square matmuls in ``dtype`` (fp32, bf16, fp16):
    the best of 512 and 1024 wide (1024 only where 512 ran at 10 GFLOP/s or more: emulated bf16
    would take seconds), each the fastest of its multiplies in about 0.15 s. bf16 is several
    times fp32 on a CPU with AMX and about a hundredth of it on one that emulates bf16 (AVX2
    alone). A step's matmuls run at most at this rate, and the rest of a step (attention, kernel
    launches, the optimizer, data) adds to them, so times made with it are lower bounds: what
    ``loralab tune`` and ``study run --dry-run`` say about time ("at least about").

    Each choice keeps the rate from coming out low, which put the bound above the time runs then
    took: the larger size, as a model's wider matmuls run faster than 512 x 512 on some machines;
    the fastest multiply rather than the mean; and on the CPU, one thread's rate times torch's
    threads where that is more than all threads' together, as another process busy on the cores
    (another test, another run, a neighbour on shared cores) slows a multiply that waits on every
    thread far more than one on a single thread (2 vCPUs with a matmul loop beside: 17-110
    GFLOP/s on two threads, 84-116 as one thread's times two)."""
    import time

    import torch

    dev = torch.device(device)
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # multiplies timed together: one on the CPU; on a GPU enough that a launch and a sync do not
    # count for more than the multiplies (a 512-wide one takes about a microsecond on an H100)
    batch = 1 if dev.type == "cpu" else 64

    def fastest(n: int) -> float:
        a, b = (torch.randn(n, n, device=dev, dtype=kind) for _ in range(2))
        a @ b  # warm-up
        sync()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < 0.15:
            t0 = time.perf_counter()
            for _ in range(batch):
                a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 * batch / best

    def rate(n: int) -> float:
        threads = torch.get_num_threads()
        if dev.type != "cpu" or threads == 1:
            return fastest(n)
        torch.set_num_threads(1)
        try:
            one = fastest(n)
        finally:
            torch.set_num_threads(threads)
        return max(fastest(n), one * threads)

    best = rate(512)
    return max(best, rate(1024)) if best >= 10e9 else best


def _notes(shape: ModelShape, cfg: Config, device: str, *, from_data: bool = False) -> list[str]:
    notes = [
        "activations assume SDPA/flash attention (no s^2 score matrix) and " + (
            "the fullest micro batch the run forms from its data (the largest micro batch that fits assumes "
            "full-length sequences)" if from_data else "full-length sequences"),
        "framework allowance: " + (
            "CPU baseline RSS 440 MiB; allocator_slack: glibc heap retention, 90% of activations + transient"
            if device == "cpu" else "CUDA context 0.5 GiB; allocator_slack: 10% of the rest (caching allocator)"
        ),
    ]
    if not shape.known_layout:
        notes.append(
            f"activations: model_type {shape.model_type!r} is not one loralab models layer by layer; "
            "the Llama-style per-layer formula was used (parameter counts are exact, from the meta model)"
        )
    if shape.guessed:
        notes.append("guessed config values: " + ", ".join(shape.guessed))
    if cfg.lora.dora:
        notes.append("DoRA: activations include two out-sized tensors per wrapped layer; its weight-norm temporaries "
                     "are not counted")
    if cfg.quant.mode != "none":
        notes.append(f"time includes the seeds' {QUANT_TIME_FACTOR}x slowdown of 4-bit dequantization")
    return notes


def context_of(cfg: Config) -> int | None:
    """The model's context (max_position_embeddings), None where its config states none."""
    from loralab.data.dataset import model_context

    return model_context(load_model_config(resolve_model_config(cfg.model.path))) or None


def at_context_length(cfg: Config) -> Config:
    """``cfg`` with data.max_seq_length: auto replaced by its ceiling, the model's context."""
    context = context_of(cfg)
    if not context:
        raise ConfigError(f"data.max_seq_length: auto: {cfg.model.path} states no context length "
                          "(max_position_embeddings); set data.max_seq_length to a number for the estimate")
    return replace(cfg, data=replace(cfg.data, max_seq_length=context))


def estimate_run(
    cfg: Config,
    *,
    grad_checkpointing: bool = False,
    budget_bytes: int | None = None,
    throughput: float | Callable[[str], float] | None = None,
    device: str | None = None,
    tokens: int | None = None,
    mean_tokens: float | None = None,
) -> Estimate:
    """Estimate a run from its Config. ``throughput`` is effective FLOP/s of the device, or a
    function of the dtype the run's matmuls run in (its resolved ``model.dtype``, or a 4-bit
    base's compute dtype) that gives them, e.g. ``functools.partial(matmul_throughput, "cpu")``.
    ``tokens``: the tokens of the fullest micro batch the run forms from its data
    (loralab.train.step.fullest_micro_batch); without it every micro batch is taken as full-length
    sequences (micro batch x data.max_seq_length), the most it can hold. ``mean_tokens``: an
    example's mean length in the run's data; the time is then taken at it (a step computes at
    least its examples' tokens, packed or padded), not at full-length rows, which no step of
    instruction data of real lengths is made of."""
    auto_length = cfg.data.max_seq_length == "auto"
    over_context = None
    if auto_length:
        cfg = at_context_length(cfg)
    elif (context := context_of(cfg)) and cfg.data.max_seq_length > context:
        over_context = cfg.data.max_seq_length  # a run refuses any example longer than the context
        cfg = replace(cfg, data=replace(cfg.data, max_seq_length=context))
    grad_checkpointing = grad_checkpointing or cfg.train.gradient_checkpointing
    shape = describe_model(cfg.model.path)
    modules = lora_modules(shape, list(cfg.lora.targets))
    from loralab.adapters import check_rank  # the run's own check: a rank above a matrix's dimension is refused

    check_rank(cfg.lora.r, {name: shape.linears[name] for name in modules})
    n_train = sum(math.prod(s) for s in lora_tensor_shapes(shape, modules, cfg.lora.r, cfg.lora.dora))
    dev = device or machine_device(cfg.model.device)
    from loralab.models import (
        resolve_dtype,  # model.dtype auto: the dtype the run would load on dev
    )

    cfg = replace(cfg, model=replace(cfg.model, dtype=resolve_dtype(cfg.model, dev, width=shape.hidden)))
    auto_micro = cfg.train.micro_batch_size == "auto"
    if auto_micro:  # estimated per example; max_micro_batch says what a run would resolve it to
        cfg = replace(cfg, train=replace(cfg.train, micro_batch_size=1))
    micro = cfg.train.micro_batch_size
    mem = _memory(shape, cfg, modules, micro=micro, gc=grad_checkpointing, device=dev, tokens=tokens)
    est = Estimate(
        model=cfg.model.path,
        model_type=shape.model_type,
        total_params=shape.total_params + n_train,
        trainable_params=n_train,
        trainable_share=n_train / (shape.total_params + n_train),
        base_params=shape.total_params,
        memory_bytes=mem,
        lora_modules=len(modules),
        settings=_settings(cfg, grad_checkpointing, dev) | ({"micro_batch_tokens": tokens} if tokens else {}),
        approximate=_notes(shape, cfg, dev, from_data=bool(tokens)),
    )
    if device is None and cfg.model.device == "auto":
        est.approximate.append(f"model.device auto: estimated for {dev}, where a run would train on this machine "
                               f"(with {est.settings['dtype']} weights); --device cuda or cpu estimates for another")
    if over_context is not None:
        est.approximate.append(f"data.max_seq_length {over_context} is more than the model's context of "
                               f"{cfg.data.max_seq_length} positions: estimated at {cfg.data.max_seq_length}; a run "
                               "refuses any example longer than the context")
    window = getattr(load_model_config(resolve_model_config(cfg.model.path)), "sliding_window", None)
    if isinstance(window, int) and 0 < window < cfg.data.max_seq_length:
        est.approximate.append(f"the model attends through a sliding window ({window} positions) over rows of up to "
                               f"{cfg.data.max_seq_length}: the attention mask that takes is not counted (a Mistral "
                               "with sliding_window 512 at rows of 1,024 peaked at 1.35x this estimate)")
    if auto_length and not tokens:
        est.approximate.append(f"data.max_seq_length: auto estimated at the model's context "
                               f"({cfg.data.max_seq_length}), "
                               "the most it resolves to; a run resolves it from the data")
    if auto_micro:
        est.approximate.append("train.micro_batch_size: auto estimated at micro batch 1; a run takes the largest "
                               "divisor of train.batch_size that fits (see the budget's largest micro batch)")
    if budget_bytes is not None:
        est.budget_bytes = budget_bytes
        est.fits = mem["total"] <= budget_bytes
        est.max_micro_batch = max_micro_batch(
            lambda b: _memory(shape, cfg, modules, micro=b, gc=grad_checkpointing, device=dev)["total"] <= budget_bytes
        )
    est.flops_per_step = step_flops(shape, cfg, n_train, grad_checkpointing)
    if throughput is not None:
        quantized = cfg.quant.mode != "none"
        if callable(throughput):
            throughput = throughput(cfg.quant.compute_dtype_for(cfg.model.dtype) if quantized else cfg.model.dtype)
        factor = QUANT_TIME_FACTOR if quantized else 1.0
        if mean_tokens:  # the step's tokens are its examples', not micro batch x max_seq_length
            factor *= min(1.0, mean_tokens / cfg.data.max_seq_length)
        est.time_per_step_s = est.flops_per_step / throughput * factor * cfg.grad_accum
    return est


def machine_device(device: str) -> str:
    """The kind of device (cpu or cuda) a run with ``model.device`` ``device`` uses on this
    machine: auto is cuda only where CUDA is usable; cuda and cuda:N are cuda (an estimate for a
    GPU run may be made anywhere)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu" if device == "cpu" else "cuda"


def _settings(cfg: Config, gc: bool, device: str) -> dict[str, Any]:
    return {
        "dtype": cfg.model.dtype,
        "quant": cfg.quant.mode,
        "double_quant": cfg.quant.double_quant,
        "r": cfg.lora.r,
        "targets": list(cfg.lora.targets),
        "rslora": cfg.lora.rslora,
        "dora": cfg.lora.dora,
        "optimizer": cfg.train.optimizer,
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.grad_accum,
        "seq_len": cfg.data.max_seq_length,
        "grad_checkpointing": gc,
        "device": device,
    }


def per_rank(est: Estimate, nproc: int, strategy: str = "ddp") -> Estimate:
    """Each rank's memory in a run on ``nproc`` processes (loralab.train.distributed). One
    process: ``est``.

    ddp: what one process holds (the whole base, the adapters, their gradients and optimizer
    state, one micro batch's activations) plus the flat fp32 buffer the step's gradient sum
    goes through (the adapters' gradients once more).

    fsdp: the base, the adapters, their gradients and optimizer state in shards of 1/N, plus
    what FSDP gathers whole while computing: the root (embeddings, final norm, head: kept
    gathered from the forward to the backward) and two decoder layers (the one computing and
    the one prefetched), base and adapters; activations are each rank's own, whole."""
    if nproc <= 1:
        return est
    memory = {k: v for k, v in est.memory_bytes.items() if k != "total"}
    if strategy == "fsdp":
        if est.settings["quant"] != "none":
            raise ConfigError(f"quant.mode {est.settings['quant']} with distributed.strategy fsdp is not available "
                              "(loralab train refuses it); estimate quant.mode=none or distributed.strategy=ddp")
        for part in ("base_weights", "lora_weights", "gradients", "optimizer_state"):
            memory[part] = -(-memory[part] // nproc)
        memory["gathered_params"] = gathered_bytes(est)
        note = (f"per rank of {nproc} fsdp processes: base, adapters, gradients and optimizer state in 1/{nproc} "
                "shards; gathered_params is the root (embeddings, norm, head) and two decoder layers whole")
    else:
        memory["gradient_sum"] = est.trainable_params * LORA_PARAM_BYTES
        note = (f"per rank of {nproc} ddp processes (every rank holds the whole base); the largest micro batch "
                "that fits leaves out the gradient-sum buffer")
    memory["total"] = sum(memory.values())
    fits = None if est.budget_bytes is None else memory["total"] <= est.budget_bytes
    return replace(est, memory_bytes=memory, fits=fits, settings={**est.settings, "processes": nproc,
                                                                  "strategy": strategy},
                   approximate=[*est.approximate, note])


def gathered_bytes(est: Estimate) -> int:
    """What an fsdp rank holds whole at its peak: the root's parameters (all but the decoder
    layers) and two decoder layers' (base in model.dtype, adapters fp32)."""
    shape = describe_model(est.model)
    e = DTYPE_BYTES[est.settings["dtype"]]
    in_layers = sum(i * o for name, (i, o) in shape.linears.items() if name != shape.head_name)
    layer = in_layers // shape.layers + 2 * shape.hidden  # its linears and two norms
    root = shape.total_params - layer * shape.layers
    return (root + 2 * layer) * e + 2 * (est.trainable_params // shape.layers) * LORA_PARAM_BYTES
