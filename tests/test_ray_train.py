"""One run on Ray Train workers (loralab train --nproc 2 --executor ray).

Real ranks: a local Ray instance started here (ray.init, 2 CPUs, local only, as
test_scheduler.py's Ray tests), gloo on the CPU, a tiny random-init Llama saved with
save_pretrained, the real CLI. The tolerances are
test_distributed.py's (measured there: float32 sums in another order).
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from loralab.cli import main
from test_distributed import close, files, losses, write_config

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


STEPS = ["--set", "train.max_steps=12"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    """The 1-process run (12 steps) the Ray Train runs are compared with; torchrun's runs are
    compared with one process in test_distributed.py."""
    tmp = tmp_path_factory.mktemp("ray-one")
    cfg = write_config(tmp, tiny_model_dir("llama"))
    assert main(["train", str(cfg), "--out", str(tmp / "one"), "--json", *STEPS]) == 0
    return cfg, tmp / "one"


@pytest.mark.slow
def test_ray_train_run_equals_the_one_process_run(tmp_path, one_process, local_ray, capsys, monkeypatch):
    """Given as a user types them, relative to the working directory (config file and --out):
    Ray Train starts its workers elsewhere, where they used to miss the config or train into
    Ray's own session directory."""
    cfg, one = one_process
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_bytes(cfg.read_bytes())
    assert main(["train", "run.yaml", "--out", "ray", "--nproc", "2", "--executor", "ray", "--json", *STEPS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed" and summary["steps_done"] == 12
    dist = summary["extra"]["distributed"]
    assert (dist["world_size"], dist["strategy"], dist["backend"]) == (2, "ddp", "gloo")
    assert min(dist["peak_memory_bytes_per_rank"]) > 50 * 2**20
    close(one, tmp_path / "ray")
    assert files(tmp_path / "ray") == files(one)  # rank 0 alone wrote, nothing of Ray's


def ray_workers(ray_module) -> list:
    """The processes of this Ray instance's Ray Train workers (their title names the actor)."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.slow
def test_killed_ray_worker_leaves_run_interrupted_and_resumes(tmp_path, one_process, local_ray, capsys):
    cfg, one = one_process
    run = tmp_path / "run"
    codes: list[int] = []
    args = ["train", str(cfg), "--out", str(run), "--nproc", "2", "--executor", "ray", "--json", *STEPS]
    driver = threading.Thread(target=lambda: codes.append(main(args)))
    driver.start()
    deadline = time.monotonic() + 180
    while not list((run / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline and driver.is_alive()
        time.sleep(0.02)
    workers = ray_workers(local_ray)
    assert len(workers) == 2, workers
    workers[1].kill()  # SIGKILL one worker, whichever rank it is
    driver.join(120)
    assert codes == [1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    # Ray 2.60: "rank 0 failed: WorkerHealthCheckFailedError: A worker health check failed.; continue it ..."
    assert re.match(rf"rank [01] failed: \w+: .+; continue it with: loralab train --resume {run}$", summary["error"])
    assert max(losses(run)) < 12

    assert main(["train", "--resume", str(run), "--json"]) == 0  # on one process
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] % 4 == 0
    close(one, run)


def test_ray_bad_input_is_refused_clearly(tmp_path, tiny_model_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path, tiny_model_dir("llama"))
    out = ["--out", str(tmp_path / "r")]
    assert main(["train", str(cfg), *out, "--nproc", "2", "--address", "127.0.0.1:1"]) == 2
    assert "--address is the Ray cluster's: give it with --executor ray" in capsys.readouterr().err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["train", str(cfg), *out, "--nproc", "2", "--executor", "ray", "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"--address 127.0.0.1:{port}: no Ray cluster answers there" in err and "ray start --head" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert main(["train", str(cfg), *out, "--nproc", "2", "--executor", "ray"]) == 2
    assert "--executor ray needs Ray, an optional extra: pip install 'loralab[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.slow
def test_bad_input_a_ray_worker_finds_ends_the_run_invalid(tmp_path, tiny_model_dir, local_ray, capsys):
    cfg = write_config(tmp_path, tiny_model_dir("llama"))
    missing = tmp_path / "missing.jsonl"
    code = main(["train", str(cfg), "--out", str(tmp_path / "bad"), "--nproc", "2", "--executor", "ray",
                 "--set", f"data.path={missing}"])
    assert code == 2
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["status"] == "invalid" and str(missing) in summary["error"]
    # any rank may end first (the others are stopped then); each found the same file missing
    assert re.search(rf"rank [01] ended with exit code 2; the run ended invalid: {re.escape(summary['error'])}\n",
                     capsys.readouterr().err)


@pytest.mark.slow
def test_more_workers_than_the_ray_cluster_has_cpus_is_refused(tmp_path, tiny_model_dir, local_ray, capsys):
    cfg = write_config(tmp_path, tiny_model_dir("llama"))
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--nproc", "3", "--executor", "ray"]) == 2
    assert ("--nproc 3: each Ray Train worker asks for one CPU, and the Ray cluster has 2 now; lower --nproc or add "
            "nodes") in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
