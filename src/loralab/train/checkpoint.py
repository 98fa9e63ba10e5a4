"""Resumable checkpoints: safetensors + JSON, written atomically, newest complete one wins.

    save_checkpoint(run_dir, state, params=params, opt=opt, sched=sched)   # params: trainable tensors by name
    path = latest_checkpoint(run_dir)          # None when there is none
    state = load_checkpoint(path, params=params, opt=opt, sched=sched)

A checkpoint is ``run_dir/checkpoints/step-000120/`` holding

    adapter.safetensors        the trainable (LoRA) parameters by name
    optimizer.safetensors      every tensor of the optimizer state
    optimizer.json             the rest of it: scalars and the parameter groups
    scheduler.json             the lr scheduler's state (its lambda is rebuilt from the config)
    rng.safetensors, rng.json  torch CPU generator state and the training device's (CUDA) one only;
                               Python and NumPy states
    trainer_state.json         data position (step, epoch, micro batches consumed) and bookkeeping
    manifest.json              written last: size and sha256 of every file above

It is written under ``checkpoints/.tmp-step-000120-<pid>``, each file fsynced, then the
directory is renamed as a whole (loralab.rundir.atomic_dir). A directory without a manifest, or whose files do not match
it, is ignored; leftover temporaries are removed. Nothing here is pickled, and nothing is
read with pickle: a checkpoint holding a pickled file (optimizer.pt, rng_state.pth, ...) is
refused with ModelError rather than skipped, since someone put it there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loralab.adapters import refuse_pickles
from loralab.errors import LoralabError, ModelError
from loralab.rundir import CHECKPOINT_GLOB, RunDir, atomic_dir, checkpoint_name, remove_tree
from loralab.train import distributed

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"


class DiskFullError(LoralabError):
    """No space left while writing a checkpoint or the adapter."""


@dataclass
class TrainState:
    """Where training stands after ``step`` optimizer steps; all of it goes into trainer_state.json."""

    step: int = 0
    epoch: int = 0
    micro_batches: int = 0  # micro batches taken from the data stream so far
    micro_batch_size: int = 0  # size they were taken at (auto_micro_batch may halve it)
    tokens_seen: int = 0
    train_time_s: float = 0.0
    train_cpu_time_s: float = 0.0
    wall_time_s: float = 0.0  # wall time of earlier sessions of this run
    skipped_steps: int = 0
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    task_history: dict[str, list[float]] = field(default_factory=dict)
    micro_batch_changes: list[dict[str, int]] = field(default_factory=list)
    grad_scaler: dict[str, Any] | None = None  # torch.amp.GradScaler's state when training in fp16
    arithmetic: dict[str, Any] | None = None  # arithmetic_settings() the run trained with (None: older checkpoint)
    compiled: bool | None = None  # whether its decoder layers trained compiled (train.compile; None: older checkpoint)
    data: dict[str, Any] | None = None  # loralab.data.dataset.fingerprint of its examples (None: older checkpoint)


# ----------------------------------------------------------------------------- arithmetic


def arithmetic_settings() -> dict[str, Any]:
    """The process settings that change a step's floating-point result on the same inputs: the
    CPU thread count (how a matmul's sums are split), the fp32 matmul precision (TF32 on GPUs)
    and torch's deterministic-algorithms switch."""
    return {"threads": torch.get_num_threads(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def _apply_arithmetic(settings: dict[str, Any]) -> None:
    torch.set_num_threads(settings["threads"])
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    torch.use_deterministic_algorithms(settings["deterministic_algorithms"])


@contextlib.contextmanager
def pinned_arithmetic(recorded: dict[str, Any] | None, *, where: str):
    """Train with the arithmetic settings a run started with, and restore the process's after.

    A run resumed in a process set up otherwise (a study worker's one thread, a shell's two)
    would not be bit-exact: the thread count alone moves fp32 training by 6e-6 in 15 steps.
    So the settings recorded at step 0 are put back for the resumed steps and said in the log.
    A checkpoint from before they were recorded resumes as it is, with a warning.
    """
    before = arithmetic_settings()
    if recorded is None:
        log.warning("%s: the checkpoint does not record the thread count and matmul settings it was trained with; "
                    "the resumed steps are bit-exact only if this process uses the same (now %s)", where, before)
        yield
        return
    changed = {k: (before[k], v) for k, v in recorded.items() if before.get(k) != v}
    if changed:
        log.info("%s: resuming with the settings it trained with, for a bit-exact resume: %s", where,
                 ", ".join(f"{k} {v} (this process had {b})" for k, (b, v) in changed.items()))
        _apply_arithmetic(recorded)
    try:
        yield
    finally:
        if changed:
            _apply_arithmetic(before)


# ----------------------------------------------------------------------------- writing


# Both write into the temporary directory atomic_dir renames whole (and fsyncs): no write_atomic.
def _write_json(path: Path, obj: Any) -> None:
    # NaN stays NaN (a task score or an eval loss can be NaN); Python's json reads it back.
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # clone: safetensors refuses tensors that share storage or are not contiguous
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors ("state/<param index>/<name>") and JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{idx}/{name}"] = distributed.whole(value)  # fsdp: the shards gathered
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def rng_parts(device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Generator states of torch (CPU, and the training device when it is a GPU), Python's random
    and NumPy. Only the training device's: a run draws from no other GPU, and a checkpoint that
    names one device resumes on any layout (a study child sees one GPU, a resume may see eight)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["torch_device"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def scheduler_state(sched) -> dict[str, Any]:
    # LambdaLR keeps its lambdas as None in the state; they are rebuilt from the config.
    return {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}


def save_checkpoint(run_dir: Path, state: TrainState, *, params: dict[str, torch.Tensor], opt, sched,
                    device: torch.device | None = None) -> Path:
    """Write the checkpoint for ``state.step`` atomically (older ones stay: the caller prunes
    them with prune_checkpoints once every run of its group has saved). ``params``: the trainable
    tensors by name; ``device``: the training device, whose generator state is kept.

    Several ranks: every rank calls it; fsdp's shards are gathered whole (a collective) and rank
    0 alone writes, in the one-process format, so any number of processes resumes it."""
    root = RunDir(run_dir).checkpoints
    final = root / checkpoint_name(state.step)
    params = {name: distributed.whole(p) for name, p in params.items()}
    opt_tensors, opt_json = optimizer_parts(opt)
    if not distributed.writes():
        return final
    root.mkdir(parents=True, exist_ok=True)
    clean_temporaries(root)
    try:
        # a checkpoint of this step from an earlier session is replaced whole
        with atomic_dir(final, fsync=True) as tmp:  # checkpoints/.tmp-step-000120-<pid>
            _write_tensors(tmp / "adapter.safetensors", params)
            _write_tensors(tmp / "optimizer.safetensors", opt_tensors)
            _write_json(tmp / "optimizer.json", opt_json)
            _write_json(tmp / "scheduler.json", scheduler_state(sched))
            rng_tensors, rng_json = rng_parts(device)
            _write_tensors(tmp / "rng.safetensors", rng_tensors)
            _write_json(tmp / "rng.json", rng_json)
            _write_json(tmp / "trainer_state.json", asdict(state))
            files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
            _write_json(tmp / MANIFEST, {"format": FORMAT, "step": state.step, "files": files})
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            previous = latest_checkpoint(run_dir)
            raise DiskFullError(
                f"disk full while writing checkpoint {final} ({exc.strerror}); nothing partial was kept; "
                f"last complete checkpoint: {previous or 'none'}"
            ) from None
        raise
    return final


def clean_temporaries(root: Path) -> None:
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    for path in complete_checkpoints(root)[:-keep_last]:
        remove_tree(path)  # renamed away first: a kill never leaves a half-deleted checkpoint


# ----------------------------------------------------------------------------- finding


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories that have a manifest, oldest first (no hashing here)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(CHECKPOINT_GLOB) if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def verify(path: Path) -> str | None:
    """None when every file matches the manifest; else what is wrong. A pickled file raises ModelError."""
    refuse_pickles(path, "checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("format") != FORMAT:
        return f"checkpoint format {manifest.get('format')!r}, expected {FORMAT}"
    for name, meta in files.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            return f"{name} does not match the manifest (size or sha256)"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest; damaged ones are skipped with a warning."""
    for path in reversed(complete_checkpoints(RunDir(run_dir).checkpoints)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("ignoring checkpoint %s: %s", path, problem)
    return None


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def recorded_data(path: Path) -> dict[str, Any] | None:
    """The examples the checkpoint at ``path`` trained on (TrainState.data; None: not recorded)."""
    return _read_json(path / "trainer_state.json").get("data")


def _restore_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = _read_json(path / "optimizer.json")
    params = [p for g in opt.param_groups for p in g["params"]]  # the state's indices, in order
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        # fsdp: a parameter's whole moment sharded as the parameter is
        state.setdefault(int(idx), {})[name] = distributed.shard_like(value, params[int(idx)])
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _restore_rng(path: Path, device: torch.device | None) -> None:
    tensors = load_file(str(path / "rng.safetensors"))
    meta = _read_json(path / "rng.json")
    torch.set_rng_state(tensors["torch_cpu"])
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # checkpoints of format 1 before this change kept every visible GPU's as torch_cuda_<i>
        state = tensors.get("torch_device", tensors.get(f"torch_cuda_{index}", tensors.get("torch_cuda_0")))
        if state is not None:
            torch.cuda.set_rng_state(state, device)
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = meta["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def load_checkpoint(path: Path, *, params: dict[str, torch.Tensor], opt, sched,
                    device: torch.device | None = None) -> TrainState:
    """Restore the trainable tensors (``params``, by name), optimizer, scheduler and RNGs
    (``device``: the training device) from ``path``; return the train state."""
    problem = verify(path)
    if problem:
        raise ModelError(f"checkpoint {path}: {problem}")
    saved = load_file(str(path / "adapter.safetensors"))
    if saved.keys() != params.keys():
        missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise ModelError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ModelError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, "
                                 f"the model {tuple(p.shape)}")
            p.copy_(distributed.shard_like(saved[name], p))  # fsdp: sharded again
    _restore_optimizer(opt, path)
    sched.load_state_dict({**_read_json(path / "scheduler.json"), "lr_lambdas": [None] * len(opt.param_groups)})
    _restore_rng(path, device)
    return TrainState(**_read_json(path / "trainer_state.json"))
