"""Does the LoRA path's precision matter to a bf16 step's time? The fp32 adapter path (PEFT over a
bf16 base: the input cast to fp32, the adapter product in fp32, as loralab trains) against the
adapter product in bf16 (autocast, with PEFT's input cast off: what the Trainer's bf16=True does).

    PYTHONPATH=src python bench/bench_lora_dtype.py [--repeats 4]

A random-init Llama of bench_user.py's shape (hidden 640, 10 layers, ~50M parameters) in bf16,
PEFT LoRA r 8 on query and value with dropout 0.05, a padded batch of 8 x 224 tokens, forward and
backward, 2 threads; the two modes alternate step by step. Prints each mode's step times.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1276, hidden_size=640, intermediate_size=1728, num_hidden_layers=10,
                                      num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=2048)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = torch.randint(0, config.vocab_size, (8, 224))

    def step(mode: str) -> float:
        t0 = time.perf_counter()
        with contextlib.ExitStack() as scope:
            if mode == "bf16 adapter product":
                scope.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
                scope.enter_context(disable_input_dtype_casting(model))
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    modes = ["fp32 adapter path", "bf16 adapter product"]
    for mode in modes:  # warm-up
        step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(step(mode))
    for mode in modes:
        print(f"{mode}: {' '.join(f'{t:.3f}' for t in times[mode])} s a step, "
              f"median {statistics.median(times[mode]):.3f} s")


if __name__ == "__main__":
    main()
