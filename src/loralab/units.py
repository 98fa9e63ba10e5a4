"""Numbers people type and read: sizes in bytes, durations in seconds, and what counts as a number.

    parse_bytes("24GiB")        # 25769803776
    human_bytes(25769803776)    # '24.00 GiB'
    parse_duration("30m", "--budget")   # 1800.0
    human_duration(1800)        # '30 min'
"""

from __future__ import annotations

import re
from typing import Any

from loralab.errors import ConfigError

_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SECONDS = {"s": 1, "m": 60, "h": 3600}


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (JSON's true/false are no numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_bytes(text: str, key: str = "--budget") -> int:
    """'24GB' (10^9), '24GiB' (2^30), '500MB', '2.5e10' (bytes) -> bytes; must be > 0."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _BYTE_UNITS:
        raise ConfigError(f"{key} must be a size such as 24GB, 24GiB or 500MB (got {text!r})")
    value = float(m.group(1)) * _BYTE_UNITS[unit]
    if value <= 0:
        raise ConfigError(f"{key} must be > 0 (got {text!r})")
    if not unit and value < 2**20:  # a plain number counts bytes: one this small is a unit left out
        raise ConfigError(f"{key} {text!r} would be {value:.0f} bytes: give the unit, e.g. {m.group(1)}GB or "
                          f"{m.group(1)}GiB (a number alone counts bytes)")
    return int(value)


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (powers of 1024; whole bytes under 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def parse_duration(text: str, key: str) -> float:
    """'90s', '30m', '2h' or plain seconds -> seconds."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _SECONDS[t[-1]] if t and t[-1] in _SECONDS else float(t)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{key} {text!r} is not a duration: use e.g. 90s, 30m or 2h")
    return value


def human_duration(seconds: float) -> str:
    """0.04 s, 90 s, 14 min, 2.5 h: a number every time (messages say "at least about" before it)."""
    if seconds < 1:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
