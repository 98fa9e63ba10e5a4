"""A task list (``--tasks``, a run's ``eval.tasks``): loralab tasks and ``harness:`` tasks, resolved.

    from loralab.evaluate.task_list import resolve_tasks
    tasks = resolve_tasks("arithmetic_2ds,harness:world_pairs", limit=100)

It sits above both kinds (loralab.evaluate.tasks, loralab.evaluate.harness), so neither imports the other
to dispatch.
"""

from __future__ import annotations

from loralab.errors import DataError
from loralab.evaluate.harness import HarnessTask, resolve_harness_task
from loralab.evaluate.tasks import HARNESS_PREFIX, Task, resolve_task


def resolve_tasks(spec: str, limit: int | None = None) -> list[Task | HarnessTask]:
    """Comma-separated built-in names, YAML task files and/or ``harness:NAME`` tasks, with
    their examples loaded (a ``harness:`` task is a :class:`loralab.evaluate.harness.HarnessTask`,
    scored by lm-evaluation-harness; it has the same ``name`` and ``run`` as a Task)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise DataError("--tasks: no task given")
    return [resolve_harness_task(name[len(HARNESS_PREFIX):], limit) if name.startswith(HARNESS_PREFIX)
            else resolve_task(name, limit) for name in names]
