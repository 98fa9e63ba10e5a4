"""How much a run's result depends on the fused group it trained in, against seed noise.

    PYTHONPATH=src python bench/bench_group_spread.py [--steps 29] [--lr 1e-3] [--dropout 0.05]

One configuration (r 8, alpha 16, q,v, AdamW at --lr, seed 1) on a random-init 64-dim Llama
(saved with save_pretrained, the shipped tokenizer) and Alpaca-style records of realistic
lengths trains solo and inside groups of 2, 3 and 5 with different partners; its final eval
loss in each is compared with the same configuration's seed-to-seed spread (seeds 1, 2, 3
solo). A group's base matmuls run over all its rows at once, and a kernel's rounding depends
on the shape it is given, so the same run rounds differently in each group; Adam turns
rounding-sized gradient differences into weight differences. Prints one JSON object and
writes bench/results/group_spread_dropout<D>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import build_tiny_model, make_cfg  # noqa: E402
from loralab.train.fused import train_fused  # noqa: E402
from loralab.train.loop import train  # noqa: E402
from userdata import instruction_records, write_jsonl  # noqa: E402

PARTNERS = [dict(lora__r=4, lora__alpha=8), dict(lora__r=16, lora__alpha=32),
            dict(lora__r=8, lora__alpha=16, train__lr=3e-4), dict(lora__r=2, lora__alpha=4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=29)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dropout", type=float, default=0.0, help="lora.dropout of every run (tune's default: 0.05)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="group-spread-"))
    model = build_tiny_model("llama_h64", tmp / "model")
    data = write_jsonl(tmp / "train.jsonl", instruction_records(240, seed=5))
    shared = dict(data__path=str(data), data__limit="null", data__val_max_examples=32, data__max_seq_length=256,
                  lora__dropout=args.dropout, train__max_steps=args.steps, train__batch_size=8,
                  train__micro_batch_size=8, train__log_every=10, eval__every=0, output__save_adapter=False)
    run = dict(lora__r=8, lora__alpha=16, train__lr=args.lr)
    n = iter(range(1000))

    def cfg(**kw):
        return make_cfg(model, tmp / f"run{next(n)}", **{**shared, **run, **kw})

    def partner(p):
        return make_cfg(model, tmp / f"run{next(n)}", **{**shared, "train__lr": args.lr, "train__seed": 1, **p})

    solo = {seed: train(cfg(train__seed=seed))["final_eval_loss"] for seed in (1, 2, 3)}
    grouped = {"solo": solo[1]}
    for size in (2, 3, 5):
        out = train_fused([cfg(train__seed=1), *[partner(p) for p in PARTNERS[: size - 1]]])
        grouped[f"group of {size}"] = out[0]["final_eval_loss"]
    values = list(grouped.values())
    result = {
        "steps": args.steps, "lr": args.lr, "dropout": args.dropout, "device": "cpu",
        "threads": torch.get_num_threads(),
        "final_eval_loss_same_run_by_group": grouped,
        "group_spread": max(values) - min(values),
        "seed_values": solo, "seed_sd": statistics.stdev(solo.values()),
        "torch": torch.__version__,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"group_spread_dropout{args.dropout:g}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
