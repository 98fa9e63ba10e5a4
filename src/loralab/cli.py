"""The ``loralab`` command line. Thin: it parses arguments and calls the modules.

    loralab quickstart
    loralab train run.yaml --set lora.r=16 --set train.lr=1e-4 --out runs/r16
    loralab generate --model builtin:tiny --adapter runs/r16 "What is 12 plus 30?"
    loralab merge runs/r16 merged/
    loralab eval --model builtin:tiny --adapter runs/r16 --tasks arithmetic_2ds
    loralab estimate --model llama2-7b --r 8 --targets query,value
    loralab tune --model DIR --data FILE --budget 2h

Each subcommand lives in its own module and registers itself through ``register``; heavy
imports (torch, transformers) happen inside the command, so ``loralab --help`` is quick.
Results go to stdout (one JSON object with --json); progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from loralab.errors import LoralabError

# Modules that define ``register(subparsers)``; each adds one or more subcommands.
COMMAND_MODULES = [
    "loralab.commands",
    "loralab.evaluate.command",
    "loralab.estimate",
    "loralab.study.command",
    "loralab.tune",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralab", description="LoRA / QLoRA fine-tuning lab.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that part of loralab is not built yet
                continue
            raise
        module.register(sub)
    return parser


def emit_json(obj: Any) -> None:
    """Print one JSON object on stdout (the --json contract)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except LoralabError as exc:
        sys.stderr.write(f"loralab {args.command}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
