"""One run on 2 processes of this CPU: each rank on its share of the cores (loralab's launcher
since it sets OMP_NUM_THREADS) against every rank on all of them (torch's default before), and
one process beside, interleaved.

    PYTHONPATH=src python bench/bench_nproc_threads.py [--repeats 2] [--steps 8]

A random-init Llama (hidden 256, 4 layers) saved with save_pretrained, instruction records of
real lengths (bench_user's: median about 230 tokens, cut at 256), LoRA r 8 on every linear
layer, batch 8 in micro batches of 2, fp32; each side is ``loralab train ... --json`` in its own
process, timed by the summary's train_time_s. Prints train seconds per side and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as bs  # noqa: E402 - the model builder
import bench_user as bu  # noqa: E402 - the records of real lengths

DIMS = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024)


def train(config: Path, out: Path, *, nproc: int, threads: str | None) -> float:
    """train_time_s of ``loralab train CONFIG --nproc N``; ``threads``: OMP_NUM_THREADS (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(bs.REPO / "src")
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    done = subprocess.run([sys.executable, "-m", "loralab.cli", "train", str(config), "--out", str(out), "--overwrite",
                           "--nproc", str(nproc), "--json"], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout)["train_time_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="loralab-nproc-") as tmp:
        work = Path(tmp)
        model = bs.build_llama(work / "model", DIMS)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in bu.user_records(96, 1)), encoding="utf-8")
        config = work / "run.yaml"
        config.write_text(
            f"model: {{path: {model}, dtype: fp32}}\nlora: {{r: 8, targets: [all], dropout: 0.0}}\n"
            f"data: {{path: {data}, max_seq_length: 256, val_max_examples: 8}}\n"
            f"train: {{batch_size: 8, micro_batch_size: 2, max_steps: {args.steps}, warmup_steps: 0}}\n"
            "eval: {every: 0}\n", encoding="utf-8")
        sides = {"2 ranks, a share of the cores each (default)": dict(nproc=2, threads=None),
                 f"2 ranks, {cpus} threads each (before)": dict(nproc=2, threads=str(cpus)),
                 "1 process": dict(nproc=1, threads=None)}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for k in range(args.repeats):
            for name, how in sides.items():
                times[name].append(train(config, work / f"run-{k}", **how))
                print(f"repeat {k + 1}: {name:<48} train {times[name][-1]:6.2f} s", flush=True)
        default, before, one = (times[name] for name in sides)
        print(f"{cpus} CPUs; per repeat, before / default: "
              + ", ".join(f"{b / d:.2f}x" for b, d in zip(before, default, strict=True))
              + "; one process / default: " + ", ".join(f"{o / d:.2f}x" for o, d in zip(one, default, strict=True)))


if __name__ == "__main__":
    main()
