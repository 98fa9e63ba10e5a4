"""What a user points loralab at: instruction data of realistic lengths, written as a file.

Responses run from a few words to a few hundred tokens (a short answer, a sentence, a list of
steps, a paragraph), prompts from one line to a short context, so batches mix lengths the way
real instruction data does. Deterministic for (n, seed).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = ["the garden", "a bicycle", "the river", "bread", "a small boat", "the library", "winter", "a clock",
          "the market", "tea", "a bridge", "the harbor", "paper", "a lantern", "the orchard", "stone walls"]
VERBS = ["clean", "repair", "plan", "describe", "build", "measure", "paint", "store", "carry", "sort"]
WORDS = ("the a of to and in is it for on with as at by from that this was are be or an "
         "light water wood door road field hill wind rain sun morning evening small large old new warm cold "
         "slowly carefully often always never first then later next before after because while").split()


def _sentence(rng: random.Random, lo: int = 6, hi: int = 16) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def instruction_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-style records whose token lengths spread from tens to hundreds."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic, verb = rng.choice(TOPICS), rng.choice(VERBS)
        kind = rng.random()
        if kind < 0.3:
            out.append({"instruction": f"In one word, what do you {verb} first in {topic}?", "input": "",
                        "output": rng.choice(WORDS)})
        elif kind < 0.55:
            out.append({"instruction": f"Describe {topic} in a sentence.", "input": "", "output": _sentence(rng)})
        elif kind < 0.8:
            steps = "\n".join(f"{k + 1}. {_sentence(rng, 4, 10)}" for k in range(rng.randint(3, 7)))
            out.append({"instruction": f"List the steps to {verb} {topic}.", "input": "", "output": steps})
        else:
            context = " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
            body = " ".join(_sentence(rng, 8, 20) for _ in range(rng.randint(4, 10)))
            out.append({"instruction": f"Write a short report on {topic} (item {i}).", "input": context,
                        "output": body})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
