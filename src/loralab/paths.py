"""Names that become paths: run, study and adapter names are checked before anything is written.

    run_dir = child_dir(Path("runs"), "r16-a32", what="run name")

A name is one path component of letters, digits, '-', '_' and '.', not '.' or '..'; the
directory it names must stay inside its root even after symlinks are resolved.
"""

from __future__ import annotations

import re
from pathlib import Path

from loralab.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def check_name(name: str, *, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in {".", ".."}:
        raise ConfigError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '-', '_' or '.', "
            "with no path separators (no '/', no '..', no absolute path)"
        )
    return name


def child_dir(root: Path, name: str, *, what: str) -> Path:
    """``root / name`` after checking ``name``; refuses a symlink that leads outside ``root``."""
    check_name(name, what=what)
    root_real = Path(root).resolve()
    path = Path(root) / name
    if path.resolve() != root_real / name and not path.resolve().is_relative_to(root_real):
        raise ConfigError(f"{what} {name!r}: {path} resolves to {path.resolve()}, outside {root_real}")
    return path
