"""Progress bars (loralab.progress): drawn on a terminal's stderr with count/total, never under
--json, never when stderr is not a terminal; training, evaluation and the study scheduler move
them as the work is done."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from loralab.progress import progress

SRC = str(Path(__file__).resolve().parents[1] / "src")
BAR = re.compile(r"\d+%\|")  # tqdm's "40%|####      |"


class Terminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what was written."""

    def isatty(self) -> bool:
        return True


def test_bar_shows_count_total_and_rate_on_a_terminal_only():
    tty = Terminal()
    with progress(5, desc="runs", unit="run", enabled=True, file=tty) as bar:
        for _ in range(5):
            bar.update(1)
    text = tty.getvalue()
    assert "runs" in text and "5/5" in text and "run/s" in text and BAR.search(text), text
    with progress(5, desc="resumed", unit="step", enabled=True, initial=3, file=(tty := Terminal())) as bar:
        bar.update(2)
    assert "3/5" in tty.getvalue() and "5/5" in tty.getvalue()
    for enabled, stream in ((False, Terminal()), (True, io.StringIO())):  # --json; not a terminal
        with progress(5, desc="runs", unit="run", enabled=enabled, file=stream) as bar:
            bar.update(5)
            bar.set_postfix(loss=1.0)
        assert stream.getvalue() == ""


def test_log_lines_go_above_a_drawn_bar(monkeypatch):
    import logging

    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    try:
        with progress(2, desc="work", enabled=True) as bar:
            bar.update(1)
            logging.getLogger("loralab.test").warning("a message mid-way")
            bar.update(1)
    finally:
        root.removeHandler(handler)
    text = tty.getvalue()
    assert "a message mid-way\n" in text and "2/2" in text
    # the message starts a line of its own: the bar was cleared before it, redrawn after
    assert re.search(r"(^|[\r\n])a message mid-way\n", text)


def test_training_bar_counts_steps_and_json_draws_none(cfg_factory, tmp_path, monkeypatch, capsys):
    from loralab.cli import main
    from loralab.train.loop import train

    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    summary = train(cfg_factory(train__max_steps=3, output__save_adapter=False), show_progress=True)
    assert summary["status"] == "completed"
    text = tty.getvalue()
    assert "3/3" in text and "step/s" in text and "loss=" in text, text
    assert "Loading weights" in text  # transformers' own bar follows the same switch
    # `loralab train --json` on a terminal: no bar of loralab's nor of transformers'
    monkeypatch.setattr(sys, "stderr", tty := Terminal())
    keys = {"model.path": "builtin:tiny", "model.device": "cpu", "data.path": "builtin:arithmetic_2ds",
            "data.limit": 32, "data.val_max_examples": 8, "train.max_steps": 2, "train.batch_size": 4,
            "train.micro_batch_size": 4, "train.warmup_steps": 0, "output.save_adapter": "false"}
    argv = ["train", *[a for k, v in keys.items() for a in ("--set", f"{k}={v}")], "--out", str(tmp_path / "j"),
            "--json"]
    assert main(argv) == 0, tty.getvalue()
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert not BAR.search(tty.getvalue()) and "step/s" not in tty.getvalue(), tty.getvalue()


def test_study_run_json_turns_the_bar_off():
    from loralab.cli import build_parser
    from loralab.study.options import StudyOptions

    parser = build_parser()
    assert StudyOptions.from_args(parser.parse_args(["study", "run", "s.yaml"])).progress
    assert not StudyOptions.from_args(parser.parse_args(["study", "run", "s.yaml", "--json"])).progress


def test_scheduler_bar_counts_final_outcomes_once(tmp_path):
    """A run interrupted then run again counts once, when it finishes; paused runs do not count."""
    import yaml

    from loralab.study.scheduler import Scheduler, Unit, plan_tasks
    from loralab.study.spec import load_study
    from loralab.study.store import Store

    base = {"model": {"path": "builtin:tiny", "device": "cpu"}, "data": {"path": "builtin:arithmetic_2ds"},
            "train": {"max_steps": 2}}
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "base": base, "axes": {"lora.r": [2, 4, 8]}}), encoding="utf-8")
    root = tmp_path / "runs"
    study = load_study(spec, root=root)
    script = {"r2": ["completed"], "r4": ["interrupted", "completed"], "r8": ["paused"]}

    class Done:
        def __init__(self, unit):
            self.results = [{"status": script[r.name].pop(0), "error": None} for r in unit.runs]

        def poll(self):
            return self.results

    class Backend:
        name = "scripted"

        def start(self, unit, *, memory, threads):
            return Done(unit)

    tty = Terminal()
    with Store(tmp_path / "s.db") as store, progress(3, desc="study s", unit="run", enabled=True, file=tty) as bar:
        sid, _ = store.open_study(study.name, study.to_json(), root, study.runs)
        tasks = plan_tasks(store, sid, root, max_memory=None)
        scheduler = Scheduler(store, Backend(), workers=2, retries=1, bar=bar)
        assert scheduler.run([Unit([t]) for t in tasks])
        assert bar.n == 2 and scheduler.outcomes == {"completed": 2}
        scheduler.finished("stopped_early")  # what the halving policy does for the runs it cuts
        assert bar.n == 3
    text = tty.getvalue()
    assert "3/3" in text and "completed=2" in text and "stopped_early=1" in text, text


def _cli_on_a_terminal(*argv: str) -> tuple[int, str, str]:
    """Run ``loralab ARGV`` with stderr on a pseudo-terminal; (exit code, stdout, stderr text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 24 rows, 160 columns
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", "from loralab.cli import main; raise SystemExit(main())", *argv],
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_eval_bars_on_a_terminal_and_none_under_json(as_json):
    argv = ["eval", "--model", "builtin:tiny", "--tasks", "arithmetic_2ds,world_mc", "--limit", "6",
            "--batch-size", "4", *(["--json"] if as_json else [])]
    rc, out, err = _cli_on_a_terminal(*argv)
    assert rc == 0, err[-2000:]
    assert "eval base on arithmetic_2ds (6 examples)" in err  # log lines reach the terminal either way
    if as_json:
        assert not BAR.search(err) and "ex/s" not in err and "seq/s" not in err, err
        rows = json.loads(out)["results"]  # stdout is the JSON object alone
        assert {r["task"] for r in rows} == {"arithmetic_2ds", "world_mc"}
        assert all(r["n"] == 6 for r in rows if r["metric"] != "token_accuracy")  # token_accuracy counts tokens
    else:
        # one bar per scoring pass, labelled with the task: generation counts the 6 prompts,
        # teacher-forced scoring the 6 (prompt, answer) pairs, MC scoring every choice
        assert re.search(r"arithmetic_2ds \(generation\):\s+\d+%\|.*\| \d/6 ", err), err
        assert re.search(r"arithmetic_2ds \(scoring\):\s+\d+%\|.*\| \d/6 ", err), err
        assert re.search(r"world_mc:\s+\d+%\|.*\| \d+/\d+ ", err), err
        assert "arithmetic_2ds" in out and "world_mc" in out and not BAR.search(out)
