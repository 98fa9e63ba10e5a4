"""Polling and process helpers shared by the tests that watch real processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from loralab.rundir import FUSED_LOG, TRAIN_LOG


def wait_for(predicate, timeout: float, what: str):
    """Return ``predicate()``'s first truthy value, polling every 0.2 s; fail after ``timeout`` s."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid``: its children, theirs, and so on."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_processes(driver: int) -> dict[int, Path]:
    """pid -> log of each run process a study driver started: a unit's process writes its output to
    its run directory's train.log (fused.log for a fused group), whether the driver started it as a
    process of its own or forked it from its warm process (loralab.study.backends.warm)."""
    found = {}
    for pid in descendants(driver):
        try:
            out = Path(os.readlink(f"/proc/{pid}/fd/1"))
        except OSError:
            continue
        if out.name in (TRAIN_LOG, FUSED_LOG):
            found[pid] = out
    return found
