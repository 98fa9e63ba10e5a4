"""``loralab train CONFIG --nproc N``: one run on N processes of this machine, through torch's
elastic launcher (the engine of ``torchrun``), its rendezvous store bound to loopback.

    loralab train run.yaml --nproc 2 --out runs/ddp2
    loralab train --resume runs/ddp2 --nproc 4          # a checkpoint resumes with any N

torchrun's own stores listen on every interface, whatever address they are given
(docs/security.md#torchrun). Here the launcher creates the one store the job uses on a socket
it bound to 127.0.0.1 itself, and hands it to torch's launcher through a rendezvous handler
(``loralab-loopback``) that returns that store; the workers find it through MASTER_ADDR /
MASTER_PORT (127.0.0.1) with TORCHELASTIC_USE_AGENT_STORE, as torchrun's workers find its
store. Nothing of the job listens beyond loopback: gloo's and NCCL's own sockets are bound to
the loopback interface too (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME = lo, unless set).

Each worker is ``python -m loralab.cli train ...`` with the same config; the run itself (rank
0 writes, gradients summed over ranks) is loralab.train.distributed. Across machines, run
torchrun on each node yourself (docs/distributed.md): a worker started by any torchrun
trains the same way.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import uuid
from pathlib import Path

from loralab.errors import LoralabError
from loralab.rundir import RunDir, Status, run_dir_of, write_atomic

log = logging.getLogger(__name__)

BACKEND = "loralab-loopback"  # the rendezvous backend name registered with torch's launcher
LOOPBACK = "127.0.0.1"
LAUNCHER_ENV = "LORALAB_LAUNCHER_PID"  # set for the ranks: the launcher they end with


class InterruptedRun(LoralabError):
    """A worker died (killed, crashed): the run is left ``interrupted``; ``--resume`` continues it."""

    exit_code = 1


def loopback_store(timeout_s: float):
    """A TCPStore server on a socket bound to 127.0.0.1 (a free port) and its port."""
    from torch.distributed import TCPStore

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # The store takes the socket's descriptor and listens on it: on this address only.
    store = TCPStore(LOOPBACK, port, None, True, datetime.timedelta(seconds=timeout_s),
                     wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.detach(), use_libuv=False)
    return store, port


def loopback_handler(store, port: int, run_id: str):
    """torch's RendezvousHandler for one node whose store is ``store`` (already listening)."""
    from torch.distributed import PrefixStore
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousInfo
    from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo

    class LoopbackRendezvous(RendezvousHandler):
        def get_backend(self) -> str:
            return BACKEND

        @property
        def use_agent_store(self) -> bool:
            return True  # the workers join this store as clients, none opens its own

        def next_rendezvous(self) -> RendezvousInfo:
            return RendezvousInfo(PrefixStore(run_id, store), 0, 1, RendezvousStoreInfo(LOOPBACK, port))

        def is_closed(self) -> bool:
            return False

        def set_closed(self) -> None:
            pass

        def num_nodes_waiting(self) -> int:
            return 0

        def get_run_id(self) -> str:
            return run_id

        def shutdown(self) -> bool:
            return True

    return LoopbackRendezvous()


def handler_of(params):
    """The rendezvous handler this launch made, passed to torch's launcher in its parameters."""
    return params.config["handler"]


def launch(worker_args: list[str], *, nproc: int, run_dir: Path, timeout_s: float) -> None:
    """Run ``python -m loralab.cli <worker_args>`` on ``nproc`` local processes and wait.
    A worker that dies takes the others down (torch's launcher stops them) and leaves the run
    ``interrupted``: raised as InterruptedRun, saying how to continue."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    store, port = loopback_store(timeout_s)
    run_id = uuid.uuid4().hex
    handler = loopback_handler(store, port, run_id)
    rendezvous_handler_registry.register(BACKEND, handler_of)  # the same function each time: registered once
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(name, "lo")  # the collectives' own sockets on loopback, too
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the ranks inherit it: die_with_launcher
    threads = rank_threads(nproc)
    if threads is not None:  # the ranks inherit it; this process's environment is put back after
        os.environ["OMP_NUM_THREADS"] = str(threads)
        log.info("each rank computes on %d thread(s): this process may use %d CPU(s) (OMP_NUM_THREADS sets "
                 "another number)", threads, len(os.sched_getaffinity(0)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id, rdzv_backend=BACKEND,
                          rdzv_endpoint=f"{LOOPBACK}:{port}", rdzv_configs={"handler": handler}, max_restarts=0,
                          monitor_interval=0.5, local_addr=LOOPBACK, role="rank", shutdown_timeout=10,
                          logs_specs=DefaultLogsSpecs(redirects=Std.OUT, tee=Std.ERR))  # the ranks' stderr here
    log.info("training on %d processes (rendezvous store on %s:%d, loopback only)", nproc, LOOPBACK, port)
    try:
        elastic_launch(config, sys.executable)("-m", "loralab.cli", *worker_args)
    except ChildFailedError as exc:
        rank = cause(exc.failures)
        failure = exc.failures[rank]
        killed = failure.exitcode < 0
        how = failure.signal_name() if killed else f"exit code {failure.exitcode}"
        err = mark_interrupted(RunDir(run_dir), f"rank {rank} ended with {how}", killed=killed,
                               code=failure.exitcode)
        if not isinstance(err, InterruptedRun) and failure.exitcode > 0:
            err.exit_code = failure.exitcode  # the worker's own: 2 invalid input, 3 diverged, ...
        raise err from None
    except SignalException as exc:  # the launcher itself was stopped (Ctrl-C, SIGTERM): it stopped the ranks
        err = mark_interrupted(RunDir(run_dir), f"the launcher got {exc.sigval.name}", killed=True)
        err.exit_code = 128 + int(exc.sigval)  # as a shell reports a process ended by that signal (130: Ctrl-C)
        raise err from None
    finally:
        if threads is not None:
            os.environ.pop("OMP_NUM_THREADS", None)


def rank_threads(nproc: int) -> int | None:
    """Torch threads for each of ``nproc`` ranks on this machine: its CPUs shared out (at least
    one each), so the ranks do not oversubscribe the cores as torch's default of one thread per
    core in every rank does; None where OMP_NUM_THREADS is set (the user's choice stands)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, len(os.sched_getaffinity(0)) // nproc)


def die_with_launcher() -> None:
    """In a rank that :func:`launch` started: end when the launcher ends. torch's launcher
    starts each rank in a session of its own, so a launcher killed outright (SIGKILL, or a
    study's driver that died and took its child the launcher with it) would leave its ranks
    training on into a run directory that the study then trains again."""
    from loralab.study.backends.child import die_with_parent

    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is None:
        return
    die_with_parent()
    if str(os.getppid()) != launcher:  # the launcher ended before the line above
        raise InterruptedRun(f"the launcher (process {launcher}) ended before this rank started")


def cause(failures: dict) -> int:
    """The rank whose end ended the job. A rank killed from outside (SIGKILL, the OOM killer) is
    the cause whenever there is one: the others' errors (a lost connection) follow from it, often
    within the same second, so torch's "first failure" (whole-second timestamps) cannot tell
    them apart. Then a rank that exited with an error; a SIGTERM comes last, as the launcher
    sends it to stop the ranks still running."""
    def order(rank: int) -> tuple:
        f = failures[rank]
        kind = 2 if f.signal_name() == "SIGTERM" else 0 if f.exitcode < 0 else 1
        return kind, f.timestamp, rank

    return min(failures, key=order)


def mark_interrupted(run: RunDir, what: str, *, killed: bool, code: int | None = None,
                     error: str | None = None) -> LoralabError:
    """The run is ``interrupted`` when a rank was killed first (rank 0 may have recorded the
    lost connection as a failure: that was the kill's doing) or when it was left ``running``;
    a run that recorded its own end otherwise (failed, diverged, invalid: a worker said why)
    keeps it. A rank that exited with code 2 found bad input before the first step: the run is
    ``invalid`` even when that rank was not rank 0 and the others were stopped before rank 0
    wrote it (``error``: that rank's message, where known). The error to raise."""
    summary = run.read_summary() or {}
    if not killed and summary.get("status") not in (None, Status.RUNNING):
        return LoralabError(f"{what}; the run ended {summary['status']}: {summary.get('error')}")
    run.root.mkdir(parents=True, exist_ok=True)  # the ranks may have been stopped before rank 0 made it
    if not killed and code == 2:
        error = error or f"{what}: bad input, found before the first step (that rank's message is above)"
        write_atomic(run.summary, {**summary, "status": Status.INVALID, "error": error, "run_dir": str(run.root)})
        return LoralabError(f"{what}; the run ended {Status.INVALID.value}: {error}")
    if run.config.is_file():
        error = f"{what}; continue it with: loralab train --resume {run.root}"
    else:  # stopped before rank 0 wrote the run's config: nothing to resume
        error = f"{what} before the run started (no {run.config.name} in {run.root} yet); start it again"
    write_atomic(run.summary, {**summary, "status": Status.INTERRUPTED, "error": error, "run_dir": str(run.root)})
    return InterruptedRun(error)


def train_on_processes(args, cfg) -> dict:
    """``loralab train ... --nproc N``: check the config here (bad input stops before any
    process starts), fix the run directory every rank writes to, launch, and return the
    summary rank 0 wrote."""
    from loralab.train.distributed import check_strategy, warn_idle_ranks

    check_strategy(cfg, args.nproc)
    warn_idle_ranks(cfg, args.nproc)
    run_dir = run_dir_of(cfg)
    launch(worker_args(args, run_dir), nproc=args.nproc, run_dir=run_dir, timeout_s=cfg.distributed.timeout_s)
    return RunDir(run_dir).read_summary()


def worker_args(args, run_dir: Path) -> list[str]:
    """The command line of every rank: ``train`` with the same config, into ``run_dir``; the
    process count recorded in config.yaml (distributed.nproc), so ``--resume`` alone continues
    the run on as many processes as it started on."""
    sets = [a for o in [*args.overrides, f"distributed.nproc={args.nproc}"] for a in ("--set", o)]
    if args.resume:
        worker = ["train", "--resume", str(run_dir), *sets]
    else:
        worker = ["train", args.config, *sets, "--out", str(run_dir)] if args.config else \
            ["train", *sets, "--out", str(run_dir)]
    worker.append("--json")  # no bars; the summary is rank 0's summary.json, printed here
    if args.force:
        worker.append("--force")
    return worker
