"""A Ray instance that loralab starts itself is closed to others (docs/security.md).

The instances are real: started by ``loralab study run --executor ray`` in a child process
(the CLI's own path: Ray not yet imported), or by the Ray backend in a process that imported
Ray first (a notebook's path). Each is probed from outside, as an attacker on this machine
would: which addresses its processes listen on, and whether a client without the token gets
in. Every process runs with its own HOME, so Ray's token file (~/.ray/auth_token) is the
test's, never the user's.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.errors import LoralabError
from loralab.study.backends.ray import LOCAL_INSTANCE_ENV, check_token_auth, connect, ensure_token
from studytools import rows_of, write_study
from waiting import wait_for

SRC = Path(__file__).resolve().parents[1] / "src"
PROBE = Path(__file__).resolve().parent / "env_probe"  # sitecustomize: $LORALAB_TEST_GATE holds a run back

# Another process on this machine, with no token of its own: Ray's GCS client, then a bare gRPC
# call to the GCS with no token, a wrong one and (the control) the instance's token.
CLIENT = """
import json, sys
import grpc
from ray._raylet import GcsClient
from ray.core.generated import gcs_service_pb2 as pb, gcs_service_pb2_grpc as rpc

address, token = sys.argv[1], sys.argv[2]
out = {}
try:
    GcsClient(address=address)
    out["ray_client"] = "connected"
except Exception as exc:
    out["ray_client"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
stub = rpc.NodeInfoGcsServiceStub(grpc.insecure_channel(address))
for name, secret in (("no_token", None), ("wrong_token", "0" * 64), ("the_token", token)):
    metadata = [("authorization", "Bearer " + secret)] if secret else []
    try:
        stub.GetClusterId(pb.GetClusterIdRequest(), timeout=20, metadata=metadata)
        out[name] = "OK"
    except grpc.RpcError as exc:
        out[name] = exc.code().name
print(json.dumps(out))
"""


def outsider_env(home: Path) -> dict[str, str]:
    """This environment without any RAY_ setting (no token, no auth mode), HOME at ``home``."""
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "OMP_NUM_THREADS": "1"}


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket's view of 127.0.0.1
    return (mapped or addr).is_loopback


def listening(root) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``root`` and its descendants."""
    import psutil

    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            found += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # a worker that ended meanwhile
            continue
    return found


def probe_from_outside(tmp_path: Path, gcs_address: str, token: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", CLIENT, gcs_address, token], env=outsider_env(tmp_path / "outsider"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_closed(sockets: list[tuple[str, str, int]], answers: dict[str, str], token_file: Path) -> None:
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the instance's own servers were seen
    assert [s for s in sockets if not is_loopback(s[1])] == []  # every one of them on loopback (Ray 2.60: all)
    assert answers["ray_client"].startswith("AuthenticationError"), answers
    assert answers["no_token"] == answers["wrong_token"] == "UNAUTHENTICATED"
    assert answers["the_token"] == "OK"  # the refusals above are about the token, not reachability
    assert token_file.stat().st_mode & 0o777 == 0o600


def end_tree(proc: subprocess.Popen, root) -> None:
    """Stop ``proc`` (Ray shuts its instance down at exit), then any of its processes left."""
    import psutil

    try:
        family = root.children(recursive=True)
    except psutil.Error:
        family = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.mark.slow
def test_a_study_on_the_local_ray_instance_is_closed_to_others(tmp_path):
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    path = write_study(tmp_path, "s", axes={"lora.r": [2]})
    gate, home, log = tmp_path / "gate", tmp_path / "home", tmp_path / "study.log"
    env = {**outsider_env(home), "PYTHONPATH": os.pathsep.join([str(SRC), str(PROBE)]),
           "LORALAB_TEST_GATE": str(gate)}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "loralab.cli", "study", "run", str(path), "--executor", "ray",
                                 "--out", str(tmp_path / "runs")], env=env, stdout=out, stderr=subprocess.STDOUT)
    driver = psutil.Process(proc.pid)
    try:
        def unit_running():
            assert proc.poll() is None, log.read_text()[-3000:]
            for child in driver.children(recursive=True):
                try:
                    argv = child.cmdline()
                except psutil.Error:
                    continue
                if "loralab.cli" in argv and "train" in argv:
                    return True
            return False

        wait_for(unit_running, 180, "the study's run to start in a Ray task")
        sockets = listening(driver)
        gcs_ports = {port for name, _, port in sockets if name == "gcs_server"}
        assert len(gcs_ports) == 1, sockets
        token_file = home / ".ray" / "auth_token"
        answers = probe_from_outside(tmp_path, f"127.0.0.1:{gcs_ports.pop()}", token_file.read_text().strip())
        assert_closed(sockets, answers, token_file)
        assert "ray::" in " ".join(name for name, _, _ in sockets)  # a worker's server was among them
        gate.touch()
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        gate.touch()
        end_tree(proc, driver)
    assert rows_of(tmp_path / "runs" / "s" / "study.db")["r2"]["status"] == "completed"


DRIVER = """
import json, sys
import ray  # imported before loralab sets RAY_AUTH_MODE: a notebook's order
from ray._raylet import AuthenticationMode, get_authentication_mode
from loralab.study.backends.ray import RayBackend

RayBackend()
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "gcs": ray.get_runtime_context().gcs_address,
                  "token_mode": get_authentication_mode() == AuthenticationMode.TOKEN}), flush=True)
sys.stdin.readline()  # hold the instance until the test has looked
"""


@pytest.mark.slow
def test_ray_imported_first_still_gets_a_closed_instance(tmp_path):
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    home = tmp_path / "home"
    env = {**outsider_env(home), "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    driver = psutil.Process(proc.pid)
    try:
        started = json.loads(proc.stdout.readline())
        assert started["token_mode"] and started["node_ip"] == "127.0.0.1"
        sockets = listening(driver)
        token_file = home / ".ray" / "auth_token"
        assert_closed(sockets, probe_from_outside(tmp_path, started["gcs"], token_file.read_text().strip()), token_file)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        end_tree(proc, driver)


def test_a_ray_without_token_authentication_is_refused():
    with pytest.raises(LoralabError) as exc:
        check_token_auth("2.51.2")
    assert "Ray 2.51.2 has no token authentication" in str(exc.value)
    assert "pip install 'ray[default]>=2.52'" in str(exc.value)
    check_token_auth("2.52.0")
    check_token_auth("2.60.0")


def test_the_token_is_written_private_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    path = ensure_token()
    assert path == tmp_path / ".ray" / "auth_token"
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert ensure_token() == path and path.read_text() == token  # an existing token is the user's: kept
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="loralab.study.backends.ray"):
        assert ensure_token() == path and path.read_text() == token
    assert f"{path}, the Ray token, is readable by other users of this machine: chmod 600 it" in caplog.text
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert ensure_token() is None  # the user said where the token is: nothing written
    assert not (tmp_path / "elsewhere").exists()


def test_ray_address_in_the_environment_joins_that_cluster(monkeypatch):
    """RAY_ADDRESS is where Ray's own init would go: a cluster the user chose, joined as it is,
    without loralab's local-instance settings."""
    import types

    calls = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: calls.append(kw))
    monkeypatch.setitem(sys.modules, "ray", fake)
    for name in LOCAL_INSTANCE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert connect(None) is fake
    assert calls == [{"address": "ray://head:10001", "include_dashboard": False, "log_to_driver": False}]
    assert not any(name in os.environ for name in LOCAL_INSTANCE_ENV)
