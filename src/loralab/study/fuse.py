"""The process of a fused group: several runs of one study trained together over one base.

    python -m loralab.study.fuse [--halving=ETA,MIN_STEPS,METRIC,GOAL] [--resume] CONFIG...

The scheduler (scheduler.form_units) decides which runs share a process and starts this one
through a backend (backends/process.py), one CONFIG per run, each the config.yaml in the
run's own directory. It calls ``loralab.train.fused.train_fused``, which writes every run's
directory exactly as ``loralab train`` does, so outcomes are read the same way.
``--halving``: the group prunes itself at the rungs (``loralab.halving``'s rules).
``--resume``: the group goes on from its runs' checkpoints (given only when one of its run
directories holds a complete checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    """Train the configs together, each into its own directory."""
    from loralab.config import load_config
    from loralab.quiet import quiet_libraries
    from loralab.train.fused import Prune, train_fused

    quiet_libraries()  # as loralab train does: the group's log holds loralab's lines

    prune_arg = next((a for a in argv if a.startswith("--halving=")), None)
    resume = "--resume" in argv
    paths = [a for a in argv if a != prune_arg and a != "--resume"]
    cfgs = [load_config(p) for p in paths]
    for p, cfg in zip(paths, cfgs, strict=True):
        cfg.output.dir = str(Path(p).parent)
    kw: dict[str, Any] = {}
    if prune_arg:
        eta, min_steps, metric, goal = prune_arg.split("=", 1)[1].split(",")
        kw["prune"] = Prune(eta=int(eta), min_steps=int(min_steps), metric=metric, goal=goal)
    if resume:  # only then: a train_fused without checkpoints never sees the keyword
        kw["resume"] = True
    train_fused(cfgs, **kw)
    return 0


if __name__ == "__main__":
    from loralab.ending import end_process

    end_process(main(sys.argv[1:]))
