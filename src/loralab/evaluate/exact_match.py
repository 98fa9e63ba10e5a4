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


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 16, batch_size: int = 32,
                    stop: str | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, KV cache on)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]  # (batch, new tokens)
            for row in tokenizer.batch_decode(new, skip_special_tokens=True):
                outputs.append(row.split(stop)[0] if stop else row)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(model, tokenizer, prompts: list[str], answers: list[str], *, normalize: str = "strip",
                **gen_kw) -> Accuracy:
    norm = NORMALIZERS[normalize]
    preds = greedy_generate(model, tokenizer, prompts, **gen_kw)
    correct = sum(norm(p) == norm(a) for p, a in zip(preds, answers, strict=True))
    return Accuracy(correct, len(answers))
