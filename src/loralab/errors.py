"""Errors that reach the user as one clear paragraph and a non-zero exit code.

Library code raises these; the CLI prints the message (no traceback) and exits with
``exit_code``. Anything else that escapes is a bug and is shown with its traceback.
"""

from __future__ import annotations


class LoralabError(Exception):
    """A problem with the user's input or machine, explained in the message. ``summary``: the
    summary.json a run recorded for it, where one did (``--json`` prints it with the error)."""

    exit_code = 2
    summary: dict | None = None


class ConfigError(LoralabError):
    """An unknown key, a wrong type or an out-of-range value in a configuration."""


class DataError(LoralabError):
    """A dataset or task file that cannot be read or yields nothing to train on."""


class ModelError(LoralabError):
    """A model directory, adapter target or quantization mode that cannot be used."""


class ResumeRefused(LoralabError):
    """A resume that would no longer equal the uninterrupted run, found once its data are loaded:
    refused before its first step, the run left as the resume found it."""


class DivergedError(LoralabError):
    """Training produced a non-finite loss or gradient."""

    exit_code = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler's stop), raised where Ctrl-C raises
    KeyboardInterrupt, so a run ends as it does on Ctrl-C: recorded ``interrupted``, saying how
    to continue (loralab.ending.sigterm_interrupts)."""

    signal_name = "SIGTERM"
