"""Failing safely: divergence, out of memory and a full disk; and nothing executes from a file.

Faults are injected honestly and said so: a NaN or inf is put into the loss or a gradient at
a chosen step by wrapping loralab's own step function, an out-of-memory error is raised by
wrapping the loss function (this machine has no GPU to exhaust), and a full disk is an
OSError(ENOSPC) raised from the write function after part of the file was written.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loralab.train.checkpoint as ckpt_mod
import loralab.train.core as core
import loralab.train.evaluation as evaluation
from loralab.errors import DivergedError, LoralabError
from loralab.train.checkpoint import complete_checkpoints, latest_checkpoint, load_checkpoint
from loralab.train.loop import train

RUN = dict(train__max_steps=6, train__batch_size=8, train__micro_batch_size=4, train__lr=1e-3,
           lora__dropout=0.1, data__limit=24, train__checkpoint_every=2, train__keep_last=3)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def summary_of(cfg) -> dict:
    return json.loads((Path(cfg.output.dir) / "summary.json").read_text())


def rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]


def poison_step(monkeypatch, bad_step: int, where: str) -> None:
    """Make optimizer step ``bad_step`` non-finite: its loss (``where="loss"``) or one gradient."""
    original = core.forward_backward
    calls = {"n": 0}

    def wrapped(adapters, *args, **kw):
        calls["n"] += 1
        losses, tokens = original(adapters, *args, **kw)
        if calls["n"] == bad_step:
            if where == "loss":
                losses = torch.full_like(losses, float("nan"))
            else:
                p = next(p for p in adapters.model.parameters() if p.requires_grad)
                p.grad[0, 0] = float("inf")
        return losses, tokens

    monkeypatch.setattr(core, "forward_backward", wrapped)


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_stops_within_the_step(model_dir, cfg_factory, monkeypatch, where):
    cfg = cfg_factory(model_dir, **RUN)
    poison_step(monkeypatch, 5, where)
    with pytest.raises(DivergedError) as exc:
        train(cfg)
    assert exc.value.exit_code == 3
    s = summary_of(cfg)
    assert s["status"] == "diverged" and s["diverged_at_step"] == 5
    assert s["last_good_checkpoint"].endswith("step-000004")
    assert "step 5" in s["error"] and "step-000004" in s["error"]
    run = Path(cfg.output.dir)
    assert not (run / "adapter").exists()  # nothing from after the divergence is promoted
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-000002", "step-000004"]
    m = rows(cfg)
    assert m[-1]["event"] == "diverged" and m[-1]["step"] == 5
    assert max(r["step"] for r in m) == 5  # stopped within the step: no step 6
    assert all(math.isfinite(r["train_loss"]) for r in m if "lr" in r)


def test_nonfinite_skip_is_counted(model_dir, cfg_factory, monkeypatch):
    cfg = cfg_factory(model_dir, **RUN, train__on_nonfinite="skip")
    poison_step(monkeypatch, 3, "gradient")
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1
    events = [r for r in rows(cfg) if r.get("event")]
    assert events == [{"step": 3, "event": "skipped_nonfinite", "train_loss": events[0]["train_loss"],
                       "skipped_steps": 1}]
    assert [r["step"] for r in rows(cfg) if "lr" in r] == [1, 2, 4, 5, 6]
    tensors = load_file(str(Path(cfg.output.dir) / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


# ----------------------------------------------------------------------------- out of memory


def oom_above(monkeypatch, limit: int) -> None:
    """Raise torch.OutOfMemoryError for micro batches larger than ``limit`` (before any compute)."""
    original = core.run_losses

    def wrapped(model, batch, n_runs, autocast):
        if batch["input_ids"].shape[0] > limit:
            raise torch.OutOfMemoryError(f"injected: micro batch {batch['input_ids'].shape[0]} > {limit}")
        return original(model, batch, n_runs, autocast)

    for module in (core, evaluation):  # the training and the evaluation forwards
        monkeypatch.setattr(module, "run_losses", wrapped)


def test_out_of_memory_reports_estimate_and_peak(model_dir, cfg_factory, monkeypatch):
    cfg = cfg_factory(model_dir, **RUN)
    oom_above(monkeypatch, 2)
    with pytest.raises(LoralabError) as exc:
        train(cfg)
    s = summary_of(cfg)
    assert s["status"] == "out_of_memory" and "injected" in s["error"]
    assert s["peak_memory_bytes"] > 0 and s["estimated_memory_bytes"] > 0
    msg = str(exc.value)
    assert "measured peak" in msg and "loralab estimate" in msg and "train.auto_micro_batch" in msg
    assert f"{s['estimated_memory_bytes'] / 2**20:.0f} MiB" in msg


def test_auto_micro_batch_halves_until_it_fits(model_dir, cfg_factory, monkeypatch):
    # padded micro batches: the injected error counts a micro batch's rows (a packed forward is one row)
    reference = cfg_factory(model_dir, **{**RUN, "train__micro_batch_size": 2}, data__packing="false")
    train(reference)
    cfg = cfg_factory(model_dir, **{**RUN, "train__micro_batch_size": 8}, train__auto_micro_batch="true",
                      data__packing="false")
    oom_above(monkeypatch, 2)
    summary = train(cfg)
    assert summary["status"] == "completed"
    assert summary["micro_batch_size"] == 2
    assert summary["micro_batch_changes"] == [{"step": 1, "from": 8, "to": 4}, {"step": 1, "from": 4, "to": 2}]
    # The global batch is unchanged, so the run equals one started at micro batch 2 (the
    # injected error fires before any forward pass, so no dropout randomness was used up).
    a = load_file(str(Path(cfg.output.dir) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(reference.output.dir) / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [r["train_loss"] for r in rows(cfg) if "lr" in r] == [r["train_loss"] for r in rows(reference) if "lr" in r]
    state = json.loads((latest_checkpoint(Path(cfg.output.dir)) / "trainer_state.json").read_text())
    assert state["micro_batch_size"] == 2  # a resume keeps the size that fits
    assert state["micro_batches"] == state["step"] * 4  # the data position counted at that size


@pytest.mark.slow
def test_auto_micro_batch_keeps_whole_micro_batches_per_step(model_dir, cfg_factory, monkeypatch):
    """Global batch 15 at micro batch 5: halving to 2 would make steps of 14 examples; the
    largest divisor of 15 at most 2 is 1."""
    # padded micro batches: the injected error counts a micro batch's rows (a packed forward is one row)
    reference = train(cfg_factory(model_dir, **{**RUN, "train__batch_size": 15, "train__micro_batch_size": 1},
                                  data__packing="false"))
    cfg = cfg_factory(model_dir, **{**RUN, "train__batch_size": 15, "train__micro_batch_size": 5},
                      train__auto_micro_batch="true", data__packing="false")
    oom_above(monkeypatch, 2)
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["micro_batch_size"] == 1
    assert summary["micro_batch_changes"] == [{"step": 1, "from": 5, "to": 1}]
    assert summary["tokens_seen"] == reference["tokens_seen"]  # 15 examples a step, as planned


# ----------------------------------------------------------------------------- disk full


def test_disk_full_during_checkpoint(model_dir, cfg_factory, monkeypatch):
    cfg = cfg_factory(model_dir, **RUN)
    original = ckpt_mod.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (3 tensor files) fits; the second does not
            Path(path).write_bytes(b"\0" * 100)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return original(tensors, path, *a, **kw)

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    with pytest.raises(LoralabError) as exc:
        train(cfg)
    s = summary_of(cfg)
    assert s["status"] == "failed" and "disk full" in s["error"] and "step-000002" in s["error"]
    assert "disk full" in str(exc.value)
    root = Path(cfg.output.dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # no half-written step-000004 or temporary
    assert not (Path(cfg.output.dir) / "adapter").exists()
    # the previous checkpoint still loads
    from transformers import AutoModelForCausalLM

    from loralab.adapters import attach_lora
    from loralab.train.optim import build_optimizer, build_scheduler

    model = attach_lora(AutoModelForCausalLM.from_pretrained(str(model_dir)), cfg.lora, seed=0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = build_optimizer(list(trainable.values()), cfg.train)
    state = load_checkpoint(latest_checkpoint(Path(cfg.output.dir)), params=trainable, opt=opt,
                            sched=build_scheduler(opt, cfg.train, 6))
    assert state.step == 2 and state.micro_batches == 4


def test_disk_full_while_saving_the_adapter(model_dir, cfg_factory, monkeypatch):
    import peft.peft_model

    cfg = cfg_factory(model_dir, **RUN)

    def full_disk(tensors, path, *a, **kw):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    with pytest.raises(LoralabError, match="disk full"):
        train(cfg)
    run = Path(cfg.output.dir)
    s = summary_of(cfg)
    assert s["status"] == "failed" and "disk full" in s["error"] and "step-000004" in s["error"]
    assert not (run / "adapter").exists() and not [p.name for p in run.iterdir() if "tmp" in p.name]  # no temporary


# ----------------------------------------------------------------------------- nothing executes from a file


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_payload_is_live(tmp_path):
    """The planted files below would run code if anything unpickled them."""
    import pickle

    marker = tmp_path / "ran"
    plant(tmp_path / "x.pt", marker)
    pickle.loads((tmp_path / "x.pt").read_bytes())
    assert marker.exists()


@pytest.fixture(scope="module")
def paused_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run paused at step 2 with one checkpoint and an adapter."""
    from conftest import make_cfg

    out = tmp_path_factory.mktemp("safety") / "paused"
    train(make_cfg(tiny_model_dir("llama"), out, **{**RUN, "train__stop_at_step": 2}))
    return out


@pytest.mark.parametrize("keep_safetensors", [True, False])
def test_planted_adapter_bin_is_refused(paused_run, model_dir, tmp_path, capsys, keep_safetensors):
    import shutil

    from loralab.cli import main

    adapter = tmp_path / "adapter"
    shutil.copytree(paused_run / "adapter", adapter)
    if not keep_safetensors:
        (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran"
    plant(adapter / "adapter_model.bin", marker)
    code = main(["generate", "--model", str(model_dir), "--adapter", str(adapter), "--max-new-tokens", "2", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert "adapter_model.bin" in err and "never opens them" in err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_planted_checkpoint_pickle_is_refused(paused_run, tmp_path, capsys, name):
    import shutil

    from loralab.cli import main

    run = tmp_path / "run"
    shutil.copytree(paused_run, run)
    marker = tmp_path / "ran"
    plant(run / "checkpoints" / "step-000002" / name, marker)
    code = main(["train", "--resume", str(run), "--set", "train.stop_at_step=null"])
    err = capsys.readouterr().err
    assert code == 2 and name in err and "pickled" in err
    assert not marker.exists()
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "failed" and name in s["error"]


def test_model_dir_with_only_pickled_weights_is_refused(model_dir, tmp_path, cfg_factory):
    import shutil

    from loralab.errors import ModelError

    bad = tmp_path / "pickled-model"
    bad.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, bad / f.name)
    marker = tmp_path / "ran"
    plant(bad / "pytorch_model.bin", marker)
    with pytest.raises(ModelError, match="never pickled .bin"):
        train(cfg_factory(bad))
    assert not marker.exists()


def test_yaml_object_tag_refused_through_the_cli(tmp_path, capsys, paused_run):
    import shutil

    from loralab.cli import main

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"lora:\n  r: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    assert main(["train", str(evil), "--out", str(tmp_path / "r")]) == 2
    assert "safe_load" in capsys.readouterr().err
    # the same tag planted in a run's config.yaml stops a resume
    run = tmp_path / "run"
    shutil.copytree(paused_run, run)
    cfg_text = (run / "config.yaml").read_text()
    payload = f"  r: !!python/object/apply:os.system ['touch {marker}']"
    (run / "config.yaml").write_text(cfg_text.replace("  r: 8", payload))
    assert main(["train", "--resume", str(run)]) == 2
    assert f"{run / 'config.yaml'}:" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "runs/../../x"])
def test_traversing_run_names_refused(tmp_path, monkeypatch, capsys, name):
    from loralab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--name", name]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_run_name_symlinked_outside_refused(tmp_path, monkeypatch, capsys):
    from loralab.cli import main

    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "evil").symlink_to(outside)
    assert main(["train", "--name", "evil"]) == 2
    assert "outside" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


def test_trust_remote_code_is_recorded(model_dir, cfg_factory, paused_run):
    assert json.loads((paused_run / "summary.json").read_text())["trust_remote_code"] is False
    cfg = cfg_factory(model_dir, train__max_steps=1, model__trust_remote_code="true")
    assert train(cfg)["trust_remote_code"] is True
    assert summary_of(cfg)["trust_remote_code"] is True


def test_yaml_object_tag_refused_in_a_study_file(tmp_path, capsys):
    from loralab.cli import main

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"name: evil\nbase:\n  lora:\n    r: !!python/object/apply:os.system ['touch {marker}']\n"
                    "axes:\n  lora.alpha: [8]\n", encoding="utf-8")
    assert main(["study", "run", str(evil), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"{evil}:4: not valid YAML" in err and "safe_load" in err
    assert not marker.exists() and not (tmp_path / "runs").exists()


# test_study.py::test_invalid_studies_are_refused_with_the_key has __import__(...).system(...) and ().__class__
@pytest.mark.parametrize(("expr", "found"), [
    ("(lambda: __import__('os').system('touch {marker}'))()", "found Call"),
    ("abs(lora.r)", "found Call"),
    ("[__import__('os').system('touch {marker}') for _ in 'x']", "found ListComp"),
    ("lora.r.__class__.__base__.__subclasses__()", "found Call"),
    ("lora.r.__class__", "'lora.r.__class__' in 'lora.r.__class__' is not a training-config key"),
    ("lora.r if __import__('os').system('touch {marker}') else 2", "found IfExp"),
])
def test_tied_expression_that_reaches_for_code_is_refused(tmp_path, capsys, expr, found):
    from loralab.cli import main
    from studytools import write_study

    marker = tmp_path / "ran"
    expr = expr.replace("{marker}", str(marker))
    path = write_study(tmp_path, axes={"lora.r": [2]}, tied={"lora.alpha": expr})
    assert main(["study", "run", str(path), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "tied lora.alpha" in err and found in err and str(path) in err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def custom_code_model(model_dir: Path, out: Path, marker: Path, part: str) -> Path:
    """A copy of ``model_dir`` whose config.json (``part="model"``) or tokenizer_config.json
    (``part="tokenizer"``) sends transformers to a Python file of its own (auto_map), as a hub
    repository with custom code does; importing that file creates ``marker``."""
    import shutil

    shutil.copytree(model_dir, out)
    plant = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    if part == "model":
        config = json.loads((out / "config.json").read_text())
        config.update(model_type="loralab_custom", architectures=["CustomForCausalLM"],
                      auto_map={"AutoConfig": "custom_code.CustomConfig",
                                "AutoModelForCausalLM": "custom_code.CustomForCausalLM"})
        (out / "config.json").write_text(json.dumps(config))
        (out / "custom_code.py").write_text(
            plant + "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "class CustomConfig(LlamaConfig):\n    model_type = 'loralab_custom'\n"
            "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    else:
        config = json.loads((out / "tokenizer_config.json").read_text())
        config.update(tokenizer_class="CustomTokenizer",
                      auto_map={"AutoTokenizer": [None, "custom_code.CustomTokenizer"]})
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        (out / "custom_code.py").write_text(
            plant + "from transformers import PreTrainedTokenizerFast\n"
            "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return out


@pytest.mark.parametrize(("part", "what", "loaded"), [("model", "the model", "CustomForCausalLM"),
                                                      ("tokenizer", "a tokenizer", "CustomTokenizer")])
def test_model_code_runs_only_with_trust_remote_code(model_dir, tmp_path, cfg_factory, monkeypatch, part, what, loaded):
    import sys

    import transformers.dynamic_module_utils as dynamic

    from loralab.errors import ModelError
    from loralab.models import load_base

    marker = tmp_path / "ran"
    custom = custom_code_model(model_dir, tmp_path / "custom", marker, part)
    with pytest.raises(ModelError) as exc:
        train(cfg_factory(custom))
    assert exc.value.exit_code == 2
    # refused at the first file that needs the code: config.json (the model's), or the tokenizer
    assert f"model.path {custom}: cannot load {what}" in str(exc.value) or (
        part == "model" and f"model.path {custom}: its config.json cannot be read" in str(exc.value))
    assert "runs only with model.trust_remote_code: true" in str(exc.value)
    assert not marker.exists()
    # the control: with the key set, transformers imports the file (into a module cache of this test's)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    cfg = cfg_factory(custom, model__trust_remote_code="true")
    try:
        lm, tokenizer = load_base(cfg.model, cfg.quant)
    finally:  # the modules imported from that cache go with it
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]
    assert loaded in (type(lm).__name__, type(tokenizer).__name__) and marker.read_text() == "ran"
