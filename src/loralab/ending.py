"""How a loralab process ends: what the interpreter's exit does that matters, without its
module teardown.

    raise SystemExit(main())      # Python's exit: about 1.3 s of teardown after torch,
    end_process(main())           # transformers and PEFT are loaded; this one: none

The teardown frees every module one by one (thousands, with torch, sympy and transformers), work
the operating system does at once when the process ends. Measured on this project's CPU (a
process that imported torch, transformers and PEFT and built a model): 1.3-1.6 s from the last
line to the end of the process with Python's exit, 0.05-0.1 s with this one; every run process,
rank and command pays it once. What an exit must still do is done first, in the interpreter's
order: threads that are not daemons are waited for (where one is alive the process takes
Python's own exit, which waits for it), ``atexit`` handlers run (logging's flush and close,
trackers' and Ray's shutdown), then Python's and C's buffered output is flushed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import NoReturn

from loralab.errors import Terminated


def end_process(code: int | None) -> NoReturn:
    """Exit with ``code`` (None: 0) as Python would, but without the module teardown."""
    code = code or 0
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        raise SystemExit(code)  # Python's exit waits for them
    finish()
    os._exit(code)


def finish() -> None:
    """What an exit does before the teardown: the ``atexit`` handlers, then Python's stdout and
    stderr and every C stdio stream (what a library printed through C) flushed."""
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises :class:`~loralab.errors.Terminated` (a KeyboardInterrupt), so a run
    records itself interrupted, as on Ctrl-C, instead of dying with summary.json left
    ``running``. The previous handler is put back after. Only in the main thread (where Python
    runs signal handlers); a rank of a multi-process run keeps SIGTERM's default, which its
    launcher reads as "stopped by the launcher"."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
