"""Benchmark (not a test): a fused group's estimated memory against its measured peak, CPU.

For each (model, K, r) a fresh Python process trains K runs as one fused group
(``loralab.train.fused.train_fused``) with loralab's defaults (``model.dtype: auto``,
``data.packing: auto``) on instruction data of realistic lengths (tests/userdata.py: records
of tens to hundreds of tokens, cut at 256), and reports the peak memory its summary.json
records (``peak_memory_bytes``: the process's peak RSS). Beside it: the scheduler's group
estimate (``loralab.study.scheduler.group_memory`` over each run's ``estimate_run``), what a
study sizes its groups with. The driver imports no torch, so a worker's peak RSS is its own.

    PYTHONPATH=src python bench/bench_fused_memory.py             # tiny base and a user model, K 1/2/4/8, r 8/64
    PYTHONPATH=src python bench/bench_fused_memory.py --quick     # user model, K 1 and 4, r 8
    PYTHONPATH=src python bench/bench_fused_memory.py --models user-12m --ranks 8 --ks 1,8 --steps 6 --threads 2

The last column, training seconds per run and step (the group's training time over K x steps),
is flat in K when a group costs each run what a solo run costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MICRO, SEQ, STEPS, N_TRAIN = 8, 256, 3, 64
CPU = {"model": {"device": "cpu"}}  # what group_memory reads of a run's config
# a random-init Llama saved with save_pretrained, wide enough that model.dtype auto is bf16 on a
# CPU with AMX/AVX512-BF16 (hidden >= 512), with the tiny base's tokenizer
USER = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=1024)


def build_user_model(out: Path) -> Path:
    from bench_speed import build_llama

    return build_llama(out, USER)


def configs(spec: dict):
    from loralab.config import load_config

    out = []
    for k in range(spec["K"]):
        items = {"model.path": spec["model"], "model.device": "cpu", "data.path": spec["data"],
                 "data.val_max_examples": 8, "data.max_seq_length": SEQ, "train.max_steps": spec["steps"],
                 "train.batch_size": MICRO, "train.micro_batch_size": MICRO, "train.lr": 1e-3 * (k + 1),
                 "eval.every": 0, "lora.r": spec["r"], "lora.targets": spec["targets"],
                 "output.dir": str(Path(spec["out"]) / f"run{k}")}
        out.append(load_config(None, [f"{key}={value}" for key, value in items.items()]))
    return out


def worker(spec: dict) -> dict:
    """Train the group; its recorded peak and the estimates of its runs."""
    import torch

    from loralab.estimate import GROUP_SHARED_PARTS, estimate_run
    from loralab.study.scheduler import PendingRun, group_memory
    from loralab.train.fused import train_fused
    from loralab.train.step import fullest_micro_batch

    torch.set_num_threads(spec["threads"])
    cfgs = configs(spec)
    baseline = peak_rss()
    summaries = train_fused(cfgs) if spec["K"] > 1 else [_solo(cfgs[0])]
    tokens = fullest_micro_batch(cfgs[0])  # the same data and order for every run of the group
    ests = [estimate_run(c, device="cpu", tokens=tokens) for c in cfgs]
    tasks = [PendingRun(k, f"r{k}", CPU, Path("."), memory=e.memory_bytes) for k, e in enumerate(ests)]
    # before: full-length sequences, and every run's allocator slack in full
    full = [estimate_run(c, device="cpu").memory_bytes for c in cfgs]
    before = sum(m["total"] for m in full) - (len(full) - 1) * sum(full[0].get(p, 0) for p in GROUP_SHARED_PARTS)
    s = summaries[0]
    return {"peak": s["peak_memory_bytes"], "estimate": group_memory(tasks), "solo_parts": ests[0].memory_bytes,
            "dtype": s["dtype"], "packed": s.get("packed_attention"), "baseline_rss": baseline,
            "status": s["status"], "tokens_per_step": s.get("tokens_seen", 0) / spec["steps"],
            "run_step_s": s.get("fused", {}).get("group_train_time_s", s["train_time_s"]) / (spec["K"] * spec["steps"]),
            "data_stats": s.get("data_stats"), "fullest": tokens, "before": before}


def _solo(cfg):
    from loralab.train.loop import train

    return train(cfg)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--models", default=None, help="comma-separated: tiny, user-12m")
    ap.add_argument("--ks", default=None, help="comma-separated group sizes")
    ap.add_argument("--ranks", default=None, help="comma-separated: 8, 64")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sys.path.insert(0, str(REPO / "tests"))
    from userdata import instruction_records, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_jsonl(root / "data.jsonl", instruction_records(N_TRAIN, seed=1))
        user = root / "user-model"
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); "
                        f"from bench_fused_memory import build_user_model; build_user_model(__import__('pathlib')"
                        f".Path({str(user)!r}))"], check=True, env=os.environ)
        models = {"user-12m": str(user)} if args.quick else {"tiny": "builtin:tiny", "user-12m": str(user)}
        if args.models:
            models = {m: {"tiny": "builtin:tiny", "user-12m": str(user)}[m] for m in args.models.split(",")}
        ks = (1, 4) if args.quick else (1, 2, 4, 8)
        ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else ks
        ranks = ((8, "query,value"),) if args.quick else ((8, "query,value"), (64, "all"))
        if args.ranks:
            ranks = tuple((int(r), "query,value" if int(r) == 8 else "all") for r in args.ranks.split(","))
        print("| model | dtype | K | r | targets | fullest micro batch, tokens | estimate MiB | measured MiB | "
              "estimate / measured | before: estimate MiB | before: ratio | train s per run and step |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, path in models.items():
            for r, targets in ranks:
                for K in ks:
                    spec = {"model": path, "data": str(data), "K": K, "r": r, "targets": targets,
                            "out": str(root / f"{name}-{r}-{K}"), "steps": args.steps, "threads": args.threads}
                    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                                         capture_output=True, text=True, env=os.environ)
                    out = json.loads(res.stdout.strip().splitlines()[-1])
                    est, peak = out["estimate"], out["peak"]
                    print(f"| {name} | {out['dtype']} | {K} | {r} | {targets} | {out['fullest']} | {est / 2**20:.0f} | "
                          f"{peak / 2**20:.0f} | {est / peak:.2f} | {out['before'] / 2**20:.0f} | "
                          f"{out['before'] / peak:.2f} | {out['run_step_s']:.3f} |", flush=True)
                    print("    parts:", {k: round(v / 2**20, 1) for k, v in out["solo_parts"].items()},
                          "baseline", round(out["baseline_rss"] / 2**20), "MiB", out["packed"], out["status"],
                          "tokens/step", out["tokens_per_step"], "fullest", out["fullest"],

                          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
