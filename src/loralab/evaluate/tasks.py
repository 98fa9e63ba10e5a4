"""Evaluation tasks: the built-in ones and user tasks described by a YAML file.

A task file (read with ``yaml.safe_load``)::

    name: my_quiz            # optional, default: the file's stem
    path: quiz.jsonl         # data file, relative to the task file
    format: lettered         # alpaca | mc | pairs | lettered
    metric: accuracy         # one name or a list (default: every metric of the format)
    prompt: "{question}\\n{choices}\\nAnswer:"   # optional prompt template
    stop: "\\n"               # optional stop string (alpaca generation)
    preamble: ""             # optional QA preamble (mc)
    max_new_tokens: 16       # optional (alpaca)
    normalize: strip         # optional (alpaca exact_match): strip | loose (lower-case, spaces, final ".")

Record layouts: alpaca ``{instruction, input?, output}`` (prompt template fields
``{instruction}``, ``{input}``; default the Alpaca template); mc the TruthfulQA layout
``{question, mc1_targets, mc2_targets}`` with choice -> 0/1; pairs ``{good, bad}``;
lettered ``{question, choices: [...], answer: "B" or 1}``.

``harness:NAME`` in a task list (``--tasks``, a run's ``eval.tasks``, resolved by
:mod:`loralab.evaluate.task_list`) is scored by lm-evaluation-harness instead
(:mod:`loralab.evaluate.harness`): a loralab task of format mc
or pairs, an lm-eval task YAML file, or an lm-eval task name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loralab.data.dataset import DATA_DIR, read_records
from loralab.data.templates import chat_turn_end, format_prompt
from loralab.errors import DataError
from loralab.evaluate import metrics as M
from loralab.evaluate.exact_match import NORMALIZERS

FORMAT_METRICS = {
    "alpaca": ["exact_match", "greedy_match", "loss", "perplexity", "token_accuracy"],
    "mc": ["mc1", "mc2"],
    "pairs": ["pairs_accuracy"],
    "lettered": ["accuracy"],
}
TASK_KEYS = {"name", "path", "format", "metric", "prompt", "stop", "preamble", "max_new_tokens", "normalize"}
BUILTIN = {
    "arithmetic_2ds": dict(path=DATA_DIR / "arithmetic_2ds_test.jsonl", format="alpaca", max_new_tokens=8),
    "arithmetic_4ds": dict(path=DATA_DIR / "arithmetic_4ds_test.jsonl", format="alpaca", max_new_tokens=8),
    "world_mc": dict(path=DATA_DIR / "world_mc.json", format="mc"),
    "world_pairs": dict(path=DATA_DIR / "world_pairs.jsonl", format="pairs"),
}
HARNESS_PREFIX = "harness:"  # eval.tasks / --tasks entries scored by lm-evaluation-harness


@dataclass
class Task:
    name: str
    path: Path
    format: str
    metrics: list[str]
    prompt: str | None = None
    stop: str | None = None
    preamble: str = ""
    max_new_tokens: int = 16
    normalize: str = "strip"
    items: list = field(default_factory=list)
    # how an alpaca-format item without a prompt of the task's own is shown: the template the
    # scored adapter's run trained with (a run on chat data: the tokenizer's chat template)
    template: str = "alpaca"

    def prompts(self, tokenizer) -> list[str]:
        """The alpaca-format items' prompts: the task's own ``prompt``, else ``template``'s."""
        return [self.prompt.format(instruction=i, input=x) if self.prompt else
                format_prompt(i, x, template=self.template, tokenizer=tokenizer) for i, x, _ in self.items]

    def run(self, model, tokenizer, *, batch_size: int = 16, progress: bool = False) -> dict[str, M.Score]:
        """The task's metrics; ``progress`` draws a bar per scoring pass, labelled with the
        task's name (stderr, terminals only)."""
        label = self.name if progress else None
        if self.format == "alpaca":
            answers = [a for _, _, a in self.items]
            prompts = self.prompts(tokenizer)  # first: a chat template the tokenizer lacks is refused here, clearly
            own = self.template == "chat" and not self.prompt  # the answer ends where the chat turn does
            stop = self.stop or (chat_turn_end(tokenizer) if own else None)
            res = M.score_generation(model, tokenizer, prompts, answers, metrics=self.metrics,
                                     stop=stop, max_new_tokens=self.max_new_tokens, batch_size=batch_size,
                                     normalize=self.normalize, progress=label, chat=own)
        elif self.format == "mc":
            res = M.score_mc(model, tokenizer, self.items, preamble=self.preamble, batch_size=batch_size,
                             progress=label)
        elif self.format == "pairs":
            res = M.score_pairs(model, tokenizer, self.items, batch_size=batch_size, progress=label)
        else:
            res = M.score_lettered(model, tokenizer, self.items, batch_size=batch_size, progress=label)
        for m, s in res.items():
            if s.n == 0:
                raise DataError(f"task {self.name}: every example is longer than the model's context "
                                f"window ({s.skipped} skipped for {m}); nothing was truncated")
        return {m: res[m] for m in self.metrics if m in res}


def _where(path: Path, line: int, k: int) -> str:
    return f"{path}:{line}" if line else f"{path} (record {k + 1})"


def _field(rec, name, kind, where, fmt):
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if name not in rec:
        raise DataError(f"{where}: missing field {name} (format {fmt})")
    if not isinstance(rec[name], kind):
        raise DataError(f"{where}: field {name} must be a {getattr(kind, '__name__', 'string')}")
    return rec[name]


def _targets(rec, name, where) -> dict[str, int]:
    t = _field(rec, name, dict, where, "mc")
    if not t:
        raise DataError(f"{where}: field {name} has no choices")
    for c, lab in t.items():
        if lab not in (0, 1) or isinstance(lab, bool):
            raise DataError(f"{where}: field {name}: label of {c!r} must be 0 or 1, got {lab!r}")
    if not any(lab == 1 for lab in t.values()):
        raise DataError(f"{where}: field {name}: no choice is labelled 1 (no true answer)")
    if name == "mc1_targets" and sum(t.values()) != 1:
        raise DataError(f"{where}: field {name}: MC1 needs exactly one true choice, got {sum(t.values())}")
    return {str(c): int(lab) for c, lab in t.items()}


def load_items(task: Task, limit: int | None = None) -> list:
    records = read_records(task.path)
    if limit is not None:
        records = records[:limit]
    items = []
    for k, (line, rec) in enumerate(records):
        w = _where(task.path, line, k)
        if task.format == "alpaca":
            instr = _field(rec, "instruction", str, w, "alpaca")
            inp = rec.get("input", "") if isinstance(rec, dict) else ""
            if not isinstance(inp, str):
                raise DataError(f"{w}: field input must be a string")
            out = _field(rec, "output", str, w, "alpaca")
            items.append((instr, inp, out))
        elif task.format == "mc":
            q = _field(rec, "question", str, w, "mc")
            mc1 = _targets(rec, "mc1_targets", w) if "mc1" in task.metrics else {}
            mc2 = _targets(rec, "mc2_targets", w) if "mc2" in task.metrics else {}
            items.append(M.MCQuestion(q, mc1, mc2, w))
        elif task.format == "pairs":
            items.append((_field(rec, "good", str, w, "pairs"), _field(rec, "bad", str, w, "pairs")))
        else:
            q = _field(rec, "question", str, w, "lettered")
            choices = _field(rec, "choices", list, w, "lettered")
            if not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{w}: field choices must be a list of 2 to 26 strings")
            ans = _field(rec, "answer", (str, int), w, "lettered")
            idx = M.LETTERS.find(ans.strip().upper()) if isinstance(ans, str) and len(ans.strip()) == 1 else ans
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(choices):
                raise DataError(f"{w}: field answer {ans!r} names no choice (A-{M.LETTERS[len(choices) - 1]} "
                                f"or 0-{len(choices) - 1})")
            items.append((M.lettered_prompt(q, choices, task.prompt), len(choices), idx))
    if not items:
        raise DataError(f"task {task.name}: {task.path} has no examples")
    return items


def _key_lines(text: str) -> dict[str, int]:
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value}


def load_task_file(path: str | Path) -> Task:
    """A Task from a YAML file; every error names the file, the line and the field."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DataError(f"task file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DataError(f"{p}{line}: malformed YAML ({getattr(exc, 'problem', None) or exc})") from None
    if spec is None:
        raise DataError(f"{p}: the task file is empty")
    if not isinstance(spec, dict):
        raise DataError(f"{p}:1: a task file is a mapping of fields (path, format, ...)")
    lines = _key_lines(text)

    def err(key, msg):
        return DataError(f"{p}:{lines.get(key, 1)}: field {key}: {msg}")

    for k in spec:
        if k not in TASK_KEYS:
            raise err(k, f"unknown field (known: {', '.join(sorted(TASK_KEYS))})")
    for k in ("path", "format"):
        if k not in spec:
            raise DataError(f"{p}: missing field {k}")
    fmt = spec["format"]
    if fmt not in FORMAT_METRICS:
        raise err("format", f"{fmt!r} is not one of {', '.join(FORMAT_METRICS)}")
    for k in ("name", "path", "prompt", "stop", "preamble"):
        if k in spec and not isinstance(spec[k], str):
            raise err(k, "must be a string")
    metric = spec.get("metric", FORMAT_METRICS[fmt])
    metric = [metric] if isinstance(metric, str) else metric
    if not isinstance(metric, list) or not metric:
        raise err("metric", "must be a metric name or a non-empty list")
    for m in metric:
        if m not in FORMAT_METRICS[fmt]:
            raise err("metric", f"{m!r} is not a metric of format {fmt} ({', '.join(FORMAT_METRICS[fmt])})")
    mnt = spec.get("max_new_tokens", 16)
    if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1:
        raise err("max_new_tokens", "must be a positive integer")
    norm = spec.get("normalize", "strip")
    if norm not in NORMALIZERS:
        raise err("normalize", f"{norm!r} is not one of {', '.join(NORMALIZERS)}")
    data = Path(spec["path"]).expanduser()
    if not data.is_absolute():
        data = p.parent / data
    if not data.is_file():
        raise err("path", f"data file {data} does not exist")
    if spec.get("prompt"):
        try:
            spec["prompt"].format(instruction="", input="", question="", choices="")
        except (KeyError, IndexError, ValueError) as exc:
            raise err("prompt", f"bad template placeholder ({exc})") from None
    return Task(spec.get("name", p.stem), data, fmt, list(metric), spec.get("prompt"), spec.get("stop"),
                spec.get("preamble", ""), mnt, norm)


# Metric names whose smaller values are better (loralab's and lm-eval's); every other metric,
# accuracies and MC scores among them, is better when larger.
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")


def lower_is_better(key: str) -> bool:
    """Whether a metrics.jsonl key ("eval_loss", "world_mc/mc2", "harness:wikitext/word_perplexity")
    is better when smaller: its last part, filter dropped, ends in loss, perplexity or bits_per_byte."""
    metric = key.rsplit("/", 1)[-1].split(",", 1)[0]
    return metric.endswith(LOWER_IS_BETTER)


def resolve_task(name: str, limit: int | None = None) -> Task:
    """A loralab task (a built-in name or a YAML task file) with its examples loaded. A list
    that may hold ``harness:`` tasks is resolved by :func:`loralab.evaluate.task_list.resolve_tasks`."""
    if name in BUILTIN:
        b = BUILTIN[name]
        t = Task(name, b["path"], b["format"], list(FORMAT_METRICS[b["format"]]),
                 max_new_tokens=b.get("max_new_tokens", 16))
    elif name.endswith((".yaml", ".yml")) or Path(name).is_file():
        t = load_task_file(name)
    else:
        raise DataError(f"--tasks: unknown task {name!r} (built-in: {', '.join(BUILTIN)}; a .yaml task file; "
                        "or harness:NAME for an lm-evaluation-harness task)")
    t.items = load_items(t, limit)
    return t
