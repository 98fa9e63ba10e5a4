"""``study run --fuse``: runs whose base and data agree train together in one process.

    loralab study run preset:rank_alpha_grid --fuse

Runs are grouped by ``loralab.train.fused.fuse_key``; each group of two or more is one
child process (``python -m loralab.study.fuse CONFIG...``) calling ``train_fused``, which
writes every run's directory exactly as ``loralab train`` does, so outcomes are read the
same way. Runs that cannot be fused (fuse_key refuses them, or nothing to fuse with) are
trained alone afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loralab.config import config_from_dict, load_config
from loralab.errors import ConfigError
from loralab.study.execute import (
    POLL_S,
    Task,
    _die_with_parent,
    loralab_env,
    outcome,
    prepare_run_dir,
    record,
    run_local,
)
from loralab.study.store import Store


def fuse_groups(tasks: list[Task]) -> tuple[list[list[Task]], list[Task]]:
    """(groups of two or more runs that can share a base, runs to train alone)."""
    from loralab.train.fused import fuse_key

    groups: dict[tuple, list[Task]] = {}
    alone: list[Task] = []
    for t in tasks:
        try:
            groups.setdefault(fuse_key(config_from_dict(t.config)), []).append(t)
        except ConfigError:  # DoRA, checkpointing: fuse_key says this run trains alone
            alone.append(t)
    alone += [g[0] for g in groups.values() if len(g) == 1]
    return [g for g in groups.values() if len(g) > 1], alone


def run_fused(store: Store, tasks: list[Task], *, workers: int, halving: Any = None,
              metric: str = "eval_loss", goal: str = "min", retries: int = 1, max_attempts: int = 3) -> None:
    """Fusable groups in one process each (``workers`` at a time), then the rest alone. With
    ``halving``, each group prunes itself at the rungs (runs that train alone are not pruned)."""
    prune_args = [f"--halving={halving.eta},{halving.min_steps},{metric},{goal}"] if halving else []
    fused, alone = fuse_groups(tasks)
    queue = list(fused)
    active: list[tuple[subprocess.Popen, list[Task], Any]] = []
    threads = max(1, (os.cpu_count() or 1) // workers)
    while queue or active:
        while queue and len(active) < workers:
            group = queue.pop(0)
            paths = []
            for t in group:
                store.start(t.run_id, run_dir=str(t.run_dir), estimated=t.estimate)
                t.attempts += 1
                paths.append(str(prepare_run_dir(t.run_dir, t.config)))
            log_path = group[0].run_dir / "fused.log"
            logf = log_path.open("wb")
            proc = subprocess.Popen([sys.executable, "-m", "loralab.study.fuse", *prune_args, *paths], stdout=logf,
                                    stderr=subprocess.STDOUT, env=loralab_env(threads), preexec_fn=_die_with_parent)
            active.append((proc, group, logf))
        time.sleep(POLL_S)
        for entry in list(active):
            proc, group, logf = entry
            rc = proc.poll()
            if rc is None:
                continue
            active.remove(entry)
            logf.close()
            for t in group:  # an interrupted group is run again by the next `study run`
                record(store, t, outcome(t.run_dir, rc, Path(logf.name)), max_attempts=max_attempts)
    run_local(store, alone, workers=workers, retries=retries, max_attempts=max_attempts)


def main(argv: list[str]) -> int:
    """Worker entry: ``[--halving=ETA,MIN_STEPS,METRIC,GOAL] CONFIG...``; train the configs
    together, each into its own directory."""
    from loralab.train.fused import Prune, train_fused

    prune_arg = next((a for a in argv if a.startswith("--halving=")), None)
    paths = [a for a in argv if a != prune_arg]
    cfgs = [load_config(p) for p in paths]
    for p, cfg in zip(paths, cfgs, strict=True):
        cfg.output.dir = str(Path(p).parent)
    prune = None
    if prune_arg:
        eta, min_steps, metric, goal = prune_arg.split("=", 1)[1].split(",")
        prune = Prune(eta=int(eta), min_steps=int(min_steps), metric=metric, goal=goal)
    train_fused(cfgs, prune=prune)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
