"""Throughput of each eval metric on builtin:tiny (examples/s). Not a test.

    python bench/bench_eval.py [--n 64] [--threads 1] [--harness]

With --harness it also times lm-evaluation-harness's hf backend on the same MC1 + MC2
questions (task files written by loralab; model loading and task building included,
the lm_eval import not).
"""

from __future__ import annotations

import argparse
import time

import torch

from loralab.config import ModelConfig, QuantConfig
from loralab.evaluate import metrics as M
from loralab.evaluate.task_list import resolve_tasks
from loralab.models import load_base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--harness", action="store_true", help="also time lm-eval on MC1 + MC2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_base(ModelConfig(path="builtin:tiny"), QuantConfig())
    ar, mc, pairs = resolve_tasks("arithmetic_2ds,world_mc,world_pairs", args.n)
    prompts, answers = [p for p, _ in ar.items], [a for _, a in ar.items]
    lettered = [(M.lettered_prompt(q.question, list(q.mc1)), len(q.mc1), list(q.mc1.values()).index(1))
                for q in mc.items]
    cases = {
        "exact_match": lambda: M.score_generation(model, tok, prompts, answers, metrics=["exact_match"],
                                                  max_new_tokens=8),
        "greedy_match+loss+token_accuracy": lambda: M.score_generation(
            model, tok, prompts, answers, metrics=["greedy_match", "loss", "token_accuracy"]),
        "mc1+mc2": lambda: M.score_mc(model, tok, mc.items),
        "pairs_accuracy": lambda: M.score_pairs(model, tok, pairs.items),
        # four one-token letters after one prompt share one row of the batch
        "lettered accuracy": lambda: M.score_lettered(model, tok, lettered),
    }
    for name, fn in cases.items():
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        print(f"{name:36s} {args.n / dt:8.1f} examples/s  ({args.n} examples, {dt:.2f} s)")
    if args.harness:
        bench_harness(args.n)


def bench_harness(n: int) -> None:
    import tempfile
    from pathlib import Path

    from loralab.evaluate import harness as H
    from loralab.models import resolve_model_path

    H.require_lm_eval()
    import lm_eval.evaluator  # noqa: F401  (import time is not scoring time)

    with tempfile.TemporaryDirectory() as tmp:
        names = H.prepare_tasks("world_mc", Path(tmp), n)
        t = time.perf_counter()
        H.run_harness(resolve_model_path("builtin:tiny"), None, list(names), include_path=[tmp],
                      include_defaults=False, batch_size=16)
        dt = time.perf_counter() - t
    print(f"{'lm-eval mc1+mc2':36s} {n / dt:8.1f} examples/s  ({n} examples, {dt:.2f} s)")


if __name__ == "__main__":
    main()
