"""lm-evaluation-harness in loralab: ``harness:NAME`` eval tasks and the ``--harness`` cross-check.

    loralab train run.yaml            # eval.tasks: [harness:world_mc, harness:truthfulqa_mc2, arithmetic_2ds]
    loralab eval --harness world_mc,world_pairs --model builtin:tiny --adapter runs/r8 [--json]
    loralab eval --harness world_mc --harness-dir harness_tasks/   # keep the generated task files

Both hand lm-eval's ``hf`` backend (``HFLM``) a model loaded by loralab, as an object: in a
run the very model being trained (at each evaluation, successive-halving rungs included), in
``loralab eval --harness`` the base loaded as a run loads it (``dtype``, ``device``,
``quant``) with each adapter put on a fresh copy. Log-softmax in float64, as loralab's own
scoring takes it. lm-eval's seeding, log warnings and progress bars are kept inside the call.

NAME is a loralab task (built-in name or task YAML of format ``mc`` or ``pairs``), an lm-eval
task YAML file (a mapping with ``task:``; its folder becomes the include path), or one of
lm-eval's own task names (their data are lm-eval's to fetch; indexing lm-eval's task
catalogue takes a while, and is skipped when no such name is given). A loralab task becomes
harness task files written by :func:`write_harness_tasks` from the same local data, so
lm-eval scores exactly what ``loralab eval --tasks`` scores:

* ``mc``: ``{name}_mc1`` and ``{name}_mc2``, ``output_type: multiple_choice``,
  ``doc_to_text`` = a "prompt" column holding loralab's own ``metrics.mc_prompt`` (preamble +
  ``"Q: {question}\\nA:"``), choices from the data's ``mc1_targets``/``mc2_targets``; MC1's
  target is the index of the choice labelled 1; MC2 uses the harness's own TruthfulQA
  ``process_results_mc2``.
* ``pairs``: ``{name}``: BLiMP's layout (empty context, choices [good, bad], target 0).

The data are converted to the Hugging Face TruthfulQA layout (``{"choices": [...],
"labels": [...]}``) in a JSONL file beside the YAML, loaded with the ``json`` builder (its
cache beside it), so nothing is downloaded.

Names of the numbers: a loralab task keeps loralab's task and metric names (lm-eval's
``acc`` of ``world_mc_mc2`` is ``world_mc``/``mc2``); lm-eval's tasks keep lm-eval's
(``truthfulqa_mc2``/``acc``; ``metric,filter`` where the filter is not ``none``). In a run's
metrics.jsonl the key is ``harness:TASK/METRIC`` (``harness:world_mc/mc2``,
``harness:truthfulqa_mc2/acc``), a group's subtasks ``harness:GROUP/SUBTASK/METRIC`` when the
group has no aggregate of its own.

lm-evaluation-harness is an optional extra: ``pip install loralab[harness]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loralab.errors import DataError, LoralabError
from loralab.evaluate.metrics import Z95, Score, mc_prompt
from loralab.evaluate.tasks import BUILTIN, HARNESS_PREFIX, Task, resolve_task
from loralab.rundir import write_atomic

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
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), fsync=False)


def _yaml(path: Path, spec: dict) -> None:
    text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    # lm-eval resolves ``!function`` tags; safe_dump cannot write one, so it is spliced in
    text = text.replace("'@@process_results_mc2@@'", "!function lm_eval.tasks.truthfulqa.utils.process_results_mc2")
    write_atomic(path, text, fsync=False)


def write_harness_tasks(task: Task, out_dir: Path) -> dict[str, tuple[str, str]]:
    """Write lm-eval task YAMLs (+ their JSONL data) for ``task``.

    Returns {harness task name: (loralab task name, loralab metric)}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{task.name}.jsonl"
    # the datasets cache of the converted data stays beside it (and goes with a temporary folder)
    kwargs = {"data_files": {"test": str(data.resolve())}, "cache_dir": str((out_dir / ".datasets").resolve())}
    common = {"dataset_path": "json", "dataset_kwargs": kwargs,
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


def lm_eval_task_file(path: Path) -> str | None:
    """The task (or group) name of an lm-eval task YAML, a mapping with ``task:`` (or
    ``group:``); None for anything else. A loralab task file (``path:``, ``format:``) has
    neither; lm-eval's YAMLs may use tags such as ``!function``, so the file is read with a
    loader that ignores them."""
    class _Loose(yaml.SafeLoader):
        pass

    _Loose.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loose)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(spec, dict) or "format" in spec:
        return None
    for key in ("group", "task"):
        if isinstance(spec.get(key), str):
            return spec[key]
    return None


def task_kind(item: str) -> str:
    """``loralab`` (a built-in name or a loralab task file), ``file`` (an lm-eval task YAML
    file) or ``lm-eval`` (one of lm-eval's own task names)."""
    path = Path(item)
    if item in BUILTIN:
        return "loralab"
    if path.is_file():
        return "file" if lm_eval_task_file(path) else "loralab"
    return "loralab" if item.endswith((".yaml", ".yml")) else "lm-eval"  # a missing file: loralab's error


def _names_lm_eval_task(spec: str) -> bool:
    """Whether ``spec`` names one of lm-eval's own tasks: only then is lm-eval's task
    catalogue (slow to index) needed."""
    return any(task_kind(s.strip()) == "lm-eval" for s in spec.split(",") if s.strip())


def prepare_tasks(spec: str, out_dir: Path, limit: int | None,
                  include_path: list[str] | None = None) -> dict[str, tuple[str, str] | None]:
    """Harness task names for ``spec``, writing loralab tasks' files under ``out_dir``.

    Returns {harness task name: (loralab task, metric)}, ``None`` for lm-eval's tasks.
    An lm-eval task YAML named by its path is taken by its ``task:`` name, and its folder is
    appended to ``include_path`` (when given) so lm-eval finds it and the files it includes."""
    names: dict[str, tuple[str, str] | None] = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        kind = task_kind(item)
        if kind == "file":
            names[lm_eval_task_file(Path(item))] = None
            if include_path is not None:
                include_path.append(str(Path(item).resolve().parent))
        elif kind == "loralab":
            task = resolve_task(item, limit)
            names.update(write_harness_tasks(task, out_dir))
        else:
            names[item] = None
    if not names:
        raise LoralabError("--harness: no task given")
    return names


def task_manager(names: list[str], include_path: list[str], *, include_defaults: bool):
    """lm-eval's TaskManager over ``include_path`` (and its own tasks when ``include_defaults``),
    after checking that it knows every name."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path or None, include_defaults=include_defaults)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise LoralabError(f"--harness: lm-eval knows no task {', '.join(unknown)} "
                           "(give a loralab task, an lm-eval task YAML file, or --include-path DIR holding its YAML)")
    return manager


def run_harness(model_dir: str, adapter_dir: str | None, tasks: list[str], *, include_path: list[str],
                include_defaults: bool = True, limit: int | None = None, device: str = "cpu",
                batch_size: int = 16, dtype: str = "float32") -> dict:
    """lm_eval.simple_evaluate with lm-eval loading model + adapter itself (``pretrained=DIR``,
    ``peft=DIR``): the independent cross-check of loralab's own loading and scoring."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_lm_eval()
    from lm_eval import simple_evaluate

    args = {"pretrained": model_dir, "dtype": dtype, "softmax_dtype": "float64"}
    if adapter_dir is not None:
        args["peft"] = adapter_dir
    manager = task_manager(tasks, include_path, include_defaults=include_defaults)
    return simple_evaluate(model="hf", model_args=args, tasks=tasks, task_manager=manager, limit=limit,
                           device=device, batch_size=batch_size, log_samples=True, bootstrap_iters=1000)


@contextlib.contextmanager
def _quiet_and_seed_neutral():
    """lm-eval seeds python, numpy and torch (for its own reproducibility), logs a warning for
    a model passed as an object and draws progress bars: inside a training run none of it may
    leak out, so the RNG states are put back (training after an evaluation draws what it would
    have drawn without one), lm-eval's logger is held at ERROR and the bars (tqdm writes to
    sys.stderr) are dropped, and so is what its subprocesses write to the process's stderr
    (``git describe`` in the working directory: "fatal: not a git repository"); loralab's own
    log lines go through logging's handlers, unaffected."""
    import io
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    lm_log.setLevel(logging.ERROR)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    sys.stderr.flush()
    saved_fd = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        with torch.random.fork_rng(devices=devices), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        random.setstate(py)
        np.random.set_state(npy)
        lm_log.setLevel(level)


def score_in_memory(model, tokenizer, tasks: list[str], *, manager, limit: int | None = None,
                    batch_size: int = 16, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate on a loaded model (a run's PEFT model, or a base): lm-eval's
    ``hf`` backend (HFLM) wraps the object as it is, on its device, in its dtype and
    quantization; log-softmax in float64 as loralab's own scoring does."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        with _quiet_and_seed_neutral():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype="float64")
            return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                   log_samples=log_samples, bootstrap_iters=1000)
    finally:
        model.train(was_training)


def _stderr(metrics: dict, metric: str, filt: str) -> float | None:
    se = metrics.get(f"{metric}_stderr,{filt}")
    return float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None


def harness_rows(results: dict, *, model: str, adapter: str | None,
                 names: dict[str, tuple[str, str] | None] | None = None) -> list[dict]:
    """The harness's numbers in loralab's row shape; the interval is value +/- 1.96 * stderr.

    A task loralab wrote is reported under loralab's task and metric names (its ``acc``
    is MC1, MC2 or pairs accuracy); lm-eval's own tasks keep the harness's names, the
    metric spelled ``metric`` for lm-eval's ``none`` filter and ``metric,filter`` otherwise."""
    rows = []
    for task, metrics in results["results"].items():
        ours = (names or {}).get(task)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            se = _stderr(metrics, metric, filt)
            if ours and metric == "acc":
                name, metric = ours
            else:
                name, metric = task, metric if filt == "none" else f"{metric},{filt}"
            rows.append({"model": model, "adapter": adapter, "task": name, "metric": metric,
                         "value": float(value), "ci_low": value - Z95 * se if se is not None else float("nan"),
                         "ci_high": value + Z95 * se if se is not None else float("nan"), "n": n, "skipped": 0,
                         "source": "lm-eval"})
    return rows


# ----------------------------------------------------------------- harness:NAME as an eval task


@dataclass
class HarnessTask:
    """``harness:NAME`` in a run's ``eval.tasks`` (or ``loralab eval --tasks``): lm-eval scores
    the model in memory at each evaluation, like a loralab Task (same ``name`` and ``run``).

    ``run`` returns {metric: Score}; the loop writes them as ``harness:LABEL/METRIC``, LABEL
    being the loralab task's name for a loralab task (``harness:world_mc/mc2``) and lm-eval's
    task name otherwise (``harness:truthfulqa_mc2/acc``); rows of a group's subtasks, when
    the group has no aggregate of its own, are ``harness:GROUP/SUBTASK/METRIC``."""

    name: str  # "harness:" + label
    label: str
    names: dict[str, tuple[str, str] | None]  # harness task -> (loralab task, metric) | None
    include_path: list[str]
    include_defaults: bool
    limit: int | None = None
    items: list = field(default_factory=list)  # the loralab task's examples (none for lm-eval's own)
    _manager: object = field(default=None, repr=False)
    _dir: object = field(default=None, repr=False)  # keeps the written task files alive

    def manager(self):
        if self._manager is None:
            self._manager = task_manager(list(self.names), self.include_path,
                                         include_defaults=self.include_defaults)
        return self._manager

    def run(self, model, tokenizer, *, batch_size: int = 16, progress: bool = False) -> dict[str, Score]:
        # progress: lm-eval's own bars stay inside score_in_memory (kept off there, see above)
        results = score_in_memory(model, tokenizer, list(self.names), manager=self.manager(),
                                  limit=self.limit, batch_size=batch_size)
        rows = harness_rows(results, model="", adapter=None, names=self.names)
        own = [r for r in rows if r["task"] == self.label]
        out = {}
        for r in own or rows:
            metric = r["metric"] if r in own else f"{r['task']}/{r['metric']}"
            out[metric] = Score(r["value"], r["ci_low"], r["ci_high"], int(r["n"] or 0), 0)
        if not out:
            raise LoralabError(f"{self.name}: lm-eval returned no metric for {', '.join(self.names)}")
        return out


def resolve_harness_task(spec: str, limit: int | None = None) -> HarnessTask:
    """The task ``harness:SPEC``: a loralab task of format mc/pairs (built-in name or task
    file) written as lm-eval task files from its local data, an lm-eval task YAML file (its
    folder becomes the include path), or one of lm-eval's own task names. Checked here,
    before any training: a name lm-eval does not know is an error."""
    require_lm_eval()
    if not spec or "," in spec:
        raise LoralabError(f"eval task harness:{spec}: give one task after harness:")
    tmp = tempfile.TemporaryDirectory(prefix="loralab-harness-")
    out = Path(tmp.name)
    include = [str(out)]
    kind = task_kind(spec)
    names = prepare_tasks(spec, out, limit, include)
    if kind == "loralab":
        label, items = next(iter(names.values()))[0], resolve_task(spec, limit).items
    else:
        label, items = lm_eval_task_file(Path(spec)) if kind == "file" else spec, []
    task = HarnessTask(HARNESS_PREFIX + label, label, names, include, include_defaults=kind == "lm-eval",
                       limit=limit, items=items, _dir=tmp)
    check_task_data(task)  # an unknown name or data lm-eval cannot load fails now, not after training
    return task


def check_task_data(task: HarnessTask) -> None:
    """Build ``task``'s lm-eval tasks once, which loads their data (lm-eval downloads a hub
    dataset on first use): a dataset that cannot be read or fetched (no network, a moved local
    file) is a LoralabError before any training, not a traceback at the first evaluation."""
    from lm_eval.tasks import get_task_dict

    manager = task.manager()
    try:
        with _quiet_and_seed_neutral():
            get_task_dict(list(task.names), manager)
    except Exception as exc:  # datasets and lm-eval raise many types (ConnectionError, FileNotFoundError, ...)
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"eval task {task.name}: lm-eval could not load its data ({type(exc).__name__}: {cause}). A hub "
            "dataset needs the network the first time, or its copy in the Hugging Face cache "
            "(HF_DATASETS_OFFLINE=1 then reads only that); a task file's data must be where the file says"
        ) from exc


# ----------------------------------------------------------------- loralab eval --harness


def _loralab_dtype(dtype: str) -> str:
    """A ``model.dtype`` value for ``dtype`` given as loralab's name (fp32, bf16, fp16, auto)
    or torch's (float32, bfloat16, float16)."""
    import typing

    import torch

    from loralab.config import ModelConfig

    name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(dtype, dtype)
    allowed = typing.get_args(typing.get_type_hints(ModelConfig)["dtype"])
    if name == "auto" and "auto" not in allowed:  # resolve it here: bf16 where the GPU has it
        name = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if name not in allowed:
        raise LoralabError(f"--dtype {dtype}: not one of {', '.join(allowed)}")
    return name


def evaluate_harness(model_path: str, adapters: list[str], spec: str, *, include_path: list[str],
                     harness_dir: str | None = None, limit: int | None = None, device: str = "auto",
                     batch_size: int = 16, dtype: str = "auto", quant: str = "none") -> list[dict]:
    """Rows for the base and each adapter, as lm-eval scores them.

    The base is loaded by loralab (``model.dtype`` ``dtype``, ``model.device`` ``device``,
    ``quant.mode`` ``quant``: the same loading as a training run) and each adapter put on a
    fresh copy; lm-eval's ``hf`` backend scores the model object."""
    from loralab.adapters import adapter_dir, load_adapter
    from loralab.config import ModelConfig, QuantConfig
    from loralab.models import load_base

    require_lm_eval()
    if quant not in ("none", "nf4", "fp4"):
        raise LoralabError(f"--quant {quant}: not one of none, nf4, fp4")
    model_cfg = ModelConfig(path=model_path, dtype=_loralab_dtype(dtype), device=device)
    for a in adapters:
        adapter_dir(a)  # a bad adapter fails before any model loads
    with tempfile.TemporaryDirectory(prefix="loralab-harness-") as tmp:
        out = Path(harness_dir) if harness_dir else Path(tmp)
        include = [str(out), *include_path]
        names = prepare_tasks(spec, out, limit, include)
        manager = task_manager(list(names), include, include_defaults=_names_lm_eval_task(spec))
        rows = []
        for adapter in [None, *adapters]:
            log.info("lm-eval on %s: %s", adapter or "base", ", ".join(names))
            model, tok = load_base(model_cfg, QuantConfig(mode=quant))
            if adapter is not None:
                model = load_adapter(model, adapter)
            res = score_in_memory(model.eval(), tok, list(names), manager=manager, limit=limit,
                                  batch_size=batch_size)
            rows += harness_rows(res, model=model_path, adapter=adapter, names=names)
    return rows
