"""Benchmark (not a test): time to an answer for a rank x alpha grid, the plain way against
successive halving + fusion, on this machine.

1. The grid the plain way: `loralab study run GRID --workers 1 --no-fuse`, every run to the
   last step, each in its own process.
2. The fast way: `loralab study run GRID --halving --eta 3 --min-steps 10` (fusion is the
   default): every run of the grid in one process over one shared base, the worse runs pruned
   at the rungs; on the local backend, or with `--executor ray` on a local Ray instance.
3. The seed-to-seed spread of the grid's best configuration: that configuration again with
   two more seeds (not counted in either time).

The answer counts as found when the fast way's best configuration has a final eval loss
within the spread of the grid's best (|difference| <= the range over the three seeds). The
fast way's best is known only when it ends, so its time to the answer is its whole wall time.
Results: printed and written to bench/results/time_to_answer.json.

    python bench/bench_time_to_answer.py            # 16 runs (r 2..128 x alpha 0.5..512), 90 steps
    python bench/bench_time_to_answer.py --steps 30 # a shorter check
    python bench/bench_time_to_answer.py --executor ray  # the fast way through the Ray backend
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}


def grid_spec(steps: int, ranks: list[int], alphas: list[float]) -> dict:
    """The rank_alpha_grid preset's quick base (tiny base, arithmetic, q+v, AdamW, cosine)."""
    return {
        "name": "grid",
        "metric": "eval_loss",
        "goal": "min",
        "base": {
            "model": {"path": "builtin:tiny"},
            "data": {"path": "builtin:arithmetic", "max_seq_length": 64, "val_max_examples": 32},
            "lora": {"targets": ["query", "value"], "dropout": 0.05},
            "train": {"optimizer": "adamw", "lr": 1.0e-4, "scheduler": "cosine", "warmup_steps": 3,
                      "batch_size": 8, "micro_batch_size": 8, "max_steps": steps, "log_every": 10},
            "eval": {"every": 0},
            "output": {"save_adapter": False},
        },
        "axes": {"lora.r": ranks, "lora.alpha": alphas},
    }


def study(spec_path: Path, out: Path, *flags: str) -> float:
    """Run one `loralab study run`; its wall time in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", "study", "run", str(spec_path), "--out", str(out),
                           *flags],
                          env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"study run {' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
    return wall


def final_losses(db: Path) -> dict[str, tuple[str, float | None]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    return {name: (status, loss) for name, status, loss in
            con.execute("SELECT name, status, final_eval_loss FROM runs").fetchall()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--ranks", default="2,8,32,128")
    ap.add_argument("--alphas", default="0.5,8,128,512")
    ap.add_argument("--executor", choices=["local", "ray"], default="local", help="the fast way's backend")
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    alphas = [float(x) for x in args.alphas.split(",")]
    work = Path(tempfile.mkdtemp(prefix="loralab-tta-"))
    spec = grid_spec(args.steps, ranks, alphas)
    spec_path = work / "grid.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")

    plain_s = study(spec_path, work / "plain", "--workers", "1", "--no-fuse")
    plain = final_losses(work / "plain" / "grid" / "study.db")
    fast_s = study(spec_path, work / "fast", "--halving", "--eta", "3", "--min-steps", "10", "--executor",
                   args.executor)
    fast = final_losses(work / "fast" / "grid" / "study.db")

    best_name = min((n for n, (s, v) in plain.items() if s == "completed"), key=lambda n: plain[n][1])
    fast_best = min((n for n, (s, v) in fast.items() if s == "completed"), key=lambda n: fast[n][1])
    # The spread of the grid's best configuration over three seeds (its grid run is seed 1337).
    best_cfg = json.loads(sqlite3.connect(work / "plain" / "grid" / "study.db").execute(
        "SELECT config_json FROM runs WHERE name = ?", (best_name,)).fetchone()[0])
    seeds_spec = {"name": "seeds", "metric": "eval_loss", "goal": "min", "base": best_cfg,
                  "axes": {"train.seed": [1, 2]}}
    seeds_spec["base"]["output"] = {"save_adapter": False}
    seeds_path = work / "seeds.yaml"
    seeds_path.write_text(yaml.safe_dump(seeds_spec, sort_keys=False), encoding="utf-8")
    study(seeds_path, work / "seeds", "--workers", "1", "--no-fuse")
    repeats = [plain[best_name][1]] + [v for _, v in final_losses(work / "seeds" / "seeds" / "study.db").values()]
    spread = max(repeats) - min(repeats)
    gap = fast[fast_best][1] - plain[best_name][1]
    result = {
        "runs": len(plain), "steps": args.steps, "fast_executor": args.executor, "grid_wall_s": plain_s,
        "fast_wall_s": fast_s,
        "speedup": plain_s / fast_s, "grid_best": best_name, "grid_best_eval_loss": plain[best_name][1],
        "fast_best": fast_best, "fast_best_eval_loss": fast[fast_best][1],
        "best_config_over_3_seeds": repeats, "seed_spread_range": spread,
        "fast_within_spread": abs(gap) <= spread,
        "fast_statuses": {s: sum(1 for v in fast.values() if v[0] == s) for s in {v[0] for v in fast.values()}},
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "time_to_answer.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"grid of {len(plain)} runs x {args.steps} steps, plain: {plain_s:.0f} s; best {best_name} "
          f"eval loss {plain[best_name][1]:.4f} (3 seeds: {', '.join(f'{v:.4f}' for v in repeats)}; "
          f"range {spread:.4f})")
    print(f"fused + halving: {fast_s:.0f} s ({result['fast_statuses']}); best {fast_best} eval loss "
          f"{fast[fast_best][1]:.4f} (difference {gap:+.4f}: "
          f"{'within' if result['fast_within_spread'] else 'OUTSIDE'} the spread)")
    print(f"time to the answer: {plain_s / fast_s:.2f}x less")


if __name__ == "__main__":
    main()
