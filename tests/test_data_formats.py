"""The data people have: chat records in real chat templates, datasets files, validation splits,
data.max_seq_length: auto and the statistics a run records."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import TINY_BASE, make_cfg
from loralab.config import load_config
from loralab.data.chat import GENERATION_BLOCK
from loralab.data.dataset import IGNORE, length_stats, load_splits
from loralab.errors import ConfigError, DataError
from loralab.train.loop import train

# ----------------------------------------------------------------------------- chat templates

# ChatML (the layout of Qwen / SmolLM / OpenHermes), with transformers' generation block around
# what the assistant writes: its content and end token.
CHATML_GENERATION = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# The same ChatML without the block, as most ChatML models ship it.
CHATML_PLAIN = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3 style: bos, header tokens, content trimmed, <|eot_id|> after every turn; no block.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Announces the number of turns up front: a conversation's beginning renders differently
# from the whole, so the assistant turns cannot be found by rendering prefixes.
TURN_COUNT = "{{ 'Turns: ' ~ (messages | length) ~ '\\n' }}" + CHATML_PLAIN

TEMPLATES = {  # name -> (template, special tokens, end token)
    "chatml_generation": (CHATML_GENERATION, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "chatml_plain": (CHATML_PLAIN, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "turn_count": (TURN_COUNT, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
}


def chat_tokenizer_dir(tmp_path: Path, name: str | None) -> Path:
    """The shipped base's tokenizer with a chat template's special tokens, saved to disk
    (None: no chat template). At most 4 tokens are added: the test models' vocab (1280) holds them."""
    tok = AutoTokenizer.from_pretrained(str(TINY_BASE))
    out = tmp_path / f"tok-{name}"
    if name is not None:
        template, specials, _ = TEMPLATES[name]
        tok.add_tokens(specials, special_tokens=True)
        if name == "llama3":
            tok.bos_token = "<|begin_of_text|>"
        tok.chat_template = template
    tok.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- realistic data

SUBJECTS = ["a sourdough starter", "the quarterly budget", "a Python dictionary", "my tomato plants",
            "the train timetable", "a cover letter", "the bathroom tiles", "a birthday speech",
            "the database index", "a marathon plan", "my bicycle chain", "the tax return"]
ASKS = ["How do I look after {s}?", "Can you explain {s} to a beginner?", "What should I check first with {s}?",
        "Give me three tips about {s}.", "Why does {s} keep failing?", "Write a short note about {s}."]
CLAUSES = ["start with the simplest step", "keep a short record of what you changed",
           "check it again after a day", "ask someone who has done it before", "do not rush the last part",
           "write the numbers down before you compare them", "expect the first attempt to be rough",
           "clean everything you used afterwards", "set a reminder for the next check",
           "read the instructions once more", "compare it with last week's result", "leave room for mistakes"]


def answer(rng: random.Random, n_sentences: int) -> str:
    sentences = []
    for _ in range(n_sentences):
        a, b = rng.sample(CLAUSES, 2)
        sentences.append(f"{a[0].upper()}{a[1:]}, and {b}.")
    return " ".join(sentences)


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """Conversations of 1-3 exchanges, some with a system turn; answers of 1-12 sentences
    (tens to a few hundred tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": "You are a patient assistant who answers plainly."})
        for _ in range(rng.choice([1, 1, 2, 3])):
            messages.append({"role": "user", "content": rng.choice(ASKS).format(s=rng.choice(SUBJECTS))})
            messages.append({"role": "assistant", "content": answer(rng, rng.choice([1, 2, 4, 8, 12]))})
        out.append({"messages": messages})
    return out


def instruction_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca records: an instruction, sometimes an input, answers of 1-12 sentences."""
    rng = random.Random(seed)
    return [{"instruction": rng.choice(ASKS).format(s=rng.choice(SUBJECTS)),
             "input": rng.choice(["", "", f"Context: {answer(rng, 1)}"]),
             "output": answer(rng, rng.choice([1, 2, 4, 8, 12]))} for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def data_cfg(path, *overrides: str):
    return load_config(None, [f"data.path={path}", *overrides]).data


def labelled_runs(ex, tok) -> list[str]:
    """The text of each contiguous run of tokens that carry loss."""
    runs, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


# ----------------------------------------------------------------------------- chat: loss on assistant turns


@pytest.mark.parametrize("name", ["chatml_generation", "chatml_plain", "llama3"])
def test_chat_loss_is_on_every_assistant_turn_and_nothing_else(tmp_path, name):
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, name)))
    assert bool(GENERATION_BLOCK.search(tok.chat_template)) == (name == "chatml_generation")
    records = chat_records(40)
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    splits = load_splits(data_cfg(path, "data.val_fraction=0", "data.max_seq_length=4096"), tok, seed=0)
    assert splits.stats["format"] == "messages" and len(splits.train) == 40
    end = TEMPLATES[name][2]
    for rec, ex in zip(records, splits.train, strict=True):
        expected = [m["content"] + end for m in rec["messages"] if m["role"] == "assistant"]
        assert labelled_runs(ex, tok) == expected
        # the whole rendering is what the model reads
        assert ex.input_ids == tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True)["input_ids"]
    n_turns = sum(m["role"] == "assistant" for r in records for m in r["messages"])
    assert n_turns > 60  # multi-turn records are in the data
    lengths = [len(e.input_ids) for e in splits.train]
    assert min(lengths) < 80 and max(lengths) > 300  # tens to hundreds of tokens


@pytest.mark.parametrize("name", ["chatml_generation", "chatml_plain", "llama3"])
def test_instruction_records_in_the_chat_template_end_their_response_as_a_turn_ends(tmp_path, name):
    """Alpaca records with data.template: chat are encoded as the one-turn conversation they are:
    the response ends with the template's end of turn (what generation stops at and what the model
    meets when served), not the tokenizer's eos, and a template that writes its BOS gets one."""
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, name)))
    records = instruction_records(30, seed=3)
    path = write_jsonl(tmp_path / "alpaca.jsonl", records)
    splits = load_splits(data_cfg(path, "data.template=chat", "data.val_fraction=0", "data.max_seq_length=4096"),
                         tok, seed=0)
    end = TEMPLATES[name][2]
    assert end.strip() != tok.eos_token  # the two endings differ for these tokenizers
    for rec, ex in zip(records, splits.train, strict=True):
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        assert labelled_runs(ex, tok) == [rec["output"] + end]
        assert ex.input_ids == tok.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
        assert tok.eos_token_id not in ex.input_ids
        if tok.bos_token_id is not None:
            assert ex.input_ids.count(tok.bos_token_id) <= 1


@pytest.mark.parametrize("name", ["chatml_plain", "llama3"])
def test_a_chat_template_run_is_prompted_and_scored_on_the_tokens_it_trained_on(tmp_path, tiny_model_dir, name):
    """Generation and eval read a chat-template prompt as training encoded it: the template's
    rendering and nothing more (this tokenizer adds a BOS: ChatML writes none, so none is added;
    Llama 3 writes its own, so it is not doubled), and the scored answer ends with the template's
    end of turn, as the run learned to end it, not with eos."""
    from transformers import AutoModelForCausalLM

    from loralab.data.templates import format_prompt, prompt_special_tokens
    from loralab.evaluate.exact_match import greedy_generate
    from loralab.evaluate.metrics import encode_requests

    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, name)))
    added = tok("x")["input_ids"][0]  # the tokenizer adds a BOS of its own (<s>)
    assert added not in tok("x", add_special_tokens=False)["input_ids"]
    rec = {"instruction": "What is 12 plus 45?", "input": "", "output": "57"}
    path = write_jsonl(tmp_path / "one.jsonl", [rec] * 4)
    splits = load_splits(data_cfg(path, "data.template=chat", "data.val_fraction=0"), tok, seed=0)
    trained = splits.train[0]
    answer = [t for t in trained.labels if t != IGNORE]  # 57 and the turn's end
    prompt = format_prompt(rec["instruction"], template="chat", tokenizer=tok)
    ids = tok(prompt, add_special_tokens=prompt_special_tokens("chat"))["input_ids"]
    assert trained.input_ids[:len(ids) + len(answer)] == ids + answer  # then the template's newline, unscored
    assert tok.decode(trained.input_ids[len(ids) + len(answer):]).strip() == ""
    assert added not in ids and ids.count(tok.bos_token_id) == (name == "llama3")  # Llama 3's own BOS, once
    ((context, scored),) = encode_requests(tok, [(prompt, rec["output"])], encoding="chat", append_eos=True)
    assert context == ids and scored == answer
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")))
    fed, generate = [], model.generate
    model.generate = lambda **kw: fed.append(kw["input_ids"][0].tolist()) or generate(**kw)
    greedy_generate(model, tok, [prompt], max_new_tokens=2, add_special_tokens=prompt_special_tokens("chat"))
    assert fed == [ids]


def test_generation_block_and_prefix_rendering_mark_the_same_tokens(tmp_path):
    records = chat_records(20, seed=1)
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    got = {}
    for name in ("chatml_generation", "chatml_plain"):
        tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, name)))
        got[name] = [(e.input_ids, e.labels)
                     for e in load_splits(data_cfg(path, "data.val_fraction=0"), tok, seed=0).train]
    assert got["chatml_generation"] == got["chatml_plain"]


def test_sharegpt_layout_equals_messages(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, "llama3")))
    records = chat_records(12, seed=2)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]}
                for r in records]
    a = load_splits(data_cfg(write_jsonl(tmp_path / "m.jsonl", records), "data.val_fraction=0"), tok, seed=0)
    b = load_splits(data_cfg(write_jsonl(tmp_path / "s.jsonl", sharegpt), "data.val_fraction=0"), tok, seed=0)
    assert [(e.input_ids, e.labels) for e in a.train] == [(e.input_ids, e.labels) for e in b.train]
    assert b.stats["format"] == "messages"


def test_train_on_prompt_puts_loss_on_every_token(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, "llama3")))
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(5))
    ex = load_splits(data_cfg(path, "data.val_fraction=0", "data.train_on_prompt=true"), tok, seed=0).train[0]
    assert ex.labels == ex.input_ids


def test_chat_truncation_keeps_the_beginning_and_counts(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, "llama3")))
    records = chat_records(30, seed=3)
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    full = load_splits(data_cfg(path, "data.val_fraction=0", "data.max_seq_length=4096"), tok, seed=0).train
    cut = load_splits(data_cfg(path, "data.val_fraction=0", "data.max_seq_length=96"), tok, seed=0)
    assert cut.stats["truncated"] == sum(len(e.input_ids) > 96 for e in full) > 0
    # every record keeps at least one assistant token within 96 here, so none is dropped
    assert cut.stats["truncated_to_no_response"] == 0 and len(cut.train) == 30
    for f, c in zip(full, cut.train, strict=True):
        assert c.input_ids == f.input_ids[:96] and c.labels == f.labels[:96]


def test_chat_data_without_a_chat_template_is_a_clear_error(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, None)))
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(3))
    with pytest.raises(DataError, match="has no chat template"):
        load_splits(data_cfg(path, "data.val_fraction=0"), tok, seed=0)


def test_template_that_breaks_the_prefix_property_names_the_record(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, "turn_count")))
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(3))
    with pytest.raises(DataError) as exc:
        load_splits(data_cfg(path, "data.val_fraction=0"), tok, seed=0)
    msg = str(exc.value)
    assert f"{path}:1: the chat template renders the first 1 turns plus the generation prompt differently" in msg
    assert "from character 7: '1\\n<|im_start|>user" in msg and "vs '6" in msg and "{% generation %} block" in msg


@pytest.mark.parametrize("record, needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}]},
     "messages[0] must be an object with string fields role and content"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from is 'robot'"),
    ({"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
     "messages[0].role is 'usr'; known: system, user, assistant, tool"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "Assistant", "content": "yes"}]},
     "messages[1].role is 'Assistant' (did you mean 'assistant'?)"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "messages[1] is an assistant turn whose content is empty; an assistant turn needs a response to train on"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": " \n"}]},
     "messages[3] is an assistant turn whose content is only spaces"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
     "conversations[1] is an assistant turn whose value is only spaces"),
])
def test_bad_chat_records_are_named(tmp_path, record, needle):
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, "llama3")))
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(2) + [record])
    with pytest.raises(DataError, match="chat.jsonl:3") as exc:
        load_splits(data_cfg(path, "data.val_fraction=0", "data.format=messages"), tok, seed=0)
    assert needle in str(exc.value)


# ----------------------------------------------------------------------------- datasets files


@pytest.fixture(scope="module")
def tiny_tok():
    return AutoTokenizer.from_pretrained(str(TINY_BASE))


def tokens(path, tok, *overrides) -> list[tuple[list[int], list[int]]]:
    splits = load_splits(data_cfg(path, "data.val_fraction=0", *overrides), tok, seed=0)
    return [(e.input_ids, e.labels) for e in splits.train]


def test_parquet_csv_arrow_and_saved_dataset_read_the_same_examples(tmp_path, tiny_tok):
    import datasets

    records = instruction_records(30)
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "saved_dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    reference = tokens(write_jsonl(tmp_path / "d.jsonl", records), tiny_tok)
    assert len(reference) == 30
    for p in ("d.parquet", "d.csv", "saved", "saved_dict", arrow):
        assert tokens(tmp_path / p, tiny_tok) == reference, p


def test_columns_map_a_datasets_own_names(tmp_path, tiny_tok):
    import datasets

    records = instruction_records(20, seed=4)
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in records]
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "qa.parquet"))
    reference = tokens(write_jsonl(tmp_path / "d.jsonl", records), tiny_tok)
    got = tokens(tmp_path / "qa.parquet", tiny_tok,
                 "data.columns={instruction: question, input: context, output: answer}")
    assert got == reference
    with pytest.raises(DataError, match=r"qa.parquet, row 0: missing field output"):
        tokens(tmp_path / "qa.parquet", tiny_tok, "data.columns={instruction: question}")


def test_columns_map_chat_columns(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, "chatml_plain")))
    records = chat_records(6, seed=5)
    a = tokens(write_jsonl(tmp_path / "m.jsonl", records), tok)
    b = tokens(write_jsonl(tmp_path / "d.jsonl", [{"dialog": r["messages"]} for r in records]), tok,
               "data.columns={messages: dialog}")
    assert a == b


def test_a_bad_row_is_named(tmp_path, tiny_tok):
    import datasets

    records = instruction_records(6)
    records[4]["output"] = None  # an empty cell
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d.parquet, row 4: field output is empty \(null\); it needs text"):
        tokens(tmp_path / "d.parquet", tiny_tok)
    # A CSV's row is named by the line an editor shows it on: after the header, a blank line
    # and a quoted field over two lines, the empty cell of record 4 is on line 7.
    csv_text = 'instruction,input,output\n"a",,"1"\n\n"b\nb",,"007"\n"c",NA,"3"\n"d",,\n"e",,"None"\n'
    (tmp_path / "d.csv").write_text(csv_text)
    with pytest.raises(DataError, match=r"d.csv:7: field output is empty"):
        tokens(tmp_path / "d.csv", tiny_tok)
    # Its cells are read as written: numbers stay text ("007", not 7.0), NA and None are words
    (tmp_path / "d.csv").write_text(csv_text.replace('"d",,', '"d",,"4"'))
    records = [{"instruction": i, "input": x, "output": o}
               for i, x, o in [("a", "", "1"), ("b\nb", "", "007"), ("c", "NA", "3"), ("d", "", "4"),
                               ("e", "", "None")]]
    assert tokens(tmp_path / "d.csv", tiny_tok) == tokens(write_jsonl(tmp_path / "d.jsonl", records), tiny_tok)


def test_damaged_parquet_and_a_directory_that_is_no_dataset(tmp_path, tiny_tok):
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: cannot be read as parquet"):
        tokens(tmp_path / "bad.parquet", tiny_tok)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        tokens(tmp_path / "empty_dir", tiny_tok)
    with pytest.raises(DataError, match="does not exist"):
        tokens(tmp_path / "missing.parquet", tiny_tok)
    # datasets' own errors for these named neither the file's state nor anything of the user's
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(DataError, match=r"empty.csv: the file is empty"):
        tokens(tmp_path / "empty.csv", tiny_tok)
    (tmp_path / "header.csv").write_text("instruction,input,output\n")
    with pytest.raises(DataError, match=r"header.csv: a header \(instruction, input, output\) but no rows under it"):
        tokens(tmp_path / "header.csv", tiny_tok)


def test_hub_dataset_offline_is_a_clear_error(tmp_path):
    """Offline (set before datasets is imported, hence a fresh interpreter): a DataError naming the
    path and the way out; nothing reaches the network."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    script = ("from loralab.data.sources import load_rows\n"
              "from loralab.errors import DataError\n"
              "try:\n    load_rows('hf:nobody/no-such-data:test')\n"
              "except DataError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("data.path hf:nobody/no-such-data:test: cannot load nobody/no-such-data (split test)")
    assert "OfflineModeIsEnabled" in proc.stdout and "save_to_disk" in proc.stdout


# ----------------------------------------------------------------------------- splits, auto length, stats


def test_held_out_split_is_seeded_and_recorded(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", instruction_records(40))

    def split(*o):
        s = load_splits(data_cfg(path, "data.val_fraction=0.25", *o), tiny_tok, seed=7)
        return s, sorted(e.input_ids for e in s.val)

    a, val_a = split()
    b, val_b = split("data.val_seed=7")
    c, val_c = split("data.val_seed=8")
    assert a.stats["val_seed"] == 7 and c.stats["val_seed"] == 8 and a.stats["val_source"] == "held_out"
    assert (a.stats["n_train"], a.stats["n_val"]) == (30, 10)
    assert val_a == val_b != val_c
    assert not {tuple(e.input_ids) for e in a.train} & {tuple(ids) for ids in val_a}


def test_val_path_in_another_format(tmp_path, tiny_tok):
    import datasets

    datasets.Dataset.from_list(instruction_records(7, seed=9)).to_parquet(str(tmp_path / "val.parquet"))
    path = write_jsonl(tmp_path / "d.jsonl", instruction_records(20))
    s = load_splits(data_cfg(path, f"data.val_path={tmp_path / 'val.parquet'}"), tiny_tok, seed=0)
    assert (s.stats["n_train"], s.stats["n_val"], s.stats["val_source"]) == (20, 7, "val_path")
    # another file format is fine; another record format is not (chat scored against Alpaca training
    # was accepted: its eval loss scored another prompt layout)
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records(4, seed=2))
    with pytest.raises(DataError, match=r"data.val_path .*chat.jsonl: its records are messages \(.*chat.jsonl:1\), "
                                        r"the training data's are alpaca \(.*d.jsonl:1\)"):
        load_splits(data_cfg(path, f"data.val_path={chat}"), tiny_tok, seed=0)


def test_auto_max_seq_length_fits_the_data_up_to_the_context(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", instruction_records(50))
    full = load_splits(data_cfg(path, "data.val_fraction=0", "data.max_seq_length=4096"), tiny_tok, seed=0)
    lengths = [len(e.input_ids) for e in full.train]
    longest = max(lengths)
    auto = load_splits(data_cfg(path, "data.val_fraction=0", "data.max_seq_length=auto"), tiny_tok, seed=0,
                       context=2048)
    assert auto.stats["max_seq_length"] == -(-longest // 8) * 8 and auto.stats["truncated"] == 0
    assert [e.input_ids for e in auto.train] == [e.input_ids for e in full.train]
    capped = load_splits(data_cfg(path, "data.val_fraction=0", "data.max_seq_length=auto"), tiny_tok, seed=0,
                         context=128)
    assert capped.stats["max_seq_length"] == 128
    assert capped.stats["truncated"] == sum(n > 128 for n in lengths) > 0
    assert capped.stats["token_lengths"] == length_stats(lengths)
    assert length_stats([5, 1, 3, 9, 7, 2, 4, 8, 6, 10]) == {"min": 1, "median": 5.5, "p90": 9, "max": 10}


def test_a_length_that_cuts_a_tenth_of_the_examples_or_more_warns(tmp_path, tiny_tok, caplog):
    """data.max_seq_length below many examples' length cuts their responses' ends away: a warning
    with the share and what auto would be; a few cut stay an info line."""
    path = write_jsonl(tmp_path / "d.jsonl", instruction_records(60))
    lengths = sorted(len(e.input_ids) for e in
                     load_splits(data_cfg(path, "data.val_fraction=0", "data.max_seq_length=4096"), tiny_tok,
                                 seed=0).train)
    many = lengths[len(lengths) // 2]  # half the examples are longer
    few = lengths[-4]  # a few are
    for setting, context, auto in ((many, None, -(-lengths[-1] // 8) * 8), (many, many + 8, many + 8)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loralab"):
            s = load_splits(data_cfg(path, "data.val_fraction=0", f"data.max_seq_length={setting}"), tiny_tok,
                            seed=0, context=context)
        cut = sum(n > setting for n in lengths)
        assert s.stats["truncated"] == cut and cut >= len(lengths) // 2 - 1
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and "were cut" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert warned[0].getMessage().startswith(
            f"WARNING: {cut} of {len(lengths)} training examples ({100 * cut / len(lengths):.0f}%) are longer than "
            f"data.max_seq_length = {setting} tokens and were cut from the right")
        assert warned[0].getMessage().endswith(
            f"data.max_seq_length: auto would be {auto} here "
            + ("(the model's context)" if context else "(the longest example, rounded up to 8)"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loralab"):
        load_splits(data_cfg(path, "data.val_fraction=0", f"data.max_seq_length={few}"), tiny_tok, seed=0)
    cut = sum(n > few for n in lengths)
    assert 0 < cut < len(lengths) / 10
    assert f"{cut} of {len(lengths)} training examples are longer than {few} tokens and were cut" in caplog.text
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "were cut" in r.getMessage()]


def test_fixed_max_seq_length_error_points_to_auto(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", instruction_records(10))
    with pytest.raises(DataError, match=r"data.max_seq_length = 8 \(as set\); raise it \(or set it to auto\)"):
        load_splits(data_cfg(path, "data.val_fraction=0", "data.max_seq_length=8"), tiny_tok, seed=0)


def test_config_columns_and_auto():
    cfg = load_config(None, ["data.columns={instruction: q, output: a}", "data.max_seq_length=auto"])
    assert cfg.data.columns == {"instruction": "q", "output": "a"} and cfg.data.max_seq_length == "auto"
    with pytest.raises(ConfigError, match="data.columns: unknown field answer"):
        load_config(None, ["data.columns={answer: a}"])
    with pytest.raises(ConfigError, match="data.max_seq_length must be an integer or one of 'auto'"):
        load_config(None, ["data.max_seq_length=longest"])


def test_run_on_chat_data_with_auto_length_records_data_stats(tmp_path, tiny_model_dir):
    """A real training run: a Llama-architecture model whose tokenizer has a chat template."""
    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    for f in chat_tokenizer_dir(tmp_path, "llama3").iterdir():
        shutil.copy(f, model_dir / f.name)
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(24, seed=6))
    cfg = make_cfg(model_dir, tmp_path / "run", f"data.path={path}", "data.max_seq_length=auto",
                   "data.val_fraction=0.2", "data.limit=null", "train.max_steps=2")
    summary = train(cfg)
    stats = summary["data_stats"]
    assert summary["status"] == "completed"
    assert stats["format"] == "messages" and (stats["n_train"], stats["n_val"]) == (19, 5)
    # the test model's context (256) caps auto; the longest conversations are cut and counted
    assert stats["max_seq_length"] == 256 and stats["token_lengths"]["max"] > 256
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    whole = load_splits(data_cfg(path, "data.val_fraction=0.2", "data.max_seq_length=4096"), tok, seed=cfg.train.seed)
    assert stats["truncated"] == sum(len(e.input_ids) > 256 for e in whole.train) > 0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["data_stats"] == stats


def test_estimate_takes_auto_at_the_models_context():
    from loralab.estimate import estimate_run

    auto = estimate_run(load_config(None, ["data.max_seq_length=auto", "model.device=cpu"]))
    fixed = estimate_run(load_config(None, ["data.max_seq_length=512", "model.device=cpu"]))  # builtin:tiny's context
    assert auto.memory_bytes == fixed.memory_bytes and auto.settings["seq_len"] == 512
    assert "auto estimated at the model's context (512)" in auto.approximate[-1]


def test_cli_chat_data_on_a_model_without_chat_template_exits_2(tiny_model_dir, tmp_path, capsys):
    from loralab.cli import main

    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    out = tmp_path / "run"
    argv = ["train", "--out", str(out)]
    for item in (f"model.path={tiny_model_dir('llama')}", "model.device=cpu", f"data.path={path}",
                 "train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=4"):
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data.format messages: the tokenizer of" in err and "has no chat template" in err
    assert json.loads((out / "summary.json").read_text())["status"] == "invalid"


@pytest.mark.slow
def test_the_estimate_counts_the_datasets_library_of_parquet_data(tiny_model_dir, tmp_path):
    """The same run from JSONL and from parquet, each `loralab train` a fresh process: reading with
    the datasets library costs the process memory of its own, and the estimate counts it."""
    import datasets
    import yaml

    from loralab.estimate import CPU_DATASETS_RSS, estimate_run
    from loralab.train.step import fullest_micro_batch
    from userdata import instruction_records as user_records  # lengths from tens to hundreds of tokens

    records = user_records(48, seed=1)
    write_jsonl(tmp_path / "d.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    peaks, estimates = {}, {}
    for kind in ("jsonl", "parquet"):
        out = tmp_path / kind
        config = {"model": {"path": str(tiny_model_dir("llama_512")), "device": "cpu"},
                  "data": {"path": str(tmp_path / f"d.{kind}"), "max_seq_length": 256, "val_max_examples": 4},
                  "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 8, "warmup_steps": 0},
                  "eval": {"every": 0}, "output": {"dir": str(out), "save_adapter": False}}
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "loralab.cli", "train", str(path), "--json"], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[kind] = json.loads(done.stdout)["peak_memory_bytes"]
        cfg = load_config(path)
        estimates[kind] = estimate_run(cfg, device="cpu", tokens=fullest_micro_batch(cfg)).memory_bytes
    assert "data_library" not in estimates["jsonl"] and estimates["parquet"]["data_library"] == CPU_DATASETS_RSS
    assert estimates["parquet"]["total"] - estimates["jsonl"]["total"] == CPU_DATASETS_RSS
    # bench/bench_data_memory.py on an AMD EPYC (fp32 by auto): parquet or CSV peaked 21-187 MiB over
    # JSONL in the same round; a single pair is too noisy to hold the difference, the ratio holds.
    for kind in peaks:
        assert 0.8 <= estimates[kind]["total"] / peaks[kind] <= 1.25, (kind, estimates[kind]["total"], peaks[kind])


def test_a_byte_order_mark_is_read_past(tmp_path):
    """Some editors start a UTF-8 file with a byte-order mark: the records are the same, and a bad
    byte after it is still named at its line."""
    from loralab.data.sources import read_records

    records = instruction_records(3, seed=2)
    plain = write_jsonl(tmp_path / "plain.jsonl", records)
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_records(marked) == read_records(plain) == [(n, r) for n, r in enumerate(records, 1)]
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes() + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"marked.jsonl:4: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        read_records(marked)


def test_validation_examples_cut_to_nothing_are_counted_and_said(tmp_path, tiny_tok, caplog):
    """A length that cuts some validation responses away: those examples are not scored, and the
    run says how many (it said so for training examples only)."""
    import logging

    from userdata import instruction_records as user_records

    path = write_jsonl(tmp_path / "d.jsonl", user_records(60, seed=5))
    whole = load_splits(data_cfg(path, "data.val_fraction=0.3", "data.max_seq_length=4096"), tiny_tok, seed=0)
    first_label = [next(i for i, t in enumerate(e.labels) if t != IGNORE) for e in whole.val]
    cut_at = sorted(first_label)[len(first_label) // 2]  # about half the responses start past it
    with caplog.at_level(logging.WARNING, logger="loralab.data.dataset"):
        cut = load_splits(data_cfg(path, "data.val_fraction=0.3", f"data.max_seq_length={cut_at}"), tiny_tok, seed=0)
    lost = sum(i >= cut_at for i in first_label)
    assert 0 < lost < len(whole.val)
    assert cut.stats["truncated_to_no_response_val"] == lost and len(cut.val) == len(whole.val) - lost
    assert (f"{lost} of {len(whole.val)} validation examples lost every response token to truncation at "
            f"max_seq_length={cut_at} and are not scored") in caplog.text


def test_a_model_path_that_is_no_directory_here_says_it_was_taken_for_a_hub_id(tmp_path):
    """A relative model.path (models/llama) run from another directory is taken for a hub id;
    offline the error says so and where it looked, not only transformers' 'couldn't connect'."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    script = ("from loralab.models import load_tokenizer, read_config\n"
              "from loralab.errors import ModelError\n"
              "for load in (load_tokenizer, read_config):\n"
              "    try:\n        load('models/llama')\n"
              "    except ModelError as exc:\n        print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tokenizer, config = proc.stdout.splitlines()
    assert tokenizer.startswith("model.path models/llama: cannot load a tokenizer (")
    assert config.startswith("model.path models/llama: no such local directory, and as a hub id its config.json "
                             "cannot be read (")
    for message in (tokenizer, config):  # a run reads config.json first, a command may read the tokenizer first
        assert (f"models/llama is no directory under the working directory ({tmp_path}), so it was looked up as "
                "a Hugging Face hub id") in message


def test_an_empty_response_is_refused_unless_the_length_filter_drops_it(tmp_path, tiny_tok):
    records = instruction_records(12, seed=6)
    records[3]["output"] = ""
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"d.jsonl:4: field output is empty; a record needs a response to train on"):
        load_splits(data_cfg(path, "data.val_fraction=0"), tiny_tok, seed=0)
    s = load_splits(data_cfg(path, "data.val_fraction=0", "data.min_response_chars=1"), tiny_tok, seed=0)
    assert s.stats["n_train"] == 11 and s.stats["dropped_by_length_filter"] == 1
    # a conversation whose one assistant turn is empty: the same rule
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir(tmp_path, "llama3")))
    chats = chat_records(5)
    for turn in chats[2]["messages"]:
        if turn["role"] == "assistant":
            turn["content"] = ""
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    with pytest.raises(DataError, match=r"chat.jsonl:3: messages\[\d\] is an assistant turn whose content is empty"):
        load_splits(data_cfg(path, "data.val_fraction=0"), tok, seed=0)
    s = load_splits(data_cfg(path, "data.val_fraction=0", "data.min_response_chars=1"), tok, seed=0)
    assert s.stats["n_train"] == 4 and s.stats["dropped_by_length_filter"] == 1
