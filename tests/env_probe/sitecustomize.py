"""Imported by every Python process started with this folder on PYTHONPATH (tests only):
a run process (``loralab.cli train`` or ``loralab.study.fuse``) writes the environment it
received (and torch's thread count, for a forked one) to $LORALAB_TEST_ENV_LOG/<pid>.json, so
tests read what each child really got."""

import json
import os
import sys
from pathlib import Path


def _log_env(dest: str, argv: list[str]) -> None:
    if ("loralab.cli" in argv and "train" in argv) or "loralab.study.fuse" in argv:
        Path(dest).mkdir(parents=True, exist_ok=True)
        Path(dest, f"{os.getpid()}.json").write_text(json.dumps({
            "argv": argv,
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "RANK": os.environ.get("RANK"),
            "threads": __import__("torch").get_num_threads() if "torch" in sys.modules else None,
        }))


_dest = os.environ.get("LORALAB_TEST_ENV_LOG")
if _dest:
    _log_env(_dest, Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0"))
    # A run forked from a study's warm process (loralab.study.backends.warm) was not started by
    # the interpreter: it enters runpy.run_module once it holds its own environment. Log there.
    import runpy

    _run_module = runpy.run_module

    def _logged_run_module(module, *args, **kwargs):
        _log_env(os.environ.get("LORALAB_TEST_ENV_LOG", _dest), ["-m", module, *sys.argv[1:]])
        return _run_module(module, *args, **kwargs)

    runpy.run_module = _logged_run_module

# $LORALAB_TEST_GATE: a run process waits (up to 120 s) until that file exists, so a test can
# look at what is running while the run is under way.
_gate = os.environ.get("LORALAB_TEST_GATE")
if _gate:
    import time

    _argv = Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0")
    if "loralab.cli" in _argv and "train" in _argv:
        _end = time.time() + 120
        while not Path(_gate).exists() and time.time() < _end:
            time.sleep(0.1)

# $LORALAB_TEST_OOM_RANK and $LORALAB_TEST_OOM_ROWS: in the rank of a ``loralab.cli train`` job
# whose RANK is $LORALAB_TEST_OOM_RANK, a micro batch of more than $LORALAB_TEST_OOM_ROWS rows
# raises torch.OutOfMemoryError before any compute (an out-of-memory on that rank only), in
# training, or in evaluation when $LORALAB_TEST_OOM_IN is "eval".
_oom_rank = os.environ.get("LORALAB_TEST_OOM_RANK")
if _oom_rank is not None and os.environ.get("RANK") == _oom_rank:
    import torch

    from loralab.train import core as _core
    from loralab.train import evaluation as _evaluation

    _limit, _run_losses = int(os.environ["LORALAB_TEST_OOM_ROWS"]), _core.run_losses
    _training = os.environ.get("LORALAB_TEST_OOM_IN", "train") == "train"

    def _oom_above(model, batch, n_runs, autocast):
        if batch["input_ids"].shape[0] > _limit and torch.is_grad_enabled() == _training:
            raise torch.OutOfMemoryError(f"injected on rank {_oom_rank}: micro batch {batch['input_ids'].shape[0]}")
        return _run_losses(model, batch, n_runs, autocast)

    _core.run_losses = _evaluation.run_losses = _oom_above
