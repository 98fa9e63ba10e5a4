"""Benchmark (not a test): peak memory and speed of the loss in chunks against the whole logits.

    PYTHONPATH=src .venv/bin/python bench/bench_chunked_loss.py        # 2 interleaved pairs

A random-init Llama with Llama 3's vocabulary (128,256; hidden 256, 2 layers) saved with
save_pretrained, 64 instruction records of real lengths (bench_user.user_records: log-normal,
median about 215 tokens) cut at 1,024, micro batch 8, 2 steps, every other setting loralab's
default. Each run is its own process, so its peak memory (VmHWM) is its own; "whole" raises
CHUNK_LOGITS so the step keeps its whole logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))


def run(mode: str, root: Path) -> dict:
    import loralab.estimate as estimate
    import loralab.train.chunked_loss as chunked
    from loralab.api import train

    if mode == "whole":
        chunked.CHUNK_LOGITS = estimate.CHUNK_LOGITS = 1 << 60
    s = train({"model": {"path": str(root / "model"), "device": "cpu"},
               "data": {"path": str(root / "data.jsonl"), "max_seq_length": 1024, "val_max_examples": 8},
               "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 8, "warmup_steps": 0},
               "output": {"save_adapter": False}}, out=root / f"run-{mode}-{len(list(root.glob('run-*')))}").summary
    return {"mode": mode, "peak_mib": round(s["peak_memory_bytes"] / 2**20), "tokens_per_s": round(s["tokens_per_s"]),
            "final_eval_loss": s["final_eval_loss"]}


def main() -> None:
    if len(sys.argv) == 3:  # a worker: python bench_chunked_loss.py MODE ROOT
        print("RESULT " + json.dumps(run(sys.argv[1], Path(sys.argv[2]))))
        return
    import torch
    from bench_user import user_records
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.models import BUILTIN_MODELS
    from userdata import write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, vocab_size=128256, max_position_embeddings=2048,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(root / "model")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(BUILTIN_MODELS["builtin:tiny"] / name, root / "model" / name)
        write_jsonl(root / "data.jsonl", user_records(64, 0))
        for mode in ("chunked", "whole", "chunked", "whole"):
            out = subprocess.run([sys.executable, __file__, mode, str(root)], capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            print(lines[0][7:] if lines else out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
