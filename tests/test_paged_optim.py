"""Paged optimizers (train.optimizer paged_adamw / paged_adamw8bit): bitsandbytes' paged state
runs on CUDA only; on this CPU machine a run is refused before anything loads, naming the device,
and the estimate counts their state as their unpaged twins'."""

from __future__ import annotations

import json

import pytest

from loralab.cli import main
from loralab.estimate import optimizer_state_bytes


@pytest.mark.parametrize("optimizer", ["paged_adamw", "paged_adamw8bit"])
def test_paged_optimizer_refused_on_cpu_naming_the_device(optimizer, tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "run"
    code = main(["train", "--set", f"model.path={tiny_model_dir('llama')}", "--set", "model.device=cpu",
                 "--set", "data.path=builtin:arithmetic_2ds", "--set", "data.limit=16",
                 "--set", f"train.optimizer={optimizer}", "--out", str(out)])
    assert code == 2
    plain = optimizer.removeprefix("paged_")
    assert (f"train.optimizer {optimizer} pages optimizer state between a CUDA GPU and the host; this run is on cpu, "
            f"where bitsandbytes has nothing to page (it would be plain {plain}): set train.optimizer={plain}"
            ) in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "invalid" and "this run is on cpu" in summary["error"]
    assert not (out / "adapter").exists()


def test_paged_optimizer_state_is_counted_as_its_twin():
    shapes = [(8, 4096), (4096, 8)]
    assert optimizer_state_bytes("paged_adamw", shapes) == optimizer_state_bytes("adamw", shapes) == 8 * 2 * 8 * 4096
    assert optimizer_state_bytes("paged_adamw8bit", shapes) == optimizer_state_bytes("adamw8bit", shapes)


def test_estimate_command_counts_paged_state(capsys):
    assert main(["estimate", "--set", "model.path=builtin:tiny", "--set", "train.optimizer=paged_adamw8bit",
                 "--json"]) == 0
    paged = json.loads(capsys.readouterr().out)
    assert main(["estimate", "--set", "model.path=builtin:tiny", "--set", "train.optimizer=adamw8bit", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert paged["memory_bytes"]["optimizer_state"] == plain["memory_bytes"]["optimizer_state"] > 0
