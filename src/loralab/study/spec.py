"""Study files: a base training config plus axes, expanded into named, validated runs.

    study = load_study("preset:rank_alpha_grid", quick=True, model="models/my-llama")
    for run in study.runs:
        run.name, run.axes, run.config      # "r8-a16-s1", {"lora.r": 8, ...}, nested config dict

The file format is documented in docs/study-files.md. Everything is checked before any run
starts: unknown axis keys, empty lists, bad samples and tied expressions are rejected with
the key named (and the study file's line where the file has one), and every expanded run's
config goes through ``loralab.config.config_from_dict``.
"""

from __future__ import annotations

import ast
import copy
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from loralab.config import (
    DEFAULT_MODEL,
    SECTIONS,
    config_from_dict,
    did_you_mean,
    flat_keys,
    override_origins,
    read_yaml,
)
from loralab.errors import ConfigError
from loralab.evaluate.tasks import lower_is_better
from loralab.paths import check_name
from loralab.rundir import METRICS
from loralab.study.deviations import deviations
from loralab.study.keys import (
    checked_part,
    config_field,
    deep_merge,
    fmt_config_value,
    get_key,
    is_int_key,
    key_hint,
    set_key,
)
from loralab.study.tied import eval_tied, parse_tied
from loralab.units import is_number

TOP_KEYS = {"name", "description", "question", "claim", "metric", "metrics", "goal", "base", "base_config",
            "axes", "tied", "repeats", "seeds", "quick", "findings", "seed", "tiny"}
QUICK_KEYS = {"base", "axes", "tied", "repeats", "seeds", "tiny"}
# seed: what the cited experiment itself ran. setup is a partial training config in loralab's
# keys (the seed's own values); the other keys are text for what a config cannot say.
# steps: the seed's optimizer steps per run
SEED_KEYS = {"source", "model", "data", "metric", "setup", "notes", "steps"}
SEED_LAYER = "the seed's setup"  # the source of the keys the seed's setup sets and nothing above it changes
# tiny: the settings for the shipped base (builtin:tiny), applied only when the model is that one.
TINY_KEYS = {"base", "metric", "goal"}
FINDING_KINDS = {"axis_effect": ("axis",), "trend_within": ("axis", "within"),
                 "equivalence": ("axis", "reference"), "cost": ("axis", "baseline"),
                 "spread": (), "pareto": ()}
# Short labels for run names: "r8-a16-s1" rather than "lora.r8-lora.alpha16-train.seed1".
ABBREV = {"lora.r": "r", "lora.alpha": "a", "train.seed": "s", "train.lr": "lr", "lora.rslora": "rs",
          "lora.dropout": "do", "quant.mode": "q", "train.optimizer": "opt", "train.scheduler": "sched",
          "lora.targets": "t", "train.epochs": "ep", "train.max_steps": "steps", "data.path": "data",
          "lora.dora": "dora", "train.momentum": "mom", "train.weight_decay": "wd"}


@dataclass
class RunSpec:
    """One expanded run: its name (also its directory), the values it varies, its config."""

    name: str
    axes: dict[str, Any]
    config: dict[str, Any]  # nested sections, as config_from_dict takes them


@dataclass
class Study:
    name: str
    description: str
    question: str
    claim: str
    metric: str
    goal: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    tied: dict[str, str]
    seeds: list[int] | None
    findings: list[dict[str, Any]]
    source: str
    quick: bool = False
    runs: list[RunSpec] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)  # other metrics judged: {key: min | max}
    seed: dict[str, Any] = field(default_factory=dict)  # the seed's own setup (see SEED_KEYS)
    profile: str = "seed"  # "tiny" when the shipped base's profile was applied
    deviations: list[dict[str, Any]] = field(default_factory=list)  # run config vs seed setup
    hardware: dict[str, str] = field(default_factory=dict)  # the machine the study was loaded on
    origins: dict[str, str] = field(default_factory=dict)  # {key: "--set key=value"}: its problems are the flag's

    def place(self, root: Path) -> None:
        """Put every run's directory under ``root`` (output.dir = root/<run name>)."""
        for run in self.runs:
            run.config["output"]["dir"] = str(Path(root) / run.name)

    def to_json(self) -> dict[str, Any]:
        """The resolved study as stored in studies.spec_json."""
        return {"name": self.name, "description": self.description, "question": self.question,
                "claim": self.claim, "metric": self.metric, "goal": self.goal, "base": self.base,
                "axes": self.axes, "tied": self.tied, "seeds": self.seeds, "findings": self.findings,
                "source": self.source, "quick": self.quick, "metrics": self.metrics, "seed": self.seed,
                "profile": self.profile, "deviations": self.deviations, "hardware": self.hardware}


# ----------------------------------------------------------------------------- where in the file


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every mapping key in a YAML text, by key path."""
    out: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return out

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = (*path, str(k.value))
                out[p] = k.start_mark.line + 1
                walk(v, p)

    walk(root, ())
    return out


class _Where:
    """Formats 'file:line: key' prefixes for error messages."""

    def __init__(self, source: str, lines: dict[tuple[str, ...], int]):
        self.source, self.lines = source, lines

    def __call__(self, *path: str) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source


# ----------------------------------------------------------------------------- axes


def _round_sample(x: float) -> float:
    return float(f"{x:.4g}")  # short, stable values (and run names) for sampled points


def axis_values(key: str, spec: Any, where: str) -> list[Any]:
    """The values of one axis: a list, {grid: [...]}, {uniform|loguniform: [lo, hi], n, seed}."""
    if config_field(key) is None:
        raise ConfigError(f"{where}: axis {key!r} is not a training-config key{key_hint(key)} (section.key, e.g. "
                          f"lora.r; sections: {', '.join(SECTIONS)})")
    if isinstance(spec, dict) and "grid" in spec:
        if set(spec) != {"grid"}:
            raise ConfigError(f"{where}: axis {key}: 'grid' takes no other keys (got {sorted(spec)})")
        spec = spec["grid"]
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: axis {key} has an empty list of values")
        return list(spec)
    if isinstance(spec, dict) and ("uniform" in spec or "loguniform" in spec):
        kind = "uniform" if "uniform" in spec else "loguniform"
        extra = set(spec) - {kind, "n", "seed"}
        if extra:
            raise ConfigError(f"{where}: axis {key}: unknown sample keys {sorted(extra)} (use {kind}, n, seed)")
        bounds, n, seed = spec[kind], spec.get("n"), spec.get("seed", 0)
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(is_number(b) for b in bounds)):
            raise ConfigError(f"{where}: axis {key}: {kind} needs [low, high] numbers (got {bounds!r})")
        lo, hi = float(bounds[0]), float(bounds[1])
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            raise ConfigError(f"{where}: axis {key}: {kind} "
                              f"needs low < high{' and low > 0' if kind == 'loguniform' else ''} (got {bounds})")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{where}: axis {key}: n must be a positive integer (got {n!r})")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"{where}: axis {key}: seed must be an integer (got {seed!r})")
        rng = random.Random(seed)
        draw = ((lambda: rng.uniform(lo, hi)) if kind == "uniform"
                else (lambda: math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        values = [_round_sample(draw()) for _ in range(n)]
        if is_int_key(key):
            values = sorted(set(int(round(v)) for v in values))
        return values
    raise ConfigError(f"{where}: axis {key} must be a list, {{grid: [...]}}, {{uniform: [lo, hi], n, seed}} or "
                      f"{{loguniform: [lo, hi], n, seed}} (got {spec!r})")


# ----------------------------------------------------------------------------- names


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, list):
        return ".".join(_label(v) for v in value)
    text = str(value)
    if "/" in text or text.endswith((".json", ".jsonl")):
        text = Path(text.replace("builtin:", "")).stem
    return text.replace("builtin:", "")


def run_name(axes: dict[str, Any]) -> str:
    """'r8-a16-s1' from {'lora.r': 8, 'lora.alpha': 16, 'train.seed': 1}."""
    if not axes:
        return "run"
    parts = []
    for key, value in axes.items():
        short = ABBREV.get(key, key.split(".")[1])
        label = _label(value)
        sep = "" if is_number(value) else "_"
        parts.append(f"{short}{sep}{label}")
    name = "-".join(parts)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:120]


# ----------------------------------------------------------------------------- loading


def preset_dir() -> Path:
    return Path(str(resources.files("loralab").joinpath("study", "presets")))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def _read(source: str | Path) -> tuple[dict[str, Any], str, Path | None]:
    """(raw study dict, label for messages, directory relative paths start from)."""
    text_source = str(source)
    if text_source.startswith("preset:"):
        name = text_source.split(":", 1)[1]
        path = preset_dir() / f"{name}.yaml"
        if not name or not path.is_file():
            raise ConfigError(f"unknown preset {name!r} (shipped: {', '.join(preset_names())})")
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(
                f"study file {path} does not exist (or use preset:NAME; shipped: {', '.join(preset_names())})")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study file is a mapping (name, base, axes, ...); see docs/study-files.md")
    return raw, str(path), path.parent


def _apply_quick(raw: dict[str, Any], where: _Where) -> dict[str, Any]:
    """The study with its quick variant's axes, tied values and repeats in place. The quick
    base configs are layered later (see ``_layers``), so their keys can be named as the source."""
    quick = raw.get("quick") or {}
    if not isinstance(quick, dict):
        raise ConfigError(f"{where('quick')}: quick must be a mapping ({', '.join(sorted(QUICK_KEYS))})")
    unknown = set(quick) - QUICK_KEYS
    if unknown:
        raise ConfigError(
            f"{where('quick')}: unknown quick keys {sorted(unknown)} (known: {', '.join(sorted(QUICK_KEYS))})")
    out = dict(raw)
    out["axes"] = {**(raw.get("axes") or {}), **(quick.get("axes") or {})}
    out["tied"] = {**(raw.get("tied") or {}), **(quick.get("tied") or {})}
    for k in ("repeats", "seeds"):
        if k in quick:
            out.pop("repeats", None)
            out.pop("seeds", None)
            out[k] = quick[k]
    return out


def _mapping(raw: dict[str, Any], key: str, where: _Where, known: set[str]) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where(key)}: {key} must be a mapping ({', '.join(sorted(known))})")
    unknown = set(value) - known
    if unknown:
        bad = sorted(unknown)[0]
        raise ConfigError(f"{where(key, bad)}: unknown {key} key {bad!r} (known: {', '.join(sorted(known))})")
    return value


def _config_part(value: Any, what: str, where: str) -> dict[str, Any]:
    """A partial training config (sections of keys), checked like a run's config."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {what} must be a training config mapping (model, lora, data, train, ...)")
    checked_part(value, f"{where}: {what}")  # names a bad key now, not once per run
    return copy.deepcopy(value)


def _layers(raw: dict[str, Any], where: _Where, base_dir: Path | None, *, quick: bool, tiny: bool,
            model: str | None, data: str | None, overrides: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The base config's layers, lowest first, each with the words that name it as a source.

    loralab's defaults <- the seed's setup <- the study's base <- the shipped base's profile
    (only on builtin:tiny) <- the quick variant <- --model/--data <- --set."""
    from loralab.config import apply_overrides

    seed = _mapping(raw, "seed", where, SEED_KEYS)
    tiny_profile = _mapping(raw, "tiny", where, TINY_KEYS)
    quick_raw = raw.get("quick") or {}
    layers = [(SEED_LAYER, _config_part(seed.get("setup"), "seed.setup", where("seed", "setup"))),
              ("the study's base", _base_config(raw, where, base_dir))]
    if tiny:
        layers.append(("the shipped base's profile (tiny:)",
                       _config_part(tiny_profile.get("base"), "tiny.base", where("tiny", "base"))))
    if quick:
        layers.append(("--quick", _config_part(quick_raw.get("base"), "quick.base", where("quick", "base"))))
        if tiny:
            layers.append(("--quick on the shipped base",
                           _config_part(quick_raw.get("tiny"), "quick.tiny", where("quick", "tiny"))))
    for key, value, flag in (("model.path", model, "--model"), ("data.path", data, "--data")):
        if value is not None:
            part: dict[str, Any] = {}
            set_key(part, key, value)
            layers.append((flag, part))
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        layers.append((f"--set {key}", apply_overrides({}, [item])))
    return layers


def _merge(layers: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """(merged config, {section.key: the layer that set it last})."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for label, part in layers:
        merged = deep_merge(merged, part)
        for key in flat_keys(part):
            sources[key] = label
    return merged, sources


def refuse_axis_overrides(overrides: list[str], data: str | None, axes: dict[str, Any], tied: dict[str, str],
                          study: str) -> None:
    """--set on a key the study varies (an axis) or derives (tied) would be overwritten in
    every run without a word: refuse it, naming the axis."""
    given = [(item.split("=", 1)[0].strip(), f"--set {item}") for item in overrides]
    if data is not None:
        given.append(("data.path", f"--data {data}"))
    for key, flag in given:
        if key in axes:
            values = ", ".join(fmt_config_value(v) for v in axes[key])
            raise ConfigError(f"{flag}: {key} is an axis of study {study} (values {values}); each run sets it, "
                              f"so the override would be overwritten. Edit the study's axes instead.")
        if key in tied:
            raise ConfigError(f"{flag}: {key} is tied in study {study} ({key} = {tied[key]}); each run computes "
                              f"it, so the override would be overwritten. Edit the study's tied: entry instead.")


def _seeds(raw: dict[str, Any], where: _Where) -> list[int] | None:
    if "repeats" in raw and "seeds" in raw:
        raise ConfigError(f"{where('seeds')}: give repeats or seeds, not both")
    if "repeats" in raw:
        n = raw["repeats"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{where('repeats')}: repeats must be a positive integer (got {n!r})")
        return list(range(1, n + 1))
    if "seeds" in raw:
        s = raw["seeds"]
        if not isinstance(s, list) or not s or not all(isinstance(x, int) and not isinstance(x, bool) for x in s):
            raise ConfigError(f"{where('seeds')}: seeds must be a non-empty list of integers (got {s!r})")
        if len(set(s)) != len(s):
            raise ConfigError(f"{where('seeds')}: seeds repeat a value ({s})")
        return list(s)
    return None


def _check_findings(findings: Any, axes: dict[str, list[Any]], where: _Where) -> list[dict[str, Any]]:
    if findings is None:
        return []
    if not isinstance(findings, list):
        raise ConfigError(f"{where('findings')}: findings must be a list of {{kind: ...}} mappings")
    known_axes = set(axes) | {"train.seed"}
    for i, f in enumerate(findings):
        if not isinstance(f, dict) or f.get("kind") not in FINDING_KINDS:
            close = did_you_mean(str(f.get("kind")), list(FINDING_KINDS)) if isinstance(f, dict) else None
            raise ConfigError(
                f"{where('findings')}: findings[{i}] needs kind: one of {', '.join(FINDING_KINDS)} (got {f!r})"
                + (f"; did you mean {close}?" if close else ""))
        for param in FINDING_KINDS[f["kind"]]:
            if param not in f:
                unknown = sorted(set(f) - {"kind", *FINDING_KINDS[f["kind"]]})
                raise ConfigError(f"{where('findings')}: findings[{i}] ({f['kind']}) needs {param}"
                                  + (f" (it has {', '.join(unknown)}, which {f['kind']} does not take)"
                                     if unknown else ""))
        for param in ("axis", "within"):
            if param in f and f[param] not in known_axes:
                raise ConfigError(f"{where('findings')}: findings[{i}] {param} {f[param]!r} is not one of the study's "
                                  f"axes ({', '.join(sorted(known_axes))})")
    return findings


def _text(raw: dict[str, Any], key: str, where: _Where, default: str = "") -> str:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigError(f"{where(key)}: {key} must be a string (got {value!r})")
    return value.strip()


def other_metrics(raw: Any, metric: str, where: str = "metrics") -> dict[str, str]:
    """A study file's ``metrics`` (judged besides ``metric``) as {metrics.jsonl key: goal}.

    A list takes each goal from the metric's name (:func:`loralab.evaluate.tasks.lower_is_better`:
    loss, perplexity, bits_per_byte are min, the rest max); a mapping gives it
    (``{world_mc/mc2: max, eval_loss: min}``). The study's own ``metric`` is left out."""
    if raw is None:
        return {}
    if isinstance(raw, list) and all(isinstance(m, str) and m for m in raw):
        out = {m: "min" if lower_is_better(m) else "max" for m in raw}
    elif isinstance(raw, dict) and all(isinstance(m, str) and m for m in raw):
        for m, goal in raw.items():
            if goal not in ("min", "max"):
                raise ConfigError(f"{where}: metrics: {m}: goal must be min or max (got {goal!r})")
        out = dict(raw)
    else:
        raise ConfigError(f"{where}: metrics must be a list of {METRICS} keys (world_mc/mc2, "
                          f"harness:world_mc/mc1, ...) or a mapping of key to min/max (got {raw!r})")
    out.pop(metric, None)
    return out


def load_study(
    source: str | Path,
    *,
    quick: bool = False,
    model: str | None = None,
    data: str | None = None,
    overrides: list[str] | None = None,
    root: Path | None = None,
    resolve: bool = True,
    local: bool = True,
) -> Study:
    """Read, check and expand a study file or ``preset:NAME``.

    ``model``/``data`` replace the base's model.path/data.path; ``overrides`` are
    ``section.key=value`` strings applied to the base (refused on an axis or a tied key);
    ``root`` is where run directories go (each run's output.dir is ``root/<run name>``).
    The shipped base's profile (``tiny:``) applies only when the model is builtin:tiny; every
    difference between a run's config and the seed's setup is in ``study.deviations``.
    ``resolve`` fills ``train.micro_batch_size: auto`` from the memory estimate and, where the
    runs train on this machine (``local``; not on a Ray cluster's workers), turns a seed's bf16
    into fp32 on a CPU that would emulate bf16 (:func:`loralab.resolve.seed_dtype_here`)."""
    raw, label, base_dir = _read(source)
    text = Path(label).read_text(encoding="utf-8")
    where = _Where(label, key_lines(text))
    unknown = set(raw) - TOP_KEYS
    if unknown:
        bad = sorted(unknown)[0]
        raise ConfigError(f"{where(bad)}: unknown study key {bad!r} (known: {', '.join(sorted(TOP_KEYS))})")
    if quick:
        raw = _apply_quick(raw, where)
    name = raw.get("name") or Path(label).stem
    check_name(str(name), what="study name")
    if quick:
        name = f"{name}-quick"  # its own database and run directories: its runs differ in steps

    overrides = list(overrides or [])
    layer_kw = dict(quick=quick, model=model, data=data, overrides=overrides)
    base, sources = _merge(_layers(raw, where, base_dir, tiny=False, **layer_kw))
    tiny = get_key(base, "model.path") == DEFAULT_MODEL
    if tiny:
        base, sources = _merge(_layers(raw, where, base_dir, tiny=True, **layer_kw))
    profile = _mapping(raw, "tiny", where, TINY_KEYS) if tiny else {}
    goal = profile.get("goal", raw.get("goal", "min"))
    if goal not in ("min", "max"):
        raise ConfigError(f"{where('goal')}: goal must be min or max (got {goal!r})")
    metric = profile.get("metric", raw.get("metric", "eval_loss"))
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{where('metric')}: metric must be a {METRICS} key such as eval_loss (got {metric!r})")

    metrics = other_metrics(raw.get("metrics"), metric, where("metrics"))
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"{where('axes')}: axes must be a mapping of config keys to values")
    axes = {k: axis_values(k, v, where("axes", str(k))) for k, v in axes_raw.items()}
    seeds = _seeds(raw, where)
    if seeds is not None:
        if "train.seed" in axes:
            raise ConfigError(
                f"{where('axes', 'train.seed')}: train.seed is an axis and repeats/seeds are given; use one")
        axes["train.seed"] = seeds
    tied_raw = raw.get("tied") or {}
    if not isinstance(tied_raw, dict):
        raise ConfigError(f"{where('tied')}: tied must be a mapping of config keys to expressions")
    tied: dict[str, tuple[str, ast.Expression]] = {}
    for key, expr in tied_raw.items():
        w = where("tied", str(key))
        if config_field(key) is None:
            raise ConfigError(f"{w}: tied key {key!r} is not a training-config key{key_hint(key)} (section.key)")
        if key in axes:
            raise ConfigError(f"{w}: {key} is both an axis and tied; remove one")
        tied[key] = (str(expr), parse_tied(key, expr, w))
    refuse_axis_overrides(overrides, data, axes, {k: e for k, (e, _) in tied.items()}, str(name))
    seed = {k: v.strip() if isinstance(v, str) else copy.deepcopy(v)
            for k, v in _mapping(raw, "seed", where, SEED_KEYS).items()}
    for k in sorted(SEED_KEYS - {"setup", "steps"}):
        if k in seed and not isinstance(seed[k], str):
            raise ConfigError(f"{where('seed', k)}: seed.{k} must be text (got {seed[k]!r})")
    if "steps" in seed and (not isinstance(seed["steps"], int) or isinstance(seed["steps"], bool) or seed["steps"] < 1):
        raise ConfigError(f"{where('seed', 'steps')}: seed.steps must be a whole number of optimizer steps "
                          f"(got {seed['steps']!r})")
    study = Study(
        name=str(name), description=_text(raw, "description", where), question=_text(raw, "question", where),
        claim=_text(raw, "claim", where), metric=metric, goal=goal, base=base, axes=axes,
        tied={k: e for k, (e, _) in tied.items()}, seeds=seeds,
        findings=_check_findings(raw.get("findings"), axes, where), source=label, quick=quick, metrics=metrics,
        seed=seed, profile="tiny" if tiny else "seed", origins=override_origins(overrides),
    )
    study.runs = expand(study, {k: t for k, (_, t) in tied.items()}, where)
    run_notes: list[dict[str, str]] = []  # each run's {key: why} for the values resolve filled in
    if resolve:
        from loralab.resolve import describe_hardware, resolve_config, seed_dtype_here, seed_targets_here

        study.hardware = describe_hardware()

        def from_seed(key: str) -> bool:  # unless a layer above the seed's setup, an axis or a tied key sets it
            return sources.get(key) == SEED_LAYER and key not in {*axes, *tied}

        for run in study.runs:
            cfg, notes = resolve_config(config_from_dict(run.config, source=f"{label} (run {run.name})",
                                                         origins=study.origins))
            if local and from_seed("model.dtype"):
                cfg, notes = seed_dtype_here(cfg, notes)
            if from_seed("lora.targets"):
                cfg, notes = seed_targets_here(cfg, notes)
            run.config = cfg.to_dict()
            run_notes.append(notes)
    study.deviations = deviations(seed.get("setup") or {}, [run.config for run in study.runs], sources,
                                  set(axes) | set(tied), notes=run_notes)
    if root is not None:
        study.place(root)
    return study


def _base_config(raw: dict[str, Any], where: _Where, base_dir: Path | None) -> dict[str, Any]:
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{where('base')}: base must be a training config mapping (model, lora, data, train, ...)")
    if raw.get("base_config"):
        path = Path(raw["base_config"])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        file_cfg = read_yaml(path)
        if not isinstance(file_cfg, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        base = deep_merge(file_cfg, base)
    return copy.deepcopy(base)


def expand(study: Study, tied: dict[str, ast.Expression], where: _Where) -> list[RunSpec]:
    """The cross product of the axes (in file order), tied values filled in, configs checked."""
    keys = list(study.axes)
    runs: list[RunSpec] = []
    seen: dict[str, int] = {}
    for combo in itertools.product(*(study.axes[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        raw = copy.deepcopy(study.base)
        for k, v in values.items():
            set_key(raw, k, copy.deepcopy(v))
        for k, tree in tied.items():
            try:
                set_key(raw, k, eval_tied(tree, raw, k, study.tied[k]))
            except ConfigError as exc:
                raise ConfigError(f"{where('tied', k)}: {exc} (run {values})") from None
        name = run_name(values)
        if name in seen:  # two axis values with the same label: keep names unique and stable
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        else:
            seen[name] = 1
        check_name(name, what="run name")
        try:
            cfg = config_from_dict(raw, source=f"{study.source} (run {name})", origins=study.origins)
        except ConfigError as exc:
            raise ConfigError(f"{exc}\n  (axes of this run: {json.dumps(values, default=str)})") from None
        runs.append(RunSpec(name=name, axes=values, config=cfg.to_dict()))
    return runs


def describe_preset(name: str) -> dict[str, Any]:
    """Name, description, question, claim and run counts (full and --quick) of a preset."""
    full = load_study(f"preset:{name}")
    quick = load_study(f"preset:{name}", quick=True)
    return {"name": name, "description": full.description, "question": full.question, "claim": full.claim,
            "runs": len(full.runs), "quick_runs": len(quick.runs), "metric": full.metric}
