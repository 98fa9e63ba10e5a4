"""Training-config keys as a study file names them (``section.key``): their type, their value in a raw config.

    get_key({"lora": {"r": 8}}, "lora.alpha")    # 16.0, loralab's default
    checked_part({"train": {"lr": "1e-4"}}, "seed.setup")   # {"train.lr": 0.0001}
"""

from __future__ import annotations

import copy
import typing
from dataclasses import fields
from typing import Any

from loralab.config import SECTIONS
from loralab.errors import ConfigError


def key_hint(key: Any) -> str:
    """' (did you mean lora.r?)' for a key that is not a training-config key, where one is close."""
    from loralab.config import did_you_mean

    if not isinstance(key, str):
        return ""
    section, _, name = key.partition(".")
    if section in SECTIONS:
        close = did_you_mean(name, [f.name for f in fields(SECTIONS[section])])
        return f" (did you mean {section}.{close}?)" if close else ""
    close = did_you_mean(section, list(SECTIONS))
    return f" (did you mean {close}.{name}?)" if close and name else ""


def config_field(key: str) -> tuple[Any, Any] | None:
    """(type, dataclass field) of a 'section.key' config key, or None when there is none."""
    if not isinstance(key, str) or key.count(".") != 1:
        return None
    section, name = key.split(".")
    cls = SECTIONS.get(section)
    if cls is None:
        return None
    for f in fields(cls):
        if f.name == name:
            return typing.get_type_hints(cls)[name], f
    return None


def is_int_key(key: str) -> bool:
    info = config_field(key)
    return info is not None and info[0] in (int, int | None)


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    section, name = key.split(".")
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"{section} must be a mapping of keys")
    target[name] = value


def get_key(raw: dict[str, Any], key: str) -> Any:
    """A key's value in a raw config, falling back to loralab's default."""
    section, name = key.split(".")
    sec = raw.get(section) or {}
    if name in sec:
        return sec[name]
    return getattr(SECTIONS[section](), name)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (top or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def checked_part(part: dict[str, Any], source: str) -> dict[str, Any]:
    """{section.key: value} of a partial config, each value checked and converted like a full
    config's (types, ranges), without the cross-key checks a partial config cannot pass."""
    from loralab.config import _build_section

    errors: list[str] = []
    out: dict[str, Any] = {}
    for section, keys in part.items():
        if section not in SECTIONS:
            errors.append(f"unknown section {section!r} (known: {', '.join(SECTIONS)})")
            continue
        built = _build_section(section, SECTIONS[section], keys, errors)
        out.update({f"{section}.{k}": getattr(built, k) for k in (keys or {}) if hasattr(built, k)})
    if errors:
        raise ConfigError(f"{source}: invalid configuration:\n  - " + "\n  - ".join(errors))
    return out


def fmt_config_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "null"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt_config_value(x) for x in v) + "]"
    return str(v)
