"""The Ray backend: the same unit processes, started inside Ray tasks anywhere in a cluster.

    loralab study run preset:dropout --executor ray --address ray://head:10001 --workers 8

Each Ray task starts one unit's process (a run, or a fused group) on the node that took the
task and returns one outcome per run to the driver, which alone writes the study database.
Run directories are written on that node (on a shared filesystem, the directories the
driver sees). A unit whose runs train on a GPU asks Ray for one: a fraction of it when the
estimate says several such units fit in ``gpu_memory`` (``--max-memory``), so Ray packs
them; Ray then sets the task's CUDA_VISIBLE_DEVICES, which the unit's process inherits. Each
task asks for ``cpus`` CPUs (default 1) and its process uses that many threads. Ray is optional:
``pip install 'loralab[ray]'``.

Without ``--address`` loralab starts a Ray instance on this machine and closes it to others
(docs/security.md): token authentication on (``RAY_AUTH_MODE=token``, whatever the installed
version's default) and every server on the loopback address. With ``--address`` the cluster
is the user's, secured by them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError
from loralab.rundir import Status
from loralab.study.backends.process import UnitSpec, run_unit

log = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LoralabError(
            "--executor ray needs Ray, an optional extra: pip install 'loralab[ray]' (or 'ray[default]')") from None
    return ray


# The first Ray with token authentication (RAY_AUTH_MODE=token); pyproject.toml requires it.
TOKEN_AUTH_SINCE = "2.52"

# Set before Ray is imported, so the driver and every process the instance starts (GCS, raylet,
# agents, workers) inherit them. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 says the instance is one
# machine's: Ray then takes 127.0.0.1 as the node's address, and its servers listen there only.
LOCAL_INSTANCE_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def check_token_auth(version: str) -> None:
    """Refuse a Ray too old to authenticate: its local instance would take code from anyone."""
    from packaging.version import Version

    if Version(version) < Version(TOKEN_AUTH_SINCE):
        raise LoralabError(f"Ray {version} has no token authentication, so a local instance it starts would run "
                           f"code from anyone who reaches this machine; loralab needs Ray >= {TOKEN_AUTH_SINCE}: "
                           f"pip install 'ray[default]>={TOKEN_AUTH_SINCE}' (docs/security.md)")


def ensure_token() -> Path | None:
    """The token file the instance will use: Ray reads RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH,
    else ~/.ray/auth_token. When none is there, write ~/.ray/auth_token readable by this user
    only (Ray would write it with the umask's, usually world-readable, mode)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = Path.home() / ".ray" / "auth_token"
    if path.exists():
        if path.stat().st_mode & 0o077:
            log.warning("%s, the Ray token, is readable by other users of this machine: chmod 600 it", path)
        return path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as Ray's own tokens
    log.info("wrote a Ray authentication token to %s (mode 600)", path)
    return path


def _apply_to_imported_ray(ray: Any) -> None:
    """Ray was imported before LOCAL_INSTANCE_ENV was set (a notebook, a test): make this
    process read it too, as Ray itself does when it turns token authentication on."""
    try:
        from ray._private import ray_constants
        from ray._raylet import Config
    except ImportError:
        raise LoralabError(f"Ray {ray.__version__} was imported before loralab could turn its token authentication "
                           "on, and cannot be told afterwards: run the study in a fresh process") from None
    ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")


def start_local_instance() -> Any:
    """Ray, with a new instance on this machine: token authentication on, servers on loopback."""
    imported = "ray" in sys.modules
    os.environ.update(LOCAL_INSTANCE_ENV)
    ray = import_ray()
    check_token_auth(ray.__version__)
    ensure_token()
    if imported:
        _apply_to_imported_ray(ray)
    ray.init(include_dashboard=False, log_to_driver=False)
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:  # a Ray that ignores the setting: the token still guards it
        log.warning("this Ray (%s) put its local instance on %s, not loopback; token authentication still guards it",
                    ray.__version__, node_ip)
    return ray


def connect(address: str | None) -> Any:
    """Ray, connected: to the instance this process already started, to the cluster at
    ``address`` (the user's choice, secured by them), or to a new local instance."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None  # where Ray itself would go
    if address is None:
        return start_local_instance()
    log.info("joining the Ray cluster at %s (docs/security.md: securing a cluster)", address)
    ray = import_ray()
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return ray


def gpu_request(*, on_gpu: bool, cluster_gpus: float, memory: int | None, gpu_memory: int | None,
                count: int = 1) -> float:
    """GPUs one unit asks Ray for: none for CPU runs or a cluster without GPUs; ``count`` whole
    GPUs for a run on ``count`` > 1 processes (one each, on the node the task runs on); 1/k of
    one when ``k`` such units fit in ``gpu_memory`` by the estimate; else a whole GPU."""
    if not on_gpu or cluster_gpus <= 0:
        return 0.0
    if count > 1:
        return float(count)
    if memory is None or gpu_memory is None or memory > gpu_memory // 2:
        return 1.0
    return round(1.0 / (gpu_memory // memory), 4)


def _unit_task(unit: UnitSpec, threads: int) -> dict[str, Any]:
    """The Ray task body: run the unit on this node; its outcomes and what Ray gave it."""
    import ray

    return {"outcomes": run_unit(unit, threads), "resources": ray.get_runtime_context().get_assigned_resources(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class RayHandle:
    def __init__(self, ray: Any, ref: Any, unit: UnitSpec):
        self.ray, self.ref, self.unit = ray, ref, unit

    def poll(self) -> list[dict[str, Any]] | None:
        ready, _ = self.ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            answer = self.ray.get(self.ref)
        except Exception as exc:  # the Ray worker died (killed node, lost task): the runs were interrupted
            first = str(exc).splitlines()[0] if str(exc) else ""
            return [{"status": Status.INTERRUPTED, "error": f"the Ray task failed: {type(exc).__name__}: {first}"}
                    for _ in self.unit.runs]
        log.info("unit %s ran with Ray resources %s", "+".join(r.name for r in self.unit.runs), answer["resources"])
        return answer["outcomes"]


class RayBackend:
    name = "ray"

    def __init__(self, *, address: str | None = None, gpu_memory: int | None = None, cpus: int = 1):
        self.ray = connect(address)
        self.gpus = float(self.ray.cluster_resources().get("GPU", 0))
        self.gpu_memory, self.cpus = gpu_memory, cpus
        self.task = self.ray.remote(_unit_task)

    def process_slots(self) -> int:
        """How many processes the cluster's CPUs run at once (``cpus`` each; at least 1)."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1) // self.cpus))

    def start(self, unit: UnitSpec, *, memory: int | None, threads: int) -> RayHandle:
        """Submit the unit; ``threads`` (the driver machine's share) is not used: a node's
        CPUs are Ray's to give, ``cpus`` per process of the unit (a run on K processes asks for
        K times as many, and K GPUs on a cluster with GPUs; its K processes run on one node)."""
        on_gpu = any(r.config.get("model", {}).get("device", "auto") != "cpu" for r in unit.runs)
        num_gpus = gpu_request(on_gpu=on_gpu, cluster_gpus=self.gpus, memory=memory, gpu_memory=self.gpu_memory,
                               count=unit.nproc)
        ref = self.task.options(num_cpus=self.cpus * unit.nproc, num_gpus=num_gpus,
                                max_retries=0).remote(unit, self.cpus)
        return RayHandle(self.ray, ref, unit)
