"""``loralab tune``: the LoRA settings for your model, data and budget, with the evidence.

    loralab tune --model models/my-llama --data train.jsonl --budget 2h --max-memory 24GB
    loralab tune --model DIR --data FILE --budget-steps 3000 --fixed lora.targets=all --search lora.r,train.lr

The search and the recommendation live in :mod:`loralab.tune`; this module parses the flags
and prints the answer.
"""

from __future__ import annotations

import argparse
import sys

from loralab.cli.output import emit_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="the LoRA settings for your model, data and budget, with the evidence",
                       description="Search r, the effective learning rate, targets and epochs with successive "
                                   "halving, repeat the finalists, and recommend what the repeats support.")
    p.add_argument("--model", required=True, help="model directory or hub id (builtin:tiny works offline)")
    p.add_argument("--data", required=True, help="training data (any format loralab train reads)")
    p.add_argument("--metric", default="eval_loss", help="eval_loss or TASK/METRIC (e.g. arithmetic_2ds/exact_match)")
    p.add_argument("--goal", choices=["min", "max"], help="default: min for losses, max otherwise")
    p.add_argument("--budget", help="wall-clock budget (90s, 30m, 2h): no run starts after it")
    p.add_argument("--budget-steps", type=int, help="total optimizer steps; the space shrinks to fit")
    p.add_argument("--max-memory", help="memory per run, e.g. 24GB: gates runs and chooses 4-bit where needed")
    p.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE", help="fix a setting (repeatable)")
    p.add_argument("--search", help="comma list of the keys to search (default: all of them; the rest take defaults)")
    p.add_argument("--widen", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="the values tried for a key (repeatable)")
    p.add_argument("--batch-size", type=int, help="global batch (default: the config default)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--address", help="Ray cluster address")
    p.add_argument("--out", default="runs", help="output root (default runs)")
    p.add_argument("--name", default="tune", help="the tune's study name (default tune)")
    p.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from loralab.ending import sigterm_interrupts
    from loralab.tune import parse_assignments, run_tune, summary_text
    from loralab.units import parse_bytes, parse_duration

    search = [k.strip() for k in args.search.split(",") if k.strip()] if args.search else None
    widen = {k: v if isinstance(v, list) else [v] for k, v in parse_assignments(args.widen, "--widen").items()}
    try:
        with sigterm_interrupts():  # SIGTERM stops the tune as Ctrl-C does
            answer = run_tune(
                model=args.model, data=args.data, out=args.out, name=args.name, metric=args.metric, goal=args.goal,
                fixed=parse_assignments(args.fixed, "--fixed"), search=search, widen=widen,
                budget_s=parse_duration(args.budget, "--budget") if args.budget else None,
                budget_steps=args.budget_steps,
                max_memory=parse_bytes(args.max_memory, "--max-memory") if args.max_memory else None,
                workers=args.workers, executor=args.executor, address=args.address, batch_size=args.batch_size,
                progress=not args.json)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the study database keeps what ended; say how to go on
        sys.stderr.write(f"tune {args.name}: stopped; run the same command again to continue it (runs that ended "
                         "are kept; interrupted ones train again, from their last checkpoint where they have one)\n")
        raise
    if args.json:
        emit_json(answer)
    else:
        print(summary_text(answer))
        print(f"config: {answer['best_yaml']}\nadapter: {answer['adapter']}")
    return 0
