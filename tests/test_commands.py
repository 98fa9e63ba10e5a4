"""The command line end to end: quickstart, train --json, generate, merge, exit codes."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from loralab.cli import main
from loralab.rundir import CONFIG, FUSED_LOG, METRICS, QUICKSTART, SUMMARY, TRAIN_LOG

SMALL = ["--set", "data.limit=64", "--set", "data.val_max_examples=16", "--set", "train.batch_size=8",
         "--set", "train.micro_batch_size=8"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short run on the shipped base with a large lr, so the adapter is clearly non-zero."""
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--out", str(out), "--set", "train.max_steps=4", "--set", "train.lr=1e-2",
                 "--set", "lora.dropout=0", "--set", "lora.targets=all", *SMALL])
    assert code == 0
    return out


@pytest.mark.slow
def test_train_json_contract(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    for key in ("status", "error", "wall_time_s", "train_time_s", "tokens_per_s", "peak_memory_bytes",
                "trainable_params", "total_params", "final_eval_loss"):
        assert key in summary
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["steps"] == 4 and summary["tokens_per_s"] > 0
    assert summary["peak_memory_bytes"] > 10 * 2**20


@pytest.mark.slow
def test_quickstart_short(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "quickstart", "--out", str(tmp_path / "qs"), "--eval-n", "10",
                           "--set", "train.max_steps=5", "--json")
    assert code == 0
    result = json.loads(out)
    for when in ("before", "after"):
        for task in ("arithmetic_2ds", "arithmetic_4ds"):
            row = result[when][task]
            assert row["n"] == 10 and 0.0 <= row["ci_low"] <= row["exact_match"] <= row["ci_high"] <= 1.0
    assert result["summary"]["steps"] == 5
    assert (tmp_path / "qs" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "qs" / "quickstart.json").read_text())["after"] == result["after"]


@pytest.mark.slow
def test_merge_matches_adapter_logits(capsys, trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from loralab.adapters import load_adapter
    from loralab.models import BUILTIN_MODELS

    code, out, _ = run_cli(capsys, "merge", str(trained_run), str(tmp_path / "merged"), "--json")
    assert code == 0 and json.loads(out)["merged"] == str(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(BUILTIN_MODELS["builtin:tiny"])
    plain = AutoModelForCausalLM.from_pretrained(BUILTIN_MODELS["builtin:tiny"]).eval()
    with_adapter = load_adapter(base, trained_run).eval()
    ids = torch.tensor([[0, 60, 61, 62, 70, 80, 90]])
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (merged, with_adapter, plain))
    assert torch.allclose(a, b, atol=1e-4)
    assert (a - c).abs().max() > 1e-3  # the merge changed the weights


@pytest.mark.slow
def test_merge_refuses_existing_output(capsys, trained_run, tmp_path):
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(capsys, "merge", str(trained_run), str(tmp_path / "taken"))
    assert code == 2 and "already exists" in err


@pytest.mark.slow
def test_generate_with_adapter(capsys, trained_run):
    code, out, _ = run_cli(capsys, "generate", "--adapter", str(trained_run), "--max-new-tokens", "4",
                           "--json", "What is 12 plus 30?")
    assert code == 0
    gens = json.loads(out)["generations"]
    assert len(gens) == 1 and gens[0]["prompt"] == "What is 12 plus 30?"


def test_bad_config_exits_2_and_names_key(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "r"), "--set", "lora.r=0",
                           "--set", "train.lr=-1")
    assert code == 2
    assert "lora.r must be > 0" in err and "train.lr must be > 0" in err
    # rejected before anything ran; the run is stored as invalid, with nothing else written
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["summary.json"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "invalid" and "lora.r must be > 0" in summary["error"]


@pytest.mark.slow
def test_eval_tasks_during_training(tmp_path):
    out = tmp_path / "evrun"
    code = main(["train", "--out", str(out), "--set", "train.max_steps=4", "--set", "eval.every=2",
                 "--set", "eval.tasks=world_pairs,arithmetic_2ds", "--set", "eval.limit=8", *SMALL])
    assert code == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert 0.0 <= e["arithmetic_2ds/exact_match"] <= 1.0 and e["world_pairs/pairs_accuracy"] >= 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_tasks"]["arithmetic_2ds/loss"] == evals[-1]["arithmetic_2ds/loss"]
    assert summary["best_eval_tasks"]["arithmetic_2ds/loss"] == min(e["arithmetic_2ds/loss"] for e in evals)


# ----------------------------------------------------------------------------- one place per concept

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loralab"


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal in a module, f-string parts included, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def _add_parser_calls(path: Path) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("add_parser", "add_subparsers")]


def test_run_directory_names_and_the_command_line_each_live_in_one_place():
    """Only rundir.py spells the run directory's file names (docstrings aside: prose may name
    them); only loralab/cli/ defines subcommands."""
    names = (SUMMARY, METRICS, CONFIG, TRAIN_LOG, FUSED_LOG, QUICKSTART)
    modules = sorted(PACKAGE.rglob("*.py"))
    spelled, parsers = {}, {}
    for path in modules:
        rel = path.relative_to(PACKAGE).as_posix()
        for line, text in _code_strings(path):
            for name in names:
                if re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text):  # not train.log_every
                    spelled.setdefault(rel, []).append(f"{line}: {name}")
        if calls := _add_parser_calls(path):
            parsers[rel] = calls
    # the checks see what they look for: rundir.py spells every name, cli/ adds the parsers
    assert {n.split(": ")[1] for n in spelled.pop("rundir.py")} == set(names)
    assert {"cli/run.py", "cli/eval.py", "cli/estimate.py", "cli/study.py", "cli/tune.py"} <= set(parsers)
    assert spelled == {}, f"run-directory file names spelled outside rundir.py (use RunDir or its constants): {spelled}"
    outside = {m: lines for m, lines in parsers.items() if not m.startswith("cli/")}
    assert outside == {}, f"subcommands defined outside loralab/cli/: {outside}"


def test_output_to_a_reader_that_left_early_ends_quietly(tmp_path):
    """`loralab ... | head -1`: the reader closes the pipe and the next write fails (EPIPE). The
    command ends with 141, as a shell reports SIGPIPE, and no traceback (it printed one)."""
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parent.parent / "src")
    proc = subprocess.Popen([sys.executable, "-m", "loralab.cli", "study", "presets"],
                            env={**os.environ, "PYTHONPATH": src}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
