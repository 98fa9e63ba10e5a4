"""Presets on a user's model and data: each preset's seed setup is what a user's run gets, the
shipped base's profile (tiny:) never reaches it, every difference from the seed is computed
from the configs, --set on an axis is refused, and a quick preset runs end to end on a
random-init Llama saved with save_pretrained and Alpaca-style data of realistic lengths."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_BASE, VOCAB
from loralab.config import config_from_dict
from loralab.estimate import estimate_run
from loralab.resolve import resolve_config
from loralab.study.keys import deep_merge, get_key
from loralab.study.spec import load_study, preset_dir, preset_names

SRC = str(Path(__file__).resolve().parents[1] / "src")
WORDS = ("river delta soil farming water city history market price energy light sound music model "
         "language letter number planet orbit garden tree winter summer travel train bridge story "
         "reason because however explain describe compare list summarize write short simple").split()


@pytest.fixture(scope="module")
def user_model(tmp_path_factory) -> Path:
    """A random-init Llama (about 1.1M parameters) saved the way a user's model is."""
    import torch
    import transformers as tf

    out = tmp_path_factory.mktemp("user-llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                            bos_token_id=0, eos_token_id=1, pad_token_id=2)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_BASE / name, out / name)
    return out


def alpaca_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Instructions of 8-40 words, an input one time in three, responses of 10-80 words:
    about 40 to 300 tokens with the shipped tokenizer (2.2 tokens a word)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [{"instruction": text(8, 40), "input": text(5, 20) if i % 3 == 0 else "", "output": text(10, 80)}
            for i in range(n)]


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user-data") / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records(128)), encoding="utf-8")
    return path


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def raw_preset(name: str) -> dict:
    return yaml.safe_load((preset_dir() / f"{name}.yaml").read_text(encoding="utf-8"))


def flat(part: dict | None) -> dict:
    return {f"{s}.{k}": v for s, sec in (part or {}).items() for k, v in (sec or {}).items()}


# ----------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("quick", [False, True])
def test_the_tiny_profile_never_reaches_a_user_run(quick, user_model, user_data):
    """Every key the shipped base's profile sets has, on a user's model, the value the seed's
    setup, the study's base and --quick give (or loralab's default): read here from the YAML."""
    for name in preset_names():
        raw = raw_preset(name)
        tiny_keys = set(flat((raw.get("tiny") or {}).get("base"))) | set(flat((raw.get("quick") or {}).get("tiny")))
        assert tiny_keys, f"{name}: no tiny profile"
        # local=False: the seed's values as written, whatever this CPU multiplies natively
        mine = load_study(f"preset:{name}", quick=quick, model=str(user_model), data=str(user_data), local=False)
        theirs = load_study(f"preset:{name}", quick=quick, local=False)
        assert mine.profile == "seed" and theirs.profile == "tiny"
        expected = deep_merge((raw.get("seed") or {}).get("setup") or {}, raw.get("base") or {})
        if quick:
            expected = deep_merge(expected, raw["quick"].get("base") or {})
        want = config_from_dict(expected, source=f"{name} without the profile").to_dict()
        for key in tiny_keys - set(mine.axes) - set(mine.tied):
            for run in mine.runs:
                got = get_key(run.config, key)
                if key == "data.max_seq_length" and get_key(want, key) == "auto":
                    assert got == "auto", (name, got)  # resolved by the run from its data's token lengths
                elif get_key(want, key) == "auto":  # resolved on a user's model: a divisor of the batch
                    assert isinstance(got, int) and run.config["train"]["batch_size"] % got == 0, name
                else:
                    assert got == get_key(want, key), (name, key, got)
            assert get_key(theirs.runs[0].config, key) == get_key(
                config_from_dict(theirs.base).to_dict(), key), (name, key)  # the profile is in force there
        assert not any("shipped base" in d["source"] for d in mine.deviations), name
        assert mine.metric == (raw.get("metric") or "eval_loss"), name
        assert all(r.config["model"]["path"] == str(user_model) for r in mine.runs)


def test_every_preset_cites_its_seed_with_a_setup():
    for name in preset_names():
        raw = raw_preset(name)
        seed = raw["seed"]
        assert seed["source"].startswith("seed 00"), name
        assert seed["model"] and seed["data"] and seed["metric"], name
        assert flat(seed["setup"]), name
        assert "train.lr" in flat(seed["setup"]) or "train.lr" in raw.get("tied", {}) \
            or "train.lr" in raw.get("axes", {}) or "not state" in seed["notes"], name


def test_rank_alpha_grid_runs_at_the_seed_lr_and_rslora_starts_matched():
    grid = load_study("preset:rank_alpha_grid")
    assert {r.config["train"]["lr"] for r in grid.runs} == {1e-5}
    rs = load_study("preset:rslora_vs_lora")
    for run in rs.runs:
        lora = run.config["lora"]
        scale_at_start = lora["alpha"] / (2 ** 0.5 if lora["rslora"] else 2)  # scale at the starting rank 2
        assert scale_at_start == pytest.approx(8.0)
    assert {r.config["train"]["lr"] for r in rs.runs} == {1e-5, 1e-4}  # the seed's higher-lr arm
    qlora = load_study("preset:qlora", model="/models/llama", local=False)
    base_runs = [r for r in qlora.runs if r.axes["quant.mode"] == "none"]
    assert base_runs and all(r.config["model"]["dtype"] == "bf16" for r in base_runs)


# ----------------------------------------------------------------------------- deviations


def test_deviations_name_exactly_the_settings_that_differ(user_model, user_data):
    study = load_study("preset:consistency", model=str(user_model), data=str(user_data),
                       overrides=["train.lr=1e-4", "lora.dropout=0.05"])  # dropout equals the seed's
    seed = flat(raw_preset("consistency")["seed"]["setup"])
    seed_cfg = config_from_dict(
        deep_merge(config_from_dict({}).to_dict(), raw_preset("consistency")["seed"]["setup"])).to_dict()
    differ = {k for k in seed for r in study.runs if get_key(r.config, k) != get_key(seed_cfg, k)}
    got = {d["key"]: d for d in study.deviations}
    assert set(got) == differ
    assert "train.lr" in got and "lora.dropout" not in got
    assert got["train.lr"]["source"] == "--set train.lr" and got["train.lr"]["seed"] == 3e-4
    micro = study.runs[0].config["train"]["micro_batch_size"]
    assert ("train.micro_batch_size" in got) == (micro != 1)
    if micro != 1:
        assert got["train.micro_batch_size"]["source"].startswith("auto: the largest divisor of batch 128")

    tiny = load_study("preset:consistency", quick=True)
    assert {d["key"] for d in tiny.deviations} == {"model.dtype", "train.lr", "train.warmup_steps", "train.batch_size",
                                                   "train.micro_batch_size", "train.max_steps"}
    by_key = {d["key"]: d for d in tiny.deviations}
    assert by_key["train.lr"]["source"] == "the shipped base's profile (tiny:)"
    assert by_key["train.max_steps"]["seed_ran"] == "train.epochs 1"


def test_a_deviations_reason_is_that_of_the_runs_that_deviate(user_model, user_data):
    """rank_alpha_sweep's r 256 runs are invalid on a 192-wide model: auto gives them micro batch
    1 (the seed's) for want of an estimate, the r 8 runs a larger one; the deviation gives the
    r 8 runs' reason, not the last run's "no memory estimate ... so micro batch 1"."""
    study = load_study("preset:rank_alpha_sweep", quick=True, model=str(user_model), data=str(user_data))
    micro = {r.name: r.config["train"]["micro_batch_size"] for r in study.runs}
    assert {micro[n] for n in micro if n.startswith("r256")} == {1} and micro["r8-a16"] > 1
    (dev,) = [d for d in study.deviations if d["key"] == "train.micro_batch_size"]
    assert dev["value"] == micro["r8-a16"] and dev["seed"] == 1
    assert dev["source"].startswith("auto: the largest divisor of batch 128 that the estimate fits")


EMULATED = ("model.dtype fp32 instead of the seed's bf16 (auto: this CPU has neither AMX-BF16 nor AVX512-BF16, so "
            "bf16 matmuls are emulated, about 100x slower than fp32; --set model.dtype=bf16 keeps the seed's bf16)")


def test_the_seeds_bf16_trains_in_fp32_on_a_cpu_that_would_emulate_it(user_model, user_data, tmp_path, monkeypatch):
    """The seeds trained in bf16 on GPUs. On this machine's CPU, where it has no bf16 units
    (AVX2 alone: bf16 matmuls about 100x slower), a preset's runs train in fp32 and the report
    says so; a user's own bf16, a Ray study's runs and a study that varies the dtype keep theirs."""
    from loralab import models
    from loralab.study.deviations import deviation_text

    # as the user meets it: the dry run on this machine's CPU, whichever it is
    proc = cli("study", "run", "preset:consistency", "--model", str(user_model), "--data", str(user_data),
               "--dry-run", "--out", str(tmp_path))
    assert (EMULATED in proc.stdout) == (models.cpu_bf16_feature() is None), proc.stdout
    assert ("model.dtype" in proc.stdout) == (models.cpu_bf16_feature() is None)

    def runs(feature, **kw):
        monkeypatch.setattr(models, "cpu_bf16_feature", lambda: feature)
        study = load_study("preset:consistency", model=str(user_model), data=str(user_data), **kw)
        return {r.config["model"]["dtype"] for r in study.runs}, {d["key"]: d for d in study.deviations}

    dtypes, devs = runs(None)
    assert dtypes == {"fp32"} and deviation_text(devs["model.dtype"]) == EMULATED
    dtypes, devs = runs("AMX-BF16")
    assert dtypes == {"bf16"} and "model.dtype" not in devs
    dtypes, devs = runs(None, overrides=["model.dtype=bf16"])
    assert dtypes == {"bf16"} and "model.dtype" not in devs
    dtypes, devs = runs(None, local=False)
    assert dtypes == {"bf16"} and "model.dtype" not in devs
    dtypes, devs = runs(None, overrides=["model.device=cuda", "train.micro_batch_size=1"])
    assert dtypes == {"bf16"}  # a GPU multiplies bf16 natively
    # the Python API plans for this machine, and again for Ray's workers when it runs on Ray
    import loralab.study.execute
    from loralab.api import Study

    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: None)
    given = []
    monkeypatch.setattr(loralab.study.execute, "run_study", lambda spec, **kw: given.append(spec) or {})
    api = Study("preset:consistency", model=str(user_model), data=str(user_data), out=tmp_path / "api")
    api.run()
    api.run(executor="ray")
    assert [{r.config["model"]["dtype"] for r in spec.runs} for spec in given] == [{"fp32"}, {"bf16"}]
    assert all(r.config["output"]["dir"].startswith(str(tmp_path / "api")) for r in given[1].runs)
    study = tmp_path / "dtypes.yaml"
    raw = {**raw_preset("consistency"), "name": "dtypes", "axes": {"model.dtype": ["bf16", "fp32"]}}
    raw.pop("tiny", None)
    study.write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: None)
    varied = load_study(study, model=str(user_model), data=str(user_data))
    assert sorted(r.config["model"]["dtype"] for r in varied.runs) == ["bf16"] * 3 + ["fp32"] * 3


def test_set_on_an_axis_or_tied_key_is_refused_naming_it(user_model):
    proc = cli("study", "run", "preset:rank_alpha_grid", "--model", str(user_model), "--set", "lora.r=16",
               "--dry-run", check=False)
    assert proc.returncode == 2
    assert "--set lora.r=16: lora.r is an axis of study rank_alpha_grid (values 2, 8, 32, 128)" in proc.stderr
    proc = cli("study", "run", "preset:alpha_lr_equivalence", "--set", "train.lr=1e-3", "--dry-run", check=False)
    assert proc.returncode == 2 and "train.lr is tied in study alpha_lr_equivalence" in proc.stderr
    # a bad --set is the flag's, not the preset file's (alone or with a key of the study's)
    for flag, said in (("train.lrr=1", "unknown key train.lrr (did you mean train.lr?)"),
                       ("train.micro_batch_size=3", "train.batch_size (16) must be divisible by "
                                                    "train.micro_batch_size (3)")):
        proc = cli("study", "run", "preset:dropout", "--quick", "--model", str(user_model), "--set", flag,
                   "--dry-run", check=False)
        assert proc.returncode == 2 and f"loralab study: error: --set {flag}: {said}" in proc.stderr, proc.stderr
        assert "dropout.yaml" not in proc.stderr


@pytest.mark.slow
def test_dry_run_lists_the_differences(user_model, user_data, tmp_path):
    proc = cli("study", "run", "preset:dropout", "--quick", "--model", str(user_model), "--data", str(user_data),
               "--set", "train.lr=1e-4", "--dry-run", "--json", "--out", str(tmp_path))
    out = json.loads(proc.stdout)
    assert out["profile"] == "seed"
    assert [d["key"] for d in out["deviations"]] == []  # seed 000 states only r; lr is not the seed's
    proc = cli("study", "run", "preset:consistency", "--model", str(user_model), "--data", str(user_data),
               "--set", "train.lr=1e-4", "--dry-run", "--out", str(tmp_path))
    assert "train.lr 0.0001 instead of the seed's 0.0003 (set by --set train.lr)" in proc.stdout
    assert "seed: seed 001: Raschka" in proc.stdout


# ----------------------------------------------------------------------------- micro batch auto


def test_auto_micro_batch_is_the_largest_divisor_that_fits(user_model):
    cfg = config_from_dict({"model": {"path": str(user_model), "device": "cpu"},
                            "train": {"batch_size": 24, "micro_batch_size": "auto"}, "data": {"max_seq_length": 256}})
    probe = copy.deepcopy(cfg)
    at = {}
    for m in (1, 2, 3, 4, 6, 8, 12, 24):
        probe.train.micro_batch_size = m
        at[m] = estimate_run(probe, device="cpu").memory_bytes["total"]
    budget = (at[6] + at[8]) // 2  # 6 fits, 8 does not (7 is no divisor of 24)
    resolved, notes = resolve_config(cfg, budget_bytes=budget)
    assert resolved.train.micro_batch_size == 6 and cfg.train.micro_batch_size == "auto"
    assert notes["train.micro_batch_size"].startswith("auto: the largest divisor of batch 24")
    assert resolve_config(cfg, budget_bytes=at[1] - 1)[0].train.micro_batch_size == 1  # nothing fits: 1
    assert resolve_config(cfg, budget_bytes=at[24] + 1)[0].train.micro_batch_size == 24


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_quick_preset_on_a_user_model_completes_and_reports(user_model, user_data, tmp_path):
    out = tmp_path / "runs"
    # the seed's dtype as the plan leaves it on this CPU: fp32 where it would emulate bf16, else bf16;
    # batch 64: two steps over the 120-odd training examples, so every run has a curve
    res = json.loads(cli("study", "run", "preset:consistency", "--quick", "--model", str(user_model),
                         "--data", str(user_data), "--set", "train.batch_size=64",
                         "--workers", "3", "--out", str(out), "--json").stdout)
    assert res["counts"] == {"completed": 3}
    db = out / "consistency-quick" / "study.db"
    import sqlite3

    con = sqlite3.connect(db)
    configs = [json.loads(c) for (c,) in con.execute("SELECT config_json FROM runs")]
    train_lines = con.execute("SELECT count(*) FROM metrics WHERE name = 'train_loss'").fetchone()[0]
    con.close()
    for c in configs:  # the seed's setup, not the shipped base's
        assert c["train"]["lr"] == 3e-4 and c["train"]["batch_size"] == 64 and c["train"]["scheduler"] == "constant"
        assert c["data"]["max_seq_length"] == "auto" and 64 % c["train"]["micro_batch_size"] == 0
    summary = json.loads(next((out / "consistency-quick").glob("*/summary.json")).read_text())
    n_train = summary["train_examples"]  # 122 after the 5% validation split, less any example
    assert n_train + summary["truncated_to_no_response"] == 122  # whose prompt fills max_seq_length
    assert summary["steps"] == -(-n_train // 64) == 2  # the seed's one epoch, at batch 64
    assert train_lines == 3 * 2  # log_every 1 under --quick: every step of every run
    paths = json.loads(cli("study", "report", "consistency-quick", "--out", str(out), "--json").stdout)
    md = Path(paths["markdown"]).read_text(encoding="utf-8")
    top = md.split("## Findings")[0]
    assert "**Differences from the seed's setup**" in top
    assert "train.warmup_steps 2 instead of the seed's 100 (set by --quick)" in top
    from loralab.models import cpu_bf16_feature

    dtype = "fp32" if cpu_bf16_feature() is None else "bf16"
    assert summary["dtype"] == dtype
    assert (EMULATED in top) == (dtype == "fp32")
    assert "train.batch_size 64 instead of the seed's 128 (set by --set train.batch_size)" in top
    assert (f"{user_model} (LlamaForCausalLM, {summary['total_params']:,} parameters, dtype {dtype}, "
            "quantization none)") in top
    assert f"{user_data}; {n_train} training / 6 validation examples" in top
    # the data's token lengths as the first run measured them (each seed holds out its own validation split)
    assert re.search(r"token lengths: min \d+, median [\d.]+, p90 \d+, max \d+ tokens", top), top
    assert "| train.lr | 0.0003 | 0.0003 |" in md
    assert any(Path(p).name == "train_loss.png" for p in paths["pngs"])


@pytest.mark.slow
def test_a_seeds_query_and_value_train_the_fused_matrix_of_gpt2(tiny_model_dir, user_data, tmp_path):
    """The seeds adapted Llama's q_proj and v_proj. GPT-2 holds q, k and v in c_attn, so every
    run of a preset whose seed setup names [query, value] was refused there; the seed's setup now
    adapts c_attn whole, and the plan and the report say so. An axis arm of [query, value]
    (the study's own question) and a user's explicit --set are not changed."""
    gpt2 = tiny_model_dir("gpt2")
    study = load_study("preset:consistency", quick=True, model=str(gpt2), data=str(user_data))
    assert {tuple(r.config["lora"]["targets"]) for r in study.runs} == {("query", "key", "value")}
    fused = ("lora.targets [query, key, value] instead of the seed's [query, value] (auto: GPT-2 (attn.c_attn) holds "
             "query, key and value in one matrix, so the seed's query, value can only be adapted with it, whole)")
    from loralab.study.deviations import deviation_text

    assert fused in [deviation_text(d) for d in study.deviations]
    mine = load_study("preset:consistency", quick=True, model=str(gpt2), data=str(user_data),
                      overrides=["lora.targets=[query,value]"])
    assert {tuple(r.config["lora"]["targets"]) for r in mine.runs} == {("query", "value")}
    axis = load_study("preset:targets", quick=True, model=str(gpt2), data=str(user_data))
    assert ("query", "value") in {tuple(r.config["lora"]["targets"]) for r in axis.runs}
    # that arm is the question's answer on this model, as a rank above its matrices is: invalid
    # here, and the other arms train (it used to stop the whole study before anything started)
    wide = tiny_model_dir("gpt2_h64")  # wide enough for the preset's 4-bit base on this CPU
    plan = cli("study", "run", "preset:targets", "--quick", "--model", str(wide), "--data", str(user_data),
               "--out", str(tmp_path / "plan"), "--dry-run", check=False)
    assert "runs cannot run" not in plan.stdout + plan.stderr and plan.stdout.count("invalid here") == 2
    for seed in (1, 2):
        assert (f"t_query.value-s{seed}: invalid here, will not train: lora.targets asks for query, value alone, "
                "but GPT-2 fuses") in plan.stdout

    out = tmp_path / "runs"
    res = json.loads(cli("study", "run", "preset:consistency", "--quick", "--model", str(gpt2), "--data",
                         str(user_data), "--set", "train.batch_size=64", "--out", str(out), "--json").stdout)
    assert res["counts"] == {"completed": 3}
    for summary in (out / "consistency-quick").glob("*/summary.json"):
        assert json.loads(summary.read_text())["trainable_params"] == 2 * 8 * (32 + 96)  # r 8 on c_attn, 2 layers
    paths = json.loads(cli("study", "report", "consistency-quick", "--out", str(out), "--json").stdout)
    assert fused in Path(paths["markdown"]).read_text(encoding="utf-8").split("## Findings")[0]


@pytest.mark.parametrize("extra, message", [
    ({"tiny": {"bogus": 1}}, "unknown tiny key 'bogus'"),
    ({"seed": {"setup": {"train": {"lr": -1}}}}, "train.lr must be > 0 (got -1.0)"),
    ({"seed": {"model": ["llama"]}}, "seed.model must be text"),
    ({"quick": {"tiny": {"train": {"optimiser": "sgd"}}}}, "unknown key train.optimiser"),
])
def test_bad_seed_or_profile_names_the_key_and_line(tmp_path, extra, message):
    from loralab.errors import ConfigError

    study = {"name": "s", "base": {"output": {"save_adapter": False}}, "axes": {"lora.r": [2, 4]}, **extra}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_study(path, quick=True)
    section = next(iter(extra))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.startswith(section + ":"))
    assert message in str(exc.value) and f"{path}:" in str(exc.value)
    assert int(str(exc.value).split(f"{path}:")[1].split(":")[0]) >= line
