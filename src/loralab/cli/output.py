"""What the commands print: one JSON object with --json, otherwise text and tables.

    emit_json({"results": rows})
    print(table([["r8", 0.1234], ["r16", None]], ["run", "eval_loss"]))
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from loralab.units import is_number


def emit_json(obj: Any) -> None:
    """Print one JSON object on stdout (the --json contract): strict JSON, a non-finite number
    (NaN, inf) as null, which every JSON parser reads."""
    sys.stdout.write(json.dumps(finite(obj), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float, at any depth of dicts, lists and tuples, as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def cell(value: Any) -> str:
    """A value as a table shows it: None as "-", floats to 4 significant digits, dicts and
    lists as JSON, the rest as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str] = (), *,
          align: Sequence[str] | None = None) -> str:
    """``rows`` in padded columns (tabulate): a dashed rule under ``headers``, or bare columns
    without headers. Cells go through :func:`cell`; a column of numbers (and None) is
    right-aligned, any other left, unless ``align`` gives one of "left", "right", "center"
    per column."""
    from tabulate import tabulate  # ~0.1 s to import: only commands that print a table pay it

    if align is None and rows:
        align = ["right" if all(v is None or is_number(v) for v in column) else "left"
                 for column in zip(*rows, strict=True)]
    return tabulate([[cell(v) for v in row] for row in rows], headers=list(headers),
                    tablefmt="simple" if headers else "plain", colalign=align, disable_numparse=True)
