"""The Ray backend: the same unit processes, started inside Ray tasks anywhere in a cluster.

    loralab study run preset:dropout --executor ray --address ray://head:10001 --workers 8

Each Ray task starts one unit's process (a run, or a fused group) on the node that took the
task and returns one outcome per run to the driver, which alone writes the study database.
Run directories are written on that node (on a shared filesystem, the directories the
driver sees). A unit whose runs train on a GPU asks Ray for one: a fraction of it when the
estimate says several such units fit in ``gpu_memory`` (``--max-memory``), so Ray packs
them; Ray then sets the task's CUDA_VISIBLE_DEVICES, which the unit's process inherits. Each
task asks for ``cpus`` CPUs (default 1) and its process uses that many threads. Ray is optional: ``pip install 'loralab[ray]'``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from loralab.errors import LoralabError
from loralab.rundir import Status
from loralab.study.backends.process import UnitSpec, run_unit

log = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LoralabError("--executor ray needs Ray, an optional extra: pip install 'loralab[ray]' (or 'ray[default]')") from None
    return ray


def gpu_request(*, on_gpu: bool, cluster_gpus: float, memory: int | None, gpu_memory: int | None) -> float:
    """GPUs one unit asks Ray for: none for CPU runs or a cluster without GPUs; 1/k of one
    when ``k`` such units fit in ``gpu_memory`` by the estimate; else a whole GPU."""
    if not on_gpu or cluster_gpus <= 0:
        return 0.0
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
        self.ray = import_ray()
        if not self.ray.is_initialized():
            self.ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.gpus = float(self.ray.cluster_resources().get("GPU", 0))
        self.gpu_memory, self.cpus = gpu_memory, cpus
        self.task = self.ray.remote(_unit_task)

    def start(self, unit: UnitSpec, *, memory: int | None, threads: int) -> RayHandle:
        """Submit the unit; ``threads`` (the driver machine's share) is not used: a node's
        CPUs are Ray's to give, ``cpus`` per task."""
        on_gpu = any(r.config.get("model", {}).get("device", "auto") != "cpu" for r in unit.runs)
        num_gpus = gpu_request(on_gpu=on_gpu, cluster_gpus=self.gpus, memory=memory, gpu_memory=self.gpu_memory)
        ref = self.task.options(num_cpus=self.cpus, num_gpus=num_gpus, max_retries=0).remote(unit, self.cpus)
        return RayHandle(self.ray, ref, unit)
