"""loralab tune against the full grid with repeats: same model, data and space.

    python bench/bench_tune.py                 # ~20M-parameter model, 24 candidates, 3 seeds for the grid
    python bench/bench_tune.py --records 240 --workers 2   # the run docs/tune.md reports (2.6 h on 2 cores)
    python bench/bench_tune.py --quick         # the tiny base and a 6-candidate space (minutes)
    python bench/bench_tune.py --tiny --records 240   # the full 24-candidate space on the tiny base

Both sides run as `loralab` processes on the same data; compute is the CPU time of each
driver and everything it waited for (resource.getrusage(RUSAGE_CHILDREN) around the call).
The grid trains every candidate with seeds 1, 2, 3 to the end; its best is the configuration
with the best mean, and its seed-to-seed spread is the pooled standard deviation over every
configuration and the best configuration's range. The tuned configuration's metric is its mean
over the same three seeds, read from the grid's runs (the same configs and seeds), so the two
are compared on equal terms. Target (issue 15): within the grid's seed spread of the grid's best
at no more than a quarter of the grid's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from loralab.rundir import SUMMARY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

# 19.6M parameters with the tiny base's 1,276-token vocabulary (hidden 512, 6 layers).
MODEL_20M = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=8, max_position_embeddings=512)


def build_model(out: Path) -> Path:
    from bench_speed import build_llama

    build_llama(out, MODEL_20M)
    print(f"model: {MODEL_20M} ({out})", flush=True)
    return out


def cpu_seconds_of(cmd: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({out.returncode})")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall, out


def grid_results(db: Path) -> dict[str, dict]:
    con = sqlite3.connect(db)
    rows = con.execute("""SELECT r.axes_json, (SELECT m.value FROM metrics m
                                               WHERE m.run_id = r.id AND m.name = 'eval_loss'
                                               ORDER BY m.step DESC LIMIT 1)
                          FROM runs r WHERE r.status = 'completed'""").fetchall()
    con.close()
    out: dict[str, dict] = {}
    for axes_json, value in rows:
        axes = json.loads(axes_json)
        key = json.dumps({k: v for k, v in axes.items() if k != "train.seed"}, sort_keys=True)
        out.setdefault(key, {"axes": {k: v for k, v in axes.items() if k != "train.seed"},
                             "values": []})["values"].append(value)
    return out


def run_times(study_dir: Path) -> dict[str, dict[str, float]]:
    """Each finished run's time from its summary.json: ``wall_s`` (its share of its fused
    group's process time: set-up, training, evaluation, saving; the shares add up to the
    group's) and ``train_cpu_s`` (its share of the training loop's CPU time)."""
    out = {}
    for summary in sorted(study_dir.glob(f"*/{SUMMARY}")):
        s = json.loads(summary.read_text())
        if s.get("status") in ("completed", "stopped_early"):
            out[summary.parent.name] = {"wall_s": s["wall_time_s"], "train_cpu_s": s["train_cpu_time_s"]}
    return out


def compare(work: Path, *, answer_axes: dict, answer_mean: float, steps: int, model: str,
            tune_cpu: float | None, tune_wall: float | None, grid_cpu: float | None, grid_wall: float | None) -> dict:
    """The comparison the issue asks for, from the two studies' databases and run directories.
    Grid runs not finished (a grid stopped early, read with --report) are counted at the mean
    time of the same configuration's finished seeds and listed under ``estimated``."""
    plan = json.loads((work / "tune" / "tune" / "tune-plan.json").read_text())
    grid = grid_results(work / "grid" / "grid" / "study.db")
    means = {k: statistics.fmean(g["values"]) for k, g in grid.items() if len(g["values"]) >= 2}
    best_key = min(means, key=means.get)
    pooled = statistics.fmean(statistics.variance(grid[k]["values"]) for k in means) ** 0.5
    best_range = max(grid[best_key]["values"]) - min(grid[best_key]["values"])
    tuned_key = json.dumps(answer_axes, sort_keys=True)
    tuned = means.get(tuned_key)
    gap = None if tuned is None else tuned - means[best_key]
    tune_times, grid_times = run_times(work / "tune" / "tune"), run_times(work / "grid" / "grid")
    con = sqlite3.connect(work / "grid" / "grid" / "study.db")
    names = [n for (n,) in con.execute("SELECT name FROM runs")]
    con.close()
    finished = dict(grid_times)
    estimated = [n for n in names if n not in finished]
    for name in estimated:
        config = name.rsplit("-s", 1)[0]
        done = [t for n, t in finished.items() if n.rsplit("-s", 1)[0] == config]
        if not done:
            raise SystemExit(f"grid run {name}: no seed of its configuration has finished, so its time cannot be "
                             "estimated")
        grid_times[name] = {t: statistics.fmean(d[t] for d in done) for t in ("wall_s", "train_cpu_s")}
    total = {side: {t: sum(r[t] for r in times.values()) for t in ("wall_s", "train_cpu_s")}
             for side, times in (("tune", tune_times), ("grid", grid_times))}
    result = {
        "model": model, "candidates": plan["candidates"], "max_steps": plan["max_steps"],
        "tune": {"cpu_s": tune_cpu, "wall_s": tune_wall, "recommended": answer_axes, "its_grid_mean": tuned,
                 "its_tune_mean": answer_mean, "steps": steps, "runs": len(tune_times),
                 "run_process_s": total["tune"]["wall_s"], "train_loop_cpu_s": total["tune"]["train_cpu_s"]},
        "grid": {"cpu_s": grid_cpu, "wall_s": grid_wall, "best": grid[best_key]["axes"], "best_mean": means[best_key],
                 "best_seeds": len(grid[best_key]["values"]), "seed_sd_pooled": pooled, "best_seed_range": best_range,
                 "runs": len(grid_times), "estimated": sorted(estimated),
                 "run_process_s": total["grid"]["wall_s"], "train_loop_cpu_s": total["grid"]["train_cpu_s"]},
        "gap_to_grid_best": gap, "within_seed_spread": gap is not None and gap <= max(pooled, best_range),
        "cpu_ratio": tune_cpu / grid_cpu if tune_cpu and grid_cpu else None,
        "run_process_ratio": total["tune"]["wall_s"] / total["grid"]["wall_s"],
        "train_loop_cpu_ratio": total["tune"]["train_cpu_s"] / total["grid"]["train_cpu_s"],
    }
    print(json.dumps(result, indent=2))
    print(f"\ntune: recommends {answer_axes} (grid mean {tuned if tuned is not None else float('nan'):.4f})")
    print(f"grid: best {result['grid']['best']} at {means[best_key]:.4f} "
          f"(pooled seed SD {pooled:.4f}, best's range {best_range:.4f}); within the seed spread: "
          f"{result['within_seed_spread']}")
    if result["cpu_ratio"] is not None:
        print(f"tune / grid CPU seconds (drivers and runs): {tune_cpu:.0f} / {grid_cpu:.0f} = "
              f"{result['cpu_ratio']:.3f}")
    for what, key in (("run processes' time", "wall_s"), ("training-loop CPU", "train_cpu_s")):
        print(f"tune / grid {what}: {total['tune'][key]:.0f} / {total['grid'][key]:.0f} s = "
              f"{total['tune'][key] / total['grid'][key]:.3f}"
              + (f" ({len(estimated)} grid runs estimated)" if estimated else ""))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny base, 240 records, a 6-candidate space")
    ap.add_argument("--tiny", action="store_true", help="the shipped tiny base instead of the ~20M model")
    ap.add_argument("--records", type=int, help="instruction records generated (default 960; 240 with --quick)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", type=Path, help="keep the work directory here")
    ap.add_argument("--report", type=Path, metavar="WORKDIR",
                    help="only compare, from a kept work directory (--keep) whose grid may have been stopped")
    args = ap.parse_args()

    if args.report:
        tune = json.loads((args.report / "tune" / "tune" / "tune.json").read_text())
        model = yaml.safe_load((args.report / "tune" / "tune" / "tune-study.yaml").read_text())["base"]["model"]["path"]
        result = compare(args.report, answer_axes=tune["recommended"]["axes"], answer_mean=tune["recommended"]["mean"],
                         steps=tune["compute"]["steps"], model=model, tune_cpu=None, tune_wall=None,
                         grid_cpu=None, grid_wall=None)
    else:
        result = measure(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


def measure(args: argparse.Namespace) -> dict:
    import bench_speed  # the generated world instructions of 38-282 tokens

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    n = args.records or (240 if args.quick else 960)
    data.write_text("".join(json.dumps(r) + "\n" for r in bench_speed.bench_records(n, 1)), encoding="utf-8")
    model = "builtin:tiny" if args.quick or args.tiny else str(build_model(work / "model-20m"))
    search = "train.lr,lora.r" if args.quick else "train.lr,lora.r,lora.targets"
    widen = ["--widen", "lora.r=4,16", "--widen", "train.lr=3e-4,1e-3,3e-3"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    loralab = [sys.executable, "-m", "loralab.cli"]
    common = ["--model", model, "--data", str(data), "--batch-size", "8", "--workers", str(args.workers)]

    tune_cpu, tune_wall, out = cpu_seconds_of(
        loralab + ["tune", *common, "--search", search, *widen, "--out", str(work / "tune"), "--name", "tune",
                   "--json"], env)
    answer = json.loads(out.stdout)
    print(f"tune: {tune_cpu:.0f} CPU s, {tune_wall:.0f} s wall", flush=True)

    spec = yaml.safe_load((work / "tune" / "tune" / "tune-study.yaml").read_text())
    spec.update(name="grid", seeds=[1, 2, 3], findings=[{"kind": "spread"}])
    spec["base"]["train"].pop("seed", None)
    grid_file = work / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    grid_cpu, grid_wall, _ = cpu_seconds_of(
        loralab + ["study", "run", str(grid_file), "--out", str(work / "grid"), "--workers", str(args.workers)], env)
    return compare(work, answer_axes=answer["recommended"]["axes"], answer_mean=answer["recommended"]["mean"],
                   steps=answer["compute"]["steps"], model=model, tune_cpu=tune_cpu, tune_wall=tune_wall,
                   grid_cpu=grid_cpu, grid_wall=grid_wall)


if __name__ == "__main__":
    raise SystemExit(main())
