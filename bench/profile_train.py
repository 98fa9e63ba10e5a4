"""Where a `loralab train` run's step time goes: torch.profiler over steps 30-49, by operator.

    PYTHONPATH=src python bench/profile_train.py src/loralab/assets/configs/quickstart.yaml [--set KEY=VALUE ...]

Runs the config as ``loralab train`` does (eval off, 55 steps, into a temporary directory) and
prints the operators' self CPU time over 20 optimizer steps, after 29 steps of warm-up.
"""

from __future__ import annotations

import sys
import tempfile

from torch.profiler import ProfilerActivity, profile

import loralab.train.core as core
from loralab.cli import main

FIRST, LAST = 30, 50  # the forward_backward calls (optimizer steps) profiled: [FIRST, LAST)


def profiled(forward_backward):
    prof = profile(activities=[ProfilerActivity.CPU])
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == FIRST:
            prof.__enter__()
        out = forward_backward(*args, **kwargs)
        if calls == LAST - 1:
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
        return out

    return wrapped


if __name__ == "__main__":
    core.forward_backward = profiled(core.forward_backward)
    with tempfile.TemporaryDirectory() as tmp:
        raise SystemExit(main(["train", sys.argv[1], "--out", f"{tmp}/run", "--set", "train.max_steps=55",
                               "--set", "eval.every=0", *sys.argv[2:]]))
