"""Throughput of each eval metric on builtin:tiny (examples/s). Not a test.

    python bench/bench_eval.py [--n 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from loralab.config import ModelConfig, QuantConfig
from loralab.evaluate import metrics as M
from loralab.evaluate.tasks import resolve_tasks
from loralab.models import load_base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_base(ModelConfig(path="builtin:tiny"), QuantConfig())
    ar, mc, pairs = resolve_tasks("arithmetic_2ds,world_mc,world_pairs", args.n)
    prompts, answers = [p for p, _ in ar.items], [a for _, a in ar.items]
    cases = {
        "exact_match": lambda: M.score_generation(model, tok, prompts, answers, metrics=["exact_match"],
                                                  max_new_tokens=8),
        "greedy_match+loss+token_accuracy": lambda: M.score_generation(
            model, tok, prompts, answers, metrics=["greedy_match", "loss", "token_accuracy"]),
        "mc1+mc2": lambda: M.score_mc(model, tok, mc.items),
        "pairs_accuracy": lambda: M.score_pairs(model, tok, pairs.items),
    }
    for name, fn in cases.items():
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        print(f"{name:36s} {args.n / dt:8.1f} examples/s  ({args.n} examples, {dt:.2f} s)")


if __name__ == "__main__":
    main()
