"""What every process a study starts gets: this loralab first on its path, its share of
threads, and death with its parent (a run never outlives the driver that started it)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from pathlib import Path


def loralab_env(threads: int | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: this loralab first on the path, a fair share of threads,
    plus ``extra`` (the GPU the scheduler gave the unit)."""
    import loralab

    env = dict(os.environ)
    src = str(Path(loralab.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


def die_with_parent() -> None:
    """In a child (before exec, or just after fork): get SIGKILL when its parent dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
