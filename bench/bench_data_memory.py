"""A run's peak memory from JSONL, parquet and CSV data, against loralab's estimate (CPU).

    PYTHONPATH=src python bench/bench_data_memory.py [--rounds 2] [--records 48,400]

``loralab train`` in its own process, once per data format, record count and round: a
random-init Llama (hidden 512, 4 layers) saved with ``save_pretrained``, the same instruction
records of real lengths (bench_user's ``user_records``: median about 230 tokens, a tail past
1,000) written as JSONL, parquet and CSV, cut at 256, micro batch 8, 2 steps, 1 thread,
everything else default. Parquet and CSV are read with the datasets library, JSONL with
loralab's own reader. Prints each run's peak (summary.json's ``peak_memory_bytes``) beside the
estimate for its config (``loralab.estimate.estimate_run`` at the fullest micro batch of its
data, as a study sizes it) and its ``data_library`` part.
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

MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--records", default="48,400", help="comma-separated record counts")
    args = ap.parse_args()
    import datasets

    from loralab.config import load_config
    from loralab.estimate import estimate_run
    from loralab.train.step import fullest_micro_batch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_user_model(root / "model")
        counts = [int(n) for n in args.records.split(",")]
        for n in counts:
            records = user_records(n, seed=1)
            (root / f"d{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            table = datasets.Dataset.from_list(records)
            table.to_parquet(str(root / f"d{n}.parquet"))
            table.to_csv(str(root / f"d{n}.csv"), index=False)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for rnd in range(args.rounds):
            for n in counts:
                for kind in ("jsonl", "parquet", "csv"):
                    config = root / f"{kind}{n}.yaml"
                    config.write_text(yaml.safe_dump({
                        "model": {"path": str(model), "device": "cpu"},
                        "data": {"path": str(root / f"d{n}.{kind}"), "max_seq_length": 256, "val_max_examples": 4},
                        "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 8, "warmup_steps": 0},
                        "eval": {"every": 0}, "output": {"save_adapter": False}}), encoding="utf-8")
                    cmd = [sys.executable, "-m", "loralab.cli", "train", str(config), "--json", "--overwrite",
                           "--out", str(root / f"run-{kind}{n}")]
                    summary = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env,
                                                        check=True).stdout)
                    cfg = load_config(config)
                    est = estimate_run(cfg, device="cpu", tokens=fullest_micro_batch(cfg)).memory_bytes
                    peak = summary["peak_memory_bytes"]
                    print(f"round {rnd + 1} {n:4} records {kind:7}: peak {peak / MIB:5.0f} MiB, estimate "
                          f"{est['total'] / MIB:5.0f} MiB ({est['total'] / peak:.2f}x; data_library "
                          f"{est.get('data_library', 0) / MIB:.0f} MiB)", flush=True)


if __name__ == "__main__":
    main()
