"""``loralab eval``: score a base model and its adapters on built-in or YAML tasks.

    loralab eval --model builtin:tiny --adapter runs/r8 --adapter runs/r16 \\
        --tasks arithmetic_2ds,world_mc,my_task.yaml --limit 100 [--json]

    loralab eval --harness world_mc,world_pairs --model builtin:tiny --adapter runs/r8 [--json]

    loralab eval --model meta-llama/Llama-2-70b-hf --quant nf4 --dtype bf16 --device cuda --adapter runs/q70b

One table: task, metric, then one column per model (base, then each adapter) with
``value [ci_low, ci_high] n=N``. ``--dtype``, ``--quant`` and ``--device`` load the base the way
the run trained it (a QLoRA adapter is scored on its 4-bit base), for loralab's own scoring
and for the harness bridge alike. With --json: ``{"results": [{model, adapter, task, metric,
value, ci_low, ci_high, n, skipped}, ...]}``, the rows of :mod:`loralab.evaluate.score`.
``--harness TASKS`` scores with lm-evaluation-harness instead (:mod:`loralab.evaluate.harness`)
and prints its numbers in the same shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import math

from loralab.cli.output import emit_json, table
from loralab.cli.run import adapter_run, add_force_arg, add_model_flags, base_configs

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a base model and adapters on tasks")
    p.add_argument("--model", required=True, help="base model directory, hub id or builtin:tiny")
    p.add_argument("--adapter", action="append", default=[], help="run or adapter directory (repeatable)")
    p.add_argument("--tasks", default="arithmetic_2ds,arithmetic_4ds,world_mc,world_pairs",
                   help="comma-separated built-in task names and/or task YAML files")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--template", choices=["alpaca", "chat", "none"],
                   help="prompt template of the tasks scored by generation (default: the one each adapter's run "
                        "trained with, chat for a run on chat data; the base takes the adapters' own where they "
                        "share one, else alpaca)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    h = p.add_argument_group("lm-evaluation-harness cross-check (pip install loralab[harness])")
    h.add_argument("--harness", metavar="TASKS", default=None,
                   help="score TASKS with lm-eval's hf backend instead: loralab tasks of format mc or pairs "
                        "(built-in names or task YAMLs) and/or lm-eval task names")
    h.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="directory of extra lm-eval task YAMLs (repeatable)")
    h.add_argument("--harness-dir", default=None, metavar="DIR",
                   help="keep the lm-eval task files loralab writes here (default: a temporary directory)")
    add_model_flags(p, from_run=True)  # unset: as the adapters' runs loaded their base, else the defaults
    add_force_arg(p)
    p.set_defaults(func=cmd_eval)


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3f}"


def cmd_eval(args: argparse.Namespace) -> int:
    from loralab.adapters import adapter_dir
    from loralab.errors import DataError
    from loralab.evaluate.score import evaluate
    from loralab.evaluate.task_list import resolve_tasks
    from loralab.preflight import check_adapter_base

    if args.limit is not None and args.limit < 1:
        raise DataError("--limit must be a positive integer")
    if args.batch_size < 1:
        raise DataError("--batch-size must be a positive integer")
    for adapter in args.adapter:  # every adapter checked before any model loads
        adapter_dir(adapter)
        check_adapter_base(adapter, args.model, force=args.force)
    model_cfg, quant = base_configs(args.model, args, runs_loading(args.adapter))
    if args.quant is None and quant.mode != "none":
        log.info("the base is loaded %s-quantized, as the adapters' runs trained on it (--quant none: full "
                 "precision)", quant.mode)
    if args.harness is not None:
        from loralab.evaluate.harness import evaluate_harness

        rows = evaluate_harness(args.model, args.adapter, args.harness, include_path=args.include_path,
                                harness_dir=args.harness_dir, limit=args.limit, batch_size=args.batch_size,
                                dtype=model_cfg.dtype, device=model_cfg.device, quant=quant.mode)
    else:
        tasks = resolve_tasks(args.tasks, args.limit)
        rows = evaluate(args.model, args.adapter, tasks, batch_size=args.batch_size, model_cfg=model_cfg,
                        quant=quant, progress=not args.json, template=args.template)
    if args.json:
        emit_json({"results": rows})
        return 0
    print_table(rows, ["base", *args.adapter])
    return 0


def runs_loading(adapters: list[str]) -> dict | None:
    """The config of the adapters' runs where they agree on how their base was loaded (model
    dtype, quantization): the base is then loaded that way unless --dtype/--quant say otherwise,
    so a QLoRA adapter is scored on the 4-bit base it trained on, as generate and merge load it.
    None (the flags' defaults) where no adapter comes from a run or the runs differ."""
    configs = [c for c in (adapter_run(a)["config"] for a in adapters) if c]
    loading = {json.dumps([(c.get("model") or {}).get("dtype"), c.get("quant") or {}], sort_keys=True)
               for c in configs}
    if len(loading) > 1:
        log.warning("WARNING: the adapters' runs loaded their bases differently (model.dtype, quant); the base is "
                    "loaded as --dtype and --quant say (default: %s, unquantized) for all of them", "auto")
        return None
    return configs[0] if configs else None


def print_table(rows: list[dict], cols: list[str]) -> None:
    """task, metric, then one ``value [ci_low, ci_high] n=N`` column per model."""
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    cell = {(r["task"], r["metric"], r["adapter"] or "base"): r for r in rows}
    lines = []
    for task, metric in keys:
        line = [task, metric]
        for c in cols:
            r = cell.get((task, metric, c))
            line.append("" if r is None else
                        f"{_fmt(r['value'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] n={r['n']}"
                        + (f" ({r['skipped']} skipped)" if r["skipped"] else ""))
        lines.append(line)
    print(table(lines, ["task", "metric", *cols]))
