"""loralab eval: MC1/MC2 against brute force, minimal pairs, greedy vs exact match, bad input, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loralab.errors import DataError
from loralab.evaluate import metrics as M
from loralab.evaluate.exact_match import Accuracy
from loralab.evaluate.task_list import resolve_tasks
from loralab.evaluate.tasks import load_items, load_task_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads on a shared CPU


@pytest.fixture(scope="module")
def rand_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from loralab.models import load_tokenizer

    d = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(str(d)).double().eval()
    return model, load_tokenizer(str(d))


@pytest.fixture(scope="module")
def tiny():
    from loralab.config import ModelConfig, QuantConfig
    from loralab.models import load_base

    return load_base(ModelConfig(path="builtin:tiny"), QuantConfig())


@torch.no_grad()
def brute_ll(model, tok, ctx, cont):
    c = tok(ctx)["input_ids"]
    k = tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([c + k])
    lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(lp[len(c) - 1 + i, t]) for i, t in enumerate(k))


QUESTIONS = [
    M.MCQuestion("What is the capital of Zorbia?", {"Plink": 0, "Zorb City": 1, "Nowhere": 0},
                 {"Plink": 0, "Zorb City": 1, "Nowhere": 0, "It is Zorb City.": 1}),
    M.MCQuestion("Which color is grass?", {"green": 1, "red": 0}, {"green": 1, "red": 0, "blue": 0}),
]


def test_mc1_mc2_equal_brute_force(rand_lm):
    model, tok = rand_lm
    res = M.score_mc(model, tok, QUESTIONS, batch_size=3)
    mc1, mc2 = [], []
    for q in QUESTIONS:
        ctx = f"Q: {q.question}\nA:"
        l1 = [brute_ll(model, tok, ctx, " " + c) for c in q.mc1]
        true1 = list(q.mc1.values()).index(1)
        mc1.append(float(max(range(len(l1)), key=lambda i: l1[i]) == true1))
        l2 = torch.tensor([brute_ll(model, tok, ctx, " " + c) for c in q.mc2], dtype=torch.float64)
        lab = torch.tensor(list(q.mc2.values())) == 1
        mc2.append(float(torch.exp(torch.logsumexp(l2[lab], 0) - torch.logsumexp(l2, 0))))
    assert res["mc1"].value == pytest.approx(sum(mc1) / 2, abs=1e-6)
    assert res["mc2"].value == pytest.approx(sum(mc2) / 2, abs=1e-6)
    assert res["mc1"].n == res["mc2"].n == 2


def test_mc1_finds_true_answer_by_label():
    assert M.mc1_from_lls([-5.0, -1.0, -3.0], [0, 1, 0]) == 1
    assert M.mc1_from_lls([-1.0, -5.0, -3.0], [0, 1, 0]) == 0
    assert M.mc2_from_lls([-1000.0, -1000.0], [1, 0]) == pytest.approx(0.5)  # stable, no underflow
    with pytest.raises(DataError):
        M.mc1_from_lls([-1.0, -2.0], [0, 0])


def test_minimal_pairs(rand_lm):
    model, tok = rand_lm
    pairs = [("The cat sleeps.", "The cat sleep."), ("Dogs bark.", "Dogs barks.")]
    res = M.score_pairs(model, tok, pairs)["pairs_accuracy"]
    want = sum(brute_ll(model, tok, "", g) > brute_ll(model, tok, "", b) for g, b in pairs)
    assert res.value == want / 2 and res.n == 2


def test_wilson_known_case():
    lo, hi = Accuracy(8, 10).wilson()
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    s = M.mean_score([1.0, 2.0, 3.0])
    assert s.value == 2.0 and s.ci_high - 2.0 == pytest.approx(1.96 / math.sqrt(3))


def test_greedy_match_consistent_with_generation(tiny):
    from loralab.cli.run import arithmetic_test_set
    from loralab.evaluate.exact_match import greedy_generate

    model, tok = tiny
    prompts, answers = arithmetic_test_set("arithmetic_2ds", 4)
    scored = M.score_continuations(model, tok, list(zip(prompts, answers, strict=True)),
                                   append_eos=True, encoding="training")
    for p, a, s in zip(prompts, answers, scored, strict=True):
        ans_ids = tok(a, add_special_tokens=False)["input_ids"]
        gen = greedy_generate(model, tok, [p], max_new_tokens=len(ans_ids) + 1, batch_size=1)[0]
        gm = all(s.greedy[:-1])
        em = gen.strip() == a.strip()
        assert gm == (tok(gen, add_special_tokens=False)["input_ids"][: len(ans_ids)] == ans_ids)
        if em:
            assert gm


def _yaml(tmp_path, text, data=None, name="t.yaml"):
    if data is not None:
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    p = tmp_path / name
    p.write_text(text)
    return p


def test_bad_task_files(tmp_path):
    with pytest.raises(DataError, match=r"t.yaml:2: field format"):
        load_task_file(_yaml(tmp_path, "path: d.jsonl\nformat: csv\n"))
    with pytest.raises(DataError, match=r"t.yaml:3: field metric"):
        load_task_file(_yaml(tmp_path, "path: d.jsonl\nformat: pairs\nmetric: mc1\n"))
    with pytest.raises(DataError, match=r"t.yaml:2: malformed YAML"):
        load_task_file(_yaml(tmp_path, "path: d.jsonl\nformat: : pairs\n"))
    with pytest.raises(DataError, match="empty"):
        load_task_file(_yaml(tmp_path, ""))
    t = load_task_file(_yaml(tmp_path, "path: d.jsonl\nformat: pairs\n", [{"good": "a"}]))
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field bad"):
        load_items(t)


def test_no_true_answer_and_empty_task(tmp_path):
    (tmp_path / "mc.json").write_text(json.dumps([{"question": "q", "mc1_targets": {"a": 0, "b": 0},
                                                   "mc2_targets": {"a": 0, "b": 0}}]))
    t = load_task_file(_yaml(tmp_path, "path: mc.json\nformat: mc\n"))
    with pytest.raises(DataError, match="no true answer"):
        load_items(t)
    (tmp_path / "e.jsonl").write_text("\n")
    t = load_task_file(_yaml(tmp_path, "path: e.jsonl\nformat: pairs\n"))
    with pytest.raises(DataError, match="empty"):
        load_items(t)
    with pytest.raises(DataError, match="no task"):
        resolve_tasks(" , ")


def test_prompt_longer_than_context_is_skipped_and_reported(tmp_path, tiny):
    model, tok = tiny
    long = " ".join(["word"] * 2000)
    t = load_task_file(_yaml(tmp_path, "path: d.jsonl\nformat: pairs\n", [{"good": long, "bad": long + "s"}]))
    t.items = load_items(t)
    with pytest.raises(DataError, match="context window"):
        t.run(model, tok)
    res = M.score_pairs(model, tok, [(long, long), ("A cat.", "A cats.")])["pairs_accuracy"]
    assert res.n == 1 and res.skipped == 1


def test_lettered(tmp_path, tiny):
    model, tok = tiny
    data = [{"question": "2+2?", "choices": ["3", "4"], "answer": "B"},
            {"question": "1+1?", "choices": ["2", "5", "7"], "answer": 0}]
    t = load_task_file(_yaml(tmp_path, "path: d.jsonl\nformat: lettered\n", data))
    t.items = load_items(t)
    assert t.items[0][2] == 1 and t.items[1][1] == 3
    res = t.run(model, tok)["accuracy"]
    assert res.n == 2 and 0 <= res.value <= 1


def test_cli_json(capsys):
    from loralab.cli import main

    rc = main(["eval", "--model", "builtin:tiny", "--tasks", "world_pairs,arithmetic_2ds", "--limit", "20", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]
    assert {(r["task"], r["metric"]) for r in rows} >= {("world_pairs", "pairs_accuracy"),
                                                        ("arithmetic_2ds", "exact_match"),
                                                        ("arithmetic_2ds", "greedy_match")}
    for r in rows:
        assert set(r) >= {"model", "adapter", "task", "metric", "value", "ci_low", "ci_high", "n"}
        assert r["n"] > 0



def test_encode_pair_follows_lm_eval_rules():
    from loralab.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    bos = tok.bos_token_id
    enc = lambda text, special=True: tok(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    # trailing whitespace of the context moves to the continuation (and is scored there)
    assert M.encode_pair(tok, "A: ", "yes") == M.encode_pair(tok, "A:", " yes") == (enc("A:"), enc(" yes", False))
    assert len(M.encode_pair(tok, "A: ", "yes")[1]) == len(enc("yes", False)) + 1
    # a context that already starts with the BOS text gets no second BOS
    assert M.encode_pair(tok, "<s>Q:", " a")[0] == [bos, *enc("Q:", False)]
    # an empty context is the BOS token; a continuation starting with BOS gives its own
    assert M.encode_pair(tok, "", "Hi") == ([bos], enc("Hi", False))
    assert M.encode_pair(tok, "", "<s>Hi") == ([bos], enc("Hi", False))
    # continuation tokens are the whole string's tokens after the context's
    ctx, cont = M.encode_pair(tok, "The cat", "s sleep")
    assert ctx + cont == enc("The cats sleep")
    with pytest.raises(DataError, match="no tokens of its own"):
        M.encode_requests(tok, [("Q:", "")])


def test_shared_rows_score_like_single_requests(rand_lm):
    """One-token choices after one prompt share a row; every score equals its own forward pass."""
    model, tok = rand_lm
    reqs = [("Which?\nAnswer:", f" {c}") for c in "ABCD"] + [("Which?\nAnswer:", " A longer one")]
    batched = M.score_continuations(model, tok, reqs, batch_size=8)
    for (ctx, cont), s in zip(reqs, batched, strict=True):
        assert s.ll == pytest.approx(brute_ll(model, tok, ctx, cont), abs=1e-9)


def test_exact_match_normalisation(tmp_path):
    from loralab.evaluate.exact_match import NORMALIZERS

    assert NORMALIZERS["loose"]("  The  Badger. ") == NORMALIZERS["loose"]("the badger") == "the badger"
    assert NORMALIZERS["strip"](" 42\n") == "42"
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    t = load_task_file(_yaml(tmp_path, "path: d.jsonl\nformat: alpaca\nnormalize: loose\n"))
    assert t.normalize == "loose"
    with pytest.raises(DataError, match=r"t.yaml:3: field normalize"):
        load_task_file(_yaml(tmp_path, "path: d.jsonl\nformat: alpaca\nnormalize: fuzzy\n"))
    with pytest.raises(DataError, match=r"t.yaml:1: field path: data file .*nothere.jsonl does not exist"):
        load_task_file(_yaml(tmp_path, "path: nothere.jsonl\nformat: alpaca\n"))


def test_cli_table_reports_skipped_examples(tmp_path, capsys):
    """An example over the context window is counted as skipped in the table, not truncated."""
    from loralab.cli import main

    long = " ".join(["word"] * 2000)
    data = [{"good": long, "bad": long + "s"}, {"good": "The cat sleeps.", "bad": "The cat sleep."}]
    task = _yaml(tmp_path, "path: d.jsonl\nformat: pairs\n", data, name="long.yaml")
    assert main(["eval", "--model", "builtin:tiny", "--tasks", str(task)]) == 0
    out = capsys.readouterr().out
    assert "n=1 (1 skipped)" in out


def test_evaluate_shows_each_model_its_template_and_leaves_the_callers_tasks_as_they_were(caplog):
    """evaluate() scores an alpaca-format task in the template asked for (here the raw
    instruction), on a copy: the caller's Task still says alpaca, so a later evaluation of the
    same objects is shown its own template, not the one before."""
    import logging

    from loralab.evaluate.score import evaluate
    from loralab.evaluate.tasks import resolve_task

    task = resolve_task("arithmetic_2ds", limit=4)
    with caplog.at_level(logging.INFO, logger="loralab"):
        assert evaluate("builtin:tiny", [], [task], batch_size=4, template="none")
        assert task.template == "alpaca"
        assert evaluate("builtin:tiny", [], [task], batch_size=4)
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval base on arithmetic_2ds")]
    assert shown == ["eval base on arithmetic_2ds (4 examples), prompt template none",
                     "eval base on arithmetic_2ds (4 examples), prompt template alpaca"]
