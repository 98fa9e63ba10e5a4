"""Cross-check with lm-evaluation-harness: run its Hugging Face backend on the base + adapter.

    loralab eval --harness world_mc,world_pairs --model builtin:tiny --adapter runs/r8 [--json]
    loralab eval --harness world_mc --harness-dir harness_tasks/   # keep the generated task files

``--harness TASKS`` names loralab tasks (built-in names or task YAML files of format ``mc``
or ``pairs``) and/or the harness's own task names. A loralab task becomes harness task
files written by :func:`write_harness_tasks` from the same local data, so lm-eval scores
exactly what ``loralab eval --tasks`` scores:

* ``mc``: ``{name}_mc1`` and ``{name}_mc2``, ``output_type: multiple_choice``,
  ``doc_to_text`` = a "prompt" column holding loralab's own ``metrics.mc_prompt`` (preamble + ``"Q: {question}\\nA:"``), choices from the data's
  ``mc1_targets``/``mc2_targets``; MC1's target is the index of the choice labelled 1; MC2
  uses the harness's own TruthfulQA ``process_results_mc2``.
* ``pairs``: ``{name}``: BLiMP's layout (empty context, choices [good, bad], target 0).

The data are converted to the Hugging Face TruthfulQA layout (``{"choices": [...],
"labels": [...]}``) in a JSONL file beside the YAML, loaded with the ``json`` builder, so
nothing is downloaded (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``). The model is
lm-eval's ``hf`` model with ``pretrained=<model dir>,peft=<adapter dir>,dtype=float32``
and ``softmax_dtype=float64`` (loralab also takes the log-softmax in float64).

lm-evaluation-harness is an optional extra: ``pip install loralab[harness]``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import yaml

from loralab.errors import LoralabError
from loralab.evaluate.metrics import Z95, mc_prompt
from loralab.evaluate.tasks import BUILTIN, Task, resolve_tasks

log = logging.getLogger(__name__)
INSTALL_HINT = "lm-evaluation-harness is not installed: pip install loralab[harness]"


def require_lm_eval():
    """Import lm_eval or raise a LoralabError with the install hint."""
    try:
        import lm_eval
    except ImportError:
        raise LoralabError(INSTALL_HINT) from None
    return lm_eval


def _jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _yaml(path: Path, spec: dict) -> None:
    text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    # lm-eval resolves ``!function`` tags; safe_dump cannot write one, so it is spliced in
    text = text.replace("'@@process_results_mc2@@'", "!function lm_eval.tasks.truthfulqa.utils.process_results_mc2")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_harness_tasks(task: Task, out_dir: Path) -> dict[str, tuple[str, str]]:
    """Write lm-eval task YAMLs (+ their JSONL data) for ``task``.

    Returns {harness task name: (loralab task name, loralab metric)}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{task.name}.jsonl"
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
              "test_split": "test", "output_type": "multiple_choice", "num_fewshot": 0,
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    if task.format == "mc":
        records = []
        for q in task.items:
            rec = {"question": q.question, "prompt": mc_prompt(q.question, task.preamble)}  # loralab's own prompt
            for key in ("mc1", "mc2"):
                choices = getattr(q, key)
                rec[f"{key}_targets"] = {"choices": list(choices), "labels": list(choices.values())}
            records.append(rec)
        _jsonl(data, records)
        names = {}
        for key in ("mc1", "mc2"):
            if not getattr(task.items[0], key):
                continue
            name = f"{task.name}_{key}"
            spec = {"task": name, **common, "doc_to_text": "prompt",
                    "doc_to_choice": "{{" + key + "_targets.choices}}",
                    "doc_to_target": "{{mc1_targets.labels.index(1)}}" if key == "mc1" else 0}
            if key == "mc2":
                spec["process_results"] = "@@process_results_mc2@@"
            _yaml(out_dir / f"{name}.yaml", spec)
            names[name] = (task.name, key)
        return names
    if task.format == "pairs":
        _jsonl(data, [{"good": g, "bad": b} for g, b in task.items])
        # target_delimiter "": the sentence is scored as written after BOS, as loralab's
        # score_pairs does (lm-eval's stock BLiMP scores " " + sentence)
        spec = {"task": task.name, **common, "doc_to_text": "", "doc_to_choice": "{{[good, bad]}}",
                "doc_to_target": 0, "target_delimiter": ""}
        _yaml(out_dir / f"{task.name}.yaml", spec)
        return {task.name: (task.name, "pairs_accuracy")}
    raise LoralabError(f"--harness: task {task.name} has format {task.format}; "
                       "loralab writes harness tasks for formats mc and pairs only")


def _is_loralab_task(name: str) -> bool:
    """The names resolve_tasks takes (a built-in, or a task file): anything else is lm-eval's."""
    return name in BUILTIN or name.endswith((".yaml", ".yml")) or Path(name).is_file()


def prepare_tasks(spec: str, out_dir: Path, limit: int | None) -> dict[str, tuple[str, str] | None]:
    """Harness task names for ``spec``, writing loralab tasks' files under ``out_dir``.

    Returns {harness task name: (loralab task, metric)}, ``None`` for lm-eval's own tasks."""
    names: dict[str, tuple[str, str] | None] = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if _is_loralab_task(item):
            (task,) = resolve_tasks(item, limit)
            names.update(write_harness_tasks(task, out_dir))
        else:
            names[item] = None
    if not names:
        raise LoralabError("--harness: no task given")
    return names


def run_harness(model_dir: str, adapter_dir: str | None, tasks: list[str], *, include_path: list[str],
                include_defaults: bool = True, limit: int | None = None, device: str = "cpu",
                batch_size: int = 16, dtype: str = "float32") -> dict:
    """lm_eval.simple_evaluate on model + adapter; returns its results dict (with samples)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {"pretrained": model_dir, "dtype": dtype, "softmax_dtype": "float64"}
    if adapter_dir is not None:
        args["peft"] = adapter_dir
    manager = TaskManager(include_path=include_path or None, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LoralabError(f"--harness: lm-eval knows no task {', '.join(unknown)} "
                           "(give a loralab task, or --include-path DIR holding its YAML)")
    return simple_evaluate(model="hf", model_args=args, tasks=tasks, task_manager=manager, limit=limit,
                           device=device, batch_size=batch_size, log_samples=True, bootstrap_iters=1000)


def harness_rows(results: dict, *, model: str, adapter: str | None,
                 names: dict[str, tuple[str, str] | None] | None = None) -> list[dict]:
    """The harness's numbers in loralab's row shape; the interval is value +/- 1.96 * stderr.

    A task loralab wrote is reported under loralab's task and metric names (its ``acc``
    is MC1, MC2 or pairs accuracy); lm-eval's own tasks keep the harness's names."""
    rows = []
    for task, metrics in results["results"].items():
        ours = (names or {}).get(task)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            se = metrics.get(f"{metric}_stderr,{filt}")
            ok = isinstance(se, (int, float))
            name, metric = ours if ours and metric == "acc" else (task, metric)
            rows.append({"model": model, "adapter": adapter, "task": name, "metric": metric,
                         "value": float(value), "ci_low": value - Z95 * se if ok else float("nan"),
                         "ci_high": value + Z95 * se if ok else float("nan"), "n": n, "skipped": 0,
                         "source": "lm-eval"})
    return rows


def sample_loglikelihoods(results: dict, task: str) -> list[list[float]]:
    """Per document (in data order), the harness's log-likelihood of each choice."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def evaluate_harness(model_path: str, adapters: list[str], spec: str, *, include_path: list[str],
                     harness_dir: str | None = None, limit: int | None = None, batch_size: int = 16,
                     dtype: str = "auto", device: str = "auto", quant: str = "none") -> list[dict]:
    """Rows for the base and each adapter, as lm-eval scores them."""
    from loralab.adapters import adapter_dir
    from loralab.models import pick_device, resolve_dtype, resolve_model_path

    if quant != "none":
        raise LoralabError(f"--harness with --quant {quant}: the harness bridge loads unquantized bases only")
    dev = pick_device(device)
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[resolve_dtype(dtype, dev)]
    device = str(dev)
    require_lm_eval()
    model_dir = resolve_model_path(model_path)
    adapter_dirs = [str(adapter_dir(a)) for a in adapters]
    with tempfile.TemporaryDirectory(prefix="loralab-harness-") as tmp:
        out = Path(harness_dir) if harness_dir else Path(tmp)
        names = prepare_tasks(spec, out, limit)
        only_ours = all(v is not None for v in names.values())
        rows = []
        for adapter, adir in [(None, None), *zip(adapters, adapter_dirs, strict=True)]:
            log.info("lm-eval on %s: %s", adapter or "base", ", ".join(names))
            res = run_harness(model_dir, adir, list(names), include_path=[str(out), *include_path],
                              include_defaults=not only_ours, limit=limit, device=device, batch_size=batch_size,
                              dtype=torch_dtype)
            rows += harness_rows(res, model=model_path, adapter=adapter, names=names)
    return rows

