"""What each run of a study will train, said before it trains: optimizer steps, tokens, time.

    plan = step_plan(study)
    plan.lines()     # ["every run: 2 optimizer steps (165 examples at batch 128, 1 epoch)
                     #   instead of the seed's about 390, ..."]
    plan.warning()   # below FLOOR_STEPS: why the study cannot answer, and the fix

``loralab study run`` and its ``--dry-run`` print these before any compute is spent. Steps
come from the run's own config and data as ``loralab train`` counts them (the data resolved by
``loralab.resolve.resolve_data``, steps by ``loralab.train.step.plan_steps``); the seed's step
count is ``seed.steps`` of the study file where the seed states it. The time is a lower bound:
``loralab estimate``'s FLOPs at this machine's measured matmul rate, evaluations not counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from loralab.config import Config, config_from_dict
from loralab.errors import ConfigError, LoralabError
from loralab.rundir import RunDir, Status
from loralab.units import human_duration

# (training examples, mean tokens per example, resolved max_seq_length, loralab.data.dataset.fingerprint)
DataFacts = tuple[int, float, int, dict[str, Any]]

FLOOR_STEPS = 20  # below this, a run has barely left its initialisation and settings cannot be told apart


@dataclass
class RunSteps:
    """One run's training, counted before it starts."""

    name: str
    steps: int  # optimizer steps
    examples: int  # training examples after filtering and the validation split
    batch_size: int
    epochs: float
    max_steps: int | None  # train.max_steps when it decides the steps
    tokens: int  # tokens the run trains on (steps x batch x mean example length)
    seconds: float | None  # lower bound on its training time on this machine

    def describe(self, seed_steps: int | None = None) -> str:
        """"2 optimizer steps (165 examples at batch 128, 1 epoch) instead of the seed's about 390,
        about 41k tokens"."""
        how = (f"train.max_steps {self.max_steps}" if self.max_steps
               else f"{self.examples} examples at batch {self.batch_size}, {self.epochs:g} "
                    f"epoch{'s' * (self.epochs != 1)}")
        seed = f" instead of the seed's about {seed_steps}" if seed_steps else ""
        return f"{self.steps} optimizer step{'s' * (self.steps != 1)} ({how}){seed}, about {_count(self.tokens)} tokens"


@dataclass
class StepPlan:
    runs: list[RunSteps]  # the runs that will train
    seed_steps: int | None  # the seed's optimizer steps per run, where the study file states them
    invalid: dict[str, str] = field(default_factory=dict)  # run name -> why it is invalid here (loralab.preflight)
    completed: int = 0  # runs already completed (a study run again): not planned, not checked again

    @property
    def seconds(self) -> float | None:
        times = [r.seconds for r in self.runs]
        return None if not times or any(t is None for t in times) else sum(times)  # type: ignore[misc]

    def lines(self) -> list[str]:
        """Each run's steps and tokens (one line when every run trains alike), against the seed's
        steps, and the time of the whole study."""
        if not self.runs:
            if not self.completed:
                return ["no run can train here"]
            if not self.invalid:
                return [f"every run already completed ({self.completed})"]
            return [f"every run that can train here already completed ({self.completed}); the other "
                    f"{len(self.invalid)} cannot train here"]
        alike = {(r.steps, r.examples, r.batch_size, r.epochs, r.max_steps) for r in self.runs}
        if len(alike) == 1:
            out = [f"every run: {self.runs[0].describe(self.seed_steps)}"]
        else:
            out = [f"{r.name}: {r.describe(self.seed_steps)}" for r in self.runs]
        total = self.seconds
        steps = sum(r.steps for r in self.runs)
        out.append(f"the study: {len(self.runs)} runs to train, {steps} optimizer steps, about "
                   f"{_count(sum(r.tokens for r in self.runs))} "
                   "tokens" + (f"; at least about {human_duration(total)} of training on this machine (a lower bound: "
                               "evaluations and start-up not counted)" if total is not None else ""))
        return out

    def invalid_lines(self) -> list[str]:
        """The runs that would be recorded invalid (never in a fused group), with their reason."""
        return [f"{name}: invalid here, will not train: {why}" for name, why in self.invalid.items()]

    def warning(self) -> str | None:
        """Why the study cannot answer when its runs train fewer than FLOOR_STEPS steps, and the fix."""
        short = [r for r in self.runs if r.steps < FLOOR_STEPS]
        if not short or not self.runs:
            return None
        r = min(short, key=lambda x: x.steps)
        if r.max_steps:
            fix = f"raise train.max_steps to at least {FLOOR_STEPS} (--set train.max_steps={FLOOR_STEPS})"
        else:
            per_epoch = r.examples * r.epochs
            fixes = []
            if per_epoch >= FLOOR_STEPS:  # a batch small enough exists
                batch = 2 ** int(math.log2(per_epoch // FLOOR_STEPS))
                fixes.append(
                    f"a smaller batch (--set train.batch_size={batch} gives {math.ceil(per_epoch / batch)} steps)")
            fixes.append(f"more data (at least {math.ceil(FLOOR_STEPS * r.batch_size / r.epochs)} examples at batch "
                         f"{r.batch_size})")
            fixes.append(f"more epochs (--set train.epochs={math.ceil(FLOOR_STEPS * r.batch_size / r.examples)})")
            fix = ", ".join(fixes[:-1]) + f", or {fixes[-1]}"
        return (f"{len(short)} of {len(self.runs)} runs train fewer than {FLOOR_STEPS} optimizer steps (fewest: "
                f"{r.name}, {r.describe(self.seed_steps)}): too few for the study to tell its settings apart. "
                f"Fix: {fix}")

    def to_json(self) -> dict[str, Any]:
        return {"runs": [r.__dict__ for r in self.runs], "seed_steps": self.seed_steps, "invalid": self.invalid,
                "completed": self.completed,
                "seconds_lower_bound": self.seconds, "floor": FLOOR_STEPS, "warning": self.warning()}


def refuse_changed_data(study: str, changed: dict[str, tuple[dict[str, Any], dict[str, Any]]],
                        command: str = "study run") -> None:
    """ConfigError naming the runs of ``study`` that trained on other examples than their data
    gives now (``changed``: run name -> (the examples it trained on, those its data settings give
    now)); none: nothing. ``command``: the loralab command that starts afresh with --name."""
    from loralab.data.dataset import fingerprint_change

    if not changed:
        return
    then, now = next(iter(changed.values()))
    raise ConfigError(
        f"study {study!r}: run{'s' * (len(changed) > 1)} {', '.join(changed)} trained on other examples than the "
        f"data gives now ({fingerprint_change(then, now)}): the data file or the tokenizer changed since, and the "
        f"study's results would mix two datasets (a run stopped part-way would resume on the new examples); start "
        f"afresh with `loralab {command} ... --name NEW_NAME` (or another --out root), or put the data back")


def trained_on(run_dir: str | None, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The examples a run trained on (loralab.data.dataset.fingerprint): its summary's where it
    completed, else its newest checkpoint's; None where neither recorded them."""
    from loralab.train.checkpoint import complete_checkpoints, recorded_data

    if summary.get("status") == Status.COMPLETED:
        return summary.get("data")
    checkpoints = complete_checkpoints(RunDir(run_dir).checkpoints) if run_dir else []
    return recorded_data(checkpoints[-1]) if checkpoints else None


def changed_data(spec: Any, then: dict[str, Any] | None, cache: dict[str, DataFacts]) -> tuple[dict, dict] | None:
    """(``then``, the examples the run's data settings give now) where they differ; None where they
    agree or cannot be compared (nothing recorded, the model or data moved)."""
    if not then:
        return None
    try:
        now = _data(config_from_dict(spec.config, source=f"run {spec.name}"), cache)[3]
    except LoralabError:
        return None
    return None if now == then else (then, now)


def _summaries(study: Any):
    """(spec, its run directory or None, its summary.json or {}) for every run of ``study``."""
    for spec in study.runs:
        out = spec.config.get("output", {}).get("dir")
        yield spec, out, (RunDir(out).read_summary() or {}) if out else {}


def trained_on_changed_data(study: Any, command: str = "study run",
                            cache: dict[str, DataFacts] | None = None) -> None:
    """Refuse (refuse_changed_data) ``study`` where a run that completed, or stopped part-way with
    a checkpoint, trained on other examples than its data gives now. ``cache``: shared with
    step_plan, so each distinct data setting is read once."""
    cache = {} if cache is None else cache
    changed = {spec.name: found for spec, out, summary in _summaries(study)
               if (found := changed_data(spec, trained_on(out, summary), cache))}
    refuse_changed_data(study.name, changed, command)


def step_plan(study: Any, cache: dict[str, DataFacts] | None = None) -> StepPlan:
    """Every run's steps, tokens and time, from its config and data (tokenizer and data read once
    per distinct model and data settings, ``cache`` across calls; no weights load). Completed
    runs are counted, not planned: trained_on_changed_data checks their examples."""
    from loralab.errors import DataError, ModelError
    from loralab.preflight import check_run
    from loralab.study.scheduler import run_device

    data_cache: dict[str, DataFacts] = {} if cache is None else cache
    runs, invalid, completed = [], {}, 0
    for spec, _, summary in _summaries(study):
        if summary.get("status") == Status.COMPLETED:
            completed += 1  # as preflight: a completed run is not checked again (its model may have moved)
            continue
        cfg = config_from_dict(spec.config, source=f"run {spec.name}")
        try:  # the scheduler's own check (such a run never trains), then the run's data
            check_run(cfg, device=run_device(cfg.model.device))
            n_train, mean_len, seq, _ = _data(cfg, data_cache)
        except (ConfigError, ModelError, DataError) as exc:
            invalid[spec.name] = str(exc)
            continue
        from loralab.train.step import plan_steps

        steps = plan_steps(cfg, n_train)
        runs.append(RunSteps(name=spec.name, steps=steps, examples=n_train, batch_size=cfg.train.batch_size,
                             epochs=cfg.train.epochs, max_steps=cfg.train.max_steps or None,
                             tokens=round(steps * cfg.train.batch_size * mean_len),
                             seconds=_seconds(cfg, seq, steps, mean_len)))
    return StepPlan(runs=runs, seed_steps=study.seed.get("steps"), invalid=invalid, completed=completed)


def _data(cfg: Config, cache: dict[str, DataFacts]) -> DataFacts:
    """(training examples, mean tokens per example, resolved max_seq_length, the examples'
    loralab.data.dataset.fingerprint) of a run's data."""
    from loralab.data.dataset import fingerprint
    from loralab.estimate import load_model_config, resolve_model_config
    from loralab.models import load_tokenizer
    from loralab.resolve import resolve_data

    key = json.dumps([cfg.model.path, cfg.to_dict()["data"], cfg.train.seed], sort_keys=True, default=str)
    if key not in cache:
        tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        splits = resolve_data(cfg, tokenizer, load_model_config(resolve_model_config(cfg.model.path)))
        mean = sum(len(e.input_ids) for e in splits.train) / len(splits.train)
        cache[key] = (len(splits.train), mean, int(cfg.data.max_seq_length), fingerprint(splits))
    return cache[key]


def _seconds(cfg: Config, seq: int, steps: int, mean_len: float) -> float | None:
    from dataclasses import replace

    from loralab.estimate import estimate_run, matmul_throughput
    from loralab.study.scheduler import run_device

    try:
        device = run_device(cfg.model.device)
        est = estimate_run(replace(cfg, data=replace(cfg.data, max_seq_length=seq)), device=device,
                           throughput=partial(matmul_throughput, device), mean_tokens=mean_len)
    except LoralabError:
        return None
    return est.time_per_step_s * steps if est.time_per_step_s is not None else None


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"
