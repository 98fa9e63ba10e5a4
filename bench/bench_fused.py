"""Benchmark (not a test): K LoRA runs trained fused over one base against the same K runs
one after another, on this machine's CPU (2 threads).

Every measurement runs in a fresh Python process and is timed from outside it, so both sides
include interpreter start, imports, model loading and the final evaluation:

- fused: one process calls train_fused(K configs);
- sequential, in-process: one process calls train(cfg) K times (imports paid once, the base
  loaded K times);
- sequential, subprocesses: K `python -m loralab.cli train` processes one after another
  (what a study without --fuse pays per run).

The two main sides are repeated and interleaved (fused, sequential, fused, ...) so a load
spike from other processes on a shared machine hits both; medians are reported. Peak memory
is each process's VmHWM (/proc/self/status), for fused groups of K = 1, 2, 4, 8.
Results: printed and written to bench/results/fused.json.

    PYTHONPATH=src .venv/bin/python bench/bench_fused.py           # tiny base, K = 8, + larger model
    PYTHONPATH=src .venv/bin/python bench/bench_fused.py --quick   # fewer steps, no larger model
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
THREADS = 2
ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
       "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}

# A rank x learning-rate grid: what a study's runs differ in.
GRID = [dict(r=r, alpha=2.0 * r, lr=lr) for r in (2, 4, 8, 16) for lr in (1e-3, 3e-3)]

# The larger case: a random-init Llama of about 25M parameters with the tiny base's tokenizer.
LARGER = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=512, vocab_size=1276,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)


def run_configs(model: str, out: Path, k: int, *, steps: int) -> list[dict]:
    """K configs differing in r, alpha and lr; micro batch 1, global batch 4."""
    cfgs = []
    for i, g in enumerate(GRID[:k]):
        cfgs.append({
            "model": {"path": model, "device": "cpu"},
            "lora": {"r": g["r"], "alpha": g["alpha"], "targets": ["query", "value"]},
            "data": {"path": "builtin:arithmetic", "val_max_examples": 32},
            "train": {"lr": g["lr"], "batch_size": 4, "micro_batch_size": 1, "max_steps": steps,
                      "warmup_steps": 2, "log_every": 5},
            "output": {"dir": str(out / f"run{i}")},
        })
    return cfgs


def child(mode: str, spec: Path) -> None:
    """Inside a fresh process: train the configs of ``spec`` and print what was measured."""
    import torch

    torch.set_num_threads(THREADS)
    from loralab.config import config_from_dict
    from loralab.train.fused import train_fused
    from loralab.train.loop import train

    t0 = time.perf_counter()
    cfgs = [config_from_dict(c) for c in json.loads(spec.read_text())]
    if mode == "fused":
        summaries = train_fused(cfgs)
    else:
        summaries = [train(c) for c in cfgs]
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    print("RESULT " + json.dumps({
        "in_process_s": time.perf_counter() - t0,
        "peak_rss_mib": hwm_kib / 1024,
        "final_eval_loss": [s["final_eval_loss"] for s in summaries],
        "tokens_seen": [s["tokens_seen"] for s in summaries],
    }))


def spawn(args: list[str]) -> tuple[float, dict | None]:
    """Wall seconds of a fresh process and its RESULT line, with ``cpu_s``: the CPU seconds the
    process used (user + system, imports included), steadier than wall time on a shared machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, {**(json.loads(lines[-1][7:]) if lines else {}), "cpu_s": cpu}


def measure(mode: str, model: str, k: int, steps: int, tmp: Path, tag: str) -> dict:
    out = tmp / tag
    spec = tmp / f"{tag}.json"
    spec.write_text(json.dumps(run_configs(model, out, k, steps=steps)))
    wall, res = spawn([__file__, "--child", mode, str(spec)])
    return {"wall_s": wall, **res}  # res has cpu_s


def measure_cli(model: str, k: int, steps: int, tmp: Path, tag: str) -> dict:
    """K `loralab train` processes one after another."""
    import yaml

    total, cpu, losses = 0.0, 0.0, []
    for i, cfg in enumerate(run_configs(model, tmp / tag, k, steps=steps)):
        path = tmp / f"{tag}-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        wall, res = spawn(["-m", "loralab.cli", "train", str(path)])
        total, cpu = total + wall, cpu + res["cpu_s"]
        losses.append(json.loads((Path(cfg["output"]["dir"]) / "summary.json").read_text())["final_eval_loss"])
    return {"wall_s": total, "cpu_s": cpu, "final_eval_loss": losses}


def compare(model: str, name: str, *, k: int, steps: int, repeats: int, tmp: Path, cli: bool) -> dict:
    fused, seq = [], []
    for rep in range(repeats):
        fused.append(measure("fused", model, k, steps, tmp, f"{name}-fused-{rep}"))
        seq.append(measure("sequential", model, k, steps, tmp, f"{name}-seq-{rep}"))
        print(f"  {name} repeat {rep}: fused {fused[-1]['wall_s']:.1f} s ({fused[-1]['cpu_s']:.1f} CPU s), "
              f"sequential {seq[-1]['wall_s']:.1f} s ({seq[-1]['cpu_s']:.1f} CPU s)", flush=True)
    f_wall = statistics.median(r["wall_s"] for r in fused)
    s_wall = statistics.median(r["wall_s"] for r in seq)
    f_cpu = statistics.median(r["cpu_s"] for r in fused)
    s_cpu = statistics.median(r["cpu_s"] for r in seq)
    diff = max(abs(a - b) / abs(b) for a, b in zip(fused[0]["final_eval_loss"], seq[0]["final_eval_loss"], strict=True))
    row = {
        "case": name, "model": model, "k": k, "steps": steps, "micro_batch": 1, "batch": 4, "repeats": repeats,
        "fused_wall_s": f_wall, "sequential_in_process_wall_s": s_wall, "speedup_vs_in_process": s_wall / f_wall,
        "fused_cpu_s": f_cpu, "sequential_in_process_cpu_s": s_cpu, "cpu_speedup_vs_in_process": s_cpu / f_cpu,
        "fused_walls": [r["wall_s"] for r in fused], "sequential_walls": [r["wall_s"] for r in seq],
        "fused_peak_rss_mib": fused[0]["peak_rss_mib"], "sequential_peak_rss_mib": seq[0]["peak_rss_mib"],
        "final_eval_loss_fused": fused[0]["final_eval_loss"], "final_eval_loss_sequential": seq[0]["final_eval_loss"],
        "max_rel_eval_loss_difference": diff,
    }
    if cli:
        c = measure_cli(model, k, steps, tmp, f"{name}-cli")
        row["sequential_cli_wall_s"] = c["wall_s"]
        row["speedup_vs_cli"] = c["wall_s"] / f_wall
        row["sequential_cli_cpu_s"] = c["cpu_s"]
        row["cpu_speedup_vs_cli"] = c["cpu_s"] / f_cpu
        print(f"  {name}: {k} loralab train processes {c['wall_s']:.1f} s ({c['cpu_s']:.1f} CPU s)", flush=True)
    return row


def memory_growth(model: str, steps: int, tmp: Path) -> list[dict]:
    rows = []
    for k in (1, 2, 4, 8):
        r = measure("fused", model, k, steps, tmp, f"mem-{k}")
        rows.append({"k": k, "peak_rss_mib": r["peak_rss_mib"], "wall_s": r["wall_s"]})
        print(f"  K={k}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.1f} s", flush=True)
    return rows


def build_larger(out: Path) -> Path:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loralab.models import BUILTIN_MODELS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LARGER))
    model.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN_MODELS["builtin:tiny"] / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats, no larger model")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    steps = args.steps or (10 if args.quick else 30)
    repeats = args.repeats or (1 if args.quick else 3)
    result = {"threads": THREADS, "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": []}
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as d:
        tmp = Path(d)
        print(f"tiny base, K = 8, micro batch 1, {steps} steps", flush=True)
        result["cases"].append(compare("builtin:tiny", "tiny", k=8, steps=steps, repeats=repeats, tmp=tmp, cli=True))
        print("memory growth with K (tiny base)", flush=True)
        result["memory_vs_k"] = memory_growth("builtin:tiny", max(5, steps // 3), tmp)
        if not args.quick:
            larger = build_larger(tmp / "llama-25m")
            print("random-init Llama ~25M, K = 8", flush=True)
            result["cases"].append(compare(str(larger), "llama-25m", k=8, steps=max(5, steps // 3), repeats=1,
                                           tmp=tmp, cli=False))
    result["load_average_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fused.json").write_text(json.dumps(result, indent=2))
    print("\n| case | K | steps | fused s | sequential (in-process) s | speedup | "
          "sequential (`loralab train` each) s | speedup |"
          " speedup in CPU s (in-process / `loralab train` each) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in result["cases"]:
        cli = (f"{c['sequential_cli_wall_s']:.1f} | {c['speedup_vs_cli']:.2f}x" if "sequential_cli_wall_s" in c
               else "- | -")
        print(f"| {c['case']} | {c['k']} | {c['steps']} | {c['fused_wall_s']:.1f} | "
              f"{c['sequential_in_process_wall_s']:.1f} | "
              f"{c['speedup_vs_in_process']:.2f}x | {cli} | {c['cpu_speedup_vs_in_process']:.2f}x / "
              f"{c.get('cpu_speedup_vs_cli', float('nan')):.2f}x |")
    print("\n| K | peak RSS MiB |\n|---|---|")
    for m in result["memory_vs_k"]:
        print(f"| {m['k']} | {m['peak_rss_mib']:.0f} |")
    print(f"\nwritten to {RESULTS / 'fused.json'}")


if __name__ == "__main__":
    main()
