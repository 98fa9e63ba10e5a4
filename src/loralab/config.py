"""The typed configuration of one fine-tuning run.

Layers, lowest first: the defaults below -> a YAML file -> ``--set section.key=value``
overrides. Everything is checked before any model or data is loaded, and every problem
is reported at once, each naming its key::

    cfg = load_config("run.yaml", overrides=["lora.r=16", "train.lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from loralab.errors import ConfigError
from loralab.rundir import METRICS
from loralab.units import is_number

DEFAULT_MODEL = "builtin:tiny"  # the tiny pretrained Llama shipped in loralab/assets
DEFAULT_DATA = "builtin:arithmetic"  # the generated arithmetic instructions
# The record fields loralab reads, per data.format; data.columns maps them to a dataset's own column names.
DATA_FIELDS = ("instruction", "input", "output", "prompt", "completion", "messages", "conversations")


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with help text and optional range checks (gt, ge, le, lt)."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _f(DEFAULT_MODEL, "Local Hugging Face model directory, a hub id (needs network) or builtin:tiny.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "dtype of the frozen base weights that are not quantized (adapters, optimizer and loss stay fp32); "
                "auto = bf16 where the device multiplies bf16 natively (GPUs of compute capability >= 8, CPUs with "
                "AMX-BF16 or AVX512-BF16, for models of hidden size >= 512), fp16 on older GPUs, fp32 on other CPUs "
                "and for narrower models on a CPU (loralab.models.resolve_dtype).")
    trust_remote_code: bool = _f(False, "Run the model repository's own Python code. Off unless you trust it.")
    device: str = _f(
        "auto", "auto = cuda when usable, else cpu (with a loud warning where an NVIDIA driver answers but "
                "this torch cannot use it); cuda = an error when CUDA is not usable, never a CPU run; cuda:N = "
                "the Nth visible GPU.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f(
        "sdpa", "transformers' attention kernel for the base: sdpa (PyTorch's fused attention), eager, or "
                "flash_attention_2 (needs the flash-attn package, a CUDA device and bf16/fp16).")


@dataclass
class QuantConfig:
    mode: Literal["none", "nf4", "fp4"] = _f("none", "bitsandbytes 4-bit quantization of the base (QLoRA).")
    double_quant: bool = _f(True, "Quantize the 4-bit block scales too (saves ~0.4 bit per weight).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "dtype the 4-bit weights are dequantized to for matmuls; auto = the base's dtype (model.dtype as "
                "resolved: bf16 where the device multiplies it natively, fp32 on a CPU that would emulate bf16).")
    block_size: int = _f(64, "Weights per absmax block of the 4-bit format (bitsandbytes through transformers uses 64; "
                             "only 64 trains).", gt=0)

    def compute_dtype_for(self, model_dtype: str) -> str:
        """The dtype the 4-bit weights dequantize to over a base resolved to ``model_dtype``: auto
        follows the base, so a CPU that would emulate bf16 does not dequantize to it."""
        return model_dtype if self.compute_dtype == "auto" else self.compute_dtype


@dataclass
class LoraConfig:
    r: int = _f(8, "Rank of the low-rank update B @ A.", gt=0)
    alpha: float = _f(16.0, "Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora).", gt=0)
    dropout: float = _f(0.05, "Dropout on the adapter's input.", ge=0, lt=1)
    rslora: bool = _f(False, "Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r.")
    dora: bool = _f(False, "Weight-decomposed LoRA (DoRA, through PEFT).")
    init: Literal["default", "gaussian"] = _f(
        "default", "A init: kaiming-uniform (default) or gaussian; B starts at zero.")
    targets: list[str] = _f(
        ["attention"],
        "Roles (query, key, value, projection, mlp, head, all; attention: query and value, or the one q,k,v "
        "matrix of GPT-2, GPT-NeoX, Phi-3 and Falcon), raw module names, or 're:<regex>'.",
    )


@dataclass
class DataConfig:
    path: str = _f(DEFAULT_DATA, "Dataset: a JSON/JSONL, parquet, arrow or CSV file, a datasets save_to_disk "
                                 "directory, hf:owner/name[:split] (needs network), or builtin:arithmetic, "
                                 "builtin:arithmetic_2ds, builtin:arithmetic_4ds.")
    format: Literal["auto", "alpaca", "prompt_completion", "messages"] = _f(
        "auto", "Record layout: alpaca (instruction, input, output), prompt_completion, or messages (chat: messages "
                "with role/content, or conversations with from/value) rendered with the tokenizer's chat template; "
                "auto looks at the first record's keys.")
    columns: dict[str, str] = _f(
        {}, "Column names of your data for loralab's fields, e.g. {instruction: question, output: answer} (fields: "
            "instruction, input, output, prompt, completion, messages, conversations).")
    template: Literal["alpaca", "chat", "none"] = _f(
        "alpaca", "Prompt template of alpaca records: Alpaca, the tokenizer's chat template (the record as a "
                  "user turn and an assistant turn), or the raw instruction; a prompt_completion record's prompt is "
                  "used as written.")
    max_seq_length: int | Literal["auto"] = _f(
        256, "Examples are truncated to this many tokens (from the right: prompt first, then response); auto = the "
             "longest example rounded up to a multiple of 8, at most the model's context.", gt=1)
    train_on_prompt: bool = _f(False, "Also compute the loss on prompt tokens (default: response tokens only; for chat "
                                      "data, the assistant turns only).")
    val_path: str | None = _f(
        None, "A separate validation file (any data.path form); otherwise val_fraction of data.path is held out.")
    val_fraction: float = _f(0.05, "Share of data.path held out for validation when val_path is not given.", ge=0, lt=1)
    val_seed: int | None = _f(None, "Seed of the held-out validation split (null = train.seed).")
    val_max_examples: int = _f(200, "At most this many validation examples are scored per evaluation.", gt=0)
    min_response_chars: int = _f(
        0, "Drop examples whose response is shorter (characters; chat data: all assistant turns together).", ge=0)
    max_response_chars: int | None = _f(None, "Drop examples whose response is longer (characters); 800 with min 201 "
                                              "is the seeds' 'hard' Text-to-SQL subset.", gt=0)
    limit: int | None = _f(None, "Use only the first N training examples (after the split).", gt=0)
    shuffle: bool = _f(True, "Shuffle the training examples each epoch (seeded).")
    packing: bool | Literal["auto"] = _f(
        "auto", "Pack each step's examples end to end, up to micro_batch_size x max_seq_length tokens per forward, "
                "attention kept inside each example; same maths, no padding. true: one attention call per example "
                "where the model allows, else a block mask over the row; auto: packed where the model allows "
                "per-example attention, padded micro batches otherwise (a block mask computes the masked blocks too); "
                "false: padded.")


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "sgd", "adafactor", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = _f(
        "adamw", "adamw8bit needs bitsandbytes. paged_adamw / paged_adamw8bit: bitsandbytes' paged optimizers (state "
                 "in CUDA unified memory, paged to the host under memory spikes; QLoRA's), on CUDA only: refused on "
                 "the CPU, where bitsandbytes has nothing to page.")
    lr: float = _f(3e-4, "Peak learning rate.", gt=0)
    momentum: float = _f(0.0, "SGD momentum.", ge=0, lt=1)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    weight_decay: float = _f(0.01, "Decoupled weight decay (AdamW) / L2 (SGD).", ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = _f(
        "cosine", "Decay after warmup: constant, linear or cosine to zero.")
    warmup_steps: int = _f(10, "Linear warmup from 0 to lr over this many optimizer steps.", ge=0)
    batch_size: int = _f(16, "Examples per optimizer step (global batch).", gt=0)
    micro_batch_size: int | Literal["auto"] = _f(
        16, "Examples per forward/backward; batch_size / micro_batch_size is gradient accumulation. auto: the largest "
            "divisor of batch_size that loralab.estimate says fits in the device's memory (resolved before the run, "
            "see loralab.resolve).", gt=0)
    max_steps: int | None = _f(None, "Optimizer steps; when set it wins over epochs.", gt=0)
    epochs: float = _f(1.0, "Passes over the training data when max_steps is not set.", gt=0)
    grad_clip: float | None = _f(1.0, "Clip the global gradient norm to this value (null = off).", gt=0)
    seed: int = _f(1337, "Seeds data order, dropout and adapter init.")
    autocast: Literal["none", "bf16", "fp16"] = _f(
        "none", "Autocast for the forward pass: bf16, or fp16 (with a gradient scaler, as for any fp16 base).")
    group_by_length: bool = _f(False, "Sort each step's examples by length before cutting micro batches (same examples "
                                      "per step, less padding).")
    compile: bool | Literal["auto"] = _f(
        "auto", "torch.compile each decoder layer (fuses the element-wise work between matmuls; checked against eager "
                "on one micro batch, eager if it fails or differs; compile time reported apart). auto: when the run "
                "plans enough tokens to repay the compile (loralab.train.compiled.MIN_WORK), and on the CPU only "
                "for a bf16 or fp16 base (in fp32 it gained nothing measurable).")
    gradient_checkpointing: bool = _f(
        False, "Keep only each decoder layer's input and recompute the rest in backward (transformers' non-reentrant "
               "activation checkpointing): far less activation memory for one more forward of compute; same maths.")
    log_every: int = _f(10, f"Write a train-loss line to {METRICS} every N steps.", gt=0)
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop", "A NaN/inf loss or gradient stops the run (diverged) or skips the step, counted.")
    checkpoint_every: int = _f(0, "Write a resumable checkpoint every N optimizer steps (0 = off).", ge=0)
    keep_last: int = _f(2, "Keep only the newest N checkpoints.", gt=0)
    stop_at_step: int | None = _f(
        None, "Pause after this step: checkpoint, status paused; --resume continues on the full run's schedule.", gt=0)
    auto_micro_batch: bool = _f(False, "On out-of-memory, shrink micro_batch_size to the largest divisor of batch_size "
                                       "at most half of it, accumulate more (global batch unchanged) and retry.")


@dataclass
class EvalConfig:
    every: int = _f(0, "Evaluate every N steps (0 = only at the end).", ge=0)
    tasks: list[str] = _f([], "Evaluation tasks run with each evaluation (see loralab eval).")
    limit: int | None = _f(None, "At most N examples per evaluation task.", gt=0)


@dataclass
class OutputConfig:
    dir: str | None = _f(None, "Run directory; default runs/<model>-<time>.")
    save_adapter: bool = _f(True, "Save the final adapter in PEFT format under <dir>/adapter.")


TRACKERS = ("tensorboard", "mlflow", "wandb")


@dataclass
class TrackingConfig:
    """Experiment trackers that also receive the run (loralab.track; docs/tracking.md).
    ``tracking: [tensorboard, mlflow]`` at the top of a YAML is short for ``tracking.backends``."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = _f(
        [], "Trackers to log to: tensorboard (<run dir>/tb), mlflow, wandb. Each needs its extra: "
            "loralab[tensorboard], loralab[mlflow] or loralab[wandb].")
    tracking_uri: str | None = _f(
        None, "MLflow tracking URI (sqlite:///mlflow.db, http://server:5000, databricks); null = MLflow's own default "
              "(MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory).")
    project: str = _f("loralab", "W&B project.")
    experiment: str | None = _f(
        None, "MLflow experiment and W&B group; null = 'loralab', or the study's name in a study.")
    run_name: str | None = _f(None, "The tracker run's name; null = the run directory's name.")
    axes: list[str] = _f([], "Config keys whose values tag the tracker run (a study sets its axes here).")
    wandb_mode: Literal["auto", "offline", "online"] = _f(
        "auto", "auto = WANDB_MODE when set, online when logged in (WANDB_API_KEY or ~/.netrc), else offline (sync "
                "later with `wandb sync`).")


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = _f(
        "ddp", "How a run on several processes (loralab train --nproc N, or torchrun) shares the work: ddp replicates "
               "the base and sums the adapters' gradients over the ranks (each rank takes its share of every step's "
               "micro batches: the same maths as one process); fsdp shards the base and the adapters over the ranks "
               "with FSDP2 (fully_shard; the same maths; not with 4-bit quant or train.compile true). One process "
               "ignores it.")
    nproc: int = _f(
        1, "Processes (devices: one GPU each on CUDA) the run trains on. loralab train launches them (its --nproc "
           "flag wins over this key); a study gives the run that many of its GPUs or worker slots (study run "
           "--gpus-per-run K sets it for runs that leave it at 1). A fused group trains on one process.", ge=1)
    timeout_s: int = _f(
        600, "Seconds a rank waits for the others at a collective (the gradient sum of a step, the start) before the "
             "run fails, naming the wait: a hanging rank ends the run instead of blocking it forever.", gt=0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def grad_accum(self) -> int:
        return self.train.batch_size // self.train.micro_batch_size


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quant": QuantConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
    "tracking": TrackingConfig,
    "distributed": DistributedConfig,
}


# ----------------------------------------------------------------------------- checking


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(get_args(tp)[0])} to {_describe(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}[tp]


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to tp). Ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if origin is Literal:
        return (value in get_args(tp), value)
    if origin in (types.UnionType, typing.Union):
        for arm in get_args(tp):
            ok, v = _coerce(value, arm)
            if ok:
                return True, v
        return False, value
    if origin is list:
        if isinstance(value, str) and get_args(tp)[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, v = _coerce(item, get_args(tp)[0])
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        if isinstance(value, str):  # --set data.columns="{instruction: question}" arrives as text
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                return False, value
        if not isinstance(value, dict):
            return False, value
        key_tp, value_tp = get_args(tp)
        pairs = [(_coerce(k, key_tp), _coerce(v, value_tp)) for k, v in value.items()]
        if not all(ok_k and ok_v for (ok_k, _), (ok_v, _) in pairs):
            return False, value
        return True, {k: v for (_, k), (_, v) in pairs}
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if is_number(value):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {tp}")


def _check_range(key: str, value: Any, meta: dict[str, Any]) -> str | None:
    if value is None or isinstance(value, (bool, list, dict, str)):
        return None
    for name, op, word in (
        ("gt", float.__gt__, ">"), ("ge", float.__ge__, ">="), ("lt", float.__lt__, "<"), ("le", float.__le__, "<=")
    ):
        if name in meta and not op(float(value), float(meta[name])):
            return f"{key} must be {word} {meta[name]} (got {value!r})"
    return None


# Names other tools give loralab's keys (PEFT's, transformers' TrainingArguments'): the did-you-mean of an unknown key.
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
           "use_dora": "dora", "target_modules": "targets", "learning_rate": "lr", "num_train_epochs": "epochs",
           "gradient_accumulation_steps": "batch_size", "per_device_train_batch_size": "micro_batch_size",
           "lr_scheduler_type": "scheduler", "max_grad_norm": "grad_clip", "torch_dtype": "dtype",
           "max_length": "max_seq_length", "model_name_or_path": "path"}


def did_you_mean(key: str, known: list[str]) -> str | None:
    """The known name closest to ``key``: an alias (rank -> r), a near spelling, or a shared prefix."""
    if ALIASES.get(key) in known:
        return ALIASES[key]
    close = difflib.get_close_matches(key, known, n=1) or [k for k in known if k.startswith(key[:3])]
    return close[0] if close else None


def _build_section(name: str, cls: type, raw: Any, errors: list[str], origins: dict[str, str] | None = None) -> Any:
    """The section's dataclass; each problem goes to ``errors`` naming its key, prefixed with the
    key's origin (``--set lora.rank=4``) where ``origins`` has one."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{name} must be a mapping of keys (got {type(raw).__name__})")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}

    def problem(full: str, text: str) -> None:
        errors.append(f"{origins[full]}: {text}" if full in (origins or {}) else text)

    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in known:
            close = did_you_mean(str(key), list(known))
            hint = f" (did you mean {name}.{close}?)" if close else ""
            problem(full, f"unknown key {full}{hint}; {name} has {', '.join(known)}")
            continue
        ok, converted = _coerce(value, hints[key])
        if not ok:
            problem(full, f"{full} must be {_describe(hints[key])} (got {value!r})")
            continue
        out_of_range = _check_range(full, converted, dict(known[key].metadata))
        if out_of_range:
            problem(full, out_of_range)
            continue
        values[key] = converted
    return cls(**values)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_problem(device: str, key: str = "model.device") -> str | None:
    """Why ``device`` is not a model.device (auto, cpu, cuda, cuda:N), or None."""
    if DEVICE.fullmatch(device):
        return None
    return f"{key} must be auto, cpu, cuda or cuda:N (a GPU's index, e.g. cuda:1) (got {device!r})"


def _cross_checks(cfg: Config, errors: list[str], origins: dict[str, str]) -> None:
    """Problems of keys taken together, each blamed on the ``--set`` flags that gave its keys."""

    def problem(keys: tuple[str, ...], text: str) -> None:
        flags = [origins[k] for k in keys if k in origins]
        errors.append(f"{', '.join(flags)}: {text}" if flags else text)

    device = device_problem(cfg.model.device)
    if device:
        problem(("model.device",), device)
    t = cfg.train
    if t.micro_batch_size != "auto" and t.batch_size % t.micro_batch_size:
        problem(("train.batch_size", "train.micro_batch_size"),
                f"train.batch_size ({t.batch_size}) must be divisible by train.micro_batch_size "
                f"({t.micro_batch_size}); the quotient is the gradient accumulation")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        problem(("train.betas",), f"train.betas must be two numbers in [0, 1) (got {t.betas})")
    if not cfg.lora.targets:
        problem(("lora.targets",), "lora.targets must name at least one role or module (for example [query, value])")
    if cfg.quant.block_size != 64:
        problem(("quant.block_size",), f"quant.block_size must be 64 (got {cfg.quant.block_size}): bitsandbytes "
                                       "4-bit as loaded by transformers uses 64-weight blocks")
    d = cfg.data
    if d.max_response_chars is not None and d.max_response_chars < d.min_response_chars:
        problem(("data.max_response_chars", "data.min_response_chars"),
                f"data.max_response_chars ({d.max_response_chars}) is below data.min_response_chars "
                f"({d.min_response_chars})")
    unknown = sorted(set(d.columns) - set(DATA_FIELDS))
    if unknown:
        problem(("data.columns",), f"data.columns: unknown field {', '.join(unknown)} (known: "
                                   f"{', '.join(DATA_FIELDS)}); map loralab's field to your column, e.g. "
                                   "{instruction: question}")


def config_from_dict(raw: Any, *, source: str = "config", origins: dict[str, str] | None = None) -> Config:
    """Build and check a Config from nested dicts; raise ConfigError listing every problem.
    ``origins`` ({"lora.r": "--set lora.r=4"}, from :func:`override_origins`) names where a key
    came from when that is not ``source``: its problems are blamed on the flag, not the file."""
    errors: list[str] = []
    origins = origins or {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    raw = expand_shorthands(raw)
    sections = {}
    for key in raw:
        if key not in SECTIONS:
            close = did_you_mean(str(key), list(SECTIONS))
            origin = next((o for k, o in origins.items() if k.split(".")[0] == key), None)
            errors.append(f"{origin + ': ' if origin else ''}unknown section {key!r}"
                          f"{f' (did you mean {close}?)' if close else ''} (known: {', '.join(SECTIONS)})")
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(name, cls, raw.get(name), errors, origins)
    cfg = Config(**sections)
    if not errors:
        _cross_checks(cfg, errors, origins)
    flagged = [e for e in errors if any(e.startswith((f"{origin}:", f"{origin},")) for origin in origins.values())]
    if errors and len(flagged) == len(errors) == 1:
        raise ConfigError(errors[0])  # --set lora.rank=4: unknown key lora.rank (did you mean lora.r?); ...
    if errors:
        head = "invalid configuration" if len(flagged) == len(errors) else f"{source}: invalid configuration"
        raise ConfigError(f"{head}:\n  - " + "\n  - ".join(errors))
    return cfg


def override_origins(overrides: list[str]) -> dict[str, str]:
    """{"section.key": "--set section.key=value"} for ``--set`` strings (the last of a key wins)."""
    return {item.split("=", 1)[0].strip(): f"--set {item}" for item in overrides if "=" in item}


def read_yaml(path: str | Path) -> Any:
    """safe_load a YAML file; a missing file or a syntax error names the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); loralab reads YAML with safe_load, so Python object "
                          f"tags are refused") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def expand_shorthands(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with ``tracking: [tensorboard, mlflow]`` (or one name) as ``tracking: {backends: [...]}``."""
    if isinstance(raw.get("tracking"), (list, str)):
        return {**raw, "tracking": {"backends": raw["tracking"]}}
    return raw


_BACKSLASH_HINT = ("; in double quotes YAML reads a backslash as the start of an escape: put a regular expression in "
                   "single quotes inside the value, as in --set \"lora.targets=['re:.*\\.q_proj']\", or double each "
                   "backslash")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars/lists."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in expand_shorthands(raw or {}).items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, for example lora.r=16")
        key, text = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            if text.lstrip()[:1] not in ("[", "{", '"', "'"):
                value = text  # a plain word that YAML cannot read (a: b, @x): the text as written
            else:  # a list, a mapping or a quoted string was meant: taken raw it would be read as something else
                problem = getattr(exc, "problem", None) or exc
                raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})"
                                  + (_BACKSLASH_HINT if "\\" in text and '"' in text else "")) from None
        if isinstance(value, dict):  # "a: b" parsed as a mapping; treat as a plain string
            value = text
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: {section} is not a section")
        target[name] = value
    return raw


def flat_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-5, ...}`` from ``{"train": {"lr": 1e-5}}`` (a config as a dict, such as
    ``cfg.to_dict()`` or a run's config.yaml); top-level entries that are not sections are left out."""
    return {f"{s}.{k}": v for s, sec in raw.items() if isinstance(sec, dict) for k, v in sec.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw = read_yaml(path) if path else {}
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    raw = apply_overrides(raw or {}, overrides or [])
    return config_from_dict(raw, source=str(path) if path else "config", origins=override_origins(overrides or []))


def absolute_local_paths(cfg: Config) -> None:
    """model.path, data.path, data.val_path and eval.tasks' task files that name a file or
    directory relative to the working directory, made absolute in place (symbolic links kept): a
    run directory's config.yaml then serves from any directory (generate, eval, merge, --resume)."""
    def absolute(value: str | None) -> str | None:
        local = (value and not value.startswith(("builtin:", "hf:")) and not os.path.isabs(value)
                 and os.path.exists(value))
        return os.path.abspath(value) if local else value

    for part, key in ((cfg.model, "path"), (cfg.data, "path"), (cfg.data, "val_path")):
        setattr(part, key, absolute(getattr(part, key)))
    harness = "harness:"  # a task file given to lm-eval: harness:tasks/mine.yaml
    cfg.eval.tasks = [harness + absolute(t[len(harness):]) if t.startswith(harness) else absolute(t)
                      for t in cfg.eval.tasks]


def dump_config(cfg: Config, path: Path) -> None:
    """config.yaml, atomically: a run killed while writing it leaves the old one (resume reads it)."""
    from loralab.rundir import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), fsync=False)


def config_reference() -> str:
    """Markdown table of every key, its default and its help (used by the README)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"| `{name}.{f.name}` | `{default!r}` | {f.metadata['help']} ({_describe(hints[f.name])}) |")
    return "\n".join(lines)
