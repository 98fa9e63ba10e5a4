"""Size and write time of a resumable checkpoint (builtin:tiny, LoRA query+value r=8, AdamW).

    PYTHONPATH=src python bench/bench_checkpoint.py

Trains 6 steps with train.checkpoint_every=1 and times each save_checkpoint call (all files
written, fsynced, manifest hashed, directory renamed). Prints one JSON object.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

import loralab.train.core as core
import loralab.train.loop as loop
from loralab.config import load_config


def main() -> None:
    torch.set_num_threads(2)
    times: list[float] = []
    original = core.save_checkpoint  # the training core writes every run's checkpoints

    def timed(*args, **kwargs):
        t = time.perf_counter()
        path = original(*args, **kwargs)
        times.append(time.perf_counter() - t)
        return path

    core.save_checkpoint = timed
    out = Path(tempfile.mkdtemp()) / "run"
    cfg = load_config(None, ["model.device=cpu", "train.max_steps=6", "train.checkpoint_every=1",
                             "train.batch_size=8", "train.micro_batch_size=8", "data.limit=64",
                             "data.val_max_examples=16", f"output.dir={out}"])
    summary = loop.train(cfg)
    newest = sorted((out / "checkpoints").iterdir())[-1]
    sizes = {p.name: p.stat().st_size for p in sorted(newest.iterdir())}
    print(json.dumps({
        "trainable_params": summary["trainable_params"],
        "checkpoint_bytes": sum(sizes.values()),
        "files": sizes,
        "writes": len(times),
        "write_s_median": sorted(times)[len(times) // 2],
        "train_step_s": summary["train_time_s"] / summary["steps"],
    }, indent=1))


if __name__ == "__main__":
    main()
