"""loralab from Python: the command line's operations, for notebooks and scripts.

    from loralab import api

    cfg = api.load_config("run.yaml", lora={"r": 16}, train={"max_steps": 50})
    result = api.train(cfg, out="runs/r16", track=["tensorboard"])
    result.status, result.final_eval_loss, result.run_dir, result.adapter
    result.metrics                       # metrics.jsonl as a list of dicts
    result.metrics_frame()               # ... as a pandas DataFrame (pandas installed)

    api.evaluate("builtin:tiny", adapters=[result.run_dir], tasks="arithmetic_2ds", limit=50)
    api.estimate(cfg, budget="24GB").memory_bytes["total"]

    study = api.Study("preset:rank_alpha_grid", quick=True, out="runs")
    study.run(workers=2)                 # again later: study.resume() runs what is left
    study.status()                       # one dict per run
    study.report()                       # shown inline in a notebook; .html is the file

Everything raises loralab's exception types (loralab.errors: ConfigError, DataError,
ModelError, ...) with the messages the command line prints. Reference: docs/python-api.md.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.config import Config, apply_overrides, config_from_dict, override_origins, read_yaml
from loralab.errors import ConfigError, LoralabError
from loralab.rundir import RunDir, check_fresh_run_dir, run_dir_of

__all__ = ["Report", "Study", "TrainResult", "estimate", "evaluate", "load_config", "train"]

ConfigSource = str | Path | dict[str, Any] | Config | None


def load_config(source: ConfigSource = None, *, overrides: list[str] | None = None,
                **sections: dict[str, Any]) -> Config:
    """A checked Config from a YAML path, a nested dict or a Config, then ``sections``
    (``lora={"r": 16}``) and ``overrides`` (``["lora.r=16"]``, as ``--set``) on top.

    Raises ConfigError naming every bad key, as ``loralab train`` does."""
    if isinstance(source, Config):
        raw, label = source.to_dict(), "config"
    elif isinstance(source, dict):
        raw, label = source, "config"
    elif source is not None:
        raw, label = read_yaml(source), str(source)
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    else:
        raw, label = {}, "config"
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for section, values in sections.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}= must be a dict of keys, e.g. lora={{'r': 16}} (got {values!r})")
        current = raw.get(section)
        raw[section] = {**(current if isinstance(current, dict) else {}), **values}
    # a problem is blamed on where its key came from: the keyword argument, the override, else the source
    origins = {f"{section}.{key}": f"{section}={{{key!r}: {value!r}}}" for section, values in sections.items()
               for key, value in values.items()}
    return config_from_dict(apply_overrides(raw, list(overrides or [])), source=label,
                            origins={**origins, **override_origins(list(overrides or []))})


def _summary_field(key: str) -> property:
    """A read-only attribute that is summary.json's ``key`` (None when the run did not record it)."""
    return property(lambda self: self.summary.get(key), doc=f"the run summary's {key} (None when absent)")


@dataclass
class TrainResult:
    """What a run left: its summary.json fields, its directory and its adapter."""

    summary: dict[str, Any]
    run_dir: Path

    @property
    def status(self) -> str:
        return str(self.summary.get("status"))

    @property
    def adapter(self) -> Path | None:
        """The PEFT adapter directory (load it with loralab.adapters.load_adapter or PEFT)."""
        path = RunDir(self.run_dir).adapter
        return path if path.is_dir() else None

    final_eval_loss = _summary_field("final_eval_loss")
    best_eval_loss = _summary_field("best_eval_loss")
    tokens_per_s = _summary_field("tokens_per_s")
    peak_memory_bytes = _summary_field("peak_memory_bytes")
    trainable_params = _summary_field("trainable_params")
    total_params = _summary_field("total_params")
    wall_time_s = _summary_field("wall_time_s")

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl, one dict per line (train lines and evaluation lines)."""
        from loralab.track import read_metrics

        return read_metrics(RunDir(self.run_dir).metrics)

    def metrics_frame(self):
        """metrics.jsonl as a pandas DataFrame (pandas is optional: pip install pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise LoralabError(
                "metrics_frame() needs pandas (pip install pandas); .metrics is the same as a list") from None
        return pd.DataFrame(self.metrics)


def train(config: ConfigSource = None, *, out: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, force: bool = False, track: list[str] | str | None = None,
          show_progress: bool = False, overrides: list[str] | None = None,
          **sections: dict[str, Any]) -> TrainResult:
    """One run, as ``loralab train``: ``config`` as load_config takes it, ``out`` the run
    directory, ``track`` trackers (tensorboard, mlflow, wandb). ``resume=True`` continues
    ``out`` (or the config's output.dir) from its newest checkpoint with its config.yaml and the
    checks of ``loralab train --resume``: ``overrides`` may change only what a resume may
    (loralab.train.resume.RESUME_MAY_CHANGE), and another base than the one the run trained on
    is refused unless ``force=True``. A directory that holds an earlier run's adapter or
    checkpoints is refused (a notebook cell run again would replace it) unless ``overwrite=True``.

    A failed run raises its LoralabError after writing summary.json, as the CLI does."""
    from loralab.train.loop import train as train_run

    extra = list(overrides or [])
    if out is not None:
        extra.append(f"output.dir={out}")
    if track:
        extra.append(f"tracking.backends=[{track if isinstance(track, str) else ','.join(track)}]")
    if resume:
        from loralab.train.resume import resume_config

        if sections:
            raise ConfigError(f"api.train(resume=True) takes the config from the run directory; give "
                              f"{', '.join(f'{k}=' for k in sections)} as overrides=['section.key=value'] (only "
                              "what a resume may change: when to stop, log or checkpoint)")
        run_dir = Path(out) if out is not None else Path(load_config(config).output.dir or "")
        cfg = resume_config(run_dir, extra, force=force, force_how="force=True", set_how="overrides=['{}']")
    else:
        if force:
            raise ConfigError("api.train: force=True is for a resume on another base (resume=True)")
        cfg = load_config(config, overrides=extra, **sections)
    if cfg.distributed.nproc > 1:
        raise ConfigError(f"distributed.nproc {cfg.distributed.nproc}: a run on several processes is launched by "
                          "the command line (loralab train CONFIG, or torchrun); loralab.api.train trains in this "
                          "process: set distributed.nproc=1")
    if not resume:
        run = RunDir(run_dir_of(cfg))
        check_fresh_run_dir(run, overwrite=overwrite, resume_how=f"api.train(out={str(run.root)!r}, resume=True)",
                            other_how="another out", overwrite_how="overwrite=True")
    summary = train_run(cfg, show_progress=show_progress, resume=resume)
    return TrainResult(summary=summary, run_dir=Path(summary["run_dir"]))


def evaluate(model: str | Path = "builtin:tiny", *, adapters: list[str | Path] | None = None,
             tasks: str | list[str] = "arithmetic_2ds,arithmetic_4ds,world_mc,world_pairs",
             limit: int | None = None, batch_size: int = 16, force: bool = False) -> list[dict[str, Any]]:
    """Score the base and each adapter (run or adapter directory) on tasks, as ``loralab eval``:
    one dict per (model, task, metric) with value, ci_low, ci_high, n. An adapter recorded for
    another base is refused (ModelError) unless ``force``."""
    from loralab.errors import DataError
    from loralab.evaluate.score import evaluate as evaluate_models
    from loralab.evaluate.task_list import resolve_tasks
    from loralab.preflight import check_adapter_base

    if limit is not None and limit < 1:
        raise DataError("--limit must be a positive integer")
    if batch_size < 1:
        raise DataError("--batch-size must be a positive integer")
    names = tasks if isinstance(tasks, str) else ",".join(tasks)
    for adapter in adapters or []:
        check_adapter_base(adapter, str(model), force=force, force_how="force=True",
                           fix="pass model= with the adapter's base")
    return evaluate_models(str(model), [str(a) for a in adapters or []], resolve_tasks(names, limit),
                           batch_size=batch_size)


def estimate(config: ConfigSource = None, *, budget: str | None = None, device: str | None = None,
             grad_checkpointing: bool = False, throughput: float | None = None,
             overrides: list[str] | None = None, **sections: dict[str, Any]):
    """Memory (and, with ``throughput`` FLOP/s, time) of a run before running it, as
    ``loralab estimate``; ``budget`` ("24GB") adds whether it fits and the largest micro batch."""
    from loralab.estimate import estimate_run
    from loralab.units import parse_bytes

    cfg = load_config(config, overrides=overrides, **sections)
    return estimate_run(cfg, grad_checkpointing=grad_checkpointing, throughput=throughput, device=device,
                        budget_bytes=parse_bytes(budget) if budget is not None else None)


@dataclass
class Report:
    """A written study report; a notebook shows it inline (in a frame of its own)."""

    html: Path
    markdown: Path
    findings: list[dict[str, Any]]
    pngs: list[Path] = field(default_factory=list)

    def _repr_html_(self) -> str:
        page = self.html.read_text(encoding="utf-8")
        return (f"<iframe srcdoc=\"{html.escape(page, quote=True)}\" style=\"width:100%;height:640px;border:0\" "
                f"title=\"{html.escape(self.html.name)}\"></iframe>")

    def open(self) -> bool:
        """Open report.html in the user's web browser."""
        import webbrowser

        return webbrowser.open(self.html.resolve().as_uri())


class Study:
    """A study file or ``preset:NAME``, expanded and checked, with its directory under ``out``.

    ``track`` sends every run to trackers (the study is their experiment, the axes tags)."""

    def __init__(self, source: str | Path, *, quick: bool = False, out: str | Path = "runs",
                 model: str | None = None, data: str | None = None, overrides: list[str] | None = None,
                 track: list[str] | str | None = None):
        from loralab.paths import child_dir

        extra = list(overrides or [])
        if track:
            extra.append(f"tracking.backends=[{track if isinstance(track, str) else ','.join(track)}]")
        self._source = {"source": source, "quick": quick, "model": model, "data": data, "overrides": extra}
        self._load(local=True)
        self.name = self.spec.name
        self.root = child_dir(Path(out), self.name, what="study name").resolve()
        self.spec.place(self.root)

    def _load(self, *, local: bool) -> None:
        """Expand and check the study, planned for this machine (``local``) or for Ray's workers."""
        from loralab.study.spec import load_study
        from loralab.track import track_study

        self.spec = load_study(**self._source, local=local)
        track_study(self.spec)

    @property
    def runs(self) -> list[dict[str, Any]]:
        """Each run's name and axis values."""
        return [{"name": r.name, **r.axes} for r in self.spec.runs]

    @property
    def database(self) -> Path:
        return self.root / "study.db"

    def run(self, *, workers: int = 1, executor: str = "local", retries: int = 1, retry_failed: bool = False,
            fuse: bool = True, max_memory: str | None = None, budget_s: float | None = None) -> dict[str, Any]:
        """Run what is not done yet, as ``loralab study run``; returns counts per status. ``fuse``
        as the command line's default: runs that share a base train in one process where they
        fit (``fuse=False``: each alone, as ``--no-fuse``)."""
        from loralab.study.execute import run_study
        from loralab.track import prepare_study_trackers
        from loralab.units import parse_bytes

        limit = parse_bytes(max_memory, "--max-memory") if max_memory else None
        if executor == "ray":  # planned for Ray's workers, which may multiply bf16 where this CPU does not
            self._load(local=False)
            self.spec.place(self.root)
        prepare_study_trackers(self.spec)
        return run_study(self.spec, root=self.root, workers=workers, executor=executor, retries=retries,
                         retry_failed=retry_failed, fuse=fuse, max_memory=limit, budget_s=budget_s)

    def resume(self, **kwargs: Any) -> dict[str, Any]:
        """Finish an interrupted or budget-limited study: finished runs are skipped, interrupted
        runs continue from their newest checkpoint (same arguments as run)."""
        return self.run(**kwargs)

    def status(self) -> list[dict[str, Any]]:
        """One dict per run: name, status, axis values, the study metric, time and memory."""
        from loralab.study.results import run_rows
        from loralab.study.store import Store

        if not self.database.is_file():
            raise ConfigError(f"no study {self.name!r} under {self.root.parent} ({self.database} does not exist); "
                              "run it first")
        with Store(self.database, readonly=True) as store:
            return run_rows(store, store.study_id(self.name), self.spec.metric)

    def report(self, dest: str | Path | None = None) -> Report:
        """Write the HTML and Markdown report (``loralab study report``); returns it."""
        from loralab.study.report import write_report

        if not self.database.is_file():
            raise ConfigError(f"no study {self.name!r} under {self.root.parent} ({self.database} does not exist)")
        paths = write_report(self.database, self.name, Path(dest) if dest else self.root / "report")
        return Report(html=Path(paths["html"]), markdown=Path(paths["markdown"]),
                      findings=json.loads(Path(paths["findings"]).read_text(encoding="utf-8")),
                      pngs=[Path(p) for p in paths["pngs"]])
