"""Speed with loralab's defaults on instruction data of real lengths, against Trainer + PEFT.

    PYTHONPATH=src python bench/bench_user.py                      # 4 cases, 2 threads per side
    PYTHONPATH=src python bench/bench_user.py --cases cut256-mb8 --repeats 3
    PYTHONPATH=src python bench/bench_user.py --dtype fp32         # both sides in fp32
    PYTHONPATH=src python bench/bench_user.py --cases cut256-mb8 --compare train.compile=true --repeats 2

What a user meets: a ~50M-parameter random-init Llama saved with ``save_pretrained`` (the
shape of bench_speed.py's ``big`` model), Alpaca-style records whose token lengths follow real
instruction sets (median about 230 tokens, a tail past 1,000, see ``user_records``), cut at
256 or 1,024 tokens, LoRA r 8 on query and value, batch 8, micro batch 1 or 8. loralab runs
with only those settings written in its config: everything else (``model.dtype``, packing,
attention, ...) is its default. The reference, bench/reference_trainer.py (transformers.Trainer
+ PEFT set up the usual way), runs in the dtype loralab's ``auto`` resolved to on this
machine, so both sides train in the same precision; ``--dtype fp32`` puts both in fp32.

Each repeat runs loralab then the reference, back to back (interleaved), in their own
subprocesses with the same thread count; the bf16 and fp32 matmul ceilings are timed in the
same invocation. Useful tokens, useful FLOPs and the ceiling are defined as in
bench_speed.py. Results: printed, and written to bench/results/user_speed.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as bs  # noqa: E402 - the shared workers, model builder and FLOP formula

RESULTS = bs.REPO / "bench" / "results" / "user_speed.json"
BATCH, STEPS, LR = 8, 20, 2e-3
N_VAL = 16
CASES = ["cut256-mb8", "cut256-mb1", "cut1024-mb8", "cut1024-mb1"]
WORDS = ("the a of to and in is it for on with as at by from that this was are be or an light water wood door "
         "road field hill wind rain sun morning evening small large old new warm cold slowly carefully often always "
         "never first then later next before after because while river garden market bread stone paper clock "
         "bridge harbor tea lantern orchard winter boat").split()


def user_records(n: int, seed: int, *, median_tokens: float = 215, sigma: float = 0.75) -> list[dict]:
    """Alpaca-style records whose lengths are log-normal like real instruction sets: with the
    tiny base's tokenizer and the Alpaca template, median about 230 tokens, a tenth under 100,
    a tenth over 650, a few past 1,000 (up to 2,400). Deterministic for (n, seed)."""
    rng = random.Random(seed)

    def words(tokens: int) -> str:  # about 2.5 tokens per word with this tokenizer
        return " ".join(rng.choice(WORDS) for _ in range(max(1, int(tokens / 2.5))))

    out = []
    for _ in range(n):
        total = int(min(2400, max(20, math.exp(rng.gauss(math.log(median_tokens), sigma)))))
        prompt = max(8, int(total * rng.uniform(0.1, 0.4)))
        out.append({"instruction": "Write about " + words(min(prompt, 24)), "input": words(max(0, prompt - 24)),
                    "output": words(total - prompt)})
    return out


def worker_defaults(spec: dict) -> dict:
    """loralab's train() with only the settings a user would write; the rest are defaults."""
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    from loralab.config import apply_overrides, config_from_dict
    from loralab.train.loop import train

    model = {"path": spec["model"]}
    if spec["dtype"] != "auto":
        model["dtype"] = spec["dtype"]
    cfg = config_from_dict(apply_overrides({
        "model": model,
        "lora": {"r": 8, "targets": ["query", "value"]},
        "data": {"path": spec["train"], "val_path": spec["val"], "max_seq_length": spec["cut"]},
        "train": {"batch_size": BATCH, "micro_batch_size": spec["micro_batch"], "max_steps": spec["steps"], "lr": LR,
                  "warmup_steps": 0, "seed": spec["seed"], "log_every": 1000},
        "output": {"dir": spec["run_dir"], "save_adapter": False},
    }, spec.get("set") or []))  # --set: settings on top of the defaults
    s = train(cfg)
    return {"side": "loralab", "compiled": s["compiled"], "compile_reason": s["compile_reason"],
            "compile_time_s": s["compile_time_s"], "useful_tokens": s["tokens_seen"], "train_time_s": s["train_time_s"],
            "tokens_per_s": s["tokens_per_s"], "train_cpu_time_s": s["train_cpu_time_s"],
            "tokens_per_s_with_compile": s["tokens_seen"] / (s["train_time_s"] + s["compile_time_s"]),
            "tokens_per_cpu_s": s["tokens_seen"] / s["train_cpu_time_s"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "final_eval_loss": s["final_eval_loss"], "steps": s["steps"], "trainable_params": s["trainable_params"],
            "dtype": s.get("dtype"), "packed_attention": s.get("packed_attention")}


def run_pair(case: dict, spec: dict, work: Path, k: int) -> tuple[dict, dict]:
    ours = bs.run_worker("loralab-defaults", {**spec, "run_dir": str(work / f"{case['name']}-{k}")})
    ref = bs.run_worker("reference", {**spec, "dtype": case["ref_dtype"], "quant": "none", "steps": spec["steps"],
                                      "batch": BATCH, "lr": LR})
    return ours, ref


def compare(case: dict, spec: dict, work: Path, settings: list[str], repeats: int) -> dict:
    """loralab with ``settings`` on top against loralab without, interleaved, ``repeats`` pairs."""
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for k in range(repeats):
        for side, extra in (("without", []), ("with", settings)):
            run = bs.run_worker("loralab-defaults", {**spec, "set": [*spec["set"], *extra],
                                                     "run_dir": str(work / f"{case['name']}-{side}-{k}")})
            runs[side].append(run)
            how = f"compiled in {run['compile_time_s']:.1f} s" if run["compiled"] else "eager"
            print(f"{case['name']:<12} {side:<7} {' '.join(settings) if extra else 'defaults':<24} tok/s "
                  f"{run['tokens_per_s']:6.0f} (train {run['train_time_s']:.1f} s, {how})  eval "
                  f"{run['final_eval_loss']:.4f}", flush=True)
    ratios = [w["tokens_per_s"] / o["tokens_per_s"] for o, w in zip(runs["without"], runs["with"], strict=True)]
    print(f"{case['name']:<12} with / without: " + ", ".join(f"x{r:.2f}" for r in ratios), flush=True)
    return {**case, "compare": settings, "runs": runs, "pair_ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="loralab's model.dtype (auto: its default); the reference gets what it resolves to")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a loralab setting on top of the defaults, e.g. train.compile=true (repeatable)")
    ap.add_argument("--steps", type=int, default=STEPS,
                    help="optimizer steps per side (one epoch of 8 x steps records); from about 240 on, "
                         "train.compile auto compiles the 50M model (loralab.train.compiled.MIN_WORK)")
    ap.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                    help="no reference: loralab with these settings against loralab without them, interleaved "
                         "(each repeat runs both), e.g. --compare train.compile=true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = worker_defaults if args.worker == "loralab-defaults" else bs.worker_matmul
        Path(args.worker_out).write_text(json.dumps(fn(json.loads(args.spec))))
        return
    bs.THREADS = args.threads
    bs.WORKER_SCRIPT = __file__
    from loralab.models import dtype_choice

    ref_dtype, why = dtype_choice(args.dtype, "cpu")
    print(f"loralab model.dtype {args.dtype} -> {ref_dtype} ({why}); the reference trains in {ref_dtype}")
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="loralab-bench-user-") as tmp:
        work = Path(tmp)
        model = str(bs.build_big_model(work / "model"))
        train, val = work / "train.jsonl", work / "val.jsonl"
        for path, records in ((train, user_records(BATCH * args.steps, 1)), (val, user_records(N_VAL, 2))):
            path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        config = json.loads((Path(model) / "config.json").read_text())
        h = config["hidden_size"]
        shapes = [[t, h, f * h] for t in (512, 2048) for f in (1, 3)]
        ceilings = {d: bs.run_worker("matmul", {"dtype": d, "shapes": shapes, "threads": args.threads})
                    for d in ("bf16", "fp32")}
        for d, c in ceilings.items():
            print(f"matmul ceiling {d}: {c['best_flops'] / 1e9:.0f} GFLOP/s wall, {c['best_flops_cpu'] / 1e9:.0f} per "
                  f"CPU-s ({args.threads} threads)", flush=True)
        for name in args.cases.split(","):
            cut, mb = (int(x) for x in name.removeprefix("cut").split("-mb"))
            lengths = bs.example_lengths(model, train, val, max_len=cut)  # the examples loralab trains on, cut
            case = {"name": name, "cut": cut, "micro_batch": mb, "ref_dtype": ref_dtype,
                    "lengths": {"median": sorted(lengths)[len(lengths) // 2], "max": max(lengths),
                                "n": len(lengths)}}
            spec = {"model": model, "train": str(train), "val": str(val), "dtype": args.dtype, "cut": cut,
                    "max_len": cut, "micro_batch": mb, "seed": 1337, "threads": args.threads, "set": args.set,
                    "steps": args.steps}
            if args.compare:
                rows.append(compare(case, spec, work, args.compare, args.repeats))
                continue
            load_before = bs.load_avg()
            pairs = [run_pair(case, spec, work, k) for k in range(args.repeats)]
            ours, ref = bs.median_run([o for o, _ in pairs]), bs.median_run([f for _, f in pairs])
            flops = bs.useful_flops(config, lengths, ours["trainable_params"])
            for side in (ours, ref):
                side["pct_of_bf16_ceiling"] = 100 * flops / side["train_time_s"] / ceilings["bf16"]["best_flops"]
                side["pct_of_fp32_ceiling"] = 100 * flops / side["train_time_s"] / ceilings["fp32"]["best_flops"]
            row = {**case, "loralab": ours, "reference": ref, "useful_flops": flops,
                   "speed_ratio": ours["tokens_per_s"] / ref["tokens_per_s"],
                   "speed_ratio_cpu": ours["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"],
                   "speed_ratio_with_compile": ours["tokens_per_s_with_compile"] / ref["tokens_per_s"],
                   "pair_ratios": [o["tokens_per_s"] / f["tokens_per_s"] for o, f in pairs],
                   "load_avg_before": load_before, "load_avg_after": bs.load_avg()}
            rows.append(row)
            how = f"compiled in {ours['compile_time_s']:.1f} s" if ours["compiled"] else "eager"
            print(f"{name:<12} tok/s {ours['tokens_per_s']:6.0f} vs {ref['tokens_per_s']:6.0f} "
                  f"x{row['speed_ratio']:.2f} ({how}; x{row['speed_ratio_with_compile']:.2f} with the compile time) "
                  f"(per CPU-s x{row['speed_ratio_cpu']:.2f})  {ref_dtype} ceiling% "
                  f"{ours[f'pct_of_{ref_dtype}_ceiling']:4.1f} vs {ref[f'pct_of_{ref_dtype}_ceiling']:4.1f}  "
                  f"eval {ours['final_eval_loss']:.4f} vs "
                  f"{ref['final_eval_loss']:.4f}  "
                  f"load {row['load_avg_after']}", flush=True)
    from loralab.train.measure import versions

    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": args.threads,
              "repeats": args.repeats, "dtype": args.dtype, "set": args.set, "resolved_dtype": ref_dtype, "why": why,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "versions": versions(),
              "batch": BATCH, "steps": args.steps, "lr": LR, "model": bs.BIG, "matmul_ceilings": ceilings,
              "cases": rows,
              "total_wall_s": time.perf_counter() - t_start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
