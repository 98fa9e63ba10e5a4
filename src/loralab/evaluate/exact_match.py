"""Exact match on generation tasks: batched greedy decoding with the KV cache.

Accuracy is reported with a Wilson 95% interval. The answer is the generated text up to
end-of-sequence (or the stop string), compared with the reference after both are
normalised by the task's rule (:data:`NORMALIZERS`):

* ``strip`` (default): leading and trailing whitespace removed;
* ``loose``: lower-cased, runs of whitespace collapsed to one space, trailing ``.`` removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loralab.progress import progress as progress_bar


def _loose(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".").rstrip()


NORMALIZERS = {"strip": str.strip, "loose": _loose}


@dataclass
class Accuracy:
    correct: int
    n: int

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def wilson(self, z: float = 1.96) -> tuple[float, float]:
        """Wilson score interval for a binomial proportion."""
        if not self.n:
            return float("nan"), float("nan")
        p, n = self.value, self.n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def end_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a turn: the model's generation_config.eos_token_id (an id or a list,
    as chat models ship it) and the tokenizer's eos, in that order, without repeats."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 16, batch_size: int = 32,
                    stop: str | None = None, progress: str | None = None,
                    add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, KV cache on), each cut at ``stop``.

    A row stops at any of the model's end tokens (:func:`end_token_ids`) and, while it is being
    generated, at ``stop`` (transformers' stop-string criterion), so a batch ends as soon as every
    row has ended instead of after ``max_new_tokens``. ``progress``: the label of a bar counting
    the prompts done (stderr, terminals only; :mod:`loralab.progress`); None draws none.
    ``add_special_tokens``: False for prompts in a chat template
    (loralab.data.templates.prompt_special_tokens).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    ends = end_token_ids(model, tokenizer)
    if stop in tokenizer.get_added_vocab():  # a token of its own (<|im_end|>): an end token, not text
        ends.append(tokenizer.get_added_vocab()[stop])
        stop = None
    stop_kw = {"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}
    outputs: list[str] = []
    try:
        with progress_bar(len(prompts), desc=progress, unit="ex", enabled=progress is not None, leave=False) as bar:
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=ends,
                                     **stop_kw)
                new = gen[:, enc["input_ids"].shape[1]:].tolist()  # (batch, new tokens)
                for row in tokenizer.batch_decode([_cut(r, ends) for r in new], skip_special_tokens=True):
                    outputs.append(row.split(stop)[0] if stop else row)
                bar.update(len(new))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def _cut(tokens: list[int], ends: list[int]) -> list[int]:
    """The tokens before the first end token (an end token need not be a special token)."""
    for k, t in enumerate(tokens):
        if t in ends:
            return tokens[:k]
    return tokens


def exact_match(model, tokenizer, prompts: list[str], answers: list[str], *, normalize: str = "strip",
                **gen_kw) -> Accuracy:
    """Share of greedy generations equal to their answer after ``normalize``; ``gen_kw`` go to
    :func:`greedy_generate` (max_new_tokens, batch_size, stop, progress, add_special_tokens)."""
    norm = NORMALIZERS[normalize]
    preds = greedy_generate(model, tokenizer, prompts, **gen_kw)
    correct = sum(norm(p) == norm(a) for p, a in zip(preds, answers, strict=True))
    return Accuracy(correct, len(answers))
