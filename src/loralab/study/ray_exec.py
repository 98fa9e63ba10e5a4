"""The Ray executor: the same run processes, started inside Ray tasks anywhere in a cluster.

    loralab study run preset:dropout --executor ray --address ray://head:10001 --workers 8

Each Ray task runs ``execute_run`` (one ``loralab train`` child process on the node that
took the task) and returns the run's status, summary and metric rows to the driver, which
alone writes the study database. Run directories are written on the node that ran them
(on a shared filesystem, the same directories the driver sees). Ray is optional:
``pip install 'loralab[ray]'``.
"""

from __future__ import annotations

import logging
from typing import Any

from loralab.errors import LoralabError
from loralab.study.execute import POLL_S, Task, execute_run, record
from loralab.study.store import Store

log = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LoralabError("--executor ray needs Ray, an optional extra: pip install 'loralab[ray]' (or 'ray[default]')") from None
    return ray


def run_ray(store: Store, tasks: list[Task], *, workers: int, address: str | None, retries: int = 1, max_attempts: int = 3) -> None:
    """Keep ``workers`` Ray tasks in flight until every run has an outcome."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=0)(execute_run)
    queue = list(tasks)
    active: dict[Any, Task] = {}
    tries: dict[int, int] = {}
    while queue or active:
        while queue and len(active) < workers:
            task = queue.pop(0)
            store.start(task.run_id, run_dir=str(task.run_dir), estimated=task.estimate)
            task.attempts += 1
            tries[task.run_id] = tries.get(task.run_id, 0) + 1
            active[remote.remote(task.config, str(task.run_dir), 1)] = task
        ready, _ = ray.wait(list(active), num_returns=1, timeout=POLL_S)
        for ref in ready:
            task = active.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # the Ray worker died (killed node, lost task): the run was interrupted
                result = {"status": "interrupted", "error": f"the Ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            if record(store, task, result, max_attempts=max_attempts) and tries[task.run_id] <= retries:
                queue.append(task)
