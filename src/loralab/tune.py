"""``loralab tune``: the LoRA settings for your model, data and budget, with the evidence.

    loralab tune --model models/my-llama --data train.jsonl --budget 2h --max-memory 24GB
    loralab tune --model DIR --data FILE --budget-steps 3000 --fixed lora.targets=all --search lora.r,train.lr

A tune is a study (same database, resumable after a kill, ``loralab study report`` works on
it) in two phases:

1. every candidate of a search space built from what the seeds teach trains under successive
   halving on the metric (memory gate from ``loralab estimate``; candidates that share a base
   train as fused groups where the scheduler fuses), so most candidates stop after a few steps;
2. the best finalists train again with two more seeds, so the final comparison has a
   seed-to-seed spread, and nothing is called best that the repeats do not support.

The answer (``<out>/<name>/best.yaml``, ``tune.md``, ``tune.json``) is computed from the study
database alone by :func:`recommend`, so it can be rebuilt or checked with SQL at any time.
The search space and why each dimension is there: docs/tune.md.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from loralab.errors import ConfigError, LoralabError
from loralab.rundir import RunDir, Status, write_atomic
from loralab.study import stats
from loralab.study.results import SEED_KEY, for_metric, read_series, read_study, repeat_groups
from loralab.units import is_number

log = logging.getLogger(__name__)

# The scale alpha/r is held at 2 (alpha = 2r, Raschka's choice) and the effective learning
# rate lr * alpha / r is searched instead of alpha and lr separately: under Adam, alpha x k with
# lr / k trains alike (Determined, quoting the LoRA paper), so searching both wastes runs on
# equivalent points. The seeds' own settings meet near 6e-4: Raschka lr 3e-4 at alpha = 2r,
# Determined alpha x lr = 5.12e-3 at r = 8 (6.4e-4).
SCALE = 2.0
EFFECTIVE_LRS = [6e-5, 2e-4, 6e-4, 2e-3]
RANKS = [8, 32, 128]              # log scale: rank mattered less than alpha at a fixed lr (Determined)
TARGETS = [["query", "value"], ["all"]]  # all layers cost memory and may buy quality (Raschka)
FINALISTS = 3                      # finalists repeated with more seeds
EXTRA_SEEDS = [2, 3]               # finalists' repeats; candidates train with seed 1
ETA = 3                            # successive halving keeps the best 1/ETA at each rung
MAX_EPOCHS_DATA = 10_000           # above this many examples a second epoch is not searched


@dataclass
class Dimension:
    """One searched config key: its candidate values and what the seeds say about it."""

    key: str
    values: list[Any]
    why: str
    default: Any  # used when the dimension is not searched
    ceiling: float | None = None  # the largest value that means anything here (lora.r: the model's smallest matrix)


def default_dimensions(n_train: int, attention: list[str] | None = None) -> list[Dimension]:
    """The search space the seeds suggest, before the user fixes or widens anything.
    ``attention``: the model's attention candidate (``loralab.roles.attention_roles``), q,v by
    default."""
    epochs = [1, 2] if n_train <= MAX_EPOCHS_DATA else [1]
    attention = attention or TARGETS[0]
    return [
        Dimension("train.lr", [lr / SCALE for lr in EFFECTIVE_LRS],
                  "effective lr (lr x alpha/r, alpha = 2r) on a log scale around the seeds' 6e-4; "
                  "alpha and lr trade against each other under Adam", 3e-4),
        Dimension("lora.r", list(RANKS), "rank on a log scale; at a fixed scale it mattered less than alpha", 8),
        Dimension("lora.targets", [list(attention), *copy.deepcopy(TARGETS[1:])],
                  ("q,v (the LoRA paper's default)" if attention == TARGETS[0] else "q,k,v (one matrix in this model)")
                  + " or every linear layer (more memory, may buy quality)", list(attention)),
        Dimension("train.epochs", epochs,
                  "a second epoch over instruction data can hurt (Raschka); searched only up to "
                  f"{MAX_EPOCHS_DATA} examples", 1),
    ]


def _scalar(text: str) -> Any:
    """A command-line value: YAML, except that 1e-3 is a number (YAML 1.1 wants 1.0e-3)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_assignments(items: list[str], flag: str) -> dict[str, Any]:
    """``key=value`` strings (values read as YAML; a comma list becomes a list)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"{flag} {item!r}: expected section.key=value, e.g. lora.targets=all")
        out[key.strip()] = [_scalar(v) for v in text.split(",")] if "," in text else _scalar(text)
    return out


def build_space(dims: list[Dimension], *, fixed: dict[str, Any], search: list[str] | None = None,
                widen: dict[str, list[Any]] | None = None) -> list[Dimension]:
    """Apply ``--fixed`` (a key taken out of the search, set to the value given), ``--search``
    (only these keys are searched; the others take their defaults) and ``--widen`` (the values
    tried for a key)."""
    known = {d.key for d in dims}
    for flag, keys in (("--search", search or []), ("--widen", list(widen or {}))):
        for key in keys:
            if key not in known:
                raise ConfigError(f"{flag} {key!r} is not a tuned dimension (tuned: {', '.join(sorted(known))})")
            if key in fixed:
                raise ConfigError(f"{flag} {key!r} is also given to --fixed; use one")
    out = []
    for d in dims:
        if d.key in fixed or (search is not None and d.key not in search):
            continue
        values = list((widen or {}).get(d.key, d.values))
        if d.key == "lora.targets":
            values = [v if isinstance(v, list) else [v] for v in values]
        out.append(Dimension(d.key, values, d.why, d.default))
    return out


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def halving_steps(n: int, rungs: list[int], max_steps: int) -> int:
    """Optimizer steps successive halving spends on ``n`` candidates of ``max_steps`` steps."""
    from loralab.halving import keep_count

    total, done, alive = 0, 0, n
    for rung in rungs:
        total += alive * (rung - done)
        done, alive = rung, keep_count(alive, ETA)
    return total + alive * (max_steps - done)


@dataclass
class Plan:
    """What a tune will run: the space, its base config, steps and the rungs."""

    dims: list[Dimension]
    base: dict[str, Any]
    n_train: int
    steps_per_epoch: int
    max_steps: int
    min_steps: int
    candidates: int
    planned_steps: int
    grid_steps: int  # the same space as a full grid with every candidate repeated like the finalists
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"dimensions": [{"key": d.key, "values": d.values, "why": d.why} for d in self.dims],
                "n_train": self.n_train, "steps_per_epoch": self.steps_per_epoch, "max_steps": self.max_steps,
                "min_steps": self.min_steps, "candidates": self.candidates, "planned_steps": self.planned_steps,
                "grid_steps": self.grid_steps, "notes": self.notes}


def _max_steps(dims: list[Dimension], base: dict[str, Any], spe: int) -> int:
    epochs = next((d.values for d in dims if d.key == "train.epochs"), [base["train"].get("epochs", 1)])
    return max(1, math.ceil(max(epochs) * spe))


def halving_schedule(n: int, max_steps: int) -> tuple[int, list[int]]:
    """(min_steps, rungs): as many rungs as leave at least FINALISTS candidates training to
    the end, so the finalists all ran the full schedule; no rung when there are too few."""
    from loralab.halving import halving_rungs, keep_count

    k, alive = 0, n
    while keep_count(alive, ETA) >= FINALISTS and max_steps // ETA ** (k + 1) >= 1:
        alive, k = keep_count(alive, ETA), k + 1
    if k == 0:
        return max_steps, []
    min_steps = math.ceil(max_steps / ETA ** k)
    return min_steps, halving_rungs(min_steps, ETA, max_steps)


def _cost(dims: list[Dimension], base: dict[str, Any], spe: int) -> tuple[int, int, int, int]:
    """(candidates, max_steps, min_steps, planned optimizer steps) of a space."""
    n = math.prod(len(d.values) for d in dims) if dims else 1
    max_steps = _max_steps(dims, base, spe)
    min_steps, rungs = halving_schedule(n, max_steps)
    finals = min(FINALISTS, n) * len(EXTRA_SEEDS) * max_steps
    return n, max_steps, min_steps, halving_steps(n, rungs, max_steps) + finals


def smallest_search(dims: list[Dimension]) -> list[Dimension]:
    """The least a tune can run and still be a search: two values of every searched key (one
    epoch: a second one is what a budget drops first)."""
    out = []
    for d in dims:
        keep = 1 if d.key == "train.epochs" else 2
        out.append(Dimension(d.key, d.values[:keep], d.why, d.default))
    return out


def fit_budget(dims: list[Dimension], base: dict[str, Any], spe: int, budget_steps: int | None,
               *, seconds_per_step: float | None = None) -> tuple[list[Dimension], list[str]]:
    """Shrink the space (second epoch first, then the outer values of each dimension, never
    below two values of a searched key) until the plan fits ``budget_steps``; refuse a budget
    too small to search, naming the smallest that does (steps, and time from
    ``seconds_per_step`` when known)."""
    notes: list[str] = []
    if budget_steps is None:
        return dims, notes
    dims = copy.deepcopy(dims)
    while _cost(dims, base, spe)[3] > budget_steps:
        epochs = next((d for d in dims if d.key == "train.epochs" and len(d.values) > 1), None)
        if epochs is not None:
            epochs.values = epochs.values[:1]
            notes.append("a second epoch was not searched: it does not fit --budget-steps")
            continue
        widest = max(dims, key=lambda d: len(d.values), default=None)
        if widest is None or len(widest.values) <= 2:
            raise too_small(dims, base, spe, f"--budget-steps {budget_steps}", seconds_per_step)
        dropped = widest.values.pop(-1 if len(widest.values) % 2 == 0 else 0)
        notes.append(f"{widest.key} {dropped!r} was not searched: it does not fit --budget-steps")
    return dims, notes


def too_small(dims: list[Dimension], base: dict[str, Any], spe: int, budget: str,
              seconds_per_step: float | None) -> ConfigError:
    """The refusal of a budget below the smallest search, naming the smallest budget that searches."""
    from loralab.units import human_duration

    least = smallest_search(dims)
    n, _, _, steps = _cost(least, base, spe)
    keys = [d.key for d in least if len(d.values) > 1]
    when = f", at least about {human_duration(steps * seconds_per_step)} on this machine" if seconds_per_step else ""
    return ConfigError(
        f"{budget} is too small for a search: comparing two values of each searched key "
        f"({', '.join(keys) or 'none'}) takes {n} candidates and their repeats, {steps} optimizer steps{when}; "
        f"give at least --budget-steps {steps}, search fewer keys (--search), or train one configuration "
        "with loralab train")


def model_attention(model: str) -> tuple[list[str], str | None]:
    """``loralab.roles.attention_roles`` of ``model``, read off its meta-device shape (q,v where
    it cannot be described: loralab train then says why)."""
    from loralab.errors import LoralabError
    from loralab.estimate import describe_model
    from loralab.roles import attention_roles

    try:
        shape = describe_model(model)
    except LoralabError:
        return list(TARGETS[0]), None
    roles, fused = attention_roles(shape.model_type, shape.linears)
    if fused is None:
        return roles, None
    return roles, (f"{fused} holds query, key and value in one matrix: LoRA on attention adapts it whole "
                   "(lora.targets [query, key, value]), as query and value alone cannot be asked for")


def fit_ranks(dims: list[Dimension], base: dict[str, Any]) -> list[str]:
    """Drop the ranks above the smallest dimension of a matrix the targets adapt (the most a rank
    can mean, loralab.preflight): searched ones with a note, a fixed one refused."""
    from loralab.config import LoraConfig, config_from_dict
    from loralab.preflight import smallest_dimension

    targets = next((d.values for d in dims if d.key == "lora.targets"),
                   [base["lora"].get("targets", LoraConfig().targets)])
    limits = []
    for t in targets:
        cfg = config_from_dict({**base, "lora": {**base["lora"], "targets": t}}, source="loralab tune")
        found = smallest_dimension(cfg)
        if found is not None:
            limits.append(found)
    if not limits:
        return []
    limit, module = min(limits)
    ranks = next((d for d in dims if d.key == "lora.r"), None)
    if ranks is None:
        r = base["lora"].get("r", 8)
        if r > limit:
            raise ConfigError(f"lora.r = {r} is larger than the dimensions of {module} (smallest {limit}); "
                              f"fix lora.r at {limit} or less")
        return []
    over = [r for r in ranks.values if r > limit]
    if not over:
        return []
    ranks.values = [r for r in ranks.values if r <= limit] or [limit]
    ranks.ceiling = limit
    return [f"lora.r {', '.join(map(str, over))} not searched: above {limit}, the smallest dimension of an "
            f"adapted matrix ({module}); a larger rank adds parameters but no expressiveness"]


def plan_tune(*, model: str, data: str, metric: str, fixed: dict[str, Any], search: list[str] | None = None,
              widen: dict[str, list[Any]] | None = None, budget_steps: int | None = None,
              max_memory: int | None = None, batch_size: int | None = None, budget_s: float | None = None) -> Plan:
    """The search space, base config and step counts for a model and data (reads the data and
    the model's config; no weights are loaded). A budget (``budget_steps``, ``budget_s``) too
    small to compare two values of each searched key is refused (ConfigError)."""
    from loralab.config import config_from_dict
    from loralab.estimate import load_model_config, resolve_model_config
    from loralab.models import load_tokenizer, resolve_model_path
    from loralab.resolve import resolve_data

    base: dict[str, Any] = {
        # sequence length from the data (up to the model's context), micro batch from memory
        "model": {"path": model}, "data": {"path": data, "max_seq_length": "auto"},
        "lora": {"dropout": 0.05}, "train": {"seed": 1, "warmup_steps": 0, "micro_batch_size": "auto"}, "eval": {},
        "output": {"save_adapter": True},
    }
    if batch_size:
        base["train"]["batch_size"] = batch_size
    if metric != "eval_loss":
        base["eval"]["tasks"] = [metric.split("/", 1)[0]]
    for key, value in fixed.items():
        section, _, name = key.partition(".")
        base.setdefault(section, {})[name] = value
    # bad --fixed keys and values fail here, each named by its flag
    cfg = config_from_dict(base, source="tune's settings", origins={k: f"--fixed {k}={v}" for k, v in fixed.items()})
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path), trust_remote_code=cfg.model.trust_remote_code)
    # data.max_seq_length: auto as loralab train resolves it: capped by the model's context
    splits = resolve_data(cfg, tokenizer, load_model_config(resolve_model_config(cfg.model.path)))
    n_train = len(splits.train)
    spe = steps_per_epoch(n_train, cfg.train.batch_size)
    base["train"].setdefault("warmup_steps", 0)
    attention, attention_note = model_attention(cfg.model.path)
    defaults = default_dimensions(n_train, attention)
    dims = build_space(defaults, fixed=fixed, search=search, widen=widen)
    for d in defaults:  # a dimension not searched takes its default, unless fixed
        if d.key not in fixed and all(d.key != s.key for s in dims):
            section, _, name = d.key.partition(".")
            base[section][name] = d.default
    if fixed.get("lora.alpha") is None:
        base["lora"].pop("alpha", None)  # tied to 2r below
    targets = next((d.values for d in dims if d.key == "lora.targets"), None)
    uses_attention = attention in targets if targets else "lora.targets" not in fixed
    notes: list[str] = [attention_note] if attention_note and uses_attention else []
    notes += fit_ranks(dims, base)
    notes += quantization_for_memory(base, max_memory, dims, attention)
    mean_len = sum(len(e.input_ids) for e in splits.train) / max(1, n_train)
    per_step = seconds_per_step(base, dims, cfg.data.max_seq_length, mean_len)
    dims, budget_notes = fit_budget(dims, base, spe, budget_steps, seconds_per_step=per_step)
    notes += budget_notes
    if budget_s is not None and per_step is not None:
        from loralab.units import human_duration

        least = _cost(smallest_search(dims), base, spe)[3]
        if least * per_step > budget_s:
            raise too_small(dims, base, spe, f"--budget {human_duration(budget_s)}", per_step)
    n, max_steps, min_steps, planned = _cost(dims, base, spe)
    grid = n * (1 + len(EXTRA_SEEDS)) * max_steps
    return Plan(dims=dims, base=base, n_train=n_train, steps_per_epoch=spe, max_steps=max_steps,
                min_steps=min_steps, candidates=n, planned_steps=planned, grid_steps=grid, notes=notes)


def seconds_per_step(base: dict[str, Any], dims: list[Dimension], max_seq_length: int,
                     mean_tokens: float | None = None) -> float | None:
    """A lower bound on one optimizer step's time on this machine: loralab estimate's FLOPs of the
    cheapest candidate on the data's examples (``mean_tokens`` each, rows cut at the data's
    sequence length), at this machine's measured matmul rate."""
    from loralab.config import config_from_dict
    from loralab.estimate import estimate_run, matmul_throughput
    from loralab.study.scheduler import run_device

    cheapest = copy.deepcopy(base)
    ranks = next((d.values for d in dims if d.key == "lora.r"), [base["lora"].get("r", 8)])
    cheapest["lora"].update(r=min(ranks), alpha=SCALE * min(ranks))
    cheapest["data"]["max_seq_length"] = max_seq_length
    try:
        cfg = config_from_dict(cheapest, source="loralab tune")
        device = run_device(cfg.model.device)
        return estimate_run(cfg, device=device, throughput=partial(matmul_throughput, device),
                            mean_tokens=mean_tokens).time_per_step_s
    except LoralabError:  # a model the estimate cannot describe: no time, steps only
        return None


def quantization_for_memory(base: dict[str, Any], max_memory: int | None, dims: list[Dimension],
                            attention: list[str]) -> list[str]:
    """4-bit only where memory demands it: nf4 when the cheapest candidate (the smallest rank on
    the ``attention`` roles) does not fit ``max_memory`` unquantized but fits in nf4 (from
    ``loralab estimate``)."""
    if max_memory is None or "mode" in base.get("quant", {}):
        return []
    from loralab.config import config_from_dict
    from loralab.estimate import estimate_run

    cheapest = copy.deepcopy(base)
    ranks = next((d.values for d in dims if d.key == "lora.r"), [base["lora"].get("r", 8)])
    cheapest["lora"].update(r=min(ranks), alpha=SCALE * min(ranks), targets=attention)

    def total(mode: str) -> int:
        cheapest["quant"] = {"mode": mode}
        return estimate_run(config_from_dict(cheapest, source="loralab tune")).memory_bytes["total"]

    plain = total("none")
    if plain <= max_memory:
        return []
    quantized = total("nf4")
    if quantized > max_memory:
        raise ConfigError(f"--max-memory {max_memory / 2**30:.1f} GiB: even the cheapest candidate in nf4 needs "
                          f"{quantized / 2**30:.1f} GiB by loralab estimate (unquantized {plain / 2**30:.1f} GiB)")
    base["quant"] = {"mode": "nf4"}
    return [f"quant.mode nf4: unquantized the cheapest candidate needs {plain / 2**30:.1f} GiB by loralab estimate, "
            f"over --max-memory {max_memory / 2**30:.1f} GiB; in nf4 {quantized / 2**30:.1f} GiB"]


def study_file(plan: Plan, *, name: str, metric: str, goal: str) -> dict[str, Any]:
    """The phase-one study: every candidate, seed 1, ranked by successive halving."""
    tied: dict[str, str] = {}
    if "alpha" not in plan.base["lora"]:
        tied["lora.alpha"] = f"{SCALE} * lora.r"
    searched = {d.key for d in plan.dims}
    if "train.epochs" in searched:
        tied["train.max_steps"] = f"{plan.steps_per_epoch} * train.epochs"
    else:
        plan.base["train"]["max_steps"] = plan.max_steps
    return {
        "name": name,
        "description": f"loralab tune: {plan.candidates} candidates under successive halving (eta {ETA}), "
                       f"then the best {FINALISTS} with seeds {', '.join(map(str, EXTRA_SEEDS))} more.",
        "question": "Which LoRA settings are best for this model, data and budget, and by how much?",
        "claim": "The seeds: the effective learning rate matters most; rank matters less than alpha at a fixed lr; "
                 "all layers may buy quality at a memory cost; a second epoch can hurt.",
        "metric": metric, "goal": goal, "base": plan.base,
        "axes": {d.key: d.values for d in plan.dims}, "tied": tied,
        "findings": [{"kind": "axis_effect", "axis": d.key} for d in plan.dims] + [{"kind": "pareto"}],
    }


# ----------------------------------------------------------------------------- the answer


@dataclass
class Candidate:
    name: str
    axes: dict[str, Any]
    config: dict[str, Any]
    values: list[float]          # final metric per completed seed
    trainable_params: int | None
    peak_memory_bytes: int | None
    train_time_s: float | None
    run_dir: str | None

    @property
    def mean(self) -> float:
        return stats.mean(self.values)


def read_candidates(db: Path, name: str, metric: str, goal: str) -> tuple[list[Candidate], dict[str, Any]]:
    """Every completed configuration with its final metric per seed, best first, and the
    study's step accounting (read with loralab.study.results, as the findings read it)."""
    data = for_metric(read_study(db, name), metric, goal)
    searched = data.spec.get("axes") or {}
    cands = []
    for runs in repeat_groups(data.ok).values():  # one configuration's seeds, in the order they ran
        first = runs[0]
        cands.append(Candidate(
            name=first.name, axes={k: v for k, v in first.axes.items() if k in searched}, config=first.config,
            values=[r.value for r in runs], trainable_params=first.params, peak_memory_bytes=first.memory_bytes,
            train_time_s=sum(r.train_time_s or 0.0 for r in runs), run_dir=first.run_dir))
    steps = 0
    counts: dict[str, int] = {}
    for r in data.runs:
        if r.status == Status.COMPLETED:
            steps += r.config["train"]["max_steps"]
        elif r.stopped_at_step is not None:
            steps += r.stopped_at_step
        counts[r.status] = counts.get(r.status, 0) + 1
    time_s = sum(r.train_time_s or 0.0 for r in data.runs)
    sign = 1 if goal == "min" else -1
    ranked = sorted(cands, key=lambda c: sign * c.values[0])  # seed 1: what halving saw
    return ranked, {"steps": steps, "train_time_s": time_s, "counts": counts}


def recommend(cands: list[Candidate], goal: str) -> dict[str, Any]:
    """The recommendation the repeats support: the best mean among repeated finalists; runners-up
    whose difference's 95% interval includes 0 are within noise, and among those the cheapest
    (trainable parameters, then peak memory, then time) is recommended."""
    repeated = [c for c in cands if len(c.values) > 1]
    pool = repeated or cands[:1]
    sign = 1 if goal == "min" else -1
    best = min(pool, key=lambda c: sign * c.mean)
    sd, df = stats.pooled_sd([c.values for c in repeated])
    comparisons = []
    for c in pool:
        if c is best:
            continue
        diff = c.mean - best.mean
        half = _half_width(sd, df, math.sqrt(1 / len(c.values) + 1 / len(best.values)))
        comparisons.append({"name": c.name, "axes": c.axes, "mean": c.mean, "n": len(c.values), "diff": diff,
                            "ci_half_width": half, "within_noise": half is not None and abs(diff) <= half})
    near = [best] + [c for c, cmp in zip([c for c in pool if c is not best], comparisons, strict=True)
                     if cmp["within_noise"]]
    chosen = min(near, key=lambda c: (c.trainable_params or 0, c.peak_memory_bytes or 0, c.train_time_s or 0.0))
    # The finalists are the best FINALISTS by seed 1 (cands' order, as phase two chose them); a stop
    # or a failure can leave some short of their seeds, and a finalist with one seed is not compared.
    seeds = 1 + len(EXTRA_SEEDS)
    short = [c for c in cands[:FINALISTS] if len(c.values) < seeds]
    if not repeated:
        why = ("no finalist has repeats yet (the budget ran out before them): the best single run, not separable "
               "from seed noise")
    elif chosen is best and not comparisons:
        why = "the best mean over its seeds; no other finalist has repeats to compare it with"
    elif chosen is best:
        why = "the best mean over its seeds" + ("; no runner-up is within noise" if len(near) == 1 else
                                                "; the runners-up within noise are not cheaper")
    else:
        why = (f"within noise of the best mean ({best.name}) and cheaper: "
               f"{chosen.trainable_params:,} vs {best.trainable_params:,} trainable parameters")
    if repeated and short:
        why += (f" (finalists short of their {seeds} seeds: "
                + ", ".join(f"{c.name} {len(c.values)}" for c in short) + ")")
    half = _half_width(sd, df, 1 / math.sqrt(len(chosen.values)))
    return {"name": chosen.name, "axes": chosen.axes, "mean": chosen.mean, "n": len(chosen.values),
            "ci_half_width": half, "seed_sd": sd, "seed_df": df, "best_mean": best.name, "why": why,
            "within_noise": [c["name"] for c in comparisons if c["within_noise"]],
            "finalist_seeds": {c.name: len(c.values) for c in cands[:FINALISTS]},
            "comparisons": comparisons, "config": chosen.config, "run_dir": chosen.run_dir,
            "trainable_params": chosen.trainable_params, "peak_memory_bytes": chosen.peak_memory_bytes}


def effects(db: Path, name: str, metric: str, dims: list[str], sd: float | None, df: int) -> list[dict[str, Any]]:
    """What mattered: for each searched key, the spread of level means of the metric at the first
    rung (where every candidate has a value), against the seed noise (``sd`` with ``df`` degrees
    of freedom: the 95% t interval of the difference between the highest and lowest level mean)."""
    series = {run: s.get(metric, []) for run, s in read_series(db, name).items()}
    steps = [step for points in series.values() for step, _ in points]
    if not steps:
        return []
    first = min(steps)
    candidates = [r for r in read_study(db, name).runs if SEED_KEY not in r.axes]  # phase one: no repeats
    at_first = [(r, v) for r in candidates for step, v in series.get(r.name, []) if step == first]
    out = []
    for key in dims:
        levels: dict[str, list[float]] = {}
        for r, value in at_first:
            if math.isfinite(value):
                levels.setdefault(json.dumps(r.axes.get(key)), []).append(value)
        if len(levels) < 2:
            continue
        means = {k: stats.mean(v) for k, v in levels.items()}
        hi, lo = max(means, key=means.get), min(means, key=means.get)
        size = means[hi] - means[lo]
        half = _half_width(sd, df, math.sqrt(1 / len(levels[hi]) + 1 / len(levels[lo])))
        out.append({"key": key, "step": first, "effect": size, "ci_half_width": half,
                    "within_noise": half is not None and size <= half,
                    "levels": {k: {"mean": m, "n": len(levels[k])} for k, m in means.items()}})
    return sorted(out, key=lambda e: -e["effect"])


def _half_width(sd: float | None, df: int, scale: float) -> float | None:
    """The 95% t interval's half width from the seed noise, or None without repeats."""
    return None if sd is None else stats.t_half_width(sd, df, scale)


# ----------------------------------------------------------------------------- running it


def edge_notes(dims: list[Dimension], axes: dict[str, Any]) -> list[str]:
    """Searched numbers (learning rate, rank) whose recommended value is the end of the range
    tried: the best may lie beyond it, and the note says which --widen would look."""
    notes = []
    for d in dims:
        nums = sorted(v for v in d.values if is_number(v))
        if d.key == "train.epochs" or len(nums) < 2 or len(nums) != len(d.values) or axes.get(d.key) not in nums:
            continue  # epochs are capped by the data's size, not by the range
        value = axes[d.key]
        if value not in (nums[0], nums[-1]):
            continue
        largest = value == nums[-1]
        if largest and d.ceiling is not None and value >= d.ceiling:
            continue  # nothing larger means anything (a rank at the model's smallest matrix)
        neighbour = nums[-2] if largest else nums[1]
        beyond = value * value / neighbour  # one more step of the same ratio
        if largest and d.ceiling is not None:
            beyond = min(beyond, d.ceiling)
        beyond = round(beyond) if all(isinstance(v, int) for v in nums) else float(f"{beyond:.2g}")
        wider = [*nums, beyond] if largest else [beyond, *nums]
        notes.append(f"{d.key} = {value:g} is the {'largest' if largest else 'smallest'} value tried, so a "
                     f"{'larger' if largest else 'smaller'} one may do better: --widen {d.key}="
                     + ",".join(f"{v:g}" for v in wider))
    return notes


def _study(spec: dict[str, Any], root: Path, *, extra_runs: list[Any] | None = None):
    from loralab.study.spec import load_study

    path = root / "tune-study.yaml"
    write_atomic(path, yaml.safe_dump(spec, sort_keys=False), fsync=False)
    study = load_study(path, root=root)
    if extra_runs:
        study.runs += extra_runs
        study.place(root)
    return study


def repeat_runs(finalists: list[Candidate]) -> list[Any]:
    """The finalists again with EXTRA_SEEDS: run specs the study database takes beside phase one."""
    from loralab.study.spec import RunSpec

    runs = []
    for c in finalists:
        for seed in EXTRA_SEEDS:
            config = copy.deepcopy(c.config)
            config["train"]["seed"] = seed
            runs.append(RunSpec(name=f"{c.name}-s{seed}", axes={**c.axes, "train.seed": seed}, config=config))
    return runs


def _repeats_begun(db: Path, name: str, candidates: list[str]) -> bool:
    """Whether phase two has begun: the database holds repeats (runs with a seed axis), which are
    added only once every candidate has ended. A command whose space has candidates the database
    lacks is refused then: they would be searched after the finalists were chosen."""
    if not db.exists():
        return False
    try:
        runs = read_study(db, name).runs
    except LoralabError:  # no study of that name yet
        return False
    if not any(SEED_KEY in r.axes for r in runs):
        return False
    new = sorted(set(candidates) - {r.name for r in runs})
    if new:
        raise ConfigError(
            f"tune {name}: its finalists' repeats have begun, but this command searches candidates the tune "
            f"did not ({', '.join(new[:3])}{' ...' if len(new) > 3 else ''}); run the earlier command to "
            f"finish it, or give this one a new --name")
    return True


def run_tune(*, model: str, data: str, out: str = "runs", name: str = "tune", metric: str = "eval_loss",
             goal: str | None = None, fixed: dict[str, Any] | None = None, search: list[str] | None = None,
             widen: dict[str, list[Any]] | None = None, budget_s: float | None = None, budget_steps: int | None = None,
             max_memory: int | None = None,
             workers: int = 1, executor: str = "local", address: str | None = None,
             batch_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Plan, run both phases (resuming whatever an earlier invocation left), write the answer;
    ``progress``: each phase's bar of runs finished on stderr (terminals only)."""
    from loralab.paths import child_dir
    from loralab.study.backends.warm import warm_process
    from loralab.study.execute import Halving, run_study
    from loralab.study.steps import trained_on_changed_data

    goal = goal or ("min" if metric == "eval_loss" or metric.endswith(("loss", "perplexity")) else "max")
    root = child_dir(Path(out), name, what="tune name")
    # One warm process for both phases; it loads the libraries while the tune is planned.
    with warm_process(local=executor != "ray") as starter:
        plan = plan_tune(model=model, data=data, metric=metric, fixed=fixed or {}, search=search, widen=widen,
                         budget_steps=budget_steps, max_memory=max_memory, batch_size=batch_size, budget_s=budget_s)
        root.mkdir(parents=True, exist_ok=True)  # after the plan: a refused tune leaves nothing behind
        for note in plan.notes:
            log.info("tune %s: %s", name, note)
        spec = study_file(plan, name=name, metric=metric, goal=goal)
        write_atomic(root / "tune-plan.json", plan.to_json(), fsync=False)
        halving = (f"halving from step {plan.min_steps}" if plan.min_steps < plan.max_steps
                   else f"no halving (too few candidates or steps for a rung that leaves {FINALISTS} finalists)")
        log.info("tune %s: %d candidates, %d steps each, %s; planned %d optimizer steps (a full grid with repeats: "
                 "%d)", name, plan.candidates, plan.max_steps, halving, plan.planned_steps, plan.grid_steps)
        common = dict(workers=workers, executor=executor, address=address, max_memory=max_memory,
                      progress=progress, starter=starter)
        study = _study(spec, root)
        trained_on_changed_data(study, "tune")  # a tune run again on changed data: its candidates trained on the old
        db = root / "study.db"
        if _repeats_begun(db, name, [r.name for r in study.runs]):
            # Phase one ended in an earlier invocation. It is not run again: the scheduler plans every
            # unfinished run in the database, so the repeats a stop left pending or interrupted would
            # train under phase one's halving and be cut at its first rung.
            finished, spent = True, 0.0
        else:
            halving = (Halving(eta=ETA, min_steps=plan.min_steps)
                       if halving_schedule(plan.candidates, plan.max_steps)[1] else None)
            phase1 = run_study(study, root=root, halving=halving, budget_s=budget_s, **common)
            finished = phase1.get("budget_spent") is not True and not any(
                s in phase1["counts"] for s in (Status.PENDING, Status.INTERRUPTED, Status.PAUSED, Status.RUNNING))
            spent = phase1["wall_time_s"]
        cands, _ = read_candidates(db, name, metric, goal)
        if finished and cands:
            left = None if budget_s is None else max(0.0, budget_s - spent)
            study = _study(spec, root, extra_runs=repeat_runs(cands[:FINALISTS]))
            run_study(study, root=root, budget_s=left, **common)
    return write_answer(root, name=name, metric=metric, goal=goal, plan=plan)


def write_answer(root: Path, *, name: str, metric: str, goal: str, plan: Plan) -> dict[str, Any]:
    """best.yaml, tune.json and tune.md from the study database."""
    db = root / "study.db"
    cands, spent = read_candidates(db, name, metric, goal)
    if not cands:
        raise ConfigError(f"tune {name}: no candidate has completed yet, so there is nothing to recommend; run the "
                          f"same command again to continue (with a larger --budget), or see loralab study "
                          f"status {name}")
    rec = recommend(cands, goal)
    found = effects(db, name, metric, [d.key for d in plan.dims], rec["seed_sd"], rec["seed_df"])
    per_step = spent["train_time_s"] / spent["steps"] if spent["steps"] else None
    answer = {
        "tune": name, "metric": metric, "goal": goal, "recommended": rec, "effects": found,
        "compute": {"steps": spent["steps"], "train_time_s": spent["train_time_s"],
                    "grid_steps": plan.grid_steps,
                    "grid_train_time_s_estimate": per_step * plan.grid_steps if per_step else None,
                    "fraction_of_grid": spent["steps"] / plan.grid_steps if plan.grid_steps else None},
        "runs": spent["counts"], "plan": plan.to_json(), "edges": edge_notes(plan.dims, rec["axes"]),
        "adapter": str(RunDir(rec["run_dir"]).adapter) if rec["run_dir"] else None,
    }
    best = copy.deepcopy(rec["config"])
    best.get("output", {}).pop("dir", None)
    best["train"]["seed"] = 1
    best = with_absolute_paths(best)
    write_atomic(root / "best.yaml", f"# loralab tune {name}: {rec['why']}\n" + yaml.safe_dump(best, sort_keys=False),
                 fsync=False)
    write_atomic(root / "tune.json", answer, fsync=False)
    write_atomic(root / "tune.md", summary_text(answer), fsync=False)
    answer["best_yaml"] = str(root / "best.yaml")
    return answer


def with_absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config with its local model and data paths absolute, as a run's config.yaml has
    them (loralab.config.absolute_local_paths): best.yaml then trains from the tune's directory,
    where the paths the tune was given relative to the working directory name nothing."""
    from loralab.config import absolute_local_paths, config_from_dict

    cfg = config_from_dict(config, source="best.yaml")
    absolute_local_paths(cfg)
    for section, key in (("model", "path"), ("data", "path"), ("data", "val_path")):
        if key in config.get(section, {}):
            config[section][key] = getattr(getattr(cfg, section), key)
    if "tasks" in config.get("eval", {}):
        config["eval"]["tasks"] = cfg.eval.tasks
    return config


def _pm(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def summary_text(a: dict[str, Any]) -> str:
    """The answer a person reads in a minute."""
    rec = a["recommended"]
    lines = [f"# loralab tune {a['tune']}", "",
             f"Recommended: {', '.join(f'{k} = {v}' for k, v in rec['axes'].items()) or 'the base settings'} "
             f"(run {rec['name']}).",
             f"{a['metric']}: {rec['mean']:.4g} +/- {_pm(rec['ci_half_width'])} (95% interval, {rec['n']} seeds).",
             f"Why this one: {rec['why']}."]
    others = [n for n in rec["within_noise"] if n != rec["name"]]  # within noise of the best mean
    if others:
        lines.append(f"Within noise of it: {', '.join(others)}." if rec["name"] == rec["best_mean"] else
                     f"Also within noise of the best mean ({rec['best_mean']}): {', '.join(others)}.")
    seeds = rec.get("finalist_seeds") or {}
    if any(n < 1 + len(EXTRA_SEEDS) for n in seeds.values()):
        lines.append(f"Seeds per finalist (of {1 + len(EXTRA_SEEDS)}): "
                     + ", ".join(f"{name} {n}" for name, n in seeds.items())
                     + "; a finalist with one seed is not compared (loralab study status shows how each repeat "
                       "ended; the same command run again trains those still to run).")
    for c in rec["comparisons"]:
        if not c["within_noise"]:
            lines.append(
                f"{c['name']}: {c['diff']:+.4g} +/- {_pm(c['ci_half_width'])} from the best mean: beyond the noise.")
    lines += ["", "What mattered (level means at the first rung, all candidates):"]
    for e in a["effects"]:
        verdict = ("within noise" if e["within_noise"]
                   else ("beyond noise" if e["ci_half_width"] is not None else "no noise estimate"))
        lines.append(
            f"- {e['key']}: {e['effect']:.3g} +/- {_pm(e['ci_half_width'])} across the values tried ({verdict})")
    c = a["compute"]
    lines += ["", f"Compute: {c['steps']:,} optimizer steps ({c['train_time_s']:.0f} s of training); a full grid "
                  f"of the same space with the same repeats: {c['grid_steps']:,} steps"
                  + (f" ({c['fraction_of_grid']:.0%} of it spent)." if c["fraction_of_grid"] else ".")]
    for note in [*a["plan"]["notes"], *a.get("edges", [])]:
        lines.append(f"Note: {note}")
    lines += [f"Train it: loralab train {a.get('best_yaml', 'best.yaml')}", ""]  # from where tune ran
    return "\n".join(lines)
