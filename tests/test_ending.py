"""loralab.ending: a process ends with its exit code and all its output, without the teardown.

Each case is a real Python process whose stdout is a pipe (so Python's and C's output are
buffered, as in a study's run log), ended by end_process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

PROGRAM = """
import atexit, ctypes, logging, sys, threading, time
from pathlib import Path
from loralab.ending import end_process

out = Path(sys.argv[1])
logging.basicConfig(filename=out / "log.txt", level=logging.INFO)
logging.info("a logged line")
atexit.register(lambda: (out / "atexit.txt").write_text("ran"))

class Teardown:  # written when the interpreter frees the module's objects, at its exit only
    def __del__(self):
        (out / "teardown.txt").write_text("ran")

keep = Teardown()
print("python's line", end="")                 # in Python's buffer: no newline, a pipe
ctypes.CDLL(None).printf(b"C's line\\n")        # in C's stdio buffer
if sys.argv[2] == "thread":                     # a thread that is not a daemon, still working
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread.txt").write_text("done"))).start()
end_process(int(sys.argv[3]))
"""


def ended(tmp_path: Path, thread: str, code: int) -> subprocess.CompletedProcess:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(PROGRAM), encoding="utf-8")
    return subprocess.run([sys.executable, str(script), str(tmp_path), thread, str(code)], capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(SRC)})


def test_the_exit_code_the_output_and_the_exit_handlers_without_the_teardown(tmp_path):
    done = ended(tmp_path, "none", 3)
    assert done.returncode == 3, done.stderr
    assert "python's line" in done.stdout and "C's line" in done.stdout
    assert (tmp_path / "log.txt").read_text() == "INFO:root:a logged line\n"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert not (tmp_path / "teardown.txt").exists()  # the teardown was skipped


def test_a_thread_still_working_is_waited_for_by_pythons_own_exit(tmp_path):
    done = ended(tmp_path, "thread", 0)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "thread.txt").read_text() == "done"
    assert (tmp_path / "atexit.txt").read_text() == "ran" and "C's line" in done.stdout
    assert (tmp_path / "teardown.txt").read_text() == "ran"  # Python's exit, teardown and all
