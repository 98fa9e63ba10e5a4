"""The golden test: the quickstart config's losses pinned to stored numbers.

Self-consistency tests (fused = solo, resumed = uninterrupted, loralab = lm-eval) cannot see a
change that moves both sides alike; this one sees any change to the numbers a run computes
(data order, templates, masks, packing, initialisation, the optimizer, the loss): it trains the
shipped quickstart config (src/loralab/assets/configs/quickstart.yaml) through the command line,
cut to 10 steps, in fp32 on the CPU with the suite's 2 threads, and compares the train loss at
steps 1, 5 and 10 and the final eval loss with the values below, to 1e-5 relative.

The values hold for the torch version and CPU architecture stored with them; elsewhere the test
is skipped, saying so. After a change that moves the numbers on purpose (a new training default,
say), regenerate them and say why in the commit:

    PYTHONPATH=src python tests/test_golden.py --write
"""

from __future__ import annotations

import json
import platform
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "loralab" / "assets" / "configs" / "quickstart.yaml"
STEPS = (1, 5, 10)
REL = 1e-5
THREADS = 2  # as tests/conftest.py sets for the suite: the reduction order, hence the rounding, depends on it
REGENERATE = "PYTHONPATH=src python tests/test_golden.py --write"
# 10 steps, a train-loss line every step, a small held-out set for the final eval, no adapter saved
FLAGS = ["--set", f"train.max_steps={max(STEPS)}", "--set", "train.log_every=1", "--set", "model.dtype=fp32",
         "--set", "model.device=cpu", "--set", "data.val_max_examples=16", "--set", "output.save_adapter=false"]

# golden values: written by `python tests/test_golden.py --write`; edit by hand only to document them
GOLDEN = {
    "platform": {"torch": "2.13.0+cpu", "machine": "x86_64"},
    "train_loss": {1: 6.281520366668701, 5: 3.7265002727508545, 10: 1.8187739849090576},
    "eval_loss": 1.3444599824793197,
}
# end of golden values


def this_platform() -> dict[str, str]:
    return {"torch": torch.__version__, "machine": platform.machine()}


def quickstart_losses(out: Path) -> dict:
    """Train the cut quickstart into ``out`` with the command line; its losses as GOLDEN holds them."""
    from loralab.cli import main

    assert main(["train", str(QUICKSTART), *FLAGS, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert sorted(train) == list(range(1, max(STEPS) + 1)) and len(evals) == 1
    return {"train_loss": {s: train[s] for s in STEPS}, "eval_loss": evals[0]}


def test_quickstart_losses_match_the_stored_values(tmp_path):
    here = this_platform()
    if here != GOLDEN["platform"]:
        pytest.skip(f"the golden losses hold for {GOLDEN['platform']}, this is {here}; "
                    f"to pin them here: {REGENERATE}")
    got = quickstart_losses(tmp_path / "quickstart")
    hint = f"the quickstart's losses moved; if that is intended, regenerate them with: {REGENERATE}"
    for step in STEPS:
        assert got["train_loss"][step] == pytest.approx(GOLDEN["train_loss"][step], rel=REL), f"step {step}: {hint}"
    assert got["eval_loss"] == pytest.approx(GOLDEN["eval_loss"], rel=REL), f"eval_loss: {hint}"


def test_the_stored_values_are_a_real_run():
    """The stored numbers are a training's, not placeholders: the loss falls, by a margin far above REL."""
    losses = [GOLDEN["train_loss"][s] for s in STEPS]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    assert 0 < GOLDEN["eval_loss"] < losses[0]


def write_golden() -> None:
    """Train, then replace the GOLDEN block of this file with the new values and this platform."""
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        got = quickstart_losses(Path(tmp) / "quickstart")
    block = (f"GOLDEN = {{\n    \"platform\": {json.dumps(this_platform())},\n"
             f"    \"train_loss\": {{{', '.join(f'{s}: {v!r}' for s, v in got['train_loss'].items())}}},\n"
             f"    \"eval_loss\": {got['eval_loss']!r},\n}}\n")
    path = Path(__file__)
    text = path.read_text(encoding="utf-8")
    new, n = re.subn(r"^GOLDEN = \{\n.*?^\}\n", lambda _: block, text, count=1, flags=re.M | re.S)
    assert n == 1, f"{path}: no GOLDEN block to replace"
    path.write_text(new, encoding="utf-8")
    sys.stdout.write(f"{path}: {block}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {REGENERATE}")
    write_golden()
