"""The package's import layering: every import (module-level or inside a function) points down.

    cli -> api -> study, tune -> train -> resolve, preflight, estimate, track
        -> models, adapters, roles, data, evaluate -> config, rundir, units, errors, paths, ...

A module may import its own layer or any layer below it, never one above; and no modules import
each other in a circle, at any distance.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "loralab"

# Top to bottom. The key is the first part of the module name under loralab.
LAYERS: list[set[str]] = [
    {"cli"},
    {"api"},
    {"study", "tune"},
    {"train"},
    # what a run is resolved, checked, sized and tracked with: used by train and by study
    {"resolve", "preflight", "estimate", "track"},
    {"models", "adapters", "roles", "data", "evaluate"},
    {"config", "rundir", "units", "errors", "paths", "progress", "quiet", "halving", "ending"},
]
LEVEL = {name: len(LAYERS) - i for i, names in enumerate(LAYERS) for name in names}

# Inside loralab.study, top to bottom (a module not named here is only held to the package layers).
STUDY_ORDER = {"execute": 5, "options": 4, "policy": 3, "scheduler": 2, "fuse": 1,
               "backends.local": 1, "backends.ray": 1, "backends.process": 0}

# Imports that run back up and are not removed yet: (importer, imported), each with its reason.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = ("loralab", *path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts).removesuffix(".__init__")


def imports(path: Path, modules: set[str]) -> set[str]:
    """The loralab modules ``path`` imports anywhere in it, each as a module name (``from
    loralab.study import stats`` imports loralab.study.stats; ``from loralab.rundir import RunDir``
    imports loralab.rundir). The package root ``loralab`` is left out: it is the facade (it imports
    loralab.api), and importing any submodule runs it first anyway."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            out |= {n for n in names if n in modules} or {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("loralab.")}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PKG.rglob("*.py")}
    return {mod: imports(path, set(paths)) for mod, path in paths.items()}


def layer_of(mod: str) -> int:
    top = mod.split(".")[1]
    assert top in LEVEL, f"{mod}: its layer is not stated in tests/test_layers.py LAYERS"
    return LEVEL[top]


def test_every_import_points_down():
    upward = []
    for mod, deps in graph().items():
        if mod == "loralab":
            continue
        for dep in deps:
            if layer_of(dep) > layer_of(mod) and (mod, dep) not in KNOWN_UPWARD:
                upward.append(f"{mod} imports {dep}, which is above it")
    assert upward == []


def test_study_modules_import_downward_only():
    """execute -> options -> policy -> scheduler -> backends, inside loralab.study."""
    for mod, deps in graph().items():
        here = mod.removeprefix("loralab.study.")
        for dep in deps:
            there = dep.removeprefix("loralab.study.")
            if here in STUDY_ORDER and there in STUDY_ORDER:
                assert STUDY_ORDER[there] < STUDY_ORDER[here], f"{mod} imports {dep}, which is not below it"


def circles(g: dict[str, set[str]]) -> list[str]:
    """The modules that reach themselves through their imports."""

    def reach(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for d in g.get(stack.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    stack.append(d)
        return seen

    return sorted(m for m in g if m in reach(m))


def test_no_import_circles():
    assert circles(graph()) == []


def test_the_check_sees_an_upward_import_and_a_circle(tmp_path):
    """The checks above can fail: an import inside a function is found, and a circle is found."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from loralab.cli.run import cmd_train\n", encoding="utf-8")
    assert imports(path, {"loralab.cli.run"}) == {"loralab.cli.run"}
    assert layer_of("loralab.cli.run") > layer_of("loralab.train.core")
    assert circles({"loralab.a": {"loralab.b"}, "loralab.b": {"loralab.c"}, "loralab.c": {"loralab.a"},
                    "loralab.d": {"loralab.a"}}) == ["loralab.a", "loralab.b", "loralab.c"]
