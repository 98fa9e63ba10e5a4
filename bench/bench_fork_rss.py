"""What a unit forked from the warm process counts as its own memory, against its parent.

    PYTHONPATH=src python bench/bench_fork_rss.py

Imports torch, transformers and PEFT (as the warm process does), forks, and prints VmHWM,
VmRSS, RssAnon and RssFile (MiB, /proc/self/status) in the parent, in the child at the fork,
and in the child after one 512 x 512 matmul. A child's RssFile starts near zero: the library
code its parent paged in counts for the child only once the child touches it again, which is
why a forked study unit peaks lower than the same run in a fresh process (docs/estimates.md).
"""

from __future__ import annotations

import os

import peft  # noqa: F401 - loaded as the warm process loads it
import torch
import transformers  # noqa: F401

KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def status() -> str:
    with open("/proc/self/status", encoding="utf-8") as f:
        found = {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f if line.split(":")[0] in KEYS}
    return ", ".join(f"{k} {found[k]} MiB" for k in KEYS)


def main() -> None:
    print(f"parent: {status()}", flush=True)
    pid = os.fork()
    if pid == 0:
        print(f"child at the fork: {status()}", flush=True)
        x = torch.randn(512, 512)
        (x @ x).sum()
        print(f"child after a matmul: {status()}", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
