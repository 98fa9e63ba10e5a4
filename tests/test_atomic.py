"""The one atomic-write helper (loralab.rundir): a file or a whole directory is replaced in one
rename, so a failure or a kill leaves the old version (or none), never half of the new one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.rundir import atomic_dir, write_atomic
from waiting import wait_for

SRC = str(Path(__file__).resolve().parents[1] / "src")


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_atomic_str_bytes_json_and_a_failed_write(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, {"a": float("nan"), "b": [1, 2]})
    assert json.loads(path.read_text())["b"] == [1, 2]
    write_atomic(path, b"\x00\x01", fsync=False)
    assert path.read_bytes() == b"\x00\x01"
    write_atomic(path, "é\n")
    assert path.read_text(encoding="utf-8") == "é\n"
    with pytest.raises(TypeError):
        write_atomic(path, 12)  # type: ignore[arg-type]
    assert path.read_text(encoding="utf-8") == "é\n" and names(tmp_path) == ["f.json"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f".tmp-adapter-{os.getpid()}" and not target.exists()
        (tmp / "a.txt").write_text("one")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"1")
    assert names(target) == ["a.txt", "sub"] and names(tmp_path) == ["adapter"]
    # a second write replaces the directory whole: files of the old one do not survive
    with atomic_dir(target, fsync=False) as tmp:
        (tmp / "c.txt").write_text("two")
    assert names(target) == ["c.txt"] and names(tmp_path) == ["adapter"]
    # an error inside the block: the old directory stays as it was, the temporary goes
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "c.txt").write_text("half")
            raise OSError(28, "disk full")
    assert (target / "c.txt").read_text() == "two" and names(tmp_path) == ["adapter"]


def test_a_kill_inside_atomic_dir_leaves_the_old_directory_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("old")
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from loralab.rundir import atomic_dir\n"
        "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'v').write_text('new, half')\n"
        "    time.sleep(60)\n"), str(target)], env={**os.environ, "PYTHONPATH": SRC})
    try:
        leftover = wait_for(lambda: next((p for p in tmp_path.glob(".tmp-out-*") if (p / "v").exists()), None),
                            60, "the child writing its temporary")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert (target / "v").read_text() == "old" and leftover.name == f".tmp-out-{child.pid}"
    with atomic_dir(target) as tmp:  # the next write of the same directory removes the leftover
        (tmp / "v").write_text("new")
    assert (target / "v").read_text() == "new" and names(tmp_path) == ["out"]


def test_study_export_to_parquet_reads_back_like_csv(tmp_path):
    """The Parquet export goes through write_atomic (pyarrow writes into memory): the files read
    back with the same rows as the CSV export, and no temporary is left beside them."""
    import csv

    pq = pytest.importorskip("pyarrow.parquet")
    import yaml

    from loralab.study.spec import load_study
    from loralab.study.store import Store

    base = {"model": {"path": "builtin:tiny", "device": "cpu"}, "data": {"path": "builtin:arithmetic_2ds"},
            "train": {"max_steps": 2}}
    spec = tmp_path / "x.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "base": base, "axes": {"lora.r": [2, 4]}}), encoding="utf-8")
    study = load_study(spec, root=tmp_path / "runs")
    with Store(tmp_path / "x.db") as store:
        sid, _ = store.open_study(study.name, study.to_json(), tmp_path / "runs", study.runs)
        first = store.runs(sid)[0]["id"]
        store.finish(first, status="completed", summary={"final_eval_loss": 1.5},
                     metrics=[(1, "eval_loss", 2.0), (2, "eval_loss", 1.5)], error=None, stopped_at_step=None)
        parquet = store.export("x", tmp_path / "pq", fmt="parquet")
        csvs = store.export("x", tmp_path / "csv", fmt="csv")
    assert names(tmp_path / "pq") == ["x-metrics.parquet", "x-runs.parquet"]
    for p, c in zip(sorted(parquet), sorted(csvs), strict=True):
        table = pq.read_table(p).to_pylist()
        with c.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert len(table) == len(rows) > 0
        assert [str(r["name"]) for r in table] == [r["name"] for r in rows]
    metrics = pq.read_table(tmp_path / "pq" / "x-metrics.parquet").to_pylist()
    assert [(m["step"], m["value"]) for m in metrics] == [(1, 2.0), (2, 1.5)]
