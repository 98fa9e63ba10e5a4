"""Score a base model and its adapters on tasks: the rows ``loralab eval`` and
``loralab.api.evaluate`` print or return.

    rows = evaluate("builtin:tiny", ["runs/r8"], resolve_tasks("arithmetic_2ds", 100))

One row per (model, task, metric): ``{model, adapter, task, metric, value, ci_low, ci_high, n,
skipped}``. The base is reloaded for each adapter so adapters never stack.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loralab.config import ModelConfig, QuantConfig

log = logging.getLogger(__name__)


def evaluate(model_path: str, adapters: list[str], tasks, *, batch_size: int = 16,
             model_cfg: ModelConfig | None = None, quant: QuantConfig | None = None,
             progress: bool = False, template: str | None = None) -> list[dict]:
    """Rows for the base and each adapter; ``model_cfg``/``quant`` (ModelConfig, QuantConfig)
    say how the base is loaded (default: model.* defaults, unquantized); ``progress``: a bar
    per task and scoring pass on stderr (terminals only). Tasks scored by generation show their
    prompts in ``template``, else in the template each adapter's run trained with (chat for a run
    on chat data), the base in the one its adapters share, else Alpaca's."""
    from dataclasses import replace

    from loralab.adapters import load_adapter
    from loralab.config import ModelConfig, QuantConfig
    from loralab.evaluate.tasks import Task
    from loralab.models import load_base

    model_cfg = model_cfg or ModelConfig(path=model_path)
    quant = quant or QuantConfig()
    templates = {a: template or trained_template(a) or "alpaca" for a in adapters}
    shared = set(templates.values())
    templates[None] = template or (shared.pop() if len(shared) == 1 else "alpaca")
    rows = []
    for adapter in [None, *adapters]:
        model, tok = load_base(model_cfg, quant, progress=progress)
        if adapter is not None:
            model = load_adapter(model, adapter)
        for t in tasks:
            count = f" ({len(t.items)} examples)" if t.items else ""  # lm-eval's own tasks: counted by lm-eval
            if isinstance(t, Task) and t.format == "alpaca" and not t.prompt:
                t = replace(t, template=templates[adapter])  # this adapter's copy; the caller's task is left as it was
                count += f", prompt template {t.template}"
            log.info("eval %s on %s%s", adapter or "base", t.name, count)
            for metric, s in t.run(model, tok, batch_size=batch_size, progress=progress).items():
                if s.skipped:
                    log.warning("%s: %d example(s) longer than the context window skipped for %s",
                                t.name, s.skipped, metric)
                rows.append({"model": model_path, "adapter": adapter, "task": t.name, "metric": metric,
                             "value": s.value, "ci_low": s.ci_low, "ci_high": s.ci_high, "n": s.n,
                             "skipped": s.skipped})
    return rows


def trained_template(adapter: str) -> str | None:
    """The prompt template ``adapter``'s run trained with (a run directory, or its adapter/
    folder); None for an adapter that is no loralab run's."""
    from pathlib import Path

    from loralab.rundir import ADAPTER, RunDir

    path = Path(adapter)
    for root in (path, path.parent) if path.name == ADAPTER else (path,):
        if (found := RunDir(root).prompt_template()) is not None:
            return found
    return None
