"""``loralab train CONFIG --nproc N --executor ray [--address ADDR]``: one run on N Ray Train
workers (``ray.train.torch.TorchTrainer``), each a rank of the run.

    loralab train run.yaml --nproc 2 --executor ray --out runs/a                  # a local Ray instance
    loralab train run.yaml --nproc 16 --executor ray --address head:6379 --out /shared/runs/a

Each worker runs what a torchrun worker runs (``loralab train`` with the same config, into the
same run directory: loralab.cli.launch.worker_args); Ray Train has already made the process
group (gloo on the CPU, NCCL with one GPU per worker), which the worker joins
(loralab.train.distributed.process_group). Rank 0 writes the run directory: across machines it
must be on storage every node reads. One resource request per worker (ScalingConfig: 1 CPU, and
1 GPU when the run trains on CUDA). Without ``--address`` loralab starts a Ray instance on this
machine, closed to others (loralab.study.backends.ray.connect); a process that already joined
one uses it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from typing import Any

from loralab.errors import LoralabError
from loralab.rundir import RunDir, run_dir_of

log = logging.getLogger(__name__)


class WorkerEnded(LoralabError):
    """A Ray Train worker's ``loralab train`` ended with a non-zero exit code (``error``: the
    message it printed, if it ended on a LoralabError)."""

    def __init__(self, rank: int, code: int, error: str | None = None):
        super().__init__(f"rank {rank} ended with exit code {code}")
        self.rank, self.code, self.error = rank, code, error

    def __reduce__(self):
        return (self.__class__, (self.rank, self.code, self.error))


def ray_worker(config: dict[str, Any]) -> None:
    """The body of every Ray Train worker: ``loralab train ...`` run in this process (it must
    join the process group Ray Train made here), as a torchrun worker runs it. The command line
    is imported when the worker runs, as ``python -m loralab.cli`` imports it: loralab.cli
    imports this module."""
    import importlib

    if os.path.isdir(config["cwd"]):  # Ray Train starts workers in a directory of its own: paths given
        os.chdir(config["cwd"])  # relative to the user's (config, --out, the config's paths) mean the same here
    errors: list[LoralabError] = []
    code = importlib.import_module("loralab.cli").main(config["argv"], errors=errors)
    if code != 0:
        raise WorkerEnded(int(os.environ.get("RANK", "0")), code, str(errors[-1]) if errors else None)


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A clear message, at once, for a cluster address nothing answers at (Ray itself retries
    for minutes). ``auto`` and addresses without a port are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise LoralabError(f"--address {address}: no Ray cluster answers there ({exc}); start one "
                           "(ray start --head) or drop --address to train on a local Ray instance") from None


def connect_ray(address: str | None) -> Any:
    from loralab.study.backends.ray import connect, import_ray

    import_ray()  # a clear message when Ray is not installed
    if address:
        check_reachable(address)
    try:
        return connect(address)
    except LoralabError:
        raise
    except Exception as exc:  # Ray's own errors: a cluster that refused, a version that differs
        raise LoralabError(f"could not start or join Ray{f' at {address}' if address else ''}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def train_on_ray(args, cfg) -> dict:
    """``loralab train ... --executor ray``: check the config, fix the run directory, run N Ray
    Train workers and return the summary rank 0 wrote. A worker that fails ends the run
    (no restarts): ``interrupted`` when it died, else as the worker recorded it."""
    from loralab.cli.launch import mark_interrupted, worker_args
    from loralab.train.distributed import check_strategy, warn_idle_ranks

    check_strategy(cfg, args.nproc)
    warn_idle_ranks(cfg, args.nproc)
    run_dir = run_dir_of(cfg)
    ray = connect_ray(args.address)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = check_resources(ray.cluster_resources(), cfg.model.device, args.nproc)
    storage = tempfile.mkdtemp(prefix="loralab-ray-")  # Ray Train's own records; the run's are in run_dir
    trainer = TorchTrainer(
        ray_worker, train_loop_config={"argv": worker_args(args, run_dir), "cwd": os.getcwd()},
        torch_config=TorchConfig(init_method="env", timeout_s=cfg.distributed.timeout_s),
        scaling_config=ScalingConfig(num_workers=args.nproc, use_gpu=gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name=f"loralab-{run_dir.name}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=0)))
    log.info("training on %d Ray Train workers (%s)", args.nproc, "one GPU each" if gpu else "CPU, gloo")
    try:
        trainer.fit()
    except Exception as exc:
        rank, failure, died = cause(exc)
        how = f"rank {rank} ended with exit code {failure.code}" if isinstance(failure, WorkerEnded) else \
            f"{'rank ' + str(rank) if rank is not None else 'a Ray Train worker'} failed: {first_line(failure)}"
        err = mark_interrupted(RunDir(run_dir), how, killed=died, code=getattr(failure, "code", None),
                               error=getattr(failure, "error", None))
        if isinstance(failure, WorkerEnded) and not died:
            err.exit_code = failure.code  # the worker's own: 2 invalid input, 3 diverged, ...
        else:
            err.exit_code = 1
        raise err from None
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return RunDir(run_dir).read_summary()


def check_resources(resources: dict[str, float], device: str, nproc: int) -> bool:
    """Whether the workers train on GPUs; refused when the cluster has too few CPUs or GPUs for
    N workers now (Ray Train would wait for them without end)."""
    gpus = resources.get("GPU", 0)
    gpu = device != "cpu" and gpus > 0
    if device.startswith("cuda") and not gpu:
        raise LoralabError(f"model.device {device}, but the Ray cluster has no GPU; set model.device=auto or cpu")
    for name, have in (("CPU", resources.get("CPU", 0)), *((("GPU", gpus),) if gpu else ())):
        if have < nproc:
            raise LoralabError(f"--nproc {nproc}: each Ray Train worker asks for one {name}, and the Ray cluster has "
                               f"{have:g} now; lower --nproc or add nodes")
    return gpu


def cause(exc: Exception) -> tuple[int | None, Exception, bool]:
    """(rank, its error, whether it died) of the worker whose end ended the run: one that died
    (killed, lost) first, since the others' errors (a lost connection) follow from it."""
    failures = getattr(exc, "worker_failures", None) or {None: exc}
    ended = {r: own_error(e) for r, e in failures.items()}
    rank = min(ended, key=lambda r: (isinstance(ended[r], WorkerEnded), -1 if r is None else r))
    return rank, ended[rank], not isinstance(ended[rank], WorkerEnded)


def own_error(exc: Exception) -> Exception:
    """The worker's exception inside Ray's wrapping of it (a RayTaskError's cause)."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, Exception) else exc


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
