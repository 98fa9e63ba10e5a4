"""Build a user-style model and data set, to run a preset on them as a new user would.

    python scripts/user_model_study.py --out /tmp/user        # writes /tmp/user/model, /tmp/user/train.jsonl
    loralab study run preset:consistency --quick --model /tmp/user/model --data /tmp/user/train.jsonl \\
        --out /tmp/user/runs
    loralab study report consistency-quick --out /tmp/user/runs

The model is a random-init Llama of about 20M parameters (hidden 512, 6 layers) saved with
save_pretrained, with the shipped base's tokenizer; the data are Alpaca-style records whose
instructions run 8-40 words and responses 10-80 words (about 40 to 300 tokens in all).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

WORDS = ("river delta soil farming water city history market price energy light sound music model "
         "language letter number planet orbit garden tree winter summer travel train bridge story "
         "reason because however explain describe compare list summarize write short simple").split()


def records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [{"instruction": text(8, 40), "input": text(5, 20) if i % 3 == 0 else "", "output": text(10, 80)}
            for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    args = p.parse_args()
    import torch
    import transformers as tf

    from loralab.models import BUILTIN_MODELS

    out = Path(args.out)
    model_dir = out / "model"
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=1280, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                            num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                            max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN_MODELS["builtin:tiny"] / name, model_dir / name)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(args.examples)), encoding="utf-8")
    print(f"model: {model_dir} ({sum(p.numel() for p in model.parameters()):,} parameters)\ndata: {data}")


if __name__ == "__main__":
    main()
