"""Bad input through the command line: a clear message naming the file and line, the key or the
module; exit code 2; the run stored as invalid (summary.json) with no adapter.

Each case is one `loralab train` on a tiny random-init Llama (hidden size 32, context 256).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from loralab.cli import main


def alpaca(tmp_path: Path, text: str | bytes, name: str = "data.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


def good_lines(n: int = 8) -> list[str]:
    return [json.dumps({"instruction": f"What is {i} plus 1?", "input": "", "output": str(i + 1)}) for i in range(n)]


def model_without(model_dir: Path, tmp_path: Path, suffixes: tuple[str, ...]) -> Path:
    out = tmp_path / "model-copy"
    out.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(suffixes):
            shutil.copy(f, out / f.name)
    return out


NL = "\n"
GOOD = NL.join(good_lines())
# id -> (data file contents or None, file name, model variant, extra --set items, substrings of the message)
CASES = {
    "malformed_json": ("[" + good_lines(1)[0] + "," + NL + ' {"instruction": }]', "data.json", "", [],
                       ["data.json:2", "malformed JSON"]),
    "malformed_jsonl": (NL.join(good_lines(2) + ['{"instruction": "x", ']), "data.jsonl", "", [],
                        ["data.jsonl:3", "malformed JSON line"]),
    "wrong_encoding": (good_lines(1)[0].encode() + NL.encode() + "caf\u00e9".encode("latin-1"), "data.jsonl", "", [],
                       ["data.jsonl:2", "not UTF-8", "0xe9"]),
    "empty_file": ("", "data.jsonl", "", [], ["data.jsonl", "empty"]),
    "empty_response": (good_lines(1)[0] + NL + json.dumps({"instruction": "b", "output": "  "}), "data.jsonl", "", [],
                       ["data.jsonl:2: field output is only spaces; a record needs a response to train on",
                        "data.min_response_chars: 1 drops records with an empty one instead"]),
    "missing_field": (good_lines(1)[0] + NL + json.dumps({"instruction": "b"}), "data.jsonl", "", [],
                      ["data.jsonl:2", "missing field output"]),
    "empty_after_filtering": (GOOD, "data.jsonl", "", ["data.min_response_chars=50"],
                              ["no training examples left", "data.min_response_chars = 50"]),
    "all_truncated_to_no_response": (None, "", "", ["data.max_seq_length=4"],
                                     ["every response token", "data.max_seq_length = 4"]),
    "prompt_longer_than_context": (
        json.dumps({"instruction": "word " * 100, "output": "word " * 400}), "data.jsonl", "",
        ["data.max_seq_length=512", "data.val_fraction=0"],
        ["examples are cut at data.max_seq_length = 512 tokens, more than the model's context of 256",
         "max_position_embeddings", "data.max_seq_length"]),
    "unknown_target_role": (None, "", "", ["lora.targets=querry"], ["lora.targets", "'querry'", "query, key, value"]),
    "target_module_not_in_model": (None, "", "", ["lora.targets=foo_proj"], ["lora.targets", "'foo_proj'", "q_proj"]),
    "r_larger_than_layer": (None, "", "", ["lora.r=64"], ["lora.r = 64", "q_proj", "32 x 32"]),
    "alpha_not_positive": (None, "", "", ["lora.alpha=0"], ["lora.alpha must be > 0"]),
    "lr_not_positive": (None, "", "", ["train.lr=-1e-4"], ["train.lr must be > 0", "-0.0001"]),
    "batch_not_divisible": (None, "", "", ["train.batch_size=6", "train.micro_batch_size=4"],
                            ["train.batch_size (6)", "train.micro_batch_size (4)"]),
    "quant_mode_cpu_cannot_run": (None, "", "", ["quant.mode=nf4"],
                                  ["quant.mode nf4", "model.layers.0.self_attn.q_proj", "in_features 32"]),
    "model_dir_without_weights": (None, "", "no-weights", [], ["model-copy", "no *.safetensors"]),
    "model_dir_without_tokenizer": (None, "", "no-tokenizer", [], ["model-copy", "no tokenizer"]),
    "token_beyond_the_vocab": (None, "", "vocab600", [],
                               ["the tokenizer gives token id 655", "vocab_size 600", "resize_token_embeddings"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_invalid(case, tiny_model_dir, tmp_path, capsys, caplog):
    data, name, variant, sets, needles = CASES[case]
    model = tiny_model_dir("llama")
    if variant == "no-weights":
        model = model_without(model, tmp_path, (".safetensors",))
    elif variant == "no-tokenizer":
        model = model_without(model, tmp_path, ("tokenizer.json", "tokenizer_config.json"))
    elif variant == "vocab600":
        model = tiny_model_dir("llama_vocab600")
    if data is not None:
        sets = [f"data.path={alpaca(tmp_path, data, name)}", *sets]
    out = tmp_path / "run"
    base = [f"model.path={model}", "model.device=cpu", "data.path=builtin:arithmetic_2ds", "data.limit=16",
            "data.val_max_examples=4", "data.max_seq_length=64", "train.max_steps=1", "train.batch_size=4",
            "train.micro_batch_size=4"]
    argv = ["train", "--out", str(out)]
    for item in base + sets:
        argv += ["--set", item]
    with caplog.at_level(logging.INFO, logger="loralab"):
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "were cut" not in caplog.text  # a refused run does not first report what it would have trained on
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "invalid"
    assert summary["error"] in err
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()
    if case == "malformed_jsonl":  # what uses the run's adapter says why there is none
        assert main(["merge", str(out), str(tmp_path / "merged")]) == 2
        assert (f"{out}: a run directory without an adapter: the run is invalid: {summary['error']}"
                in capsys.readouterr().err)


def test_adapter_for_another_base_names_the_module(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), "--set", f"model.path={tiny_model_dir('llama')}", "--set",
                 "model.device=cpu", "--set", "train.max_steps=1", "--set", "data.limit=8", "--set",
                 "train.batch_size=4", "--set", "train.micro_batch_size=4", "--set", "data.max_seq_length=64"])
    assert code == 0
    capsys.readouterr()
    other = tiny_model_dir("llama_h64")  # hidden size 64 instead of 32
    code = main(["generate", "--model", str(other), "--adapter", str(run), "--max-new-tokens", "2", "hi"])
    err = capsys.readouterr().err
    assert code == 2  # refused from config.json, before loading (tests/test_cli_user.py)
    assert "was trained on" in err and "hidden_size 32" in err and "hidden_size 64" in err
    # --force cannot make the shapes fit: refused from the adapter's header, naming the module and
    # both widths, before any model loads (eval used to score the base first, then fail)
    for argv in (["generate", "--max-new-tokens", "2", "hi"], ["eval", "--tasks", "arithmetic_2ds", "--limit", "2"]):
        code = main([argv[0], "--model", str(other), "--adapter", str(run), "--force", *argv[1:]])
        err = capsys.readouterr().err
        assert code == 2, err
        assert ("was made for model.layers.0.self_attn.q_proj with 32 input features; "
                f"{other}'s model.layers.0.self_attn.q_proj has 64: it does not fit this base") in err
        assert "eval base" not in err and "model.dtype" not in err  # nothing loaded, nothing scored
