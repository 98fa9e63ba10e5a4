"""What a loralab process costs around its training: how long a launcher takes to start its
ranks, and how long a process takes to end after its run's summary says completed.

    PYTHONPATH=src python bench/bench_process.py [--repeats 3]

Each case runs ``python -m loralab.cli train`` on the shipped tiny base (4 steps, 1 torch thread
per process) and watches it from outside: when the launcher's ranks appear (--nproc 2), when
summary.json first says completed, when each process is gone. Results are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

CONFIG = """model: {path: 'builtin:tiny', dtype: fp32}
data: {path: 'builtin:arithmetic_2ds', limit: 48, val_max_examples: 8, max_seq_length: 64}
train: {max_steps: 4, batch_size: 6, micro_batch_size: 2, warmup_steps: 0}
"""


def watch(config: Path, out: Path, nproc: int) -> dict[str, float]:
    """Seconds from the command's start to: its ranks started (nproc > 1), the summary completed,
    the last rank gone, the command gone."""
    cmd = [sys.executable, "-m", "loralab.cli", "train", str(config), "--out", str(out), "--json",
           *(["--nproc", str(nproc)] if nproc > 1 else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, float] = {}
    gone: dict[int, float] = {}
    out_at: dict[str, float] = {}
    while proc.poll() is None:
        now = time.perf_counter() - t0
        try:
            for child in psutil.Process(proc.pid).children():
                seen.setdefault(child.pid, now)
        except psutil.NoSuchProcess:
            pass
        gone.update({pid: now for pid in seen if pid not in gone and not psutil.pid_exists(pid)})
        if "completed" not in out_at:
            try:
                if json.loads((out / "summary.json").read_text())["status"] == "completed":
                    out_at["completed"] = now
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.01)
    end = time.perf_counter() - t0
    result = {"summary_completed_s": out_at.get("completed", float("nan")), "exit_s": end}
    if seen:
        result["ranks_started_s"] = min(seen.values())
        result["ranks_gone_s"] = max(gone.values(), default=end)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "run.yaml"
        config.write_text(CONFIG, encoding="utf-8")
        for i in range(args.repeats):
            for nproc in (1, 2):
                r = watch(config, Path(tmp) / f"run-{nproc}-{i}", nproc)
                after = r["exit_s"] - r["summary_completed_s"]
                ranks = (f"ranks started {r['ranks_started_s']:.2f} s, gone {r['ranks_gone_s']:.2f} s, "
                         if "ranks_started_s" in r else "")
                print(f"nproc {nproc}: {ranks}summary completed {r['summary_completed_s']:.2f} s, "
                      f"command ended {r['exit_s']:.2f} s ({after:.2f} s after the summary)", flush=True)


if __name__ == "__main__":
    main()
