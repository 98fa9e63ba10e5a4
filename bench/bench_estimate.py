"""Benchmark (not a test): ``loralab estimate`` against measured peak memory on this CPU.

For each configuration a fresh Python process loads the model with transformers (4-bit
through bitsandbytes' BitsAndBytesConfig), wraps it with ``peft.get_peft_model``, runs a few
forward/backward/optimizer steps at a fixed micro batch x sequence length and reports its
peak RSS (VmHWM from /proc/self/status; see ``peak_rss``). Next to it: ``estimate_run`` for
the same setup with the CPU allowance (baseline RSS after importing torch, transformers
and peft, measured here as well). Results: bench/results/estimate.{md,json}.

    .venv/bin/python bench/bench_estimate.py            # all configurations
    .venv/bin/python bench/bench_estimate.py --quick    # a few
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MICRO, SEQ, STEPS = 4, 128, 3
# Large frees go back to the OS at once: peak RSS is then close to the live tensor bytes,
# which checks the formulas without the CPU allocator_slack part.
NO_HEAP_RETENTION = {"MALLOC_MMAP_THRESHOLD_": "65536"}

# Random-init Llama models (~20M and ~80M parameters).
MODELS = {
    "llama-20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=6, vocab_size=8000),
    "llama-80m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=16000),
}
ALL = ["query", "key", "value", "projection", "mlp"]
QV = ["query", "value"]


def configurations(quick: bool) -> list[dict]:
    """(model, dtype, quant, r, targets, optimizer) combinations."""
    runs = [
        ("tiny", "fp32", "none", 8, QV, "adamw"),
        ("tiny", "fp32", "none", 64, ALL, "adamw"),
        ("llama-20m", "fp32", "none", 8, QV, "adamw"),
        ("llama-20m", "fp32", "none", 64, ALL, "sgd"),
        ("llama-20m", "bf16", "none", 8, QV, "adamw"),
        ("llama-20m", "fp32", "nf4", 8, QV, "adamw"),
        ("llama-80m", "fp32", "none", 8, QV, "adamw"),
        ("llama-80m", "fp32", "none", 64, ALL, "adamw"),
        ("llama-80m", "fp32", "none", 8, QV, "sgd"),
        ("llama-80m", "bf16", "none", 64, ALL, "adamw"),
        ("llama-80m", "bf16", "nf4", 8, QV, "adamw"),
        ("llama-80m", "fp32", "nf4", 64, ALL, "adamw"),
    ]
    if quick:
        runs = runs[2:3] + runs[5:6] + runs[9:10]
    keys = ("model", "dtype", "quant", "r", "targets", "optimizer")
    return [dict(zip(keys, r, strict=True)) for r in runs]


def build_models(root: Path) -> dict[str, str]:
    """Save the random-init models (fp32 safetensors) and locate the tiny base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.estimate import resolve_model_config

    paths = {}
    try:
        paths["tiny"] = str(resolve_model_config("builtin:tiny").parent)
    except Exception:
        print("builtin:tiny not found; skipping it", file=sys.stderr)
    for name, dims in MODELS.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, tie_word_embeddings=False, **dims))
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


# ----------------------------------------------------------------------------- child process


def peak_rss() -> int:
    """Peak RSS of this process in bytes: VmHWM, the high-water mark of its own address space.

    ``ru_maxrss`` would do in a process started from a shell, but Linux carries it over
    from the forking parent across exec, and the driver has torch loaded; VmHWM starts
    afresh at exec. Both are reported."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_baseline() -> int:
    """Peak RSS (bytes) of a process that only imports torch, transformers and peft."""
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(1)
    return peak_rss()


def run_one(spec: dict) -> dict:
    """Load, wrap, train STEPS steps; return peak RSS after loading and at the end."""
    import resource

    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loralab.roles import head_module_name, linear_module_names, resolve_targets

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    kwargs = {"dtype": dtype}
    if spec["quant"] != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=spec["quant"], bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    model = AutoModelForCausalLM.from_pretrained(spec["path"], **kwargs)
    targets = resolve_targets(model_type=model.config.model_type, linear_names=linear_module_names(model),
                              head_name=head_module_name(model), targets=spec["targets"])
    lcfg = peft.LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=0.05, target_modules=targets.peft)
    model = peft.get_peft_model(model, lcfg)
    model.train()
    loaded = peak_rss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if spec["optimizer"] == "adamw" else torch.optim.SGD(params, lr=1e-3)
    vocab = model.config.vocab_size
    t0 = time.perf_counter()
    for _ in range(STEPS):
        ids = torch.randint(3, vocab, (MICRO, SEQ))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "peak_rss": peak_rss(),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load": loaded,
        "step_s": (time.perf_counter() - t0) / STEPS,
        "trainable_peft": model.get_nb_trainable_parameters()[0],
    }


# ----------------------------------------------------------------------------- driver


def child(args: list[str], env: dict | None = None) -> dict:
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False, env=full_env)
    if out.returncode != 0:
        raise RuntimeError(f"child {args[:1]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate_for(spec: dict):
    from loralab.config import config_from_dict
    from loralab.estimate import estimate_run

    cfg = config_from_dict({
        "model": {"path": spec["path"], "dtype": spec["dtype"], "device": "cpu"},
        "quant": {"mode": spec["quant"], "double_quant": True},
        "lora": {"r": spec["r"], "alpha": 2 * spec["r"], "dropout": 0.05, "targets": spec["targets"]},
        "train": {"optimizer": spec["optimizer"], "micro_batch_size": MICRO, "batch_size": MICRO},
        "data": {"max_seq_length": SEQ},
    })
    return estimate_run(cfg, device="cpu")


def table(rows: list[dict], baseline: int) -> str:
    mib = 1024**2
    lines = [
        f"Micro batch {MICRO} x {SEQ} tokens, {STEPS} steps, 1 thread, LoRA dropout 0.05. "
        f"Baseline RSS (torch+transformers+peft imported): {baseline / mib:.0f} MiB.",
        "",
        "Columns 'live': same run with MALLOC_MMAP_THRESHOLD_=65536 (no glibc heap retention) against the "
        "estimate without its allocator_slack part.",
        "",
        "| model | dtype | quant | r | targets | optim | trainable | estimate MiB | measured MiB | error % "
        "| live est. MiB | live meas. MiB | live error % | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['quant']} | {r['r']} | {'all' if r['targets'] == ALL else 'q,v'} "
            f"| {r['optimizer']} | {r['trainable']:,} | {r['estimate'] / mib:.0f} | {r['peak_rss'] / mib:.0f} "
            f"| {r['error_pct']:+.1f} | {r['live_estimate'] / mib:.0f} | {r['live_rss'] / mib:.0f} "
            f"| {r['live_error_pct']:+.1f} | {r['step_s']:.2f} |"
        )
    worst = max(abs(r["error_pct"]) for r in rows)
    worst_live = max(abs(r["live_error_pct"]) for r in rows)
    lines += ["", f"max |error|: {worst:.1f}% (default malloc), {worst_live:.1f}% (live, no heap retention)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        print(json.dumps({"baseline": measure_baseline()}))
        return
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    baseline = child(["--baseline"])["baseline"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp))
        for spec in configurations(args.quick):
            if spec["model"] not in paths:
                continue
            spec["path"] = paths[spec["model"]]
            measured = child(["--one", json.dumps(spec)])
            live = child(["--one", json.dumps(spec)], env=NO_HEAP_RETENTION)["peak_rss"]
            est = estimate_for(spec)
            total = est.memory_bytes["total"]
            live_est = total - est.memory_bytes["allocator_slack"]
            row = {**spec, **measured, "estimate": total, "parts": est.memory_bytes,
                   "trainable": est.trainable_params, "live_rss": live, "live_estimate": live_est,
                   "error_pct": 100 * (total - measured["peak_rss"]) / measured["peak_rss"],
                   "live_error_pct": 100 * (live_est - live) / live}
            assert row["trainable"] == measured["trainable_peft"], (row["trainable"], measured["trainable_peft"])
            rows.append(row)
            print(f"{spec['model']} {spec['dtype']} {spec['quant']} r={spec['r']} {spec['optimizer']}: "
                  f"estimate {total / 2**20:.0f} MiB, measured {measured['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr)
    text = table(rows, baseline)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "estimate.md").write_text(text + "\n", encoding="utf-8")
    for r in rows:
        r.pop("path", None)
    (RESULTS / "estimate.json").write_text(json.dumps({"baseline_rss": baseline, "rows": rows}, indent=2),
                                           encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
