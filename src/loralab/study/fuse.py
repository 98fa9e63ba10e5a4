"""``study run --fuse``: runs whose base and data agree train together in one process.

    loralab study run preset:rank_alpha_grid --fuse

Runs are grouped by ``loralab.train.fused.fuse_key``; each group is one child process
(``python -m loralab.study.fuse CONFIG...``) calling ``train_fused``, which writes every
run's directory exactly as ``loralab train`` does, so outcomes are read the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from loralab.config import config_from_dict, load_config
from loralab.study.execute import (
    POLL_S,
    Task,
    _die_with_parent,
    loralab_env,
    outcome,
    prepare_run_dir,
    record,
)
from loralab.study.store import Store


def run_fused(store: Store, tasks: list[Task], *, workers: int) -> None:
    from loralab.train.fused import fuse_key

    groups: dict[tuple, list[Task]] = {}
    for t in tasks:
        groups.setdefault(fuse_key(config_from_dict(t.config)), []).append(t)
    queue = list(groups.values())
    active: list[tuple[subprocess.Popen, list[Task]]] = []
    threads = max(1, (os.cpu_count() or 1) // workers)
    while queue or active:
        while queue and len(active) < workers:
            group = queue.pop(0)
            paths = []
            for t in group:
                store.start(t.run_id, run_dir=str(t.run_dir), estimated=t.estimate)
                t.attempts += 1
                paths.append(str(prepare_run_dir(t.run_dir, t.config)))
            logf = (group[0].run_dir / "fused.log").open("wb")
            proc = subprocess.Popen([sys.executable, "-m", "loralab.study.fuse", *paths], stdout=logf,
                                    stderr=subprocess.STDOUT, env=loralab_env(threads), preexec_fn=_die_with_parent)
            active.append((proc, group))
        time.sleep(POLL_S)
        for proc, group in list(active):
            rc = proc.poll()
            if rc is None:
                continue
            active.remove((proc, group))
            for t in group:
                record(store, t, outcome(t.run_dir, rc), max_attempts=3)


def main(paths: list[str]) -> int:
    from loralab.train.fused import train_fused

    cfgs = [load_config(p) for p in paths]
    for p, cfg in zip(paths, cfgs, strict=True):
        cfg.output.dir = str(Path(p).parent)
    train_fused(cfgs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
