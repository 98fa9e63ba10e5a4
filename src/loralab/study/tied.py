"""Tied values: the small arithmetic language of a study file's ``tied:`` entries.

    tree = parse_tied("lora.alpha", "2 * lora.r", where)        # checked once, when the study loads
    eval_tied(tree, {"lora": {"r": 8}}, "lora.alpha", "2 * lora.r")    # 16.0, for each run

Numbers, config keys (``section.key``, true/false counting as 1/0), + - * / ** and
parentheses; nothing else parses, so a study file cannot run code.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from loralab.errors import ConfigError
from loralab.study.keys import config_field, get_key, is_int_key
from loralab.units import is_number

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def parse_tied(key: str, expr: Any, where: str) -> ast.Expression:
    """Parse a tied expression; only numbers, config keys, + - * / ** and parentheses."""
    if is_number(expr):
        expr = repr(expr)
    if not isinstance(expr, str):
        raise ConfigError(f"{where}: tied {key} must be an arithmetic expression string (got {expr!r})")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ConfigError(f"{where}: tied {key}: {expr!r} is not an arithmetic expression") from None

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.Expression):
            return check(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            check(node.left)
            return check(node.right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            return check(node.operand)
        if isinstance(node, ast.Constant) and is_number(node.value):
            return None
        name = _dotted(node)
        if name is not None:
            if config_field(name) is None:
                raise ConfigError(
                    f"{where}: tied {key}: {name!r} in {expr!r} is not a training-config key (section.key)")
            return None
        raise ConfigError(f"{where}: tied {key}: {expr!r} may only use numbers, config keys, + - * / ** and "
                          f"parentheses (found {type(node).__name__})")

    check(tree)
    return tree


def eval_tied(tree: ast.Expression, raw: dict[str, Any], key: str, expr: str) -> float:
    """Evaluate a parsed tied expression against one run's raw config."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ConfigError(f"tied {key}: exponent {right} in {expr!r} is too large")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Constant):
            return node.value
        name = _dotted(node)
        value = get_key(raw, name)
        if isinstance(value, bool):  # true/false count as 1/0: "16 * 2 ** (-0.5 * lora.rslora)"
            return int(value)
        if not isinstance(value, (int, float)):
            raise ConfigError(f"tied {key}: {name} is {value!r}, not a number, in {expr!r}")
        return value

    try:
        value = ev(tree)
    except ZeroDivisionError:
        raise ConfigError(f"tied {key}: division by zero in {expr!r}") from None
    if isinstance(value, complex) or not math.isfinite(value):
        raise ConfigError(f"tied {key}: {expr!r} gives {value}, not a finite number")
    if is_int_key(key):
        if abs(value - round(value)) > 1e-9:
            raise ConfigError(f"tied {key}: {expr!r} gives {value}, but {key} must be an integer")
        return int(round(value))
    return float(f"{value:.12g}")
