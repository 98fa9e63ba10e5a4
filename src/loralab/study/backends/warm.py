"""Run processes forked from one warm process: a study's units start without re-importing torch,
transformers and PEFT (about 7 s of a short run's 8 on a 2-core CPU).

    starter = WarmStarter()              # the driver's end
    starter.spawn()                      # the warm process loads while the driver plans
    proc = starter.start(cmd, env, log)  # cmd as backends/process.py builds it: [python, -m, module, ...]
    proc.poll()                          # None while it runs, then its exit code (-N: killed by signal N)
    starter.close()

The warm process (``python -m loralab.study.backends.warm FD``) imports the libraries a run
needs and waits for requests on its stdin. For each it forks; the child points its stdout and
stderr at the unit's log, takes the unit's environment, working directory and thread count, and
runs the module as ``python -m`` would, then exits with its code. Each reply (the child's pid,
later its exit code) is a JSON line on fd FD. The children are the warm process's: they die with
it, and it dies with the driver (PR_SET_PDEATHSIG), so nothing outlives a killed driver.

Used on the CPU only: where torch has a CUDA (or ROCm) build, each unit starts as its own process,
so a unit's CUDA_VISIBLE_DEVICES applies before CUDA starts. Where the warm process cannot start
or stops, units start as plain processes (``process.launch``) and the study log says why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from loralab.ending import finish
from loralab.study.backends.child import die_with_parent, loralab_env

log = logging.getLogger("loralab.study")

READY_TIMEOUT_S = 600  # the imports take seconds; a machine under load may take minutes
PRELOAD = ("torch", "transformers", "peft", "loralab.cli", "loralab.train.core", "loralab.train.fused",
           "loralab.study.fuse")


class WarmProcess:
    """A unit's process forked by the warm process: ``pid``, ``poll()`` and ``wait()`` as a
    ``subprocess.Popen`` has them."""

    def __init__(self, starter: WarmStarter, pid: int):
        self.starter, self.pid = starter, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.starter.pump()
        return self.returncode

    def wait(self) -> int:
        while self.poll() is None:
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]


class WarmStarter:
    """The driver's end of one warm process; ``start`` returns None when units must start as
    plain processes (no warm process here, or it stopped). ``spawn`` starts the warm process
    early, so that it loads while the driver plans; ``start`` waits for it to be ready."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.replies: int | None = None  # the read end of the reply pipe
        self.errors: IO[bytes] | None = None  # the warm process's own output, read when it fails
        self.ready = False
        self.buffer = b""
        self.children: dict[int, WarmProcess] = {}
        self.unusable: str | None = None  # why units start as plain processes
        self.next_id = 0

    def spawn(self) -> None:
        """Start the warm process (once); it loads the libraries while the caller goes on."""
        if self.proc is not None or self.unusable is not None:
            return
        if why := _gpu_build():  # known without loading torch: no process to start
            self._give_up(why)
            return
        read_end, write_end = os.pipe()
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "loralab.study.backends.warm", str(write_end)],
                                     stdin=subprocess.PIPE, stdout=self.errors, stderr=self.errors, env=loralab_env(),
                                     pass_fds=(write_end,), preexec_fn=die_with_parent)
        os.close(write_end)
        self.replies = read_end

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path, *, append: bool) -> WarmProcess | None:
        if not self.ready and self.unusable is None:
            self._wait_ready()
        if self.unusable is not None:
            return None
        self.next_id += 1
        request = {"id": self.next_id, "module": cmd[2], "args": cmd[3:], "env": env, "cwd": os.getcwd(),
                   "log": str(log_path), "append": append}
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            reply = self._reply(lambda m: m.get("id") == self.next_id)
        except (OSError, EOFError) as exc:
            self._give_up(f"the warm process stopped ({exc})")
            return None
        child = WarmProcess(self, reply["pid"])
        self.children[child.pid] = child
        return child

    def pump(self) -> None:
        """Read the replies that have arrived: exit codes of children."""
        if self.replies is None:
            return
        try:
            while select.select([self.replies], [], [], 0)[0]:
                if not self._read():
                    raise EOFError
                for _ in self._messages():  # exit codes are recorded as they are read
                    pass
        except (OSError, EOFError):
            self._give_up("the warm process stopped")

    def close(self) -> None:
        """Stop the warm process (called once every unit has ended; one still running dies with it)."""
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.kill()
            self.proc.wait()
        if self.replies is not None:
            os.close(self.replies)
        if self.errors is not None:
            self.errors.close()
        self.proc, self.replies, self.errors, self.ready = None, None, None, False

    def _wait_ready(self) -> None:
        self.spawn()
        try:
            answer = self._reply(lambda m: "ready" in m, timeout=READY_TIMEOUT_S)
        except (OSError, EOFError, TimeoutError) as exc:
            self.errors.seek(0)  # type: ignore[union-attr]
            tail = self.errors.read().decode(errors="replace").strip().splitlines()[-3:]  # type: ignore[union-attr]
            answer = {"ready": False, "why": f"{exc or type(exc).__name__}{': ' if tail else ''}{' | '.join(tail)}"}
        self.ready = answer["ready"]
        if not self.ready:
            self._give_up(answer["why"])

    def _give_up(self, why: str) -> None:
        """Units start as plain processes from now on; children still running are reported killed
        (they die with the warm process)."""
        if self.unusable is None:
            log.info("run processes start on their own (%s)", why)
        self.unusable = why
        for child in self.children.values():
            if child.returncode is None:
                child.returncode = -signal.SIGKILL
        self.close()

    def _reply(self, wanted, timeout: float = 60) -> dict[str, Any]:
        """Read replies until one is ``wanted`` (exit codes read on the way are recorded)."""
        end = time.monotonic() + timeout
        while True:
            for message in self._messages():
                if wanted(message):
                    return message
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from the warm process in {timeout:.0f} s")
            if select.select([self.replies], [], [], min(left, 1.0))[0] and not self._read():
                raise EOFError("the warm process ended")

    def _read(self) -> bool:
        chunk = os.read(self.replies, 65536)  # type: ignore[arg-type]
        self.buffer += chunk
        return bool(chunk)

    def _messages(self):
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            if "returncode" in message:
                if message["pid"] in self.children:
                    self.children.pop(message["pid"]).returncode = message["returncode"]
                continue
            yield message


@contextlib.contextmanager
def warm_process(*, local: bool) -> Iterator[WarmStarter | None]:
    """A started warm process for a study's local units (None for Ray's), stopped on the way out.
    Started first, it loads the libraries while the caller checks and plans the study."""
    if not local:
        yield None
        return
    starter = WarmStarter()
    starter.spawn()
    try:
        yield starter
    finally:
        starter.close()


def _gpu_build() -> str | None:
    """Why units must not be forked, as far as the files tell without importing torch: its GPU
    libraries are installed beside it. The warm process asks torch itself (``_why_not_here``)."""
    spec = importlib.util.find_spec("torch")
    lib = Path(spec.origin).parent / "lib" if spec is not None and spec.origin else None
    found = [name for name in ("libtorch_cuda.so", "libtorch_hip.so") if lib is not None and (lib / name).exists()]
    return f"torch is a GPU build ({found[0]}): a unit's GPU must be chosen before CUDA starts" if found else None


# ----------------------------------------------------------------------------- the warm process


def _why_not_here() -> str | None:
    """Why units must not be forked here (None: they may)."""
    import torch

    if torch.version.cuda or getattr(torch.version, "hip", None):
        return f"torch {torch.__version__} is a GPU build: a unit's GPU must be chosen before CUDA starts"
    if torch.cuda.is_initialized():
        return "CUDA started while the libraries loaded"
    return None


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become the unit's process, run its module, exit with its code."""
    import runpy
    import traceback

    code = 1
    try:
        die_with_parent()
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if request["append"] else os.O_TRUNC)
        out = os.open(request["log"], flags, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if threads := request["env"].get("OMP_NUM_THREADS"):
            import torch

            torch.set_num_threads(int(threads))
        sys.argv = [request["module"], *request["args"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                sys.stderr.write(f"{exc.code}\n")
    except BaseException:  # noqa: BLE001 - the child reports every failure as python would
        traceback.print_exc()
    finally:
        finish()  # as the interpreter does at exit, after an error too
        os._exit(code)


def serve(reply_fd: int) -> None:
    """The warm process: load, say whether it is ready, then fork one child per request and
    report each child's pid and exit code, until the driver closes stdin."""
    def send(message: dict[str, Any]) -> None:
        os.write(reply_fd, json.dumps(message).encode() + b"\n")

    try:
        for name in PRELOAD:
            importlib.import_module(name)
        why = _why_not_here()
    except Exception as exc:  # noqa: BLE001 - any failure to load means plain processes
        why = f"loading the libraries failed: {type(exc).__name__}: {exc}"
    send({"ready": why is None, "why": why})
    if why is not None:
        return
    buffer, children, open_ = b"", set(), True
    while open_ or children:
        if open_ and select.select([0], [], [], 0.05)[0]:
            chunk = os.read(0, 65536)
            open_ = bool(chunk)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    os.close(reply_fd)
                    _child(request)
                children.add(pid)
                send({"id": request["id"], "pid": pid})
        elif not open_:
            for pid in children:  # the driver closed early: nothing outlives it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            with contextlib.suppress(OSError):
                send({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve(int(sys.argv[1]))
