"""A QLoRA run's speed with quant.compute_dtype auto against bf16, as a user runs it (CPU).

    PYTHONPATH=src python bench/bench_qlora_compute.py [--steps 3] [--rounds 2]

``loralab train`` in its own process, once per setting and round, interleaved: a random-init
Llama (hidden 512, 4 layers) saved with ``save_pretrained``, nf4, r 8 on query and value,
batch 2, instruction records of real lengths (bench_user's ``user_records``: median about 230
tokens, a tail past 1,000) cut at 256, 2 threads. Everything else is loralab's default, so
model.dtype auto and, for the first setting, quant.compute_dtype auto (the base's dtype). On a
CPU that emulates bf16 (AVX2 alone) the base is fp32 and bf16 compute multiplies in emulation.
Prints the summaries' tokens/s, dtypes and final eval losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_memory import build_user_model  # noqa: E402
from bench_user import user_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_user_model(root / "model")
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in user_records(64, seed=1)), encoding="utf-8")
        config = root / "run.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"path": str(model), "device": "cpu"},
            "data": {"path": str(data), "max_seq_length": 256, "val_max_examples": 4},
            "train": {"max_steps": args.steps, "batch_size": 2, "micro_batch_size": 2, "warmup_steps": 0},
            "eval": {"every": 0}, "quant": {"mode": "nf4"}, "output": {"save_adapter": False}}), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        for rnd in range(args.rounds):
            for setting in ("auto", "bf16"):
                cmd = [sys.executable, "-m", "loralab.cli", "train", str(config), "--json",
                       "--out", str(root / f"{setting}{rnd}"), "--set", f"quant.compute_dtype={setting}"]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                s = json.loads(done.stdout)
                print(f"round {rnd + 1} compute_dtype {setting:4}: {s['tokens_per_s']:7.0f} tokens/s, model.dtype "
                      f"{s['dtype']}, final eval loss {s['final_eval_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
