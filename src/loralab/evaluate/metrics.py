"""Scoring by log-likelihood: one batched forward pass per group of (context, continuation).

Every metric here is built on :func:`score_continuations`. Two encodings of a pair exist:

``encoding="harness"`` (multiple choice, minimal pairs, lettered choice) is
lm-evaluation-harness's rule for causal LMs (``TemplateLM.loglikelihood`` and
``_encode_pair`` with ``HFLM.tok_encode``), so loralab's log-likelihoods equal the
harness's on the same model (``tests/test_harness.py`` checks it to 1e-6):

* trailing whitespace of the context moves to the front of the continuation;
* the whole string ``context + continuation`` is tokenized, the context alone is
  tokenized, and the continuation tokens are ``whole[len(context_tokens):]`` (so a token
  that merges across the boundary is never double counted; the model reads
  ``context_tokens + continuation_tokens``);
* both are tokenized with the tokenizer's default special tokens (``<s>`` in front for
  builtin:tiny), except a string that already starts with the BOS text gets none;
* an empty context becomes the prefix token (BOS, else EOS) and the continuation is
  tokenized without special tokens; if its first token already is the prefix token, that
  token is the context instead.

``encoding="training"`` (eval loss, perplexity, token accuracy, greedy match) is the
training data's rule (:func:`loralab.data.dataset.encode`): the prompt with the
tokenizer's special tokens, the response alone with ``add_special_tokens=False``, then
``eos`` when ``append_eos``; so eval loss is over exactly the tokens the run trained on.

Either way the model reads ``(context + continuation)[:-1]`` (the last token is only a
target), as lm-eval does; requests with the same input row (one-token choices such as
``" A"``, ``" B"`` after one prompt) share one row of the batch, like lm-eval's one-token
continuation cache. For continuation token ``t_i`` at position ``p`` the score is
``log_softmax(logits[p - 1])[t_i]`` (log-softmax in float64 over the model's logits, taken
in blocks over the vocabulary by :func:`token_logprobs` so evaluation memory stays small),
``greedy_i = argmax(logits[p - 1]) == t_i`` and ``ll = sum_i log p(t_i | context, t_<i)``.
Batches are right-padded (longest first) with an attention mask.

Exactness: in float32 on CPU the logits of one row change by about 1e-5 with the shape of
the batch it sits in (BLAS blocking), so loralab and lm-eval agree to 1e-6 in float32
when both score one request row at a time (``batch_size=1``), and to float64 rounding in
float64 at any batch size; at other float32 batch sizes they differ at the 1e-5 level.

A request whose input row is longer than the model's context window is never truncated
(lm-eval would cut tokens from the left, with a warning): it is returned as ``None``
(skipped), the caller counts it and the command reports the count.

Intervals (all 95%): Wilson for accuracies (:meth:`Accuracy.wilson`), and the normal
approximation ``mean +/- 1.96 * sd / sqrt(n)`` (sample sd, ``n - 1``) for means of
per-example values (MC2, losses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loralab.data.dataset import model_context
from loralab.data.templates import chat_turn_end
from loralab.errors import DataError
from loralab.evaluate.exact_match import Accuracy, exact_match
from loralab.progress import progress as progress_bar

Z95 = 1.96


@dataclass
class Score:
    """One metric value with its 95% interval; ``skipped`` counts examples not scored."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    skipped: int = 0


def accuracy_score(correct: int, n: int, skipped: int = 0) -> Score:
    acc = Accuracy(correct, n)
    lo, hi = acc.wilson()
    return Score(acc.value, lo, hi, n, skipped)


def mean_score(values: list[float], skipped: int = 0, *, bounds: tuple[float, float] | None = None) -> Score:
    """Mean with the normal-approximation 95% interval of the mean (sample sd); ``bounds``: the
    range the values live in (MC2, a probability: (0, 1)), which the interval is clipped to."""
    n = len(values)
    if not n:
        return Score(float("nan"), float("nan"), float("nan"), 0, skipped)
    mean = math.fsum(values) / n
    if n < 2:
        return Score(mean, float("nan"), float("nan"), n, skipped)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = Z95 * math.sqrt(var / n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Score(mean, lo, hi, n, skipped)


@dataclass
class Scored:
    """Per-token log-probs and greedy flags of one continuation."""

    logprobs: list[float]
    greedy: list[bool]

    @property
    def ll(self) -> float:
        return math.fsum(self.logprobs)


def _tok_encode(tokenizer, text: str) -> list[int]:
    """Default special tokens, none when ``text`` already starts with the BOS text (lm-eval's rule)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def prefix_token_id(tokenizer) -> int:
    """The token an empty context is replaced with: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) by lm-evaluation-harness's rule (module docstring)."""
    if context == "":
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        prefix = prefix_token_id(tokenizer)
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _tok_encode(tokenizer, context + continuation)
    ctx = _tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def encode_requests(tokenizer, requests: list[tuple[str, str]], *, encoding: str = "harness",
                    append_eos: bool = False) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (context, continuation); ``encoding`` is "harness", "training" or
    "chat" (the training data's in the tokenizer's chat template: the context as the template
    renders it, no special tokens of the tokenizer's, and with ``append_eos`` the template's end
    of turn where the eos would be, as a chat-template run learns to end its answer)."""
    if encoding not in ("harness", "training", "chat"):
        raise ValueError(f"unknown encoding {encoding!r}")
    end = [tokenizer.eos_token_id]
    if encoding == "chat" and (turn_end := chat_turn_end(tokenizer)) is not None:
        end = list(tokenizer(turn_end, add_special_tokens=False)["input_ids"])
    out = []
    cache: dict[str, list[int]] = {}
    for ctx, cont in requests:
        if encoding == "harness":
            c_ids, k_ids = encode_pair(tokenizer, ctx, cont)
        else:
            if ctx not in cache:
                cache[ctx] = list(tokenizer(ctx, add_special_tokens=encoding == "training")["input_ids"])
            c_ids, k_ids = cache[ctx], list(tokenizer(cont, add_special_tokens=False)["input_ids"])
        if append_eos:
            k_ids = [*k_ids, *end]
        if not k_ids:
            raise DataError(f"continuation {cont!r} after context {ctx[-60:]!r} has no tokens of its own")
        out.append((c_ids, k_ids))
    return out


VOCAB_CHUNK = 8192  # vocabulary columns per float64 block in token_logprobs


def token_logprobs(pred: torch.Tensor, targets: torch.Tensor, *,
                   chunk: int = VOCAB_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), argmax == target) for each row of ``pred`` (n, vocab), in float64.

    ``log_softmax(pred)[target] = pred[target] - logsumexp(pred)``, with the logsumexp taken
    over blocks of ``chunk`` vocabulary columns and combined with ``logaddexp``: only an
    (n, chunk) float64 block exists at a time, never the (n, vocab) float64 log-softmax (4 GiB
    for a 4k-token response over a 128k vocabulary). Same numbers as the full log-softmax to
    float64 rounding.
    """
    lse = torch.full((pred.shape[0],), -math.inf, dtype=torch.float64, device=pred.device)
    for c in range(0, pred.shape[-1], chunk):
        lse = torch.logaddexp(lse, pred[:, c : c + chunk].double().logsumexp(dim=-1))
    target_logit = pred.gather(1, targets[:, None])[:, 0].double()
    return target_logit - lse, pred.argmax(dim=-1) == targets


@torch.no_grad()
def score_continuations(model, tokenizer, requests: list[tuple[str, str]], *, append_eos: bool = False,
                        batch_size: int = 16, max_length: int | None = None,
                        encoding: str = "harness", progress: str | None = None) -> list[Scored | None]:
    """Score each (context, continuation); ``None`` where the sequence exceeds the window.

    ``encoding``: "harness" (lm-eval's tokenization) or "training" (the training data's);
    with ``append_eos`` the eos token is scored as the last continuation token. ``progress``:
    the label of a bar counting the requests scored (stderr, terminals only; None: no bar).
    """
    device = next(model.parameters()).device
    limit = max_length or model_context(getattr(model, "config", None))
    encoded = encode_requests(tokenizer, requests, encoding=encoding, append_eos=append_eos)
    # The model reads (context + continuation)[:-1]: the last token is only ever a target.
    # Requests with the same input row (e.g. one-token choices " A", " B" after one prompt)
    # share one row of the batch.
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, (c, k) in enumerate(encoded):
        if limit is None or len(c) + len(k) - 1 <= limit:
            rows.setdefault(tuple(c + k[:-1]), []).append(i)
    order = sorted(rows, key=lambda r: (-len(r), r))  # longest first, similar lengths together
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[Scored | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    total = sum(len(ids) for ids in rows.values())  # requests that fit the window
    try:
        with progress_bar(total, desc=progress, unit="seq", enabled=progress is not None, leave=False) as bar:
            for b in range(0, len(order), batch_size):
                seqs = order[b : b + batch_size]
                width = len(seqs[0])
                ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for r, s in enumerate(seqs):
                    ids[r, : len(s)] = torch.tensor(s)
                    mask[r, : len(s)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (batch, seq, vocab)
                for r, s in enumerate(seqs):
                    for i in rows[s]:
                        ctx, cont = encoded[i]
                        start = len(ctx)
                        pred = logits[r, start - 1 : start - 1 + len(cont)]  # (len(cont), vocab): rows predicting cont
                        token_lp, greedy = token_logprobs(pred, torch.tensor(cont, device=pred.device))
                        out[i] = Scored(token_lp.tolist(), greedy.tolist())
                    bar.update(len(rows[s]))
    finally:
        model.train(was_training)
    return out


# --- multiple choice (TruthfulQA MC1 / MC2, as lm-evaluation-harness scores them) ---------


@dataclass
class MCQuestion:
    """A question with labelled choices; ``mc1``/``mc2`` map choice text -> 0/1."""

    question: str
    mc1: dict[str, int]
    mc2: dict[str, int] = field(default_factory=dict)
    where: str = ""


def mc_prompt(question: str, preamble: str = "") -> str:
    """``preamble + "Q: {question}\\nA:"`` (lm-eval's truthfulqa_mc doc_to_text, preamble optional)."""
    return f"{preamble}Q: {question}\nA:"


def mc1_from_lls(lls: list[float], labels: list[int]) -> int:
    """1 when the single choice labelled 1 has the strictly highest ll (ties: first max wins).

    lm-eval's MC1 is ``argmax(lls) == index of the true choice``; argmax returns the first
    maximum, reproduced here.
    """
    true = [i for i, lab in enumerate(labels) if lab == 1]
    if len(true) != 1:
        raise DataError(f"MC1 needs exactly one choice labelled 1, got {len(true)}")
    best = max(range(len(lls)), key=lambda i: (lls[i], -i))
    return int(best == true[0])


def mc2_from_lls(lls: list[float], labels: list[int]) -> float:
    """sum over true choices of exp(ll) / sum over all choices of exp(ll), via logsumexp.

    Equals lm-eval's ``p_true / (p_true + p_false)`` with ``p = exp(ll)``, computed as
    ``exp(logsumexp(ll_true) - logsumexp(ll_all))`` so it neither underflows nor overflows.
    """
    if not any(lab == 1 for lab in labels):
        raise DataError("MC2 needs at least one choice labelled 1")
    t = torch.tensor(lls, dtype=torch.float64)
    m = torch.tensor([lab == 1 for lab in labels])
    return float(torch.exp(torch.logsumexp(t[m], 0) - torch.logsumexp(t, 0)))


def score_mc(model, tokenizer, questions: list[MCQuestion], *, preamble: str = "",
             batch_size: int = 16, progress: str | None = None) -> dict[str, Score]:
    """MC1 (accuracy, Wilson) and MC2 (mean, normal interval); continuations are ``" " + choice``.

    All continuations of all questions go through :func:`score_continuations` in batches.
    A question with any choice over the context window is skipped (counted in ``skipped``).
    """
    reqs: list[tuple[str, str]] = []
    spans = []
    for q in questions:
        ctx = mc_prompt(q.question, preamble)
        spans.append([])
        for key in ("mc1", "mc2"):
            choices = list(getattr(q, key).items())
            s = len(reqs)
            reqs += [(ctx, " " + c) for c, _ in choices]
            spans[-1].append((s, [lab for _, lab in choices]))
    scored = score_continuations(model, tokenizer, reqs, batch_size=batch_size, progress=progress)
    mc1_hits, mc1_n, mc2_vals, skipped1, skipped2 = 0, 0, [], 0, 0
    for (s1, lab1), (s2, lab2) in spans:
        if lab1:
            part = scored[s1 : s1 + len(lab1)]
            if any(x is None for x in part):
                skipped1 += 1
            else:
                mc1_hits += mc1_from_lls([x.ll for x in part], lab1)
                mc1_n += 1
        if lab2:
            part = scored[s2 : s2 + len(lab2)]
            if any(x is None for x in part):
                skipped2 += 1
            else:
                mc2_vals.append(mc2_from_lls([x.ll for x in part], lab2))
    out = {}
    if any(q.mc1 for q in questions):
        out["mc1"] = accuracy_score(mc1_hits, mc1_n, skipped1)
    if any(q.mc2 for q in questions):
        out["mc2"] = mean_score(mc2_vals, skipped2, bounds=(0.0, 1.0))  # a probability: the interval stays in [0, 1]
    return out


# --- minimal pairs --------------------------------------------------------------------------


def score_pairs(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 16,
                progress: str | None = None) -> dict[str, Score]:
    """pairs_accuracy: share of (good, bad) pairs where ll(good) > ll(bad) (strictly; Wilson).

    ll of a sentence is the sum of the log-probs of all its tokens after the start token:
    the context is empty, so by lm-eval's rule (:func:`encode_pair`) the model reads the
    BOS token (EOS for a tokenizer without one) followed by the sentence.
    """
    reqs = [("", s) for pair in pairs for s in pair]
    scored = score_continuations(model, tokenizer, reqs, batch_size=batch_size, progress=progress)
    hits = n = skipped = 0
    for k in range(len(pairs)):
        g, b = scored[2 * k], scored[2 * k + 1]
        if g is None or b is None:
            skipped += 1
            continue
        n += 1
        hits += g.ll > b.ll
    return {"pairs_accuracy": accuracy_score(hits, n, skipped)}


# --- lettered multiple choice (MMLU style) --------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def lettered_prompt(question: str, choices: list[str], template: str | None = None) -> str:
    """Default: ``"{question}\\nA. c0\\nB. c1\\n...\\nAnswer:"``; a template gets
    ``{question}`` and ``{choices}`` (the lettered lines)."""
    lines = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    if template:
        return template.format(question=question, choices=lines)
    return f"{question}\n{lines}\nAnswer:"


def score_lettered(model, tokenizer, items: list[tuple[str, int, int]], *, batch_size: int = 16,
                   progress: str | None = None) -> dict[str, Score]:
    """accuracy: 1 when ``" A"``, ``" B"``, ... with the highest ll after the formatted
    prompt is the answer's letter. ``items`` are (prompt, number of choices, answer index)."""
    reqs, spans = [], []
    for prompt, k, _ in items:
        spans.append(len(reqs))
        reqs += [(prompt, " " + LETTERS[i]) for i in range(k)]
    scored = score_continuations(model, tokenizer, reqs, batch_size=batch_size, progress=progress)
    hits = n = skipped = 0
    for (_, k, ans), s in zip(items, spans, strict=True):
        part = scored[s : s + k]
        if any(x is None for x in part):
            skipped += 1
            continue
        lls = [x.ll for x in part]
        n += 1
        hits += max(range(k), key=lambda i: (lls[i], -i)) == ans
    return {"accuracy": accuracy_score(hits, n, skipped)}


# --- generation tasks (Alpaca) --------------------------------------------------------------


def score_generation(model, tokenizer, prompts: list[str], answers: list[str], *, metrics: list[str],
                     stop: str | None = None, max_new_tokens: int = 16, batch_size: int = 16,
                     normalize: str = "strip", progress: str | None = None, chat: bool = False) -> dict[str, Score]:
    """Metrics for (prompt, answer) tasks; each is defined exactly as:

    * ``exact_match``: greedy generation (:func:`greedy_generate`, cut at ``stop``) compared
      with the answer after the task's normalisation (``normalize``: ``strip`` or
      ``loose``, :data:`loralab.evaluate.exact_match.NORMALIZERS`) on both; Wilson interval.
    * ``greedy_match``: teacher-forced, no generation: 1 when, at every answer-token position
      (answer tokenized with ``add_special_tokens=False``, eos not included), the argmax of
      the logits equals the answer token; Wilson interval.
    * ``loss``: per example, the mean negative log-likelihood of the response tokens
      (response = answer tokens + eos); the value is the mean over examples, with the
      normal 95% interval of that mean.
    * ``perplexity``: ``exp(loss)``, interval ``exp`` of the loss interval.
    * ``token_accuracy``: share of all response tokens (answer + eos, pooled over examples)
      where the argmax equals the token; Wilson interval over tokens (n = token count).

    ``chat``: the prompts are in the tokenizer's chat template; they are tokenized as it renders
    them, and the response's last token is the template's end of turn instead of eos
    (``encode_requests``' "chat" encoding).

    Examples whose prompt + response exceed the context window are skipped and counted.
    ``progress``: the label of the bars of the two passes (teacher-forced, generation); None: no bars.
    """
    out: dict[str, Score] = {}
    want_tf = [m for m in metrics if m in ("greedy_match", "loss", "perplexity", "token_accuracy")]
    if want_tf:
        scored = score_continuations(model, tokenizer, list(zip(prompts, answers, strict=True)),
                                     append_eos=True, batch_size=batch_size, encoding="chat" if chat else "training",
                                     progress=progress and f"{progress} (scoring)")
        ok = [s for s in scored if s is not None]
        skipped = len(scored) - len(ok)
        if "greedy_match" in metrics:
            out["greedy_match"] = accuracy_score(sum(all(s.greedy[:-1]) for s in ok), len(ok), skipped)
        losses = [-math.fsum(s.logprobs) / len(s.logprobs) for s in ok]
        if "loss" in metrics or "perplexity" in metrics:
            ls = mean_score(losses, skipped)
            if "loss" in metrics:
                out["loss"] = ls
            if "perplexity" in metrics:
                out["perplexity"] = Score(math.exp(ls.value), _exp(ls.ci_low), _exp(ls.ci_high), ls.n, skipped)
        if "token_accuracy" in metrics:
            out["token_accuracy"] = accuracy_score(sum(sum(s.greedy) for s in ok),
                                                   sum(len(s.greedy) for s in ok), skipped)
    if "exact_match" in metrics:
        out["exact_match"] = exact_match_score(model, tokenizer, prompts, answers, stop=stop,
                                               max_new_tokens=max_new_tokens, batch_size=batch_size,
                                               normalize=normalize, progress=progress and f"{progress} (generation)",
                                               add_special_tokens=not chat)
    return {m: out[m] for m in metrics if m in out}


def _exp(x: float) -> float:
    return math.exp(x) if math.isfinite(x) else float("nan")


def exact_match_score(model, tokenizer, prompts, answers, *, stop=None, max_new_tokens=16, batch_size=16,
                      normalize: str = "strip", progress: str | None = None, add_special_tokens: bool = True) -> Score:
    """exact_match over the prompts that fit the window (prompt + max_new_tokens); the rest are
    skipped. ``add_special_tokens``: as greedy_generate's."""
    limit = model_context(getattr(model, "config", None))
    keep = [i for i, p in enumerate(prompts)
            if limit is None
            or len(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) + max_new_tokens <= limit]
    acc = exact_match(model, tokenizer, [prompts[i] for i in keep], [answers[i] for i in keep], normalize=normalize,
                      stop=stop, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                      add_special_tokens=add_special_tokens)
    return accuracy_score(acc.correct, acc.n, len(prompts) - len(keep))
