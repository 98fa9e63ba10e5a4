"""A run directory: its layout, its statuses, its summary, and the one atomic-write helper.

    from loralab.rundir import RunDir, Status, atomic_dir, write_atomic
    run = RunDir("runs/r1")
    run.summary        # runs/r1/summary.json
    write_atomic(run.summary, {"status": Status.COMPLETED})
    with atomic_dir(run.adapter) as tmp:   # a directory: filled beside, renamed whole
        model.save_pretrained(tmp)

Every file or directory loralab writes for another reader (a run's files, checkpoints,
adapters, reports, exports) goes through ``write_atomic`` or ``atomic_dir``: a reader, or a
run resumed after a kill, sees the old version or the new one, never half of one.

Layout (every module that reads or writes a run goes through these names)::

    config.yaml        the resolved config, written before step 0
    summary.json       status and measurements; written at the start (running) and at the end
    metrics.jsonl      one JSON object per line: train/eval rows and events
    adapter/           the trained adapter, PEFT format (completed and paused runs)
    checkpoints/       step-000120/ ... resumable checkpoints (loralab.train.checkpoint)
    train.log          a study's run process: its stderr (fused.log for a fused group's process)
    quickstart.json    ``loralab quickstart``: accuracy before and after
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train.log"
FUSED_LOG = "fused.log"
QUICKSTART = "quickstart.json"


CHECKPOINT_GLOB = "step-*"  # every checkpoint folder under checkpoints/


def checkpoint_name(step: int) -> str:
    """A checkpoint's folder under checkpoints/: step-000120."""
    return f"step-{step:06d}"


def checkpoint_step_of(path: Path) -> int:
    """The step a checkpoint folder holds: step-000120 -> 120."""
    return int(path.name.rsplit("-", 1)[-1])


class Status(str, Enum):
    """Why a run ended (or that it has not): the strings summary.json, the study store and the
    report read. A ``str`` Enum, so ``Status.COMPLETED == "completed"`` and JSON writes the string.
    PENDING and SKIPPED are the study driver's words (study.db), never a run's own; INTERRUPTED is
    both (a run stopped by SIGINT or a killed rank, or one a stopped driver left running)."""

    PENDING = "pending"  # in a study, not started yet
    RUNNING = "running"
    COMPLETED = "completed"
    PAUSED = "paused"  # train.stop_at_step reached; resumable
    INVALID = "invalid"  # bad config, data or model found before the first step
    FAILED = "failed"
    DIVERGED = "diverged"  # non-finite loss or gradient with train.on_nonfinite=stop
    OUT_OF_MEMORY = "out_of_memory"
    STOPPED_EARLY = "stopped_early"  # pruned by successive halving
    INTERRUPTED = "interrupted"  # its process or the study driver died; run again (resumes)
    SKIPPED = "skipped"  # not started: the estimate says it does not fit --max-memory

    def __str__(self) -> str:
        return self.value


# Statuses after which nothing is left to train: a resume returns the summary as it is.
FINAL = frozenset({Status.COMPLETED, Status.DIVERGED, Status.STOPPED_EARLY})


@dataclass
class RunSummary:
    """What a run measured: summary.json's fields for a completed, paused or stopped-early run
    (besides status, error, run_dir, versions and trust_remote_code, written at the start).
    Solo runs and members of a fused group report the same fields with the same meanings."""

    steps: int  # optimizer steps planned (train.max_steps, or epochs x examples / batch)
    steps_done: int  # optimizer steps taken so far (== steps when completed)
    skipped_steps: int  # steps skipped as non-finite (train.on_nonfinite=skip)
    resumed_from_step: int | None  # the checkpoint step this session started from; None without resume
    checkpoint: str | None  # the newest checkpoint written or resumed from
    micro_batch_size: int  # in force at the end (auto_micro_batch may have halved it)
    micro_batch_changes: list[dict[str, int]]  # {"step", "from", "to"} per halving
    packed_attention: str | None  # "per_example", "block_mask", or None unpacked
    train_examples: int
    val_examples: int
    dropped_by_length_filter: int
    truncated_to_no_response: int
    data_stats: dict[str, Any]  # loralab.data.dataset Splits.stats: sizes, token lengths, truncation
    data: dict[str, Any] | None  # loralab.data.dataset.fingerprint of its examples (None: resumed from an older run)
    final_eval_loss: float | None  # None when never evaluated (no validation examples) or not finite
    best_eval_loss: float | None
    final_eval_tasks: dict[str, float]
    best_eval_tasks: dict[str, float]
    wall_time_s: float  # this run's wall time (its equal share of a group's), all sessions
    train_time_s: float  # time in training steps (its share in a group)
    train_cpu_time_s: float  # CPU seconds of training: steadier than wall time on a shared machine
    tokens_seen: int
    tokens_per_s: float  # tokens_seen / train_time_s
    peak_memory_bytes: int  # the process's peak (CUDA: reserved + context; CPU: RSS); a group shares one
    trainable_params: int
    total_params: int
    device: str
    dtype: str  # the base's dtype (model.dtype resolved: "bf16" where auto found native bf16); adapters are fp32
    dtype_reason: str  # why: "set in the config" (and whether this CPU emulates it), or what auto found
    compiled: bool  # decoder layers trained compiled (train.compile)
    compile_reason: str  # why, or why not ("auto: 40,960 tokens planned, compiled from 1,000,000 on cpu")
    compile_time_s: float  # this session's compile, probe step included; not part of train_time_s
    extra: dict[str, Any] = field(default_factory=dict)  # "fused": the group's shared figures

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {**out, **out.pop("extra")}


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    @property
    def log(self) -> Path:
        return self.root / TRAIN_LOG

    @property
    def fused_log(self) -> Path:
        return self.root / FUSED_LOG

    @property
    def quickstart(self) -> Path:
        return self.root / QUICKSTART

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json as a dict; None when it is missing or unreadable."""
        try:
            return json.loads(self.summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def prompt_template(self) -> str | None:
        """The prompt template the run trained with: chat for a run on chat data, else its
        data.template; None where the folder is no loralab run (a plain PEFT adapter)."""
        import yaml

        trained_on = ((self.read_summary() or {}).get("data_stats") or {}).get("format")
        if trained_on == "messages":
            return "chat"
        try:
            config = yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return None
        data = config.get("data") if isinstance(config, dict) else None
        return data.get("template") if isinstance(data, dict) else None


def default_run_dir(model_path: str) -> Path:
    """runs/<model name>-<date>-<time>: where a run without output.dir is written."""
    stem = Path(model_path.replace("builtin:", "")).name or "model"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir_of(cfg) -> Path:
    """A run config's directory: ``output.dir``, or :func:`default_run_dir` of its model."""
    return Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg.model.path)


def write_atomic(path: str | Path, data: str | bytes | dict | list, *, fsync: bool = True) -> None:
    """Write ``data`` so a reader never sees half a file: a temporary beside ``path``, flushed
    and fsynced, then renamed over it. str is written as UTF-8, bytes as they are, a dict or
    list as indented JSON (NaN stays NaN; other objects as ``str``)."""
    path = Path(path)
    if isinstance(data, (dict, list)):
        data = json.dumps(data, indent=2, default=str)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(payload)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Write a directory so a reader never sees half of it: the block fills a temporary beside
    ``path`` (``.tmp-NAME-PID``, left over only by a kill and removed by the next write of
    ``path``), which then replaces ``path`` whole (an existing ``path`` is removed first, with
    :func:`remove_tree`). With ``fsync`` every file, the directory and its parent reach the disk
    before and after the rename. On an error the temporary is removed and nothing changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".tmp-{path.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    fsync_path(p)
            fsync_path(tmp)
        if path.exists():
            remove_tree(path)
        os.replace(tmp, path)
        if fsync:
            fsync_path(path.parent)
    except BaseException:  # a full disk, say, or a kill signal: nothing half-written under the real name
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: Path) -> None:
    """Remove a directory, renamed away first (``.tmp-delete-NAME-PID``) so a kill during the
    removal never leaves half of it under its real name."""
    doomed = path.with_name(f".tmp-delete-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: the names in it, a rename's result)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsWriter:
    """metrics.jsonl: one JSON object per line, flushed so a killed run keeps what it logged."""

    def __init__(self, path: Path, tracker: Any = None):
        self.f = Path(path).open("a", encoding="utf-8")
        self.tracker = tracker  # experiment trackers get each row too (loralab.track.Tracker)

    def write(self, **row: Any) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tracker is not None:
            self.tracker.log(row)

    def close(self) -> None:
        self.f.close()


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines up to ``last_step`` (and drop a line cut off by a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def earlier_results(run: RunDir) -> list[str]:
    """What an earlier run left in ``run`` that a fresh run would replace: its adapter and its
    checkpoints (what a user keeps or resumes), where they hold files."""
    return [f"{p.name}/" for p in (run.adapter, run.checkpoints) if p.is_dir() and any(p.iterdir())]


def check_fresh_run_dir(run: RunDir, *, overwrite: bool, resume_how: str, other_how: str,
                        overwrite_how: str) -> None:
    """Refuse (ConfigError, exit 2, nothing touched) a fresh run in a directory that holds an
    earlier run's adapter or checkpoints, unless ``overwrite``; the message says how to resume it,
    go elsewhere or replace it in the caller's terms (the command line's flags, the API's
    arguments)."""
    from loralab.errors import ConfigError

    found = earlier_results(run)
    if not found or overwrite:
        return
    status = (run.read_summary() or {}).get("status")
    # a completed run has nothing to continue (a resume says so): offer only the other two ways
    go_on = "Choose" if status == "completed" else f"Continue it with {resume_how}, choose"
    raise ConfigError(f"{run.root} holds an earlier run ({status or 'no summary'}; {', '.join(found)}), which a new "
                      f"run there would replace; nothing was changed. {go_on} {other_how}, or pass "
                      f"{overwrite_how} to replace it")


def clear_run_outputs(run: RunDir) -> None:
    """What an earlier run left that a fresh run must not inherit: checkpoints (never to be
    resumed), metric lines (never to be appended to) and the adapter (never to stand for this
    run if it fails)."""
    import shutil

    shutil.rmtree(run.checkpoints, ignore_errors=True)
    shutil.rmtree(run.adapter, ignore_errors=True)
    run.metrics.unlink(missing_ok=True)
