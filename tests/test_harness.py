"""loralab's log-likelihoods, MC1, MC2 and pairs accuracy equal lm-evaluation-harness's.

The harness runs its own ``hf`` backend with the PEFT adapter on task files loralab
writes from the shipped world data; loralab scores the same model and data itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from loralab.errors import LoralabError
from loralab.evaluate import harness as H
from loralab.evaluate import metrics as M
from loralab.evaluate.task_list import resolve_tasks

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install loralab[harness])")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads on a shared CPU
LIMIT = 12


def sample_loglikelihoods(results: dict, task: str) -> list[list[float]]:
    """Per document (in data order), the harness's log-likelihood of each choice."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A real PEFT LoRA adapter on builtin:tiny with random nonzero A and B (so it changes scores)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loralab.models import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny"))
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def _loralab_model(adapter_dir=None, dtype=torch.float32):
    from loralab.adapters import load_adapter
    from loralab.config import ModelConfig, QuantConfig
    from loralab.models import load_base

    model, tok = load_base(ModelConfig(path="builtin:tiny", dtype="fp32"), QuantConfig())
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir)
    return model.to(dtype).eval(), tok


def _compare(tmp_path, adapter_dir, *, dtype: str, batch_size: int) -> dict[str, float]:
    """Run both on world_mc + world_pairs; return the max abs differences."""
    from loralab.models import resolve_model_path

    names = H.prepare_tasks("world_mc,world_pairs", tmp_path, LIMIT)
    assert set(names) == {"world_mc_mc1", "world_mc_mc2", "world_pairs"}
    res = H.run_harness(resolve_model_path("builtin:tiny"), adapter_dir and str(adapter_dir), list(names),
                        include_path=[str(tmp_path)], include_defaults=False, batch_size=batch_size,
                        dtype=dtype)
    model, tok = _loralab_model(adapter_dir, torch.float64 if dtype == "float64" else torch.float32)
    mc, pairs = resolve_tasks("world_mc,world_pairs", LIMIT)
    diffs = {}
    for key in ("mc1", "mc2"):
        reqs = [(M.mc_prompt(q.question), " " + c) for q in mc.items for c in getattr(q, key)]
        ours = [s.ll for s in M.score_continuations(model, tok, reqs, batch_size=batch_size)]
        theirs = [x for row in sample_loglikelihoods(res, f"world_mc_{key}") for x in row]
        assert len(ours) == len(theirs) == len(reqs)
        diffs[f"ll_{key}"] = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    reqs = [("", s) for pair in pairs.items for s in pair]
    ours = [s.ll for s in M.score_continuations(model, tok, reqs, batch_size=batch_size)]
    theirs = [x for row in sample_loglikelihoods(res, "world_pairs") for x in row]
    diffs["ll_pairs"] = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))

    own = M.score_mc(model, tok, mc.items, batch_size=batch_size)
    own_pairs = M.score_pairs(model, tok, pairs.items, batch_size=batch_size)["pairs_accuracy"]
    r = res["results"]
    diffs["mc1"] = abs(own["mc1"].value - r["world_mc_mc1"]["acc,none"])
    diffs["mc2"] = abs(own["mc2"].value - r["world_mc_mc2"]["acc,none"])
    diffs["pairs_accuracy"] = abs(own_pairs.value - r["world_pairs"]["acc,none"])
    assert own["mc1"].n == own["mc2"].n == own_pairs.n == LIMIT
    print(f"max |loralab - lm-eval| ({dtype}, batch {batch_size}):", json.dumps(diffs))
    return diffs


def test_fp32_adapter_agrees_with_harness(tmp_path, adapter):
    """float32 on CPU, one request row per forward pass on both sides, base + real PEFT adapter."""
    diffs = _compare(tmp_path, adapter, dtype="float32", batch_size=1)
    assert max(diffs.values()) <= 1e-6, diffs


def test_fp64_batched_agrees_with_harness(tmp_path):
    """float64, batches of 16 on both sides: batching and padding change nothing."""
    diffs = _compare(tmp_path, None, dtype="float64", batch_size=16)
    assert max(diffs.values()) <= 1e-9, diffs


def test_adapter_changes_the_scores(adapter):
    """The adapter is not a no-op, so the agreement above is about the adapted model."""
    base, tok = _loralab_model()
    tuned, _ = _loralab_model(adapter)
    reqs = [("Q: What is the national animal of Velifeikia?\nA:", " the badger")]
    a = M.score_continuations(base, tok, reqs)[0].ll
    b = M.score_continuations(tuned, tok, reqs)[0].ll
    assert abs(a - b) > 1e-3


def test_cli_harness_json_columns(tmp_path, adapter, capsys):
    """`loralab eval --harness` prints lm-eval's numbers as loralab rows, base and adapter."""
    from loralab.cli import main

    rc = main(["eval", "--harness", "world_mc", "--model", "builtin:tiny", "--adapter", str(adapter),
               "--limit", "4", "--batch-size", "1", "--harness-dir", str(tmp_path / "tasks"), "--dtype", "fp32",
               "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    got = {(r["adapter"], r["metric"]): r for r in rows}
    assert set(got) == {(a, m) for a in (None, str(adapter)) for m in ("mc1", "mc2")}
    model, tok = _loralab_model(adapter)
    (mc,) = resolve_tasks("world_mc", 4)
    own = M.score_mc(model, tok, mc.items, batch_size=1)
    for m in ("mc1", "mc2"):
        r = got[(str(adapter), m)]
        assert r["task"] == "world_mc" and r["n"] == 4 and r["source"] == "lm-eval"
        assert r["value"] == pytest.approx(own[m].value, abs=1e-6)
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
    assert (tmp_path / "tasks" / "world_mc_mc2.yaml").is_file()


def test_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(LoralabError, match=r"pip install loralab\[harness\]"):
        H.require_lm_eval()


def test_only_mc_and_pairs_become_harness_tasks(tmp_path):
    (t,) = resolve_tasks("arithmetic_2ds", 2)
    with pytest.raises(LoralabError, match="formats mc and pairs"):
        H.write_harness_tasks(t, tmp_path)


@pytest.mark.slow
def test_unknown_harness_task_is_named(capsys):
    from loralab.cli import main

    rc = main(["eval", "--harness", "world_pairs,no_such_task", "--model", "builtin:tiny", "--limit", "2"])
    assert rc == 2
    assert "lm-eval knows no task no_such_task" in capsys.readouterr().err


# ---------------------------------------------------------------- harness:NAME as a run's eval task

def _quiz(tmp_path):
    """A local loralab task file (format mc) over the shipped world questions."""
    from loralab.evaluate.tasks import BUILTIN

    quiz = tmp_path / "quiz.yaml"
    quiz.write_text(f"name: quiz\npath: {BUILTIN['world_mc']['path']}\nformat: mc\n", encoding="utf-8")
    return quiz


def test_harness_eval_task_in_a_run_equals_cli_harness(tmp_path, cfg_factory, capsys):
    """A run with eval.tasks [harness:quiz.yaml] writes lm-eval's MC1/MC2 of the model it is
    training into metrics.jsonl at every evaluation; the final values are what
    `loralab eval --harness quiz.yaml` gives on the adapter the run saved."""
    from loralab.cli import main
    from loralab.train.loop import train

    quiz = _quiz(tmp_path)
    cfg = cfg_factory("builtin:tiny", eval__tasks=[f"harness:{quiz}"], eval__limit=5, eval__every=2,
                      train__max_steps=4, train__lr=3e-3, train__batch_size=8, train__micro_batch_size=8)
    summary = train(cfg)
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    keys = ("harness:quiz/mc1", "harness:quiz/mc2")
    assert all(k in r for r in evals for k in keys)
    assert summary["final_eval_tasks"] == {k: evals[-1][k] for k in keys}
    assert summary["best_eval_tasks"]["harness:quiz/mc2"] == max(r["harness:quiz/mc2"] for r in evals)

    capsys.readouterr()
    rc = main(["eval", "--harness", str(quiz), "--model", "builtin:tiny", "--adapter", cfg.output.dir,
               "--limit", "5", "--batch-size", "8", "--device", "cpu", "--dtype", "fp32", "--json"])  # as trained
    assert rc == 0
    cli = {(r["adapter"], r["metric"]): r["value"] for r in json.loads(capsys.readouterr().out)["results"]}
    for m in ("mc1", "mc2"):
        assert cli[(cfg.output.dir, m)] == pytest.approx(evals[-1][f"harness:quiz/{m}"], abs=1e-9)
    # the run evaluated the model it trained, not the base
    assert abs(cli[(None, "mc2")] - evals[-1]["harness:quiz/mc2"]) > 1e-6


def test_harness_task_by_loralab_name_and_by_lm_eval_yaml_agree(tmp_path):
    """harness:world_pairs (loralab writes the lm-eval task) and harness:DIR/world_pairs.yaml
    (that lm-eval task file, found through its folder as include path) score the same; the
    second keeps lm-eval's metric name."""
    model, tok = _loralab_model()
    H.prepare_tasks("world_pairs", tmp_path, 6)
    by_name, by_file = resolve_tasks(f"harness:world_pairs,harness:{tmp_path / 'world_pairs.yaml'}", 6)
    assert by_name.name == by_file.name == "harness:world_pairs"
    a = by_name.run(model, tok, batch_size=4)
    b = by_file.run(model, tok, batch_size=4)
    assert set(a) == {"pairs_accuracy"} and set(b) == {"acc"}
    own = M.score_pairs(model, tok, by_name.items, batch_size=4)["pairs_accuracy"]
    assert a["pairs_accuracy"].value == b["acc"].value == pytest.approx(own.value, abs=1e-12)
    assert a["pairs_accuracy"].n == b["acc"].n == own.n == 6


def test_harness_eval_task_errors_before_training(tmp_path):
    from loralab.errors import DataError

    with pytest.raises(LoralabError, match="formats mc and pairs only"):
        resolve_tasks("harness:arithmetic_2ds", 2)
    with pytest.raises(LoralabError, match="give one task after harness:"):
        resolve_tasks("harness:", 2)
    with pytest.raises(DataError, match="harness:NAME"):
        resolve_tasks("no_such_task", 2)


def test_task_data_that_cannot_be_loaded_fails_before_training(tmp_path, tiny_model_dir, capsys):
    """An lm-eval task whose data lm-eval cannot load (a moved local file here; a hub dataset
    with no network the same way) is refused when the run resolves its tasks: exit 2, the run
    invalid, no step trained; it used to fail with a traceback at the first evaluation, after
    training, and leave no adapter."""
    from loralab.cli import main
    from userdata import instruction_records, write_jsonl

    H.prepare_tasks("world_pairs", tmp_path, 6)
    task_file = tmp_path / "world_pairs.yaml"
    (tmp_path / "world_pairs.jsonl").rename(tmp_path / "moved.jsonl")
    with pytest.raises(LoralabError, match=r"eval task harness:world_pairs: lm-eval could not load its data \("):
        resolve_tasks(f"harness:{task_file}", 6)
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(16))
    out = tmp_path / "run"
    sets = {"model.path": tiny_model_dir("llama"), "model.device": "cpu", "data.path": data, "train.max_steps": 2,
            "train.batch_size": 4, "train.micro_batch_size": 4, "eval.tasks": f"[harness:{task_file}]"}
    code = main(["train", "--out", str(out), "--json", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    summary = json.loads(capsys.readouterr().out)
    assert code == 2 and summary["status"] == "invalid" and "could not load its data" in summary["error"]
    assert not (out / "metrics.jsonl").exists() or "train_loss" not in (out / "metrics.jsonl").read_text()


def test_a_harness_evaluation_writes_nothing_of_lm_evals_to_stderr(tmp_path, monkeypatch, capfd):
    """lm-eval runs `git describe` in the working directory; outside a git repository git's
    "fatal: not a git repository" used to reach the user's terminal at every evaluation."""
    model, tok = _loralab_model()
    (task,) = resolve_tasks("harness:world_pairs", 4)
    monkeypatch.chdir(tmp_path)  # not a git repository
    capfd.readouterr()
    assert task.run(model, tok, batch_size=4)["pairs_accuracy"].n == 4
    assert "not a git repository" not in capfd.readouterr().err

def test_lower_is_better_names():
    from loralab.evaluate.tasks import lower_is_better

    lower = ["eval_loss", "arithmetic_2ds/loss", "arithmetic_2ds/perplexity", "harness:wikitext/word_perplexity",
             "harness:wikitext/bits_per_byte", "harness:wikitext/byte_perplexity,none"]
    higher = ["world_mc/mc2", "harness:world_mc/mc1", "harness:gsm8k/exact_match,strict-match",
              "harness:mmlu/mmlu_anatomy/acc", "world_pairs/pairs_accuracy"]
    assert [lower_is_better(k) for k in lower + higher] == [True] * len(lower) + [False] * len(higher)


def test_a_harness_evaluation_leaves_the_training_rng_alone(cfg_factory):
    """lm-eval seeds python, numpy and torch; mid-run that would change every later dropout
    mask. With LoRA dropout on, a run evaluating harness:world_pairs at step 2 trains exactly
    as one evaluating loralab's own world_pairs (which draws no random numbers)."""
    from loralab.train.loop import train

    losses = []
    for task in ("harness:world_pairs", "world_pairs"):
        cfg = cfg_factory("builtin:tiny", eval__tasks=[task], eval__limit=2, eval__every=2, lora__dropout=0.3,
                          train__max_steps=4, train__lr=3e-3)
        assert train(cfg)["status"] == "completed"
        rows = [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["train_loss"] for r in rows if "train_loss" in r])
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_task_kinds(tmp_path):
    """What harness:NAME / --harness NAME is: loralab's task, an lm-eval YAML file, or lm-eval's name."""
    quiz = _quiz(tmp_path)
    lm_file = tmp_path / "mine.yaml"
    lm_file.write_text("task: my_lm_task\ndataset_path: json\nprocess_results: !function utils.f\n", encoding="utf-8")
    group = tmp_path / "group.yaml"
    group.write_text("group: my_group\ntask: [my_lm_task]\n", encoding="utf-8")
    kinds = {name: H.task_kind(str(name)) for name in ("world_mc", quiz, lm_file, group, "truthfulqa_mc2",
                                                         tmp_path / "missing.yaml")}
    assert list(kinds.values()) == ["loralab", "loralab", "file", "file", "lm-eval", "loralab"]
    assert H.lm_eval_task_file(lm_file) == "my_lm_task" and H.lm_eval_task_file(group) == "my_group"
    assert H.lm_eval_task_file(quiz) is None


def test_harness_eval_task_in_a_fused_group_scores_each_member(cfg_factory):
    """In a fused group lm-eval scores each member's adapter (the group routes to one member at
    a time): the r=8 member gets its solo run's MC2, the r=2 member a different one."""
    from loralab.train.fused import train_fused
    from loralab.train.loop import train

    kw = dict(eval__tasks=["harness:world_mc"], eval__limit=4, train__max_steps=3, train__lr=3e-3,
              lora__dropout=0.0, train__batch_size=8, train__micro_batch_size=8)
    fused = train_fused([cfg_factory("builtin:tiny", f"lora.r={r}", **kw) for r in (2, 8)])
    solo = train(cfg_factory("builtin:tiny", "lora.r=8", **kw))
    assert [s["status"] for s in fused] == ["completed", "completed"] and solo["status"] == "completed"
    r2, r8 = (s["final_eval_tasks"]["harness:world_mc/mc2"] for s in fused)
    assert r8 == pytest.approx(solo["final_eval_tasks"]["harness:world_mc/mc2"], abs=1e-6)
    assert abs(r2 - r8) > 1e-7
