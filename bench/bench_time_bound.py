"""Benchmark (not a test): the "at least about" time of ``study run`` and ``tune`` against the time runs take.

``study run --dry-run`` and ``tune`` bound a run's training time from below: the FLOPs of its
data's examples (``loralab.study.steps.step_plan``) at the rate this machine's matmuls reach
(``loralab.estimate.matmul_throughput``). For each case a study of one run is written on a
random-init Llama saved with save_pretrained and Alpaca records of real lengths (bench_user's:
median about 230 tokens, a tail past 1,000); the bound is taken as the study's driver takes it,
then ``loralab study run`` trains it, and the bound is set against the run's ``train_time_s``.
The bound and the run alternate ``--repeats`` times, so both meet the same load on shared cores.
A bound under 1.0x of the time taken is what the command promises. Results:
bench/results/time_bound.json.

    .venv/bin/python bench/bench_time_bound.py                 # every case, 2 repeats
    .venv/bin/python bench/bench_time_bound.py --cases w512-cut256 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as bs  # noqa: E402 - the model builder
from bench_user import user_records  # noqa: E402 - records of real lengths

RESULTS = bs.REPO / "bench" / "results" / "time_bound.json"
WIDTHS = {"w256": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=1024),
          "w512": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                       num_key_value_heads=8, max_position_embeddings=1024),
          "w640": bs.BIG}
CASES = ["w256-cut1024", "w512-cut256", "w512-cut1024", "w640-cut1024"]
BATCH, STEPS = 8, 6


def bound(study_yaml: Path) -> dict:
    """The driver's bound for the study's one run, in a fresh process (a fresh matmul probe)."""
    code = ("import json, sys; from loralab.study.spec import load_study; from loralab.study.steps import step_plan; "
            "(r,) = step_plan(load_study(sys.argv[1])).runs; "
            "print(json.dumps({'seconds': r.seconds, 'tokens': r.tokens, 'steps': r.steps}))")
    out = subprocess.run([sys.executable, "-c", code, str(study_yaml)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train(study_yaml: Path, out: Path) -> dict:
    loralab = str(Path(sys.executable).with_name("loralab"))
    done = subprocess.run([loralab, "study", "run", str(study_yaml), "--out", str(out)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"loralab study run {study_yaml} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    summary = json.loads(next(out.glob("*/*/summary.json")).read_text())
    return {"train_time_s": summary["train_time_s"], "tokens_seen": summary["tokens_seen"],
            "status": summary["status"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t_start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="loralab-bench-bound-") as tmp:
        work = Path(tmp)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in user_records(BATCH * STEPS + 8, 1)), encoding="utf-8")
        models: dict[str, str] = {}
        for name in args.cases.split(","):
            width, cut = name.split("-cut")
            if width not in models:
                models[width] = str(bs.build_llama(work / width, WIDTHS[width]))
            study = {"name": name, "axes": {"lora.r": [8]},
                     "base": {"model": {"path": models[width], "device": "cpu", "dtype": "fp32"},
                              "data": {"path": str(data), "max_seq_length": int(cut), "val_max_examples": 4},
                              "train": {"max_steps": STEPS, "batch_size": BATCH, "micro_batch_size": BATCH,
                                        "warmup_steps": 0},
                              "eval": {"every": 0}}}
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
            pairs = []
            for k in range(args.repeats):
                b = bound(path)
                t = train(path, work / f"runs-{name}-{k}")
                pairs.append({**b, **t, "ratio": b["seconds"] / t["train_time_s"]})
                print(f"{name:<14} bound {b['seconds']:6.2f} s  trained {t['train_time_s']:6.2f} s  "
                      f"x{pairs[-1]['ratio']:.2f}  ({b['tokens']} tokens, {b['steps']} steps)", flush=True)
            rows.append({"name": name, "width": WIDTHS[width], "cut": int(cut), "pairs": pairs,
                         "max_ratio": max(p["ratio"] for p in pairs)})
    from loralab.train.measure import versions

    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dtype": "fp32",
              "cpu": platform.processor() or platform.machine(), "versions": versions(), "batch": BATCH,
              "steps": STEPS, "cases": rows, "total_wall_s": time.perf_counter() - t_start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
