"""Build loralab's shipped offline default: the built-in task data and the tiny pretrained base.

Command (from the repository root, with the project's virtual environment)::

    .venv/bin/python scripts/build_assets/build_tiny_base.py

Takes about 25 minutes on 2 CPU cores (a few seconds for data and tokenizer, the rest is
pretraining); ``--steps`` trades quality for time. Everything is deterministic: fixed seeds
for the generators, the data shuffle and ``torch.manual_seed`` for the initialisation.

Steps:

1. ``src/loralab/assets/data/``: fixed arithmetic splits (2-digit and 4-digit, train / val /
   test, disjoint in problems), ``world_mc.json`` and ``world_pairs.jsonl``
   (all from ``synth.py`` beside this script).
2. A pretraining corpus: arithmetic in surface forms *other* than the Alpaca instruction
   (``59 - 38 = 21``, ``59 minus 38 is 21.``, ...; the val/test problems never appear), and
   documents about the generated world, including Alpaca-formatted world instructions
   answered in full sentences.
3. A byte-level BPE tokenizer (``tokenizers``), digits split individually, wrapped as a
   ``PreTrainedTokenizerFast`` that adds ``<s>`` in front of every text.
4. A small ``LlamaForCausalLM`` pretrained from random init with a plain AdamW + cosine loop,
   saved with safetensors to ``src/loralab/assets/tiny-base/`` with the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import synth  # beside this script: the generators are build-time only, not part of the package
import torch

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "src" / "loralab" / "assets"

SPLITS = {"train": 2000, "val": 200, "test": 200}
DATA_SEED = {2: 20, 4: 40}
MC_SEED, PAIRS_SEED, CORPUS_SEED, TORCH_SEED = 7, 8, 11, 1234


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_data(out: Path) -> set:
    """Write the fixed task files; return the held-out (val + test) problems."""
    out.mkdir(parents=True, exist_ok=True)
    held_out = set()
    for digits in (2, 4):
        problems = synth.arithmetic_problems(digits, sum(SPLITS.values()), seed=DATA_SEED[digits])
        start = 0
        for split, n in SPLITS.items():
            part = problems[start : start + n]
            start += n
            write_jsonl(
                out / f"arithmetic_{digits}ds_{split}.jsonl",
                [synth.problem_record(*p) for p in part],
            )
            if split != "train":
                held_out.update(part)
    (out / "world_mc.json").write_text(
        json.dumps(synth.world_mc_task(150, seed=MC_SEED), indent=1, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    write_jsonl(out / "world_pairs.jsonl", synth.world_minimal_pairs(300, seed=PAIRS_SEED))
    return held_out


# ----------------------------------------------------------------------------- corpus


def build_corpus(n_tokens_hint: int, held_out: set) -> list[str]:
    """Documents, shuffled: ~60% arithmetic (2-digit mostly), ~40% world, by tokens."""
    # Rough token costs: an arithmetic doc of ~7 lines is ~100 tokens, a world doc ~60.
    n_arith = int(0.6 * n_tokens_hint / 100)
    n_world = int(0.4 * n_tokens_hint / 60)
    arith2 = synth.arithmetic_corpus(
        int(n_arith * 0.7), seed=CORPUS_SEED, digits=(2,), exclude=held_out
    )
    arith4 = synth.arithmetic_corpus(
        n_arith - len(arith2), seed=CORPUS_SEED + 1, digits=(4,), exclude=held_out
    )
    world = synth.world_corpus(n_world, seed=CORPUS_SEED + 2)
    docs = arith2 + arith4 + world
    random.Random(CORPUS_SEED + 3).shuffle(docs)
    return docs


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
        padding_side="right",
    )


def pack(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """Every document as ``<s> text </s>``, concatenated and cut into rows of ``seq_len``."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for i in range(0, len(docs), 2000):
        for row in tokenizer(docs[i : i + 2000])["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ----------------------------------------------------------------------------- model


def make_model(vocab_size: int, tokenizer, hidden: int, layers: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(round(hidden * 8 / 3 / 32)) * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(TORCH_SEED)
    return LlamaForCausalLM(cfg)


def pretrain(model, data: torch.Tensor, steps: int, batch: int, lr: float, warmup: int) -> None:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(TORCH_SEED + 1)
    order = torch.randperm(len(data), generator=g)
    pos = 0
    model.train()
    t0 = time.time()
    running = None
    for step in range(steps):
        if pos + batch > len(order):
            order = torch.randperm(len(data), generator=g)
            pos = 0
        x = data[order[pos : pos + batch]]
        pos += batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - t0
            log(
                f"step {step}/{steps} loss {running:.3f} lr {lr_at(step):.2e} "
                f"({el:.0f}s, eta {el / (step + 1) * (steps - step - 1):.0f}s)"
            )
    model.eval()


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Batched greedy completion (left padding), cut at the first eos or newline."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.split("\n")[0] for t in texts]


def sanity(model, tokenizer, data_dir: Path) -> None:
    """Held-out 2-digit / 4-digit problems in the pretraining (equation) form."""
    for digits in (2, 4):
        rows = [
            json.loads(line) for line in (data_dir / f"arithmetic_{digits}ds_test.jsonl").open()
        ][:100]
        probs = [synth.parse_problem(r["instruction"]) for r in rows]
        prompts = [f"{a} {'+' if op == 'plus' else '-'} {b} =" for a, op, b in probs]
        outs = greedy(model, tokenizer, prompts)
        acc = sum(o.strip() == r["output"] for o, r in zip(outs, rows, strict=True)) / len(rows)
        log(
            f"held-out {digits}-digit equations '{prompts[0]}' -> '{outs[0].strip()}': {acc:.0%} exact"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=1536)
    ap.add_argument("--out", type=Path, default=ASSETS / "tiny-base")
    ap.add_argument("--data-out", type=Path, default=ASSETS / "data")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    held_out = build_data(args.data_out)
    log(
        f"task data written to {args.data_out} ({len(held_out)} held-out problems kept out of the corpus)"
    )

    n_tokens = args.steps * args.batch * args.seq_len
    docs = build_corpus(n_tokens, held_out)
    log(f"corpus: {len(docs)} documents")
    tokenizer = build_tokenizer(docs[:60000], args.vocab)
    data = pack(tokenizer, docs, args.seq_len)
    log(
        f"tokenizer: {len(tokenizer)} tokens; packed {data.numel() / 1e6:.1f}M tokens "
        f"= {data.numel() / n_tokens:.2f} epochs of the planned {n_tokens / 1e6:.1f}M"
    )

    model = make_model(len(tokenizer), tokenizer, args.hidden, args.layers, args.heads)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    pretrain(model, data, args.steps, args.batch, args.lr, warmup=min(200, args.steps // 10))

    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 32
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # Name the generic fast class so that transformers 4.x (no "TokenizersBackend") loads it too.
    tc_path = args.out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2) + "\n", encoding="utf-8")
    log(f"saved to {args.out}")
    sanity(model, tokenizer, args.data_out)
    log(f"done in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
