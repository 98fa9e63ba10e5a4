"""Fused training: K runs over one base equal their solo runs (losses, adapters, logits, tasks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from loralab.config import LoraConfig
from loralab.errors import ConfigError, DataError
from loralab.train.fused import check_group, fuse_key, train_fused
from loralab.train.group import initial_adapter
from loralab.train.loop import train

# One group mixing rank, alpha, rsLoRA, targets, init, optimizers, schedules and learning rates.
VARIANTS = [
    dict(lora__r=2, lora__alpha=4.0, train__lr=1e-3),
    dict(lora__r=8, lora__alpha=16.0, lora__rslora=True, train__lr=3e-3, train__grad_clip=0.5,
         lora__targets="query,key,value,projection,mlp"),
    dict(lora__r=4, lora__alpha=32.0, lora__init="gaussian", train__lr=5e-4, lora__targets="mlp,head",
         train__optimizer="sgd", train__momentum=0.9, train__scheduler="linear", train__weight_decay=0.1),
]
SHARED = dict(lora__dropout=0.0, train__max_steps=4, train__batch_size=4, train__micro_batch_size=2,
              eval__every=2, train__warmup_steps=1, data__limit=32, data__val_max_examples=8)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir, key: str) -> list[float]:
    return [r[key] for r in metrics(run_dir) if key in r]


def adapter_tensors(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def assert_same_run(solo_dir, fused_dir) -> None:
    for key in ("train_loss", "eval_loss", "grad_norm", "lr"):
        a, b = curve(solo_dir, key), curve(fused_dir, key)
        assert len(a) == len(b) > 0, key
        assert b == pytest.approx(a, rel=1e-4), key
    sa, sb = adapter_tensors(solo_dir), adapter_tensors(fused_dir)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        # Rounding only: matmuls over K runs' rows round differently from one run's, and Adam's
        # normalised step turns rounding-sized differences in tiny gradients into weight
        # differences. The scale: the same solo run with the output head computed at every
        # position instead of only at label positions ends up to 7.5e-5 apart (the rsLoRA variant).
        assert (sa[k] - sb[k]).abs().max().item() <= 2e-4, k
    ca = json.loads((Path(solo_dir) / "adapter" / "adapter_config.json").read_text())
    cb = json.loads((Path(fused_dir) / "adapter" / "adapter_config.json").read_text())
    assert ca == cb


@pytest.fixture(scope="module")
def solo_and_fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")

    def cfg(i: int, tag: str):
        return make_cfg("builtin:tiny", root / f"{tag}{i}", **{**SHARED, **VARIANTS[i]})

    solo = [train(cfg(i, "solo")) for i in range(len(VARIANTS))]
    fused = train_fused([cfg(i, "fused") for i in range(len(VARIANTS))])
    return root, solo, fused


def test_fused_runs_equal_their_solo_runs(solo_and_fused):
    root, solo, fused = solo_and_fused
    for i in range(len(VARIANTS)):
        assert_same_run(root / f"solo{i}", root / f"fused{i}")
    # the runs really differ from one another: different adapters, different curves
    finals = [round(s["final_eval_loss"], 6) for s in fused]
    assert len(set(finals)) == len(VARIANTS)
    for s, f in zip(solo, fused, strict=True):
        assert f["final_eval_loss"] == pytest.approx(s["final_eval_loss"], rel=1e-4)
        assert f["trainable_params"] == s["trainable_params"]
        assert f["total_params"] == s["total_params"]
        assert f["tokens_seen"] == s["tokens_seen"]


@pytest.mark.slow
def test_fused_runs_stay_within_bf16_rounding_of_their_solo_runs(tmp_path):
    """In bf16 (model.dtype auto on CPUs with AMX/AVX512-BF16 and on current GPUs) a fused run and
    its solo run round their bf16 activations in a different order (the group's rows are
    concatenated, PEFT adds one run's delta), so they agree to bf16 rounding, not to 1e-4.
    Measured on this project's CPU over these 4 steps: losses within 0.32% (relative), gradient
    norms within 2.1%, adapter weights within 3.1e-3; the bounds below leave about 3x of margin
    (docs/runs.md, "Fused groups")."""
    def cfg(i: int, tag: str):
        return make_cfg("builtin:tiny", tmp_path / f"{tag}{i}", model__dtype="bf16", **{**SHARED, **VARIANTS[i]})

    solo = [train(cfg(i, "solo")) for i in range(len(VARIANTS))]
    fused = train_fused([cfg(i, "fused") for i in range(len(VARIANTS))])
    for i, (s, f) in enumerate(zip(solo, fused, strict=True)):
        assert s["dtype"] == f["dtype"] == "bf16"
        for key, rel in (("train_loss", 1e-2), ("eval_loss", 1e-2), ("grad_norm", 6e-2)):
            a, b = curve(tmp_path / f"solo{i}", key), curve(tmp_path / f"fused{i}", key)
            assert len(a) == len(b) > 0 and b == pytest.approx(a, rel=rel), key
        sa, sb = adapter_tensors(tmp_path / f"solo{i}"), adapter_tensors(tmp_path / f"fused{i}")
        # the adapters train in fp32 over the bf16 base (PEFT also saves a targeted tied head's base weight)
        assert all(t.dtype == torch.float32 for k, t in sa.items() if "lora_" in k)
        assert max((sa[k] - sb[k]).abs().max().item() for k in sa) <= 1e-2
        assert f["final_eval_loss"] == pytest.approx(s["final_eval_loss"], rel=1e-2)


def test_fused_run_directories(solo_and_fused):
    root, _, fused = solo_and_fused
    dirs = [str(root / f"fused{i}") for i in range(len(VARIANTS))]
    group = fused[0]["fused"]
    assert group["group_size"] == len(VARIANTS)
    for i, s in enumerate(fused):
        run_dir = Path(dirs[i])
        on_disk = json.loads((run_dir / "summary.json").read_text())
        assert on_disk["status"] == s["status"] == "completed"
        assert on_disk["fused_with"] == [d for d in dirs if d != dirs[i]]
        assert (run_dir / "config.yaml").is_file()
        assert s["wall_time_s"] > s["train_time_s"] > 0
        assert s["tokens_per_s"] == pytest.approx(s["tokens_seen"] / s["train_time_s"])
    # equal shares: the runs' wall times add up to the group's wall time
    assert sum(s["wall_time_s"] for s in fused) == pytest.approx(group["group_wall_time_s"], rel=1e-6)
    assert sum(s["train_time_s"] for s in fused) == pytest.approx(group["group_train_time_s"], rel=1e-6)


def test_fused_adapter_loads_in_peft_with_solo_logits(solo_and_fused):
    from loralab.adapters import load_adapter
    from loralab.config import ModelConfig, QuantConfig
    from loralab.models import load_base

    root, _, _ = solo_and_fused
    ids = torch.tensor([[0, 57, 301, 9, 44, 120, 7, 1]])
    logits = {}
    for tag in ("solo", "fused"):
        base, _ = load_base(ModelConfig(device="cpu"), QuantConfig())
        model = load_adapter(base, root / f"{tag}1").eval()
        with torch.no_grad():
            logits[tag] = model(input_ids=ids).logits
    base, _ = load_base(ModelConfig(device="cpu"), QuantConfig())
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    assert (logits["fused"] - plain).abs().max().item() > 1e-3  # the adapter changes the output
    # the adapters differ by rounding (see assert_same_run)
    assert (logits["fused"] - logits["solo"]).abs().max().item() <= 1e-4


def test_initial_adapter_is_peft_init_and_leaves_base_unchanged():
    from loralab.adapters import attach_lora
    from loralab.config import ModelConfig, QuantConfig
    from loralab.models import load_base

    base, _ = load_base(ModelConfig(device="cpu"), QuantConfig())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=4, alpha=8.0, rslora=True, targets=["query", "mlp"])
    init = initial_adapter(base, lora, seed=7)
    assert {k: torch.equal(v, before[k]) for k, v in base.state_dict().items()} == dict.fromkeys(before, True)
    assert not any("lora" in n for n, _ in base.named_modules())
    peft = attach_lora(base, lora, seed=7)
    layers = {n: m for n, m in peft.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert sorted(layers) == sorted(init.weights) and len(layers) == 6 * 4
    for name, w in init.weights.items():
        assert torch.equal(w.A, layers[name].lora_A["default"].weight)
        assert torch.equal(w.B, torch.zeros_like(w.B))
        assert w.scaling == pytest.approx(8.0 / 2.0)


# ----------------------------------------------------------------------------- grouping


def test_fuse_key_groups_adapter_and_optimizer_variants(tmp_path):
    a = make_cfg("builtin:tiny", tmp_path / "a")
    b = make_cfg("builtin:tiny", tmp_path / "b", lora__r=32, lora__alpha=64.0, lora__dropout=0.1, lora__rslora=True,
                 lora__targets="mlp", lora__init="gaussian", train__lr=1e-5, train__optimizer="sgd",
                 train__scheduler="constant", train__warmup_steps=3, train__weight_decay=0.0, train__grad_clip=2.0)
    assert fuse_key(a) == fuse_key(b)
    hash(fuse_key(a))
    for kw in (dict(train__seed=2), dict(data__shuffle=False), dict(train__micro_batch_size=2),
               dict(train__max_steps=4), dict(model__dtype="bf16"), dict(quant__mode="nf4"),
               dict(data__path="builtin:arithmetic_4ds"), dict(eval__every=2), dict(train__autocast="bf16")):
        assert fuse_key(make_cfg("builtin:tiny", tmp_path / "c", **kw)) != fuse_key(a), kw


def test_group_checks_name_the_key(tmp_path):
    a = make_cfg("builtin:tiny", tmp_path / "a")
    b = make_cfg("builtin:tiny", tmp_path / "b", train__seed=5)
    with pytest.raises(ConfigError, match=r"differ in train\.seed \(1337 vs 5\)"):
        check_group([a, b])
    with pytest.raises(ConfigError, match="more than one run"):
        check_group([a, make_cfg("builtin:tiny", tmp_path / "a", lora__r=4)])
    with pytest.raises(ConfigError, match="DoRA"):
        fuse_key(make_cfg("builtin:tiny", tmp_path / "d", lora__dora=True))
    # what a solo run has, a group has: these are shared keys, not refusals
    for kw in (dict(train__auto_micro_batch=True), dict(train__checkpoint_every=2), dict(train__stop_at_step=2),
               dict(train__gradient_checkpointing=True)):
        assert fuse_key(make_cfg("builtin:tiny", tmp_path / "d", **kw)) != fuse_key(a), kw
    with pytest.raises(ConfigError, match="at least one"):
        check_group([])
    from loralab.config import ModelConfig, QuantConfig
    from loralab.models import load_base

    base, _ = load_base(ModelConfig(device="cpu"), QuantConfig())
    with pytest.raises(ConfigError, match="DoRA"):  # the one refusal, train.group.refuse_dora
        initial_adapter(base, LoraConfig(dora=True), seed=0)


# ----------------------------------------------------------------------------- failures


@pytest.mark.slow
def test_a_diverging_run_stops_alone(tmp_path):
    kw = dict(lora__dropout=0.0, train__max_steps=5, train__optimizer="sgd", train__scheduler="constant",
              train__warmup_steps=0, train__grad_clip="null", data__limit=32)
    good = make_cfg("builtin:tiny", tmp_path / "good", train__lr=1e-3, **kw)
    bad = make_cfg("builtin:tiny", tmp_path / "bad", train__lr=1e30, **kw)
    skip = make_cfg("builtin:tiny", tmp_path / "skip", train__lr=1e30, train__on_nonfinite="skip", **kw)
    # AdamW's first update at lr 1e38 (lr / (1 - beta1) = 1e39) overflows fp32 inside the optimizer
    # step: a RuntimeError there used to fail the whole group
    huge = make_cfg("builtin:tiny", tmp_path / "huge", train__lr=1e38, **{**kw, "train__optimizer": "adamw"})
    out = train_fused([good, bad, skip, huge])
    assert [s["status"] for s in out] == ["completed", "diverged", "completed", "diverged"]
    assert "non-finite" in out[1]["error"]
    assert out[3]["error"].startswith("the optimizer step at step 1 failed (value cannot be converted to type float "
                                      "without overflow; learning rate 1e+38)")
    assert out[3]["diverged_at_step"] == 1 and not (tmp_path / "huge" / "adapter").exists()
    assert json.loads((tmp_path / "bad" / "summary.json").read_text())["status"] == "diverged"
    assert not (tmp_path / "bad" / "adapter").exists()
    assert curve(tmp_path / "bad", "event") == ["diverged"]
    assert out[2]["skipped_steps"] >= 1
    solo = train(make_cfg("builtin:tiny", tmp_path / "solo", train__lr=1e-3, **kw))
    assert_same_run(tmp_path / "solo", tmp_path / "good")
    assert out[0]["final_eval_loss"] == pytest.approx(solo["final_eval_loss"], rel=1e-4)


def test_group_failure_is_recorded_in_every_run(tmp_path, monkeypatch):
    import loralab.train.core as core

    cfgs = [make_cfg("builtin:tiny", tmp_path / f"r{i}", data__path=str(tmp_path / "missing.jsonl"), lora__r=2 + i)
            for i in range(2)]
    with pytest.raises(DataError, match="does not exist"):
        train_fused(cfgs)
    for i in range(2):  # bad input found before the first step: invalid, as for train(cfg)
        s = json.loads((tmp_path / f"r{i}" / "summary.json").read_text())
        assert s["status"] == "invalid" and "does not exist" in s["error"]

    def broken(*args, **kwargs):  # injected: an error of the same kind once training has begun
        raise DataError("injected during training")

    monkeypatch.setattr(core, "forward_backward", broken)
    cfgs = [make_cfg("builtin:tiny", tmp_path / f"t{i}", lora__r=2 + i) for i in range(2)]
    with pytest.raises(DataError, match="injected"):
        train_fused(cfgs)
    assert {json.loads((tmp_path / f"t{i}" / "summary.json").read_text())["status"] for i in range(2)} == {"failed"}


# ----------------------------------------------------------------------------- other bases


def no_dropout_copy(model_dir: Path, out: Path) -> Path:
    """The model with its own dropout off: base-model dropout draws different masks when the
    batch holds K copies, so only a dropout-free base can equal its solo run exactly."""
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        cfg[key] = 0.0
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_fused_gpt2_conv1d_and_eval_tasks(tiny_model_dir, tmp_path):
    """GPT-2's Conv1D layers, and evaluation tasks (generation and scoring) run per run."""
    path = no_dropout_copy(tiny_model_dir("gpt2"), tmp_path / "gpt2")
    kw = dict(lora__dropout=0.0, train__max_steps=3, train__lr=5e-3, eval__tasks="world_pairs,arithmetic_2ds",
              eval__limit=4, data__limit=24)
    variants = [dict(lora__r=2, lora__targets="query,key,value"), dict(lora__r=4, lora__targets="projection,mlp")]
    solo = [train(make_cfg(path, tmp_path / f"s{i}", **kw, **v)) for i, v in enumerate(variants)]
    fused = train_fused([make_cfg(path, tmp_path / f"f{i}", **kw, **v) for i, v in enumerate(variants)])
    for i in range(2):
        assert_same_run(tmp_path / f"s{i}", tmp_path / f"f{i}")
        assert fused[i]["final_eval_tasks"].keys() == solo[i]["final_eval_tasks"].keys()
        for k, v in solo[i]["final_eval_tasks"].items():
            assert fused[i]["final_eval_tasks"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_fused_qlora_nf4(tiny_model_dir, tmp_path):
    """Real bitsandbytes 4-bit base (fp32 compute): fused equals solo."""
    path = tiny_model_dir("llama_h64")
    kw = dict(quant__mode="nf4", quant__compute_dtype="fp32", lora__dropout=0.0, train__max_steps=3,
              data__limit=24)
    variants = [dict(lora__r=2, train__lr=3e-3), dict(lora__r=8, lora__targets="mlp", train__lr=1e-3)]
    for i, v in enumerate(variants):
        train(make_cfg(path, tmp_path / f"s{i}", **kw, **v))
    train_fused([make_cfg(path, tmp_path / f"f{i}", **kw, **v) for i, v in enumerate(variants)])
    for i in range(2):
        assert_same_run(tmp_path / f"s{i}", tmp_path / f"f{i}")


@pytest.mark.slow
def test_dropout_trains_and_is_reproducible(tmp_path):
    kw = dict(lora__dropout=0.3, train__max_steps=3, data__limit=24, train__lr=3e-3)
    runs = []
    for rep in range(2):
        runs.append(train_fused([make_cfg("builtin:tiny", tmp_path / f"{rep}-{i}", lora__r=2 + 2 * i, **kw)
                                 for i in range(2)]))
    assert [s["final_eval_loss"] for s in runs[0]] == [s["final_eval_loss"] for s in runs[1]]
    assert curve(tmp_path / "0-0", "train_loss") != curve(tmp_path / "0-1", "train_loss")


@pytest.mark.slow
def test_halving_inside_a_fused_group(tmp_path):
    """Rungs at steps 3 and 6 (eta 2): the worse half stops at each; the survivor trains on
    exactly as it would alone."""
    from loralab.train.fused import Prune

    kw = dict(lora__dropout=0.0, train__max_steps=9, train__batch_size=4, train__micro_batch_size=4,
              train__warmup_steps=0, data__limit=48, data__val_max_examples=8)
    lrs = [1e-5, 3e-3, 1e-4, 1e-3]
    cfgs = [make_cfg("builtin:tiny", tmp_path / f"lr{i}", train__lr=lr, **kw) for i, lr in enumerate(lrs)]
    out = train_fused(cfgs, prune=Prune(eta=2, min_steps=3))
    stopped = {i: s["stopped_at_step"] for i, s in enumerate(out) if s["status"] == "stopped_early"}
    survivors = [i for i, s in enumerate(out) if s["status"] == "completed"]
    assert len(survivors) == 1 and sorted(stopped.values()) == [3, 3, 6]

    def eval_at(i: int, step: int) -> float:
        return next(r["eval_loss"] for r in metrics(tmp_path / f"lr{i}") if r.get("step") == step and "eval_loss" in r)

    at3 = sorted(range(4), key=lambda i: eval_at(i, 3))
    assert {i for i, s in stopped.items() if s == 3} == set(at3[2:])  # the worse half at rung 1
    at6 = sorted(at3[:2], key=lambda i: eval_at(i, 6))
    assert survivors == at6[:1] and stopped[at6[1]] == 6
    for i in stopped:
        assert not (tmp_path / f"lr{i}" / "adapter").exists()
        assert curve(tmp_path / f"lr{i}", "event") == ["stopped_early"]
    best = survivors[0]
    solo = train(make_cfg("builtin:tiny", tmp_path / "solo", train__lr=lrs[best], **kw))
    expected = curve(tmp_path / "solo", "train_loss")
    assert curve(tmp_path / f"lr{best}", "train_loss") == pytest.approx(expected, rel=1e-4)
    assert out[best]["final_eval_loss"] == pytest.approx(solo["final_eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_fused_packed_runs_equal_their_solo_packed_runs(tmp_path):
    """data.packing lays out a fused step exactly as a solo step."""
    kw = dict(lora__dropout=0.0, train__max_steps=3, train__batch_size=4, train__micro_batch_size=2,
              train__warmup_steps=0, data__limit=24, data__val_max_examples=8, data__packing=True)
    lrs = [1e-3, 3e-3]
    fused = train_fused([make_cfg("builtin:tiny", tmp_path / f"f{i}", train__lr=lr, **kw) for i, lr in enumerate(lrs)])
    for i, lr in enumerate(lrs):
        solo = train(make_cfg("builtin:tiny", tmp_path / f"s{i}", train__lr=lr, **kw))
        assert_same_run(tmp_path / f"s{i}", tmp_path / f"f{i}")
        assert fused[i]["tokens_seen"] == solo["tokens_seen"]


@pytest.mark.slow
def test_fused_rerun_into_the_same_directories_starts_clean(tmp_path):
    kw = dict(lora__dropout=0.0, train__max_steps=2, train__batch_size=4, train__micro_batch_size=4, data__limit=16,
              data__val_max_examples=4)

    def cfgs():
        return [make_cfg("builtin:tiny", tmp_path / f"r{i}", train__lr=lr, **kw) for i, lr in enumerate((1e-3, 2e-3))]

    train_fused(cfgs())
    first = [metrics(tmp_path / f"r{i}") for i in range(2)]
    (tmp_path / "r0" / "checkpoints" / "step-000001").mkdir(parents=True)  # left by an earlier solo run
    train_fused(cfgs())
    assert [metrics(tmp_path / f"r{i}") for i in range(2)] == first  # replaced, not appended to
    assert not (tmp_path / "r0" / "checkpoints").exists()


def test_the_bases_own_dropout_is_named_where_it_makes_a_group_differ(tiny_model_dir, tmp_path, caplog):
    """GPT-2's config turns its own dropout on (p 0.1), and it trains on, as the Trainer trains it:
    its masks come from the process's stream, so a fused run differs from its solo run, and the
    group says so. With the base's dropout off the same runs equal their solo runs."""
    import logging

    from transformers import AutoConfig

    kw = dict(lora__dropout=0.0, train__max_steps=2, data__limit=16, data__val_max_examples=4,
              lora__targets="query,key,value")
    on = tiny_model_dir("gpt2")
    off = tmp_path / "gpt2_no_dropout"
    shutil.copytree(on, off)
    config = AutoConfig.from_pretrained(off)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    config.save_pretrained(off)
    for model, tag in ((on, "on"), (off, "off")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="loralab.train.setup"):
            train_fused([make_cfg(model, tmp_path / f"{tag}f{r}", lora__r=r, **kw) for r in (2, 4)])
        noted = [r.getMessage() for r in caplog.records if "own dropout" in r.getMessage()]
        train(make_cfg(model, tmp_path / f"{tag}s2", lora__r=2, **kw))
        fused, solo = curve(tmp_path / f"{tag}f2", "train_loss"), curve(tmp_path / f"{tag}s2", "train_loss")
        if tag == "on":
            assert len(noted) == 1 and "transformer.h.N.attn.resid_dropout p 0.1" in noted[0]
            assert "fused with 1 other run(s)" in noted[0]
            assert fused != pytest.approx(solo, rel=1e-4)  # what the note says: other masks, other numbers
        else:
            assert noted == []
            assert fused == pytest.approx(solo, rel=1e-4)
