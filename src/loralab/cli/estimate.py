"""``loralab estimate``: parameters, memory and time of a LoRA / QLoRA run, from config.json alone.

    loralab estimate --model llama2-7b --r 8 --targets query,value --quant nf4 --budget 24GB
    loralab estimate run.yaml --set lora.r=16 --budget 24GB --json

The formulas live in :mod:`loralab.estimate`; this module turns the flags into a config and prints.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loralab.cli.output import emit_json, table
from loralab.config import apply_overrides, config_from_dict, override_origins, read_yaml
from loralab.errors import ConfigError
from loralab.estimate import (
    OPTIMIZER_BYTES_PER_PARAM,
    Estimate,
    estimate_run,
    known_presets,
    per_rank,
)
from loralab.units import human_bytes, parse_bytes

# flag -> config key (for --set style overrides)
FLAG_KEYS = {
    "model": "model.path", "dtype": "model.dtype", "r": "lora.r", "targets": "lora.targets",
    "quant": "quant.mode", "optim": "train.optimizer", "micro_batch": "train.micro_batch_size",
    "seq_len": "data.max_seq_length", "momentum": "train.momentum",
}
_POSITIVE = {"r": "--r (lora.r)", "micro_batch": "--micro-batch (train.micro_batch_size)",
             "seq_len": "--seq-len (data.max_seq_length)"}


def estimate_from_args(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    *,
    grad_checkpointing: bool = False,
    budget: str | None = None,
    throughput: float | None = None,
    device: str | None = None,
    rslora: bool | None = None,
    dora: bool | None = None,
    double_quant: bool | None = None,
    nproc: int | None = None,
    **flags: Any,
) -> Estimate:
    """The CLI path: a config file and/or flags (model, r, targets, quant, optim,
    micro_batch, seq_len, dtype, momentum); flags win over the file. ``nproc`` (default: the
    config's distributed.nproc) > 1: each rank's memory, for the config's distributed.strategy."""
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {nproc})")
    for name, label in _POSITIVE.items():
        if flags.get(name) is not None and flags[name] <= 0:
            raise ConfigError(f"{label} must be > 0 (got {flags[name]})")
    if throughput is not None and throughput <= 0:
        raise ConfigError(f"--throughput must be > 0 FLOP/s (got {throughput})")
    budget_bytes = parse_bytes(budget) if budget is not None else None
    raw = read_yaml(config_path) if config_path else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides or []))
    sets = {key: flags[name] for name, key in FLAG_KEYS.items() if flags.get(name) is not None}
    sets |= {k: v for k, v in (("lora.rslora", rslora), ("lora.dora", dora), ("quant.double_quant", double_quant))
             if v is not None}
    for key, value in sets.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    if "train.micro_batch_size" in sets:  # accumulation does not change memory; keep it valid
        raw["train"]["batch_size"] = sets["train.micro_batch_size"]
    if isinstance(raw.get("lora", {}).get("targets"), str):
        raw["lora"]["targets"] = [t.strip() for t in raw["lora"]["targets"].split(",") if t.strip()]
    cfg = config_from_dict(raw, source=str(config_path or "estimate"), origins=override_origins(list(overrides or [])))
    tokens = None
    if "path" in (raw.get("data") or {}) and flags.get("seq_len") is None:
        # the user's own data named: activations at the fullest micro batch its examples make, as a
        # study's scheduler takes them (full-length rows overstate real instruction data 1.3-2.8x)
        from loralab.train.step import fullest_micro_batch

        tokens = fullest_micro_batch(cfg)
    est = estimate_run(cfg, grad_checkpointing=grad_checkpointing, budget_bytes=budget_bytes, throughput=throughput,
                       device=device, tokens=tokens)
    return per_rank(est, nproc or cfg.distributed.nproc, cfg.distributed.strategy)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``estimate`` subcommand."""
    p = subparsers.add_parser(
        "estimate",
        help="parameters, memory and time of a LoRA/QLoRA run, from config.json alone",
        description="Estimate trainable parameters, memory by part and step time without loading weights.",
    )
    p.add_argument("config", nargs="?", help="a loralab run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--model", help=f"model directory, config.json or preset ({', '.join(known_presets())})")
    p.add_argument("--r", type=int, help="LoRA rank")
    p.add_argument("--targets", help="comma-separated roles/modules, e.g. query,value or all")
    p.add_argument("--quant", choices=["none", "nf4", "fp4"])
    p.add_argument("--double-quant", dest="double_quant", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--optim", choices=list(OPTIMIZER_BYTES_PER_PARAM))
    p.add_argument("--momentum", type=float, help="SGD momentum (a buffer per parameter when > 0)")
    p.add_argument("--micro-batch", dest="micro_batch", type=int)
    p.add_argument("--seq-len", dest="seq_len", type=int)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--rslora", action="store_true", default=None)
    p.add_argument("--dora", action="store_true", default=None)
    p.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_true")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="device to estimate for: its dtype (model.dtype auto) and framework allowance (default: "
                        "model.device; auto = the device a run would use on this machine)")
    p.add_argument("--budget", help="memory budget, e.g. 24GB or 80GiB; reports fits and the largest micro batch")
    p.add_argument("--throughput", type=float, help="effective FLOP/s of the device, e.g. 100e12")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="memory of each rank of a run on N processes (loralab train --nproc N; default the config's "
                        "distributed.nproc), for the config's distributed.strategy (ddp or fsdp; "
                        "--set distributed.strategy=fsdp)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> int:
    if not args.config and not args.model and not any(o.startswith("model.path=") for o in args.set):
        raise ConfigError("give a run config (loralab estimate run.yaml) or --model DIR_OR_PRESET "
                          f"(presets: {', '.join(known_presets())})")
    flags = {k: getattr(args, k) for k in FLAG_KEYS}
    est = estimate_from_args(
        args.config, args.set, grad_checkpointing=args.grad_checkpointing, budget=args.budget,
        throughput=args.throughput, device=args.device, rslora=args.rslora, dora=args.dora,
        double_quant=args.double_quant, nproc=args.nproc, **flags,
    )
    if args.json:
        emit_json(est.to_dict())
    else:
        sys.stdout.write(format_table(est) + "\n")
    return 0


def format_table(est: Estimate) -> str:
    """What a person reads: the setup, then memory by part, then what is approximate."""
    s = est.settings
    setup = (f"{s['dtype']} base, quant {s['quant']}, r={s['r']} on {','.join(s['targets'])} ({est.lora_modules} "
             f"module{'s' * (est.lora_modules != 1)}), {s['optimizer']}, micro batch {s['micro_batch_size']} "
             + (f"({s['micro_batch_tokens']:,} tokens at the fullest, from the data)" if s.get("micro_batch_tokens")
                else f"x {s['seq_len']} tokens")
             + (", grad checkpointing" if s["grad_checkpointing"] else "") + f", {s['device']}"
             + (f", per rank of {s['processes']} {s['strategy']} processes" if s.get("processes") else ""))
    about = [("model", f"{est.model} ({est.model_type})"), ("setup", setup),
             ("total params", f"{est.total_params:,} (base {est.base_params:,} + adapter {est.trainable_params:,})"),
             ("trainable params",
              f"{est.trainable_params:,} ({100 * est.trainable_share:.4f}% of {est.total_params:,})")]
    if est.budget_bytes is not None:
        about.append(("budget", f"{human_bytes(est.budget_bytes)}: {'fits' if est.fits else 'does NOT fit'}; "
                                f"largest micro batch that fits: {est.max_micro_batch}"))
    if est.time_per_step_s is not None:
        about.append(("time per step", f"{est.time_per_step_s:.3f} s ({est.flops_per_step:.3e} FLOP per micro step)"))
    memory = table([(part, human_bytes(b)) for part, b in est.memory_bytes.items()], ["memory", "size"],
                   align=["left", "right"])
    notes = "\n".join(["approximate:"] + [f"  - {n}" for n in est.approximate])
    return f"{table(about)}\n\n{memory}\n\n{notes}"
