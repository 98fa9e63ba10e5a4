"""The checks a study's runs would make before their first step, made for all of them at once,
before any run starts (``loralab study run`` and ``--dry-run``).

    report = preflight(study, max_memory=None)
    report.cannot_run    # {run name: [reason, ...]}: runs that would end invalid
    report.skipped       # {run name: reason}: runs the memory gate (--max-memory) would skip

Per run: the model (its directory, config.json and safetensors weights), the LoRA roles
against the architecture (the estimate's meta-device model, so nothing is loaded), the data
(every file read and parsed, as the run reads it), the evaluation tasks, the study metric
against the metrics the run will write, and the memory gate. Checks shared by runs (one model,
one dataset) run once. Runs already completed are not checked again. A run's own checks on the
meta-device model, which make that run invalid alone, are ``loralab.preflight``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.config import Config, config_from_dict
from loralab.errors import ConfigError, LoralabError
from loralab.rundir import RunDir, Status

log = logging.getLogger(__name__)

# The numbers every run writes to metrics.jsonl (loralab.train.core), besides its task metrics.
LOOP_METRICS = ("eval_loss", "train_loss", "lr", "grad_norm", "tokens_seen", "epoch")


@dataclass
class Preflight:
    """What the checks found: runs that cannot run (with every reason) and runs the memory gate skips."""

    checked: int = 0
    cannot_run: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def by_reason(self) -> dict[str, list[str]]:
        """{reason: [run names]}: one line per distinct problem, however many runs share it."""
        out: dict[str, list[str]] = {}
        for name, reasons in self.cannot_run.items():
            for reason in reasons:
                out.setdefault(reason, []).append(name)
        return out

    def text(self) -> str:
        """``N of M runs cannot run:`` and one line per reason with the runs it applies to."""
        lines = [f"{len(self.cannot_run)} of {self.checked} runs cannot run:"]
        for reason, names in self.by_reason().items():
            shown = (f"all {len(names)} runs" if len(names) == self.checked > 1 else
                     ", ".join(names[:6]) + (f", ... ({len(names)} runs)" if len(names) > 6 else ""))
            lines.append(f"  - {reason} [{shown}]")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "cannot_run": self.cannot_run, "skipped": self.skipped}


def preflight(study: Any, *, max_memory: int | None = None) -> Preflight:
    """Check every run of ``study`` (placed: each run's output.dir set) that is not completed yet;
    raises ConfigError when the study metric is one no run writes (with a did-you-mean)."""
    report = Preflight()
    produced: dict[str, set[str] | None] = {}
    done: dict[tuple, str | None] = {}  # a check shared by runs (one model, one dataset) runs once

    def once(check, *key: Any) -> str | None:
        if (check, *key) not in done:
            done[(check, *key)] = check(*key)
        return done[(check, *key)]

    for run in study.runs:
        if (RunDir(run.config["output"]["dir"]).read_summary() or {}).get("status") == Status.COMPLETED:
            continue
        report.checked += 1
        cfg = config_from_dict(run.config, source=f"run {run.name}")
        data = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
        reasons = [r for r in (once(model_problem, cfg.model.path, cfg.model.trust_remote_code),
                               once(roles_problem, cfg.model.path, tuple(cfg.lora.targets),
                                    "lora.targets" in study.axes),
                               once(data_problem, data, cfg.train.seed),
                               once(tasks_problem, tuple(cfg.eval.tasks))) if r]
        if reasons:
            report.cannot_run[run.name] = reasons
            continue
        produced[run.name] = run_metrics(cfg)
        gate = memory_gate(cfg, max_memory)
        if gate:
            report.skipped[run.name] = gate
    check_metric(study, produced, report)
    return report


def _problem(check) -> str | None:
    try:
        check()
    except LoralabError as exc:
        return str(exc)
    return None


def model_problem(path: str, trust_remote_code: bool) -> str | None:
    """The model directory (config.json, safetensors weights) and its config, as loading checks them."""
    from loralab.adapters import read_base_identity
    from loralab.models import resolve_model_path

    def check() -> None:
        resolve_model_path(path)
        read_base_identity(path, trust_remote_code=trust_remote_code, at={})  # its config; no weights sample

    return _problem(check)


def is_local(path: str) -> bool:
    return path.startswith("builtin:") or Path(path).expanduser().is_dir()


def roles_problem(path: str, targets: tuple[str, ...], axis: bool = False) -> str | None:
    """lora.targets against the architecture, on the estimate's meta-device model (local models;
    a hub id is checked when its run loads it). ``axis``: lora.targets is the study's question;
    an arm this architecture cannot take (query and value apart where one matrix holds q, k and
    v) is then not a mistake to fix before anything starts but that arm's answer on this model:
    the run is invalid here, as a rank above the model's matrices is, and the others train."""
    if not is_local(path):
        return None
    from loralab.estimate import describe_model, lora_modules
    from loralab.roles import FusedRolesError

    try:
        shape = describe_model(path)
    except LoralabError:
        return None  # the model check says what is wrong with it
    try:
        lora_modules(shape, list(targets))
    except FusedRolesError as exc:
        return None if axis else f"{exc} (model {path})"
    except LoralabError as exc:
        return f"{exc} (model {path})"
    return None


def data_problem(data_json: str, seed: int) -> str | None:
    """Every data file read and parsed as the run reads it (records and their fields)."""
    from loralab.config import DataConfig
    from loralab.data.dataset import split_records

    cfg = DataConfig(**json.loads(data_json))
    return _problem(lambda: split_records(cfg, seed=seed))


def tasks_problem(tasks: tuple[str, ...]) -> str | None:
    if not tasks:
        return None
    from loralab.evaluate.task_list import resolve_tasks

    return _problem(lambda: resolve_tasks(",".join(tasks), 1))


def run_metrics(cfg: Config) -> set[str] | None:
    """The metrics.jsonl keys a run of ``cfg`` writes: the loop's and ``task/metric`` per
    evaluation task; None when an lm-evaluation-harness task makes them known only at run time."""
    from loralab.evaluate.task_list import resolve_tasks

    names = set(LOOP_METRICS)
    for task in resolve_tasks(",".join(cfg.eval.tasks), 1) if cfg.eval.tasks else []:
        metrics = getattr(task, "metrics", None)
        if metrics is None:
            return None
        names |= {f"{task.name}/{m}" for m in metrics}
    return names


def check_metric(study: Any, produced: dict[str, set[str] | None], report: Preflight) -> None:
    """The study metric (and its other ``metrics``) against what the runs write: one no run
    writes is a ConfigError with a did-you-mean; runs that do not write it cannot run."""
    known = [names for names in produced.values() if names is not None]
    if not known or len(known) < len(produced):
        return  # nothing checked, or harness tasks whose metric names come at run time
    every = set().union(*known)
    for metric in [study.metric, *study.metrics]:
        if metric not in every:
            close = difflib.get_close_matches(metric, sorted(every), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{study.source}: metric {metric!r} is not written by any run of study {study.name}{hint}; "
                f"its runs write {', '.join(sorted(every))} "
                "(add evaluation tasks with eval.tasks for task/metric keys)")
        for name, names in produced.items():
            if names is not None and metric not in names:
                report.cannot_run.setdefault(name, []).append(
                    f"does not write the study metric {metric} (its eval.tasks do not produce it)")


def memory_gate(cfg: Config, max_memory: int | None) -> str | None:
    """Why --max-memory would skip the run (its estimate is over it), or None."""
    if max_memory is None:
        return None
    from loralab.estimate import estimate_run
    from loralab.study.scheduler import run_device

    try:
        est = estimate_run(cfg, device="cpu" if run_device(cfg.model.device) == "cpu" else "cuda")
    except LoralabError:
        return None  # a model the estimate cannot describe runs unestimated
    total = est.memory_bytes["total"]
    if total <= max_memory:
        return None
    return f"estimated memory {total / 2**30:.2f} GiB is over --max-memory {max_memory / 2**30:.2f} GiB"
