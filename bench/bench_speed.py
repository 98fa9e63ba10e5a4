"""loralab against transformers.Trainer + PEFT: useful tokens/s, wall time, memory, loss, FLOP/s.

    PYTHONPATH=src python bench/bench_speed.py            # --quick: a few cases, minutes on 2 cores
    PYTHONPATH=src python bench/bench_speed.py --full     # model x micro batch x dtype x quant
    PYTHONPATH=src python bench/bench_speed.py --cases tiny-fp32-lora-mb1,big-bf16-nf4-mb8

Every case runs each side in its own subprocess (so the peak RSS is its own): loralab's
``train(cfg)`` with data.packing on, and bench/reference_trainer.py. Both see the same
tokenized examples, the same global batch, AdamW settings, lr schedule, number of optimizer
steps (exactly one epoch, so both consume the same examples and the same useful tokens) and
dtype. Results are printed and written to bench/results/speed.json.

Definitions (identical for both sides):

* useful tokens/s = non-padding tokens of the training examples fed to the model / time of
  the training loop (model loading and the final evaluation excluded; the wall time of the
  whole subprocess is reported beside it).
* final eval loss = mean cross-entropy per response token on the same validation examples,
  scored by loralab's evaluate_loss for both sides.
* useful FLOPs per example of n tokens =
  4 * N_mm * n                       (forward 2N plus backward to the activations 2N; frozen
                                      weights get no weight gradient)
  + 6 * N_lora * n                   (LoRA A and B: forward, input and weight gradients)
  + 12 * L * H * d_head * n(n+1)/2   (causal attention QK^T and AV, 4 FLOPs per key per
                                      head-dim forward, twice that backward, over the keys
                                      each token may see inside its own example)
  where N_mm counts the weights of the decoder's linear layers plus the output head. Work
  spent on padding or on attention across masked-out blocks is not counted: the figure is
  what any implementation has to do.
* matmul ceiling = the best FLOP/s of torch.matmul over representative shapes (tokens x
  hidden by hidden x hidden / intermediate) in the run's compute dtype, timed in this
  invocation with the same thread count.

Every rate is given twice: per wall second and per CPU second of the training process
(time.process_time). On a machine shared with other jobs the wall figures mostly measure
the other jobs; with one thread (the default) the per-CPU-second figures are the steady
ones, so the headline ratio and ceiling percentage use them. ``--threads 2`` on a quiet
machine gives the two-core wall figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "speed.json"
WORKER_SCRIPT = __file__  # the script whose --worker runs loralab's side (bench_user.py sets its own)
REPEATS = 1  # --repeats: runs of each side per case
THREADS = 1  # --threads; one by default: on a machine shared with other jobs a second thread mostly adds spin-waiting
GLOBAL_BATCH = 16
# transformers starts its warmup at lr 0 on the first step, loralab at lr/warmup: none on either side keeps the
# schedules equal
WARMUP = 0
LR = 2e-3  # high enough that an 8-step run moves the eval loss, so "same loss" means something
MAX_LEN = 512
# the larger random-init Llama: 10 layers of 640, ~50M parameters, the tiny base's tokenizer
BIG = dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=10, num_attention_heads=10,
           num_key_value_heads=10, max_position_embeddings=1024)
N_TRAIN = {"tiny": 128, "big": 48}  # one epoch = N_TRAIN / 16 optimizer steps
N_VAL = 64

QUICK = ["tiny-fp32-lora-mb1", "tiny-fp32-lora-mb8", "big-fp32-lora-mb8"]
SPREAD_CASE, SPREAD_SEEDS = "tiny-fp32-lora-mb8", [1337, 1338, 1339]


def all_cases() -> list[str]:
    return [f"{m}-{d}-{q}-mb{mb}" for m in ("tiny", "big") for d in ("fp32", "bf16")
            for q in ("lora", "nf4") for mb in (1, 8)]


def parse_case(name: str) -> dict:
    model, dtype, quant, mb = name.split("-")
    return {"name": name, "model": model, "dtype": dtype, "quant": "none" if quant == "lora" else "nf4",
            "micro_batch": int(mb.removeprefix("mb"))}


# ----------------------------------------------------------------------------- data and models


def bench_records(n: int, seed: int) -> list[dict]:
    """Instructions about loralab's generated world whose responses run from a few tokens (a
    capital's name) through one sentence and short stories to reports of a few hundred tokens
    (several countries' facts). Deterministic for (n, seed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "build_assets"))
    import synth  # the generators behind the shipped assets (build-time code, not in the package)

    world = synth.make_world()
    facts = synth._facts(world)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            _k, question, _s, answer = rng.choice(facts)
            out.append({"instruction": question, "input": "", "output": answer})
        elif kind < 0.55:
            _k, question, sentence, _a = rng.choice(facts)
            out.append({"instruction": question + " Answer in a sentence.", "input": "", "output": sentence})
        elif kind < 0.75:
            out.append({"instruction": "Tell me a short story about someone in the world.", "input": "",
                        "output": synth._story(rng, world)})
        else:
            cs = rng.sample(world.countries, rng.randint(1, 3))
            text = " ".join(" ".join(synth._fact_sentences(rng, world, c)) for c in cs)
            out.append({"instruction": "Write a report on " + ", ".join(c.name for c in cs) + ".", "input": "",
                        "output": text})
    return out


def write_data(root: Path) -> dict[str, Path]:
    paths = {}
    for name, n, seed in (("tiny", N_TRAIN["tiny"], 1), ("big", N_TRAIN["big"], 1), ("val", N_VAL, 2)):
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in bench_records(n, seed)), encoding="utf-8")
        paths[name] = p
    return paths


def build_llama(out: Path, dims: dict) -> Path:
    """A random-init Llama of ``dims`` saved with save_pretrained, with the tiny base's tokenizer
    and vocabulary (the benches' user models)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loralab.models import BUILTIN_MODELS

    tiny = BUILTIN_MODELS["builtin:tiny"]
    base = json.loads((tiny / "config.json").read_text())
    cfg = LlamaConfig(vocab_size=base["vocab_size"], bos_token_id=base["bos_token_id"],
                      eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
                      tie_word_embeddings=True, **dims)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, out / name)
    return out


def build_big_model(out: Path) -> Path:
    return build_llama(out, BIG)


def example_lengths(model_path: str, train: Path, val: Path, *, max_len: int = MAX_LEN) -> list[int]:
    from loralab.config import DataConfig
    from loralab.data.dataset import load_splits
    from loralab.models import load_tokenizer

    tok = load_tokenizer(model_path)
    splits = load_splits(DataConfig(path=str(train), val_path=str(val), max_seq_length=max_len), tok, seed=0)
    return [len(e.input_ids) for e in splits.train]


def useful_flops(config: dict, lengths: list[int], n_lora: int) -> float:
    """The module docstring's formula over one epoch of examples of these lengths."""
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or d // heads
    n_mm = layers * (2 * d * heads * hd + 2 * d * kv * hd + 3 * d * inter) + config["vocab_size"] * d
    tokens = sum(lengths)
    attention = 12 * layers * heads * hd * sum(n * (n + 1) // 2 for n in lengths)
    return 4 * n_mm * tokens + 6 * n_lora * tokens + attention


# ----------------------------------------------------------------------------- workers (subprocesses)


def worker_loralab(spec: dict) -> dict:
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    from loralab.config import config_from_dict
    from loralab.train.loop import train

    cfg = config_from_dict({
        "model": {"path": spec["model"], "dtype": spec["dtype"], "device": "cpu"},
        "quant": {"mode": spec["quant"], "compute_dtype": spec["dtype"]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["query", "value"]},
        "data": {"path": spec["train"], "val_path": spec["val"], "max_seq_length": MAX_LEN,
                 "val_max_examples": 10_000, "packing": spec["packing"]},
        "train": {"batch_size": GLOBAL_BATCH, "micro_batch_size": spec["micro_batch"], "max_steps": spec["steps"],
                  "lr": LR, "warmup_steps": WARMUP, "scheduler": "cosine", "seed": spec["seed"], "log_every": 1000},
        "output": {"dir": spec["run_dir"], "save_adapter": False},
    })
    s = train(cfg)
    return {"side": "loralab", "useful_tokens": s["tokens_seen"], "train_time_s": s["train_time_s"],
            "tokens_per_s": s["tokens_per_s"], "train_cpu_time_s": s["train_cpu_time_s"],
            "tokens_per_cpu_s": s["tokens_seen"] / s["train_cpu_time_s"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "final_eval_loss": s["final_eval_loss"], "steps": s["steps"], "trainable_params": s["trainable_params"],
            "packed_attention": s["packed_attention"]}


def worker_matmul(spec: dict) -> dict:
    """Best torch.matmul FLOP/s over the given (m, k, n) shapes in one dtype."""
    import torch

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    best, best_cpu, per_shape = 0.0, 0.0, {}
    for m, k, n in spec["shapes"]:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b)
        reps, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.process_time() - c0 < 0.5:
            torch.matmul(a, b)
            reps += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        per_shape[f"{m}x{k}x{n}"] = {"flops_per_s": 2 * m * k * n * reps / wall,
                                     "flops_per_cpu_s": 2 * m * k * n * reps / cpu}
        best = max(best, per_shape[f"{m}x{k}x{n}"]["flops_per_s"])
        best_cpu = max(best_cpu, per_shape[f"{m}x{k}x{n}"]["flops_per_cpu_s"])
    return {"dtype": spec["dtype"], "best_flops": best, "best_flops_cpu": best_cpu, "per_shape": per_shape}


def run_worker(kind: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(THREADS)}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    if kind == "reference":
        cmd = [sys.executable, str(REPO / "bench" / "reference_trainer.py"), "--model", spec["model"],
               "--train", spec["train"], "--val", spec["val"], "--dtype", spec["dtype"], "--quant", spec["quant"],
               "--micro-batch", str(spec["micro_batch"]), "--batch", str(spec.get("batch", GLOBAL_BATCH)),
               "--steps", str(spec["steps"]), "--lr", str(spec.get("lr", LR)), "--warmup", str(WARMUP),
               "--max-len", str(spec.get("max_len", MAX_LEN)), "--seed", str(spec["seed"]),
               "--threads", str(THREADS), "--out", str(out)]
    else:
        cmd = [sys.executable, WORKER_SCRIPT, "--worker", kind, "--spec", json.dumps(spec), "--worker-out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    result["wall_s"] = wall
    return result


# ----------------------------------------------------------------------------- the benchmark


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_case(case: dict, paths: dict, models: dict, ceilings: dict, work: Path, seed: int = 1337) -> dict:
    steps = N_TRAIN[case["model"]] // GLOBAL_BATCH
    spec = {"model": models[case["model"]], "train": str(paths[case["model"]]), "val": str(paths["val"]),
            "dtype": case["dtype"], "quant": case["quant"], "micro_batch": case["micro_batch"], "steps": steps,
            "seed": seed, "threads": THREADS, "packing": True}
    load_before = load_avg()
    # Each repeat runs both sides back to back, so a burst of load on the shared machine hits
    # both; each side reports its median-speed repeat, the ratio range covers every pair.
    pairs = [(run_worker("loralab", {**spec, "run_dir": str(work / f"{case['name']}-{seed}-{k}")}),
              run_worker("reference", spec)) for k in range(REPEATS)]
    ours = median_run([o for o, _ in pairs])
    ref = median_run([f for _, f in pairs])
    pair_ratios = [o["tokens_per_cpu_s"] / f["tokens_per_cpu_s"] for o, f in pairs]
    cfg = json.loads((Path(models[case["model"] + "_dir"]) / "config.json").read_text())
    lengths = models[case["model"] + "_lengths"]
    flops = useful_flops(cfg, lengths, ours["trainable_params"])
    ceiling, ceiling_cpu = ceilings[case["dtype"]]["best_flops"], ceilings[case["dtype"]]["best_flops_cpu"]
    for side in (ours, ref):
        side["useful_flops_per_s"] = flops / side["train_time_s"]
        side["useful_flops_per_cpu_s"] = flops / side["train_cpu_time_s"]
        side["pct_of_matmul_ceiling"] = 100 * side["useful_flops_per_s"] / ceiling
        side["pct_of_matmul_ceiling_cpu"] = 100 * side["useful_flops_per_cpu_s"] / ceiling_cpu
    return {**case, "seed": seed, "steps": steps, "global_batch": GLOBAL_BATCH, "train_examples": len(lengths),
            "useful_tokens_expected": sum(lengths), "useful_flops": flops, "matmul_ceiling_flops": ceiling,
            "matmul_ceiling_flops_cpu": ceiling_cpu,
            "loralab": ours, "reference": ref, "speed_ratio": ours["tokens_per_s"] / ref["tokens_per_s"],
            "speed_ratio_cpu": ours["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"],
            "eval_loss_diff": ours["final_eval_loss"] - ref["final_eval_loss"],
            "repeats": REPEATS, "pair_ratios_cpu": pair_ratios,
            "load_avg_before": load_before, "load_avg_after": load_avg()}


def median_run(runs: list[dict]) -> dict:
    """The run with the median useful tokens per CPU second (the lower middle one of an even count),
    with every repeat's rate beside it."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_cpu_s"])
    return {**ordered[(len(ordered) - 1) // 2], "tokens_per_cpu_s_repeats": [r["tokens_per_cpu_s"] for r in runs],
            "tokens_per_s_repeats": [r["tokens_per_s"] for r in runs]}


def print_row(r: dict) -> None:
    o, f = r["loralab"], r["reference"]
    print(f"{r['name']:<20} tok/cpu-s {o['tokens_per_cpu_s']:6.0f} vs {f['tokens_per_cpu_s']:6.0f} "
          f"x{r['speed_ratio_cpu']:.2f}  "
          f"tok/s {o['tokens_per_s']:6.0f} vs {f['tokens_per_s']:6.0f} x{r['speed_ratio']:.2f}  "
          f"wall {o['wall_s']:6.1f}s vs {f['wall_s']:6.1f}s  rss {o['peak_rss_bytes'] / 2**20:5.0f} vs "
          f"{f['peak_rss_bytes'] / 2**20:5.0f} MiB  eval {o['final_eval_loss']:.4f} vs {f['final_eval_loss']:.4f}  "
          f"ceiling% (cpu) {o['pct_of_matmul_ceiling_cpu']:4.1f} vs {f['pct_of_matmul_ceiling_cpu']:4.1f}  "
          f"load {r['load_avg_after']}"
          + (f"  pair ratios {min(r['pair_ratios_cpu']):.2f}-{max(r['pair_ratios_cpu']):.2f}"
             if r["repeats"] > 1 else ""),
          flush=True)


def judge_losses(rows: list[dict], tolerance: float) -> None:
    """Mark each case whose two final eval losses differ by more than the seed-to-seed spread:
    speed bought with quality does not count, so such a case is called out, not just printed."""
    for r in rows:
        gap = r["loralab"]["final_eval_loss"] - r["reference"]["final_eval_loss"]
        r["eval_loss_gap"], r["eval_loss_agrees"] = gap, abs(gap) <= tolerance
    bad = [r["name"] for r in rows if not r["eval_loss_agrees"]]
    print(f"eval losses agree within the seed spread ({tolerance:.4f}) in {len(rows) - len(bad)} of {len(rows)} cases"
          + (f"; DISAGREE: {', '.join(bad)}" if bad else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help=f"the default: {', '.join(QUICK)} + the seed spread")
    group.add_argument("--full", action="store_true", help="all 16 cases + the seed spread")
    group.add_argument("--cases", help="comma-separated case names, e.g. tiny-bf16-nf4-mb8")
    ap.add_argument("--no-spread", action="store_true", help="skip the 3-seed spread measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side (default 1)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each side per case, interleaved; the median is reported")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=["loralab", "matmul"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = worker_loralab if args.worker == "loralab" else worker_matmul
        Path(args.worker_out).write_text(json.dumps(fn(json.loads(args.spec))))
        return

    global THREADS, REPEATS
    THREADS, REPEATS = args.threads, args.repeats
    names = all_cases() if args.full else (args.cases.split(",") if args.cases else QUICK)
    unknown = [n for n in names if n not in all_cases()]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(all_cases())}")
    cases = [parse_case(n) for n in names]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loralab-bench-") as tmp:
        work = Path(tmp)
        paths = write_data(work)
        models = {"tiny": "builtin:tiny"}
        from loralab.models import BUILTIN_MODELS

        models["tiny_dir"] = str(BUILTIN_MODELS["builtin:tiny"])
        if any(c["model"] == "big" for c in cases):
            models["big"] = models["big_dir"] = str(build_big_model(work / "big-model"))
        for m in ("tiny", "big"):
            if m in models:
                models[m + "_lengths"] = example_lengths(models[m], paths[m], paths["val"])
        hidden = {json.loads((Path(models[m + "_dir"]) / "config.json").read_text())["hidden_size"]
                  for m in ("tiny", "big") if m in models}
        shapes = [[t, h, f * h] for t in (512, 2048) for h in sorted(hidden) for f in (1, 3)]
        ceilings = {d: run_worker("matmul", {"dtype": d, "shapes": shapes, "threads": THREADS})
                    for d in sorted({c["dtype"] for c in cases})}
        for d, c in ceilings.items():
            print(f"matmul ceiling {d}: {c['best_flops_cpu'] / 1e9:.1f} GFLOP per CPU-s, "
                  f"{c['best_flops'] / 1e9:.1f} GFLOP/s wall ({THREADS} threads)", flush=True)
        rows = []
        for case in cases:
            rows.append(run_case(case, paths, models, ceilings, work))
            print_row(rows[-1])
        spread = None
        if not args.no_spread:
            case = parse_case(SPREAD_CASE)
            ceilings.setdefault("fp32", run_worker("matmul", {"dtype": "fp32", "shapes": shapes, "threads": THREADS}))
            runs = [next((r for r in rows if r["name"] == SPREAD_CASE and r["seed"] == s), None)
                    or run_case(case, paths, models, ceilings, work, seed=s) for s in SPREAD_SEEDS]
            ours = [r["loralab"]["final_eval_loss"] for r in runs]
            refs = [r["reference"]["final_eval_loss"] for r in runs]
            spread = {"case": SPREAD_CASE, "seeds": SPREAD_SEEDS, "loralab_eval_loss": ours,
                      "reference_eval_loss": refs,
                      "loralab_range": max(ours) - min(ours), "reference_range": max(refs) - min(refs),
                      "mean_diff": sum(ours) / len(ours) - sum(refs) / len(refs)}
            spread["tolerance"] = max(spread["loralab_range"], spread["reference_range"])
            spread["agree"] = abs(spread["mean_diff"]) <= spread["tolerance"]
            print(f"seed spread on {SPREAD_CASE}: loralab {[f'{x:.4f}' for x in ours]} reference "
                  f"{[f'{x:.4f}' for x in refs]}; mean diff {spread['mean_diff']:+.4f}, "
                  f"spread {spread['tolerance']:.4f}")
            judge_losses(rows, spread["tolerance"])
    import platform

    from loralab.train.measure import versions

    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": THREADS, "repeats": REPEATS,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "versions": versions(),
              "global_batch": GLOBAL_BATCH, "lr": LR, "max_seq_length": MAX_LEN, "big_model": BIG,
              "matmul_ceilings": ceilings, "cases": rows, "seed_spread": spread,
              "total_wall_s": time.perf_counter() - t_start, "load_avg_end": load_avg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
