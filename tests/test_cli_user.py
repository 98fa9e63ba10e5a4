"""The command line as a user meets it (issue 26): adapters know their base, checks come before
work, exit codes and JSON mean what they say. Each test runs ``loralab ...`` on small random-init
models of real architectures and instruction data, and checks the message, the exit code and
that nothing was half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loralab.adapters import BASE_RECORD
from loralab.cli import main
from userdata import instruction_records, write_jsonl


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def train_args(model: Path, data: Path, out: Path, *more: str) -> list[str]:
    """``loralab train`` of a 2-step run on ``model`` and ``data`` into ``out``."""
    sets = {"model.path": model, "model.device": "cpu", "data.path": data, "data.max_seq_length": 256,
            "train.max_steps": 2, "train.batch_size": 4, "train.micro_batch_size": 4, "train.warmup_steps": 0}
    return ["train", "--out", str(out), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *more]


@pytest.fixture(scope="module")
def qwen_run(tiny_model_dir, tmp_path_factory):
    """A completed run trained on a tiny Qwen2."""
    root = tmp_path_factory.mktemp("user")
    data = write_jsonl(root / "train.jsonl", instruction_records(24))
    out = root / "qwen1"
    assert main(train_args(tiny_model_dir("qwen2"), data, out)) == 0
    return out


# ----------------------------------------------------------------------------- 1. adapters know their base


def test_adapter_records_its_base_and_refuses_another(capsys, caplog, qwen_run, tiny_model_dir, tmp_path):
    record = json.loads((qwen_run / "adapter" / BASE_RECORD).read_text())
    assert record["model_type"] == "qwen2" and record["architectures"] == ["Qwen2ForCausalLM"]
    assert record["sizes"]["hidden_size"] == 32 and record["path"] == str(tiny_model_dir("qwen2"))
    llama = str(tiny_model_dir("llama"))
    merged = tmp_path / "merged"
    for argv in (["eval", "--model", llama, "--adapter", str(qwen_run), "--tasks", "arithmetic_2ds", "--limit", "2"],
                 ["generate", "--model", llama, "--adapter", str(qwen_run), "Hi"],
                 ["merge", str(qwen_run), str(merged), "--model", llama]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert out == ""
        assert f"adapter {qwen_run} was trained on {tiny_model_dir('qwen2')} (qwen2 Qwen2ForCausalLM" in err
        assert f"not on {llama} (llama LlamaForCausalLM" in err and "--force" in err
    assert not merged.exists() and not list(tmp_path.iterdir())  # nothing half-written

    # --force uses it knowingly, with a warning naming both bases
    code, out, err = run_cli(capsys, "generate", "--model", llama, "--adapter", str(qwen_run), "--force",
                             "--max-new-tokens", "2", "Hi")
    assert code == 0 and "was trained on" in caplog.text and "--force: using it anyway" in caplog.text


def test_adapter_on_its_own_base_and_an_older_adapter(capsys, caplog, qwen_run, tiny_model_dir, tmp_path):
    caplog.set_level("INFO", logger="loralab")
    qwen = str(tiny_model_dir("qwen2"))
    code, _, err = run_cli(capsys, "generate", "--model", qwen, "--adapter", str(qwen_run), "--max-new-tokens", "2",
                           "Hi")
    assert code == 0 and "trained on" not in caplog.text
    # an adapter saved before loralab recorded bases: accepted, with a one-line note
    old = tmp_path / "old"
    old.mkdir()
    for f in (qwen_run / "adapter").iterdir():
        if f.name != BASE_RECORD:
            (old / f.name).write_bytes(f.read_bytes())
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir("llama")), "--adapter", str(old),
                           "--max-new-tokens", "2", "Hi")
    assert code == 0 and f"note: {old} has no record of its base model" in caplog.text
    # without --model: the base its adapter_config.json names (PEFT's own record), not the shipped base
    assert json.loads((old / "adapter_config.json").read_text())["base_model_name_or_path"] == qwen
    code, _, err = run_cli(capsys, "generate", "--adapter", str(old), "--max-new-tokens", "2", "Hi")
    assert code == 0, err


def test_an_adapter_on_another_checkpoint_of_its_architecture_is_refused(capsys, caplog, qwen_run, tiny_model_dir,
                                                                        tmp_path):
    """A fine-tune of the base, or another seed, has the base's config.json: a few rows of its
    weights, read from the files, tell it apart. The base saved again in bf16 is the same base."""
    import torch
    from transformers import AutoModelForCausalLM

    qwen = tiny_model_dir("qwen2")

    def saved(name, change):
        model = AutoModelForCausalLM.from_pretrained(qwen)
        with torch.no_grad():
            change(model)
        model.save_pretrained(tmp_path / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(qwen / f, tmp_path / name / f)
        return str(tmp_path / name)

    caplog.set_level("INFO", logger="loralab")
    bf16 = saved("bf16", lambda m: m.to(torch.bfloat16))
    code, _, err = run_cli(capsys, "generate", "--model", bf16, "--adapter", str(qwen_run), "--max-new-tokens", "2",
                           "Hi")
    assert code == 0, err
    assert "trained on" not in caplog.text

    torch.manual_seed(1)  # every weight moved by 1% of its tensor's spread, as a short full fine-tune would
    tuned = saved("tuned", lambda m: [p.add_(0.01 * p.std() * torch.randn_like(p)) for p in m.parameters()])
    merged = tmp_path / "merged"
    for argv in (["eval", "--model", tuned, "--adapter", str(qwen_run), "--tasks", "arithmetic_2ds", "--limit", "2"],
                 ["generate", "--model", tuned, "--adapter", str(qwen_run), "Hi"],
                 ["merge", str(qwen_run), str(merged), "--model", tuned]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "", argv
        assert (f"adapter {qwen_run}: it was trained on {qwen}, not on {tuned}: the same architecture and sizes, "
                "but other weights (") in err and "--force" in err
    assert not merged.exists()
    code, _, err = run_cli(capsys, "generate", "--model", tuned, "--adapter", str(qwen_run), "--force",
                           "--max-new-tokens", "2", "Hi")
    assert code == 0 and "but other weights" in caplog.text and "--force: using it anyway" in caplog.text
    # the base with this adapter merged into it: the record samples the adapted matrices too
    assert run_cli(capsys, "merge", str(qwen_run), str(merged))[0] == 0
    code, _, err = run_cli(capsys, "generate", "--model", str(merged), "--adapter", str(qwen_run), "Hi")
    assert code == 2 and "self_attn" in err.split("other weights (")[1].split(" differs")[0]


def test_eval_of_a_qlora_run_loads_the_4bit_base_it_trained_on(capsys, caplog, tiny_model_dir, tmp_path):
    """`loralab eval --adapter RUN` of a QLoRA run scores it on its nf4 base (as generate and
    merge load it), so it gives the run's own final task score; it used to load the base in full
    precision without a word."""
    caplog.set_level("INFO", logger="loralab")
    model = tiny_model_dir("llama_h64")  # bitsandbytes' CPU 4-bit kernels need in_features >= 64
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(16, seed=2))
    write_jsonl(tmp_path / "d.jsonl", [{"good": f"The sun is warm {i}.", "bad": f"Sun the warm is {i}."}
                                       for i in range(6)])
    task = tmp_path / "pairs.yaml"
    task.write_text("path: d.jsonl\nformat: pairs\n", encoding="utf-8")
    run = tmp_path / "nf4"
    code, stdout, err = run_cli(capsys, *train_args(model, data, run, "--set", "quant.mode=nf4",
                                                    "--set", "lora.dropout=0", "--set", f"eval.tasks=[{task}]"))
    assert code == 0, err
    assert "layout:  nf4 base computing in " in stdout  # not the compute dtype alone, as if unquantized
    trained = json.loads((run / "summary.json").read_text())["final_eval_tasks"]
    code, stdout, _ = run_cli(capsys, "eval", "--model", str(model), "--adapter", str(run), "--tasks", str(task),
                              "--json")
    assert code == 0 and "the base is loaded nf4-quantized, as the adapters' runs trained on it" in caplog.text
    (row,) = [r for r in json.loads(stdout)["results"] if r["adapter"] == str(run)]
    assert row["value"] == pytest.approx(trained[f"{row['task']}/{row['metric']}"], abs=1e-12)


def test_merge_dequantize_on_a_run_that_was_not_quantized_says_so(capsys, caplog, qwen_run, tmp_path):
    code, _, _ = run_cli(capsys, "merge", str(qwen_run), str(tmp_path / "merged"), "--dequantize")
    assert code == 0 and "--dequantize does nothing here: the run's base is not quantized" in caplog.text


def test_resume_refuses_a_changed_base(capsys, tiny_model_dir, tmp_path):
    """A paused run whose base directory was replaced by another model: --resume refuses it."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("qwen2"), base)
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24))
    run = tmp_path / "paused"
    assert main(train_args(base, data, run, "--set", "train.stop_at_step=1")) == 0
    assert json.loads((run / "summary.json").read_text())["base"]["model_type"] == "qwen2"
    shutil.rmtree(base)
    shutil.copytree(tiny_model_dir("llama"), base)
    before = (run / "summary.json").read_text()
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--set", "train.stop_at_step=null")
    assert code == 2 and f"adapter {run} was trained on {base} (qwen2" in err and "(llama LlamaForCausalLM" in err
    assert (run / "summary.json").read_text() == before  # the paused run is left as it was


# ----------------------------------------------------------------------------- 4. no validation examples


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_validation_set_truncated_away_is_refused_before_training(capsys, tiny_model_dir, tmp_path):
    short = [{"instruction": f"What is {a} plus 1?", "input": "", "output": str(a + 1)} for a in range(16)]
    long = [{"instruction": "Summarize: " + "the river runs by the old mill " * 20, "input": "", "output": "A mill."}
            for _ in range(9)]
    data = write_jsonl(tmp_path / "train.jsonl", short)
    val = write_jsonl(tmp_path / "val.jsonl", long)
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, *train_args(tiny_model_dir("qwen2"), data, out, "--set", f"data.val_path={val}",
                                                   "--set", "data.max_seq_length=48", "--json"))
    assert code == 2
    assert (f"{val}: all 9 validation examples are longer than data.max_seq_length = 48 (as set) and lose every "
            "response token to truncation, so the run could not be evaluated") in err
    summary = strict_json((out / "summary.json").read_text())
    assert summary["status"] == "invalid" and "all 9 validation examples" in summary["error"]
    assert strict_json(stdout) == {**summary, "exit_code": 2}  # --json: what summary.json recorded
    assert not (out / "adapter").exists() and not (out / "metrics.jsonl").exists()


def test_no_validation_set_trains_without_evaluation_and_json_is_strict(capsys, caplog, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(16))
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, *train_args(tiny_model_dir("qwen2"), data, out, "--set", "data.val_fraction=0",
                                                  "--json"))
    assert code == 0
    summary = strict_json(stdout)  # strict JSON: null, never NaN
    assert summary["status"] == "completed" and summary["val_examples"] == 0 and summary["final_eval_loss"] is None
    assert "no validation examples (data.val_fraction = 0): the run trains without evaluation" in caplog.text
    assert strict_json((out / "summary.json").read_text())["final_eval_loss"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    code, stdout, _ = run_cli(capsys, *train_args(tiny_model_dir("qwen2"), data, tmp_path / "run2",
                                                  "--set", "data.val_fraction=0"))
    assert code == 0 and "final eval loss:  none (no validation examples: trained without evaluation)" in stdout



def test_json_holds_on_failure_with_the_runs_summary(capsys, tiny_model_dir, tmp_path):
    """With --json a failing command still prints one JSON object on stdout: the error and the
    exit code, and for a run the summary.json it recorded (never an earlier run's)."""
    model = tiny_model_dir("qwen2")
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24, seed=5))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    # bad data: invalid, naming the file and line, as summary.json says
    code, stdout, err = run_cli(capsys, *train_args(model, bad, tmp_path / "bad-data", "--json"))
    out = strict_json(stdout)
    assert code == 2 == out["exit_code"] and out["status"] == "invalid"
    assert f"{bad}:25: malformed JSON line" in out["error"]
    assert out["error"] in err and out == {**json.loads((tmp_path / "bad-data" / "summary.json").read_text()),
                                           "exit_code": 2}
    # a bad key: the same, from the config's check
    code, stdout, _ = run_cli(capsys, *train_args(model, data, tmp_path / "bad-key", "--set", "lora.rank=4", "--json"))
    out = strict_json(stdout)
    assert code == 2 and out["status"] == "invalid" and "lora.rank" in out["error"]
    # a run that diverges: exit 3 and its summary (the step, the last good checkpoint)
    code, stdout, _ = run_cli(capsys, *train_args(model, data, tmp_path / "diverged", "--set", "train.lr=1e30",
                                                  "--set", "lora.dropout=0", "--json"))
    out = strict_json(stdout)
    assert code == 3 == out["exit_code"] and out["status"] == "diverged"
    assert out["diverged_at_step"] == 2  # step 1's loss is finite, its update of 1e30 is not
    assert out["run_dir"] == str(tmp_path / "diverged") and "non-finite" in out["error"]
    # refused before any run: the error alone, not the earlier run's "completed"
    assert run_cli(capsys, *train_args(model, data, tmp_path / "done"))[0] == 0
    code, stdout, _ = run_cli(capsys, *train_args(model, data, tmp_path / "done", "--json"))
    out = strict_json(stdout)
    assert code == 2 and set(out) == {"error", "exit_code"} and "holds an earlier run (completed" in out["error"]
    # any other command: the error and the exit code
    code, stdout, _ = run_cli(capsys, "estimate", "--model", str(model), "--r", "64", "--json")
    out = strict_json(stdout)
    assert code == 2 and set(out) == {"error", "exit_code"} and "r = 64" in out["error"]


# ----------------------------------------------------------------------------- 2. study run: checks first, exit codes


def study_base(model: Path, data: Path) -> dict:
    return {"model": {"path": str(model), "device": "cpu"},
            "data": {"path": str(data), "max_seq_length": 256, "val_max_examples": 4},
            "lora": {"r": 4, "alpha": 8},
            "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, "log_every": 1},
            "output": {"save_adapter": False}}


def test_study_dry_run_makes_the_runs_checks_and_a_real_run_starts_none(capsys, tiny_model_dir, tmp_path):
    from studytools import write_study

    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24))
    study = write_study(tmp_path, "s", base=study_base(tiny_model_dir("qwen2"), data), axes={"lora.r": [4, 8]})
    out = tmp_path / "runs"
    bad = ["--model", str(tmp_path / "modles" / "qwen"), "--data", str(tmp_path / "trian.jsonl"), "--out", str(out)]
    code, stdout, err = run_cli(capsys, "study", "run", str(study), *bad, "--dry-run")
    assert code == 2
    assert "2 of 2 runs cannot run:" in stdout
    assert f"model.path {tmp_path / 'modles' / 'qwen'}: no such directory [all 2 runs]" in stdout
    assert f"dataset file {tmp_path / 'trian.jsonl'} does not exist [all 2 runs]" in stdout
    assert "judged on: eval_loss (lower is better)\n" in stdout  # the metric, said before anything runs
    code, stdout, err = run_cli(capsys, "study", "run", str(study), *bad)
    assert code == 2 and stdout == ""
    assert "2 of 2 runs cannot run:" in err and "nothing was started" in err
    assert not out.exists()  # no database, no run directory

    # roles against the architecture: GPT-2 fuses query, key and value
    base = study_base(tiny_model_dir("gpt2"), data)
    base["lora"]["targets"] = ["query", "value"]
    gpt2 = write_study(tmp_path, "g", base=base, axes={"lora.r": [4, 8]})
    code, stdout, err = run_cli(capsys, "study", "run", str(gpt2), "--out", str(out))
    assert code == 2 and ("lora.targets asks for query, value alone, but GPT-2 fuses query, key and value into one "
                          "matrix (attn.c_attn). Ask for all three together: targets [query, key, value], or "
                          "[attention] (the default, which adapts attn.c_attn whole on GPT-2), or the module's "
                          "name (c_attn).") in err
    assert not out.exists()


def test_train_with_the_default_targets_on_a_model_with_one_qkv_matrix(capsys, caplog, tiny_model_dir, tmp_path):
    """GPT-2 holds q, k and v in c_attn: a run that names no lora.targets adapts that matrix
    whole (PEFT's default there) instead of being refused for asking q and v alone."""
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(16))
    out = tmp_path / "gpt2"
    code, _, err = run_cli(capsys, *train_args(tiny_model_dir("gpt2"), data, out))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_eval_loss"] > 0
    assert summary["trainable_params"] == 2 * 8 * (32 + 96)  # 2 layers, r 8 on c_attn (32 -> 96)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["attn.c_attn"]
    code, _, err = run_cli(capsys, *train_args(tiny_model_dir("gpt2"), data, tmp_path / "qv"),
                           "--set", "lora.targets=[query,value]")
    assert code == 2 and "GPT-2 fuses query, key and value" in err


@pytest.mark.slow  # three studies, each run in its own `loralab train` process: ~35 s
def test_study_exit_codes_and_name(capsys, tiny_model_dir, tmp_path):
    from studytools import write_study

    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24))
    study = write_study(tmp_path, "s", base=study_base(tiny_model_dir("qwen2"), data), axes={"lora.r": [4]})
    out = tmp_path / "runs"
    code, stdout, _ = run_cli(capsys, "study", "run", str(study), "--out", str(out))
    assert code == 0 and "1 runs (1 completed)" in stdout
    code, stdout, _ = run_cli(capsys, "study", "report", "s", "--out", str(out))  # 11: paths printed as text
    assert code == 0 and "PosixPath" not in stdout and f"html: {out / 's' / 'report' / 'report.html'}" in stdout
    # the same study with a changed config: refused, pointing at --name
    code, _, err = run_cli(capsys, "study", "run", str(study), "--out", str(out), "--set", "data.val_max_examples=2")
    assert code == 2 and "--name NEW_NAME" in err
    assert "already has a run 'r4' with a different config (data.val_max_examples 4 -> 2)" in err  # names the key
    # run again from another directory after the model moved: the completed run is neither checked nor planned
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir("qwen2"), moved)
    moved_study = write_study(tmp_path, "m", base=study_base(moved, data), axes={"lora.r": [4]})
    assert run_cli(capsys, "study", "run", str(moved_study), "--out", str(out))[0] == 0
    shutil.rmtree(moved)
    for dry in (["--dry-run"], []):
        code, stdout, err = run_cli(capsys, "study", "run", str(moved_study), "--out", str(out), *dry)
        assert code == 0 and "invalid" not in stdout + err, stdout + err
    assert "every run already completed (1)" in run_cli(capsys, "study", "run", str(moved_study), "--out", str(out),
                                                        "--dry-run")[1]
    # --name starts a fresh study; its run ends invalid (every validation example truncated away): exit 1
    long = [{"instruction": "Summarize: " + "the river runs by the old mill " * 20, "input": "",
             "output": "A mill."}] * 3
    val = write_jsonl(tmp_path / "val.jsonl", long)
    code, stdout, _ = run_cli(capsys, "study", "run", str(study), "--out", str(out), "--name", "s-val",
                              "--set", f"data.val_path={val}", "--set", "data.max_seq_length=48")
    assert code == 1 and "study s-val: 1 runs (1 invalid)" in stdout
    assert (out / "s-val" / "study.db").is_file() and (out / "s" / "study.db").is_file()


# ----------------------------------------------------------------------------- 3. the study metric is checked


def test_study_metric_is_checked_against_what_the_runs_write(capsys, tiny_model_dir, tmp_path):
    from studytools import write_study

    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24))
    base = study_base(tiny_model_dir("qwen2"), data)
    out = tmp_path / "runs"
    for metric, hint in (("eval_los", "did you mean eval_loss?"),
                         ("arithmetic_2ds/exact_mach", "did you mean arithmetic_2ds/exact_match?")):
        study = write_study(tmp_path, "m", base={**base, "eval": {"tasks": ["arithmetic_2ds"], "limit": 2}},
                            axes={"lora.r": [4]}, metric=metric)
        for dry in (["--dry-run"], []):
            code, stdout, err = run_cli(capsys, "study", "run", str(study), "--out", str(out), *dry)
            assert code == 2 and stdout == ""
            assert f"{study}: metric {metric!r} is not written by any run of study m ({hint})" in err
            assert "arithmetic_2ds/exact_match" in err and "eval_loss" in err
    assert not out.exists()
    # a task metric the runs do write passes
    study = write_study(tmp_path, "m", base={**base, "eval": {"tasks": ["arithmetic_2ds"], "limit": 2}},
                        axes={"lora.r": [4]}, metric="arithmetic_2ds/exact_match")
    assert run_cli(capsys, "study", "run", str(study), "--out", str(out), "--dry-run")[0] == 0


# ----------------------------------------------------------------------------- 6. errors name their source


def test_set_errors_name_the_flag_not_the_file(capsys, tiny_model_dir, tmp_path):
    config = tmp_path / "qwen.yaml"
    config.write_text(f"model:\n  path: {tiny_model_dir('qwen2')}\n  device: cpu\nlora:\n  r: 8\n", encoding="utf-8")
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", str(config), "--set", "lora.rank=4", "--out", str(out))
    assert code == 2 and stdout == ""
    assert "loralab train: error: --set lora.rank=4: unknown key lora.rank (did you mean lora.r?); lora has r, " in err
    assert "qwen.yaml" not in err
    assert json.loads((out / "summary.json").read_text())["status"] == "invalid"  # recorded, nothing else written
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    # a problem in the file is still the file's; one on the command line is the flag's
    config.write_text("lora:\n  rank: 8\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "train", str(config), "--set", "train.lr=-1", "--out", str(out))
    assert code == 2 and f"{config}: invalid configuration:" in err
    assert "  - unknown key lora.rank (did you mean lora.r?)" in err
    assert "  - --set train.lr=-1: train.lr must be > 0 (got -1.0)" in err
    code, _, err = run_cli(capsys, "estimate", "--model", "tiny", "--set", "lora.lora_alpha=32")
    assert code == 2 and "--set lora.lora_alpha=32: unknown key lora.lora_alpha (did you mean lora.alpha?)" in err
    # so are the checks of keys taken together: a valid file, and a flag that breaks a rule
    config.write_text("lora:\n  r: 8\ntrain:\n  batch_size: 8\n  micro_batch_size: 8\n", encoding="utf-8")
    for flag, said in (("quant.block_size=128", "quant.block_size must be 64 (got 128)"),
                       ("train.micro_batch_size=3",
                        "train.batch_size (8) must be divisible by train.micro_batch_size (3)")):
        code, _, err = run_cli(capsys, "train", str(config), "--set", flag, "--out", str(out))
        assert code == 2 and f"loralab train: error: --set {flag}: {said}" in err and str(config) not in err
    # a list or a quoted string YAML cannot read is refused, not taken as its raw text (a regular expression in
    # double quotes, whose backslash YAML reads as an escape, was then "neither a role nor a linear module")
    code, _, err = run_cli(capsys, "estimate", "--model", "tiny", "--set", 'lora.targets=["re:.*\\.q_proj"]')
    assert code == 2 and "not valid YAML (found unknown escape character '.')" in err
    assert "single quotes" in err and "neither a role" not in err
    code, _, err = run_cli(capsys, "estimate", "--model", "tiny", "--set", "lora.targets=['re:.*\\.q_proj']")
    assert code == 0, err  # the form the message gives


# ----------------------------------------------------------------------------- 7. data before the model


def test_data_is_checked_before_the_model_loads_and_the_hint_maps_the_columns(capsys, caplog, tiny_model_dir, tmp_path):
    import csv

    caplog.set_level("INFO", logger="loralab")
    data = tmp_path / "qa.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "answer"])
        w.writerows([i, f"What is {i} plus 1?", f"It is {i + 1}."] for i in range(16))
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(tiny_model_dir("qwen2"), data, out))
    assert code == 2
    assert f"{data}:2: missing field instruction, output (format alpaca needs instruction, output)" in err
    assert "the record has columns id, question, answer" in err
    hint = '--set data.columns="{instruction: question, output: answer}"'
    assert hint in err
    assert "trainable params" not in caplog.text  # no model was loaded, no adapter attached
    assert json.loads((out / "summary.json").read_text())["status"] == "invalid"
    assert not (out / "adapter").exists() and not (out / "metrics.jsonl").exists()
    # the line the message shows is the one that works
    code, _, _ = run_cli(capsys, *train_args(tiny_model_dir("qwen2"), data, tmp_path / "run2"), "--set",
                         "data.columns={instruction: question, output: answer}")
    assert code == 0


# ----------------------------------------------------------------------------- 11. smaller things


def test_smaller_things(capsys, caplog, tiny_model_dir, tmp_path):
    from loralab.evaluate.metrics import mean_score

    caplog.set_level("INFO", logger="loralab")
    # warmup longer than the run: said at once
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24))
    run = tmp_path / "paused"
    assert main(train_args(tiny_model_dir("qwen2"), data, run, "--set", "train.warmup_steps=10",
                           "--set", "train.stop_at_step=1")) == 0
    assert ("train.warmup_steps = 10 is more than the run's 2 steps: the learning rate never reaches train.lr = "
            "0.0003 (it peaks at 2/10 of it, 6e-05); set train.warmup_steps below 2") in caplog.text
    from loralab.config import load_config
    from loralab.train.setup import warn_if_warmup_outlasts

    caplog.clear()
    warn_if_warmup_outlasts(load_config(None, ["train.warmup_steps=3"]), 1)
    assert "is more than the run's 1 step: the learning rate" in caplog.text
    assert caplog.text.rstrip().endswith("set train.warmup_steps to 0")
    # resuming a paused run as it is pauses again at once: said, and --help says how to finish it
    caplog.clear()
    assert main(["train", "--resume", str(run)]) == 0
    assert "the run is paused at step 1 by train.stop_at_step = 1 and pauses again at once; finish it with " \
           "--set train.stop_at_step=null" in caplog.text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "finish it with --set train.stop_at_step=null" in " ".join(capsys.readouterr().out.split())
    # MC2, a probability: its interval stays in [0, 1], from the command line as in the library
    low = mean_score([0.0, 0.0, 0.9], bounds=(0.0, 1.0))
    assert low.ci_low == 0.0 and low.ci_high == pytest.approx(0.3 + 1.96 * (0.27 / 3) ** 0.5)
    code, stdout, _ = run_cli(capsys, "eval", "--model", "builtin:tiny", "--tasks", "world_mc", "--limit", "3",
                              "--json")
    mc2 = next(r for r in json.loads(stdout)["results"] if r["metric"] == "mc2")
    assert code == 0 and 0.0 <= mc2["ci_low"] <= mc2["value"] <= mc2["ci_high"] <= 1.0
    # --json is one object everywhere
    code, stdout, _ = run_cli(capsys, "study", "presets", "--json")
    assert code == 0 and {p["name"] for p in json.loads(stdout)["presets"]} >= {"rank_alpha_grid", "targets"}
    (tmp_path / "none").mkdir()
    code, stdout, _ = run_cli(capsys, "runs", "list", "--out", str(tmp_path / "none"), "--json")
    assert code == 0 and json.loads(stdout) == {"runs": []}


# ----------------------------------------------------------------------------- 9. runs of `loralab train`


def test_runs_list_show_compare_see_train_runs(capsys, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24))
    out = tmp_path / "runs"
    for name, r in (("a", 4), ("b", 8)):
        assert main(train_args(tiny_model_dir("qwen2"), data, out / name, "--set", f"lora.r={r}")) == 0
    capsys.readouterr()
    code, stdout, _ = run_cli(capsys, "runs", "list", "--out", str(out), "--json")
    rows = json.loads(stdout)["runs"]
    assert code == 0 and [(r["name"], r["status"], r["study"]) for r in rows] == [("a", "completed", None),
                                                                                   ("b", "completed", None)]
    summary_a = json.loads((out / "a" / "summary.json").read_text())
    assert rows[0]["value"] == pytest.approx(summary_a["final_eval_loss"])
    code, stdout, _ = run_cli(capsys, "runs", "show", str(out / "a"), "--json")
    shown = json.loads(stdout)
    assert code == 0 and shown["status"] == "completed" and shown["config"]["lora"]["r"] == 4
    assert shown["final_metrics"]["eval_loss"] == pytest.approx(summary_a["final_eval_loss"])
    code, stdout, _ = run_cli(capsys, "runs", "compare", "a", "b", "--out", str(out), "--json")
    compared = json.loads(stdout)
    assert code == 0 and compared["differences"] == ["lora.r"]
    assert {r["field"]: (r["a"], r["b"]) for r in compared["rows"]}["lora.r"] == (4, 8)
    code, _, err = run_cli(capsys, "runs", "show", "nope", "--out", str(out))
    assert code == 2 and f"no run directory nope (nor {out / 'nope'})" in err
    # a directory that is not there, a status that does not exist: said, not "no runs"
    code, stdout, err = run_cli(capsys, "runs", "list", "--out", str(tmp_path / "nowhere"), "--json")
    assert code == 2 and "no such directory" in json.loads(stdout)["error"]
    for argv, said in ((["runs", "list", "--out", str(out), "--status", "complete"], "invalid choice: 'complete'"),
                       (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens must be a whole number")):
        with pytest.raises(SystemExit) as ended:
            main(argv)
        assert ended.value.code == 2 and said in capsys.readouterr().err
        with pytest.raises(SystemExit) as ended:  # with --json, the error is on stdout as JSON too
            main([*argv, "--json"])
        stdout = capsys.readouterr().out
        assert ended.value.code == 2 and said in json.loads(stdout)["error"] and json.loads(stdout)["exit_code"] == 2


# ----------------------------------------------------------------------------- 10. a run picks its device


def test_device_accepts_cuda_n_and_the_commands_take_device(capsys, tiny_model_dir, tmp_path):
    import torch

    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24))
    qwen = tiny_model_dir("qwen2")
    code, _, err = run_cli(capsys, *train_args(qwen, data, tmp_path / "bad", "--set", "model.device=gpu1"))
    assert code == 2 and ("model.device must be auto, cpu, cuda or cuda:N (a GPU's index, e.g. cuda:1) "
                          "(got 'gpu1')") in err
    for argv in (["generate", "--device", "gpu1", "Hi"], ["eval", "--model", str(qwen), "--device", "gpu1"],
                 ["train", "--device", "gpu1"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2 and "--device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    # cuda:N is a device: taken from --set and --device alike, refused clearly where it is not usable
    out = tmp_path / "gpu"
    for flag in (["--set", "model.device=cuda:1"], ["--device", "cuda:1"]):
        code, _, err = run_cli(capsys, *train_args(qwen, data, out), *flag)
        if not torch.cuda.is_available():
            assert code == 2 and "model.device is cuda:1 but CUDA is not usable" in err
        elif torch.cuda.device_count() < 2:
            assert code == 2 and "model.device is cuda:1 but this process sees 1 CUDA device(s)" in err
    # --device on train is --set model.device
    code, _, _ = run_cli(capsys, *train_args(qwen, data, tmp_path / "cpu"), "--device", "cpu")
    assert code == 0 and "device: cpu" in (tmp_path / "cpu" / "config.yaml").read_text()
    code, _, _ = run_cli(capsys, "generate", "--model", str(qwen), "--device", "cpu", "--max-new-tokens", "2", "Hi")
    assert code == 0


# ----------------------------------------------------------------------------- 5. generate --adapter RUN_DIR


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_the_chat_template_asked_of_a_model_without_one_is_refused_in_words(capsys, command):
    """`--template chat` on a base whose tokenizer has no chat template: exit 2 naming the model
    and the way out, for eval as for generate (eval printed a transformers traceback and exited 1)."""
    argv = (["eval", "--model", "builtin:tiny", "--tasks", "arithmetic_2ds", "--limit", "2"] if command == "eval"
            else ["generate", "--model", "builtin:tiny", "What is 2 plus 3?"])
    code, _, err = run_cli(capsys, *argv, "--template", "chat")
    assert code == 2, err
    assert ("the prompt template is 'chat' (data.template, or --template of eval and generate) but the tokenizer "
            "of") in err
    assert "has no chat template" in err and "Traceback" not in err


def test_generate_uses_the_runs_model_and_chat_template(capsys, caplog, tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    caplog.set_level("INFO", logger="loralab")
    model = tmp_path / "chat-qwen"
    shutil.copytree(tiny_model_dir("qwen2"), model)
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    tok.save_pretrained(str(model))
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                           {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(24)]
    run = tmp_path / "chat-run"
    assert main(train_args(model, write_jsonl(tmp_path / "chat.jsonl", chats), run)) == 0
    capsys.readouterr()
    # no --model: the run's base, and the chat template it trained with
    code, stdout, _ = run_cli(capsys, "generate", "--adapter", str(run), "--max-new-tokens", "2", "--json", "Hi")
    result = json.loads(stdout)
    assert code == 0 and result["model"] == str(model) and result["template"] == "chat"
    assert f"generating with {run} on {model}, prompt template chat" in caplog.text
    code, stdout, _ = run_cli(capsys, "generate", "--adapter", str(run / "adapter"), "--max-new-tokens", "2",
                              "--json", "Hi")  # the adapter folder itself: its run's template all the same
    assert code == 0 and json.loads(stdout)["template"] == "chat"
    # --template overrides; an Alpaca run keeps Alpaca
    code, stdout, _ = run_cli(capsys, "generate", "--adapter", str(run), "--template", "alpaca", "--max-new-tokens",
                              "2", "--json", "Hi")
    assert code == 0 and json.loads(stdout)["template"] == "alpaca"
    from loralab.data.templates import format_prompt

    prompt = format_prompt("Hi", template="chat", tokenizer=tok)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tasks_are_scored_in_the_chat_template_a_run_trained_with(capsys, caplog, tiny_model_dir, tmp_path):
    """A run on chat data was scored on tasks in Alpaca prompts, which it never saw: 0% exact match
    in its summary and from loralab eval alike, while generate (in its chat template) answered
    right. Tasks are now prompted as the run's examples were, and the answer ends where the chat
    turn does (here a newline; ChatML's <|im_end|>, a token of its own, ends it as an end token)."""
    from transformers import AutoTokenizer

    from loralab.data.dataset import DATA_DIR
    from loralab.data.templates import chat_turn_end
    from loralab.models import BUILTIN_MODELS

    caplog.set_level("INFO", logger="loralab")
    model = tmp_path / "tiny-chat"  # the shipped base, which knows the sums in Alpaca prompts, with a chat template
    shutil.copytree(BUILTIN_MODELS["builtin:tiny"], model)
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = ("{% for m in messages %}{{ ('User: ' if m['role'] == 'user' else 'Bot: ') + m['content'] + "
                         "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Bot: ' }}{% endif %}")
    tok.save_pretrained(str(model))
    assert chat_turn_end(tok) == "\n"
    chatml = AutoTokenizer.from_pretrained(str(tiny_model_dir("qwen2")))
    chatml.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chatml.chat_template = CHATML
    assert chat_turn_end(chatml) == "<|im_end|>" and "<|im_end|>" in chatml.get_added_vocab()
    records = [json.loads(line) for line in (DATA_DIR / "arithmetic_2ds_train.jsonl").read_text().splitlines()[:480]]
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": r["instruction"]},
                                                                {"role": "assistant", "content": r["output"]}]}
                                                  for r in records])
    run = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--out", str(run), "--json", *[
        a for kv in (f"model.path={model}", "model.dtype=fp32", f"data.path={chats}", "data.max_seq_length=128",
                     "lora.r=16", "lora.alpha=32", "lora.dropout=0", "lora.targets=all", "train.lr=2e-3",
                     "train.warmup_steps=5", "train.batch_size=16", "train.micro_batch_size=16", "train.max_steps=30",
                     "eval.tasks=[arithmetic_2ds]", "eval.limit=40", "eval.every=0") for a in ("--set", kv)])
    assert code == 0, err
    in_run = json.loads(stdout)["final_eval_tasks"]["arithmetic_2ds/exact_match"]
    assert in_run >= 0.25  # 0.475 after these 30 steps (0.875 on another 480 of the sums); 0.0 in Alpaca prompts

    def exact_match(*flags: str) -> dict:
        code, stdout, err = run_cli(capsys, "eval", "--model", str(model), "--adapter", str(run), "--tasks",
                                    "arithmetic_2ds", "--limit", "40", "--json", *flags)
        assert code == 0, err
        return {r["adapter"]: r["value"] for r in json.loads(stdout)["results"] if r["metric"] == "exact_match"}

    scored = exact_match()
    assert scored[str(run)] == pytest.approx(in_run)  # the same prompts as the run's own evaluation
    assert f"eval {run} on arithmetic_2ds (40 examples), prompt template chat" in caplog.text
    assert scored[str(run)] - exact_match("--template", "alpaca")[str(run)] >= 0.25
    code, stdout, _ = run_cli(capsys, "generate", "--adapter", str(run), "--json", "What is 12 plus 45?")
    answer = json.loads(stdout)["generations"][0]["output"]
    assert code == 0 and answer.startswith("57") and "\n" not in answer  # cut at the turn's end ("57." here)


# ----------------------------------------------------------------------------- 8. estimate as the run would be


def test_estimate_uses_this_machines_device_and_counts_as_train(capsys, tiny_model_dir, tmp_path):
    import torch

    from loralab.models import model_width, read_config, resolve_dtype

    qwen = tiny_model_dir("qwen2")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{path: {qwen}}}\ndata: {{max_seq_length: 256}}\n", encoding="utf-8")
    code, stdout, _ = run_cli(capsys, "estimate", str(config), "--json")
    est = json.loads(stdout)
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert code == 0 and est["settings"]["device"] == here and est["settings"]["dtype"] == resolve_dtype(
        "auto", here, width=model_width(read_config(str(qwen))))
    assert any(n.startswith(f"model.device auto: estimated for {here}, where a run would train on this machine")
               for n in est["approximate"])
    code, stdout, _ = run_cli(capsys, "estimate", str(config))
    assert f"total params      {est['total_params']:,} (base {est['base_params']:,} + adapter" in stdout
    assert f"({100 * est['trainable_share']:.4f}% of {est['total_params']:,})" in stdout
    # the same counts as the run: total = base + adapter, the share's denominator in both
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24))
    code, stdout, _ = run_cli(capsys, *train_args(qwen, data, tmp_path / "run"), "--json")
    summary = json.loads(stdout)
    assert (summary["total_params"], summary["trainable_params"]) == (est["total_params"], est["trainable_params"])
    code, stdout, _ = run_cli(capsys, *train_args(qwen, data, tmp_path / "run2"))
    share = 100 * est["trainable_params"] / est["total_params"]
    assert f"{est['trainable_params']:,} / {est['total_params']:,} ({share:.4f}%; total = base + adapter)" in stdout
    # an explicit device still estimates for it (a GPU run planned on a laptop)
    code, stdout, _ = run_cli(capsys, "estimate", str(config), "--device", "cuda", "--json")
    assert json.loads(stdout)["settings"]["device"] == "cuda"


# ----------------------------------------------------------------------------- an earlier run is kept


def test_a_new_run_never_replaces_an_earlier_runs_adapter_or_checkpoints(capsys, tiny_model_dir, tmp_path):
    """`loralab train --out DIR` where DIR holds a run: refused, exit 2, every file as it was,
    whether the new invocation's input is bad or good; --overwrite replaces it."""
    model = tiny_model_dir("qwen2")
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(24, seed=3))
    out = tmp_path / "run"
    assert run_cli(capsys, *train_args(model, data, out))[0] == 0

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    kept = files()
    assert "adapter/adapter_model.safetensors" in kept
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    for argv in (train_args(model, bad, out), train_args(model, data, out, "--set", "lora.r=4"),
                 train_args(model, data, out, "--set", "lora.rank=4")):  # bad data, a good run, a bad key
        code, stdout, err = run_cli(capsys, *argv)
        assert code == 2 and stdout == "", err
        assert files() == kept, argv
    assert f"{out} holds an earlier run (completed; adapter/)" in err or "unknown key lora.rank" in err
    code, _, err = run_cli(capsys, *train_args(model, data, out, "--set", "lora.r=4"))
    assert "nothing was changed. Choose another --out, or pass --overwrite to replace it" in err
    assert "--resume" not in err  # a completed run has nothing to continue
    # a paused run's checkpoints are kept the same way
    paused = tmp_path / "paused"
    assert run_cli(capsys, *train_args(model, data, paused, "--set", "train.checkpoint_every=1",
                                       "--set", "train.stop_at_step=1"))[0] == 0
    code, _, err = run_cli(capsys, *train_args(model, data, paused))
    assert code == 2 and f"{paused} holds an earlier run (paused; " in err and "checkpoints/)" in err
    assert f"Continue it with `loralab train --resume {paused}`, choose another --out" in err
    # --overwrite: the new run replaces the old one
    assert run_cli(capsys, *train_args(model, data, out, "--set", "lora.r=4", "--overwrite"))[0] == 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_a_run_trained_with_relative_paths_serves_from_any_directory(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """model.path, data.path and eval.tasks' task files given relative to the working directory
    are recorded absolute in the run's config.yaml, so generate and --resume work from elsewhere;
    a resume refused for bad input leaves the paused run as it was (summary and config)."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir("qwen2"), work / "models" / "qwen")
    write_jsonl(work / "train.jsonl", instruction_records(24, seed=3))
    (work / "tasks").mkdir()
    write_jsonl(work / "tasks" / "d.jsonl", [{"good": "The sun is warm.", "bad": "The sun warm is."}] * 3)
    (work / "tasks" / "pairs.yaml").write_text("path: d.jsonl\nformat: pairs\n", encoding="utf-8")
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, *train_args(Path("models/qwen"), Path("train.jsonl"), work / "run",
                                               "--set", "train.stop_at_step=1", "--set", "train.checkpoint_every=1",
                                               "--set", "eval.tasks=[tasks/pairs.yaml]"))
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert saved["model"]["path"] == str(work / "models" / "qwen")
    assert saved["data"]["path"] == str(work / "train.jsonl")
    assert saved["eval"]["tasks"] == [str(work / "tasks" / "pairs.yaml")]
    monkeypatch.chdir(tmp_path)  # elsewhere
    code, stdout, err = run_cli(capsys, "generate", "--adapter", str(work / "run"), "--max-new-tokens", "2", "hi")
    assert code == 0, err
    # a resume whose task file has gone is refused; the run stays paused with its config as it was
    paused = {f: (work / "run" / f).read_bytes() for f in ("summary.json", "config.yaml")}
    (work / "tasks" / "pairs.yaml").rename(work / "tasks" / "moved.yaml")
    code, _, err = run_cli(capsys, "train", "--resume", str(work / "run"), "--set", "train.stop_at_step=null")
    assert code == 2 and "pairs.yaml" in err, err
    after = json.loads((work / "run" / "summary.json").read_text())
    assert after == {**json.loads(paused["summary.json"]), "resume_error": after["resume_error"]}
    assert after["status"] == "paused" and after["resume_error"].startswith("--resume refused before its first step")
    assert (work / "run" / "config.yaml").read_bytes() == paused["config.yaml"]
    (work / "tasks" / "moved.yaml").rename(work / "tasks" / "pairs.yaml")
    # a run an older loralab recorded with the paths as given resumes from where it was started
    old = tmp_path / "old"
    shutil.copytree(work / "run", old)
    (old / "config.yaml").write_text(paused["config.yaml"].decode().replace(f"{work}/", ""), encoding="utf-8")
    assert "path: models/qwen" in (old / "config.yaml").read_text()
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "train", "--resume", str(old), "--set", "train.stop_at_step=null")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "train", "--resume", str(work / "run"), "--set", "train.stop_at_step=null")
    assert code == 0, err
    assert json.loads((work / "run" / "summary.json").read_text())["status"] == "completed"


def test_a_model_with_no_sdpa_attention_trains_and_serves_eagerly(capsys, caplog, tiny_model_dir, tmp_path):
    """Gemma2 has no SDPA attention in transformers: the defaults (sdpa) used to make every run on
    it invalid, with transformers' advice in its own terms; now it loads eagerly and says so, in
    train as in generate."""
    caplog.set_level("INFO", logger="loralab")
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(8))
    out = tmp_path / "g2"
    code, _, err = run_cli(capsys, *train_args(tiny_model_dir("gemma2"), data, out))
    assert code == 0, err
    assert "model.attn_implementation: sdpa -> eager (Gemma2ForCausalLM has no SDPA attention" in caplog.text
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    code, _, err = run_cli(capsys, "generate", "--adapter", str(out), "--max-new-tokens", "2", "Hi")
    assert code == 0, err


def test_a_resume_on_other_data_is_refused_and_leaves_the_run_as_it_was(capsys, tiny_model_dir, tmp_path):
    """The data file cut, edited or appended to between a pause and its resume: the resumed run
    would mix two datasets. The resume is refused before its first step (exit 2, the run's
    summary, config, metrics and checkpoints as they were); with the data put back it completes."""
    model = tiny_model_dir("llama")
    records = instruction_records(40, seed=3)
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = tmp_path / "run"
    assert run_cli(capsys, *train_args(model, data, out, "--set", "train.max_steps=4",
                                       "--set", "train.checkpoint_every=1", "--set", "train.stop_at_step=2"))[0] == 0
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert json.loads((out / "summary.json").read_text())["status"] == "paused"
    said = []
    for changed in (records[:30], records[:5] + [{**records[5], "output": records[5]["output"] + "!"}] + records[6:]):
        write_jsonl(data, changed)  # cut; one response edited
        code, stdout, err = run_cli(capsys, "train", "--resume", str(out), "--set", "train.stop_at_step=null")
        assert code == 2 and stdout == "", err
        assert f"cannot resume {out}: its examples are not those it trained on until step 2" in err
        assert f"data.path {data}): the data or the tokenizer changed since" in err
        summary = json.loads((out / "summary.json").read_text())
        assert summary.pop("resume_error").startswith("--resume refused before its first step: cannot resume")
        assert summary == json.loads(files[out / "summary.json"])
        assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "summary.json"} == {
            p: b for p, b in files.items() if p.name != "summary.json"}
        said.append(err)
    n_train, n_val = summary["data_stats"]["n_train"], summary["data_stats"]["n_val"]
    assert f"({n_train} training and {n_val} validation examples then, " in said[0]
    assert "(the same number of examples, other tokens; " in said[1]
    write_jsonl(data, records)
    code, _, err = run_cli(capsys, "train", "--resume", str(out), "--set", "train.stop_at_step=null")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 4 and summary["resumed_from_step"] == 2
