"""Progress bars: one tqdm bar per long loop, on stderr, only when a person watches it.

    with progress(len(batches), desc="world_mc", unit="seq", enabled=not args.json) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

A bar is drawn only when asked for (the command passes ``enabled=not args.json``) and the
stream is a terminal, so pipes, logs, CI and ``--json`` output stay free of bar text; stdout
is never touched. While a bar is drawn, console log lines go through ``tqdm.write`` and appear
above it instead of breaking it. :func:`library_bars` holds transformers' and huggingface_hub's
own bars (weight loading, downloads) to the same rule.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


@contextlib.contextmanager
def progress(total: int | None, *, desc: str | None = None, unit: str = "it", enabled: bool, initial: int = 0,
             leave: bool = True, file: TextIO | None = None) -> Iterator[tqdm]:
    """A tqdm bar (count/total, rate, ETA) on ``file`` (default stderr), closed on exit.

    Disabled, writing nothing, unless ``enabled`` and ``file`` is a terminal; a disabled bar
    takes ``update`` and ``set_postfix`` calls all the same, so callers never branch on it.
    """
    stream = file if file is not None else sys.stderr
    shown = enabled and stream.isatty()
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=stream,
               disable=not shown, dynamic_ncols=True)
    with contextlib.ExitStack() as scope:
        scope.callback(bar.close)
        if shown:
            scope.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        yield bar


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's bars (loading weights, downloading) on only when
    ``enabled`` and stderr is a terminal, for the duration; their previous setting after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    _set_library_bars(enabled and sys.stderr.isatty())
    try:
        yield
    finally:
        _set_library_bars(was)


def _set_library_bars(on: bool) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar() if on else hf_logging.disable_progress_bar()
