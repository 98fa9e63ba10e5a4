"""The ``loralab`` command line, all of it in this package. Thin: it parses arguments, calls the
library modules and prints what they return.

    loralab quickstart
    loralab train run.yaml --set lora.r=16 --set train.lr=1e-4 --out runs/r16
    loralab generate --model builtin:tiny --adapter runs/r16 "What is 12 plus 30?"
    loralab merge runs/r16 merged/
    loralab eval --model builtin:tiny --adapter runs/r16 --tasks arithmetic_2ds
    loralab estimate --model llama2-7b --r 8 --targets query,value
    loralab study run preset:rank_alpha_grid --quick
    loralab runs list --study rank_alpha_grid-quick
    loralab tune --model DIR --data FILE --budget 2h

One module per command family, each holding its argparse definition (``register``) and its
handlers: run.py (train, quickstart, generate, merge, and the model flags the others share),
eval.py, estimate.py, study.py (``study ...`` and ``runs ...``), tune.py; output.py prints
(--json and tables). Heavy imports (torch, transformers) happen inside the handlers, so
``loralab --help`` is quick. Results go to stdout (one JSON object with --json); progress and
logs go to stderr. ``python -m loralab.cli ...`` runs the same as ``loralab ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from loralab.cli import estimate, run, study, tune
from loralab.cli import eval as evaluate
from loralab.cli.output import emit_json
from loralab.errors import LoralabError, Terminated
from loralab.quiet import quiet_libraries, verbose

__all__ = ["build_parser", "emit_json", "main", "script"]

# In the order ``loralab --help`` lists them.
FAMILIES = (run, evaluate, estimate, study, tune)


class UsageError(SystemExit):
    """A command line argparse cannot parse: exit 2 as argparse's own, with its message kept."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), whose error carries its message, so that
    ``--json`` can print it."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        sys.stderr.write(text + "\n")
        raise UsageError(text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="loralab", description="LoRA / QLoRA fine-tuning lab.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and every library message on stderr (also LORALAB_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for family in FAMILIES:
        family.register(sub)
    return parser


def script() -> None:
    """The ``loralab`` console script: :func:`main`, then the process ends (loralab.ending)."""
    from loralab.ending import end_process

    end_process(main())


def main(argv: list[str] | None = None, *, errors: list[LoralabError] | None = None) -> int:
    """Run one command; its exit code. A LoralabError is printed (and appended to ``errors``
    when given: a Ray Train worker passes its message on to the driver)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:  # the --json contract holds for a command line that does not parse, too
        if "--json" in argv:
            emit_json({"error": exc.message, "exit_code": exc.code})
        raise
    if args.verbose:
        os.environ["LORALAB_VERBOSE"] = "1"  # for the run processes a study starts, too
    logging.basicConfig(
        level=logging.DEBUG if verbose() else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    quiet_libraries()
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except LoralabError as exc:
        sys.stderr.write(f"loralab {args.command}: error: {exc}\n")
        if getattr(args, "json", False):  # the --json contract holds on failure too
            emit_json({**(exc.summary or {}), "error": str(exc), "exit_code": exc.exit_code})
        if errors is not None:
            errors.append(exc)
        return exc.exit_code
    except BrokenPipeError:  # stdout's reader left early (loralab runs list | head): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
        return 141  # as a shell reports a process ended by SIGPIPE
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM where a run turned it into one (errors.Terminated)
        if not getattr(exc, "reported", False):  # a run says which one and how to continue it
            sys.stderr.write("interrupted\n")
        code = 128 + (15 if isinstance(exc, Terminated) else 2)  # as a shell reports the signal: 130, 143
        if getattr(args, "json", False):
            summary = getattr(exc, "summary", None) or {}
            emit_json({**summary, "error": summary.get("error") or "interrupted", "exit_code": code})
        return code
