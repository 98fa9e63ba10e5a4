"""``loralab train``, ``quickstart``, ``generate``, ``merge``, and the model flags other commands share.

    loralab quickstart [--out runs/quickstart] [--json]
    loralab train run.yaml --set lora.r=16 --out runs/r16 [--json]
    loralab train --resume runs/r16 [--set train.stop_at_step=null]
    loralab generate --model builtin:tiny --adapter runs/r16 "What is 12 plus 30?"
    loralab generate --model meta-llama/Llama-3.1-8B --quant nf4 --dtype bf16 --device cuda "..."
    loralab merge runs/r16 merged/
    loralab merge runs/qlora7b merged/ --dequantize   # a QLoRA run: merge into the dequantized 4-bit base
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loralab.cli.output import emit_json, table
from loralab.errors import ModelError
from loralab.rundir import CONFIG, RunDir, Status, atomic_dir, earlier_results, run_dir_of, write_atomic

if TYPE_CHECKING:
    from loralab.config import ModelConfig, QuantConfig

log = logging.getLogger(__name__)
QUICKSTART = Path(__file__).parent.parent / "assets" / "configs" / "quickstart.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="one LoRA / QLoRA fine-tuning run from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config (defaults apply to missing keys)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help=f"continue RUN_DIR from its newest complete checkpoint, with RUN_DIR/{CONFIG}; "
                        "--set may change only keys that leave the maths alone (train.stop_at_step, ...). "
                        "A run paused by train.stop_at_step keeps it: finish it with "
                        "--set train.stop_at_step=null, or pause later with --set train.stop_at_step=N")
    _run_args(p)
    add_force_arg(p)
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds an earlier run's adapter or checkpoints, "
                        "replacing them (without it such a directory is refused and left as it is)")
    p.add_argument("--nproc", type=nproc_arg, metavar="N",
                   help="train the run on N processes of this machine (torch's launcher, as torchrun; "
                        "distributed.strategy ddp; one GPU each on CUDA; default the config's distributed.nproc, "
                        "1): docs/distributed.md")
    p.add_argument("--executor", choices=["torchrun", "ray"], default="torchrun",
                   help="who starts the N processes: torchrun (torch's launcher, this machine; default) or ray "
                        "(N Ray Train workers, anywhere in a Ray cluster)")
    p.add_argument("--address", help="--executor ray: the Ray cluster's address (default: start a local Ray "
                                     "instance); the run directory must then be on storage every node reads")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quickstart", help="fine-tune the shipped tiny base on arithmetic, accuracy before/after")
    _run_args(p)
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems per task (default 200)")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("generate", help="greedy generation from a base model, optionally with an adapter")
    p.add_argument("prompt", nargs="+", help="instruction(s), in the prompt template the run trained with (--template)")
    p.add_argument("--model", help="base model (default: the adapter's run's model.path, else the base the adapter "
                                   "records, else its adapter_config.json's base_model_name_or_path, else "
                                   "builtin:tiny)")
    p.add_argument("--adapter", help="run directory or PEFT adapter directory; a run directory also gives the "
                                     "model, its dtype, quantization and prompt template")
    p.add_argument("--template", choices=["alpaca", "chat", "none"],
                   help="prompt template: alpaca, chat (the tokenizer's chat template, one user turn) or none "
                        "(default: the run's: chat for a run trained on chat data, else its data.template; "
                        "alpaca without a run)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is (--template none)")
    p.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=64)
    p.add_argument("--stop", help="cut each generation at this string (generation stops there too)")
    add_model_flags(p, from_run=True)
    add_force_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge a run's adapter into its base and save a plain HF model")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--model", help="base model (default: the run's model.path)")
    add_model_flags(p, from_run=True)
    p.add_argument("--dequantize", action="store_true",
                   help="with a 4-bit base (--quant nf4/fp4, or a QLoRA run's own quant.mode): load it in 4 bits, "
                        "dequantize it to --dtype and merge there, giving the weights the adapter was trained on")
    add_force_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_merge)


def add_model_flags(p: argparse.ArgumentParser, *, from_run: bool = False) -> None:
    """--dtype, --quant, --device: how the base is loaded (model.dtype, quant.mode, model.device)."""
    default = " (default: the run's own setting)" if from_run else ""
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default=None if from_run else "auto",
                   help="dtype of the base weights: auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on "
                        "CPU" + (default or " (default auto)"))
    p.add_argument("--quant", choices=["none", "nf4", "fp4"], default=None if from_run else "none",
                   help="load the base in 4 bits with bitsandbytes, as a QLoRA run trained it" + (default or
                                                                                                  " (default none)"))
    p.add_argument("--device", type=device_arg, default=None if from_run else "auto",
                   help="auto = cuda when usable, else cpu; cuda (or cuda:N, the Nth GPU) fails clearly when CUDA "
                        "is not usable" + (default or " (default auto)"))


def positive_int(flag: str):
    """An argparse type: a whole number, at least 1, refused naming ``flag``."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number, at least 1 (got {text!r})")
        return int(text)
    return parse


def nproc_arg(text: str) -> int:
    """--nproc's value: a whole number of processes, at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--nproc must be a whole number of processes, at least 1 (got {text!r})")
    return int(text)


def device_arg(text: str) -> str:
    """--device's value, checked as model.device is (auto, cpu, cuda, cuda:N)."""
    from loralab.config import device_problem

    problem = device_problem(text, "--device")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="use an adapter on a base other than the one it records it was trained on "
                        "(refused otherwise, naming both bases)")


def base_configs(path: str, args: argparse.Namespace, run: dict | None = None) -> tuple[ModelConfig, QuantConfig]:
    """(ModelConfig, QuantConfig) for ``path`` from --dtype/--quant/--device; a flag left unset
    takes the run's config (``run``, for merge), else the default. The run's attention
    implementation is kept (no flag sets it)."""
    from loralab.config import ModelConfig, QuantConfig

    run_model, run_quant = (run or {}).get("model") or {}, (run or {}).get("quant") or {}

    def pick(flag: str | None, saved: str | None, default: str) -> str:
        return flag if flag is not None else saved if saved is not None else default

    model = ModelConfig(path=path, dtype=pick(args.dtype, run_model.get("dtype"), "auto"),
                        device=pick(args.device, run_model.get("device"), "auto"),
                        attn_implementation=run_model.get("attn_implementation") or "sdpa")
    quant = QuantConfig(mode=pick(args.quant, run_quant.get("mode"), "none"))
    if quant.mode != "none":
        for key in ("double_quant", "compute_dtype", "block_size"):
            if key in run_quant:
                setattr(quant, key, run_quant[key])
    return model, quant


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lora.r=16 (repeatable)")
    p.add_argument("--device", dest="overrides", action="append", metavar="DEVICE",
                   type=lambda text: f"model.device={device_arg(text)}",
                   help="short for --set model.device=DEVICE: auto, cpu, cuda or cuda:N (the Nth GPU)")
    add_track_arg(p)
    p.add_argument("--out", help="run directory (output.dir)")
    p.add_argument("--name", help="run name: the run directory is runs/NAME (checked: one path component, "
                                  "no '..', no symlink leading out of runs/)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")


def add_track_arg(p: argparse.ArgumentParser) -> None:
    """--track tensorboard,mlflow: short for --set tracking.backends=[tensorboard,mlflow] (loralab.track)."""
    p.add_argument("--track", dest="overrides", action="append", metavar="TRACKERS",
                   type=lambda text: f"tracking.backends=[{text}]",
                   help="also log to experiment trackers: tensorboard, mlflow, wandb (comma-separated)")


def _config(path: str | None, args: argparse.Namespace):
    from loralab.config import load_config

    return load_config(path, list(args.overrides) + _out_override(args))


def _out_override(args: argparse.Namespace) -> list[str]:
    from loralab.errors import ConfigError
    from loralab.paths import child_dir

    if args.name and args.out:
        raise ConfigError("give either --out DIR or --name NAME, not both")
    if args.name:
        return [f"output.dir={child_dir(Path('runs'), args.name, what='run name')}"]
    return [f"output.dir={args.out}"] if args.out else []


def _eval_loss_text(s: dict) -> str:
    loss = s.get("final_eval_loss")
    return f"{loss:.4f}" if loss is not None else "none (no validation examples: trained without evaluation)"


def _layout_text(s: dict, quant: str = "none") -> str:
    """How the steps ran: dtype (a 4-bit base's compute dtype), packing and train.compile (with
    its compile time, not in train time)."""
    packed = {"per_example": "packed rows, attention per example", "block_mask": "packed rows, block mask"}
    compiled = (f"compiled in {s['compile_time_s']:.1f} s" if s.get("compiled")
                else f"eager ({s.get('compile_reason', 'train.compile')})")
    dtype = s.get("dtype") if quant == "none" else f"{quant} base computing in {s.get('dtype')}"
    return f"{dtype}, {packed.get(s.get('packed_attention'), 'padded micro batches')}, {compiled}"


def _print_summary(s: dict, quant: str = "none") -> None:
    rows = [("run directory", s["run_dir"]), ("status", s["status"]),
            ("trainable / total params", f"{s['trainable_params']:,} / {s['total_params']:,} "
                                         f"({100 * s['trainable_params'] / s['total_params']:.4f}%; "
                                         "total = base + adapter)"),
            ("steps", s["steps"]), ("final eval loss", _eval_loss_text(s)),
            ("train time", f"{s['train_time_s']:.1f} s (wall {s['wall_time_s']:.1f} s)"),
            ("tokens/s", f"{s['tokens_per_s']:.0f}"), ("peak memory", f"{s['peak_memory_bytes'] / 2**20:.0f} MiB"),
            ("layout", _layout_text(s, quant))]
    print(table([(f"{k}:", v) for k, v in rows], align=["right", "left"]))


def _checked_config(args: argparse.Namespace):
    """The run's config; when it is invalid and the run directory is known, the run is stored as invalid."""
    from loralab.config import load_config
    from loralab.errors import ConfigError

    out = _out_override(args)  # a bad --name raises here, before anything is written
    try:
        return load_config(args.config, list(args.overrides) + out)
    except ConfigError as exc:
        run = RunDir(out[0].split("=", 1)[1]) if out else None
        if run is not None and not earlier_results(run):  # an earlier run's summary stays as it is
            run.root.mkdir(parents=True, exist_ok=True)
            exc.summary = {"status": Status.INVALID, "error": str(exc), "run_dir": str(run.root)}
            write_atomic(run.summary, exc.summary)
        raise


def cmd_train(args: argparse.Namespace) -> int:
    from loralab.train import distributed

    if args.resume:
        from loralab.errors import ConfigError
        from loralab.train.resume import resume_config

        if args.config or args.out or args.name:
            raise ConfigError("--resume RUN_DIR takes the config and the directory from RUN_DIR; "
                              "drop CONFIG, --out and --name")
        cfg = resume_config(args.resume, args.overrides, force=args.force)
    else:
        cfg = _checked_config(args)
        if not distributed.launched():  # a rank's launcher checked it
            from loralab.rundir import check_fresh_run_dir

            run = RunDir(run_dir_of(cfg))
            check_fresh_run_dir(run, overwrite=args.overwrite, resume_how=f"`loralab train --resume {run.root}`",
                                other_how="another --out", overwrite_how="--overwrite")
    if args.address and args.executor != "ray":
        from loralab.errors import ConfigError

        raise ConfigError("--address is the Ray cluster's: give it with --executor ray")
    if distributed.launched():
        from loralab.cli.launch import die_with_launcher

        die_with_launcher()
    if args.nproc and distributed.launched() and args.nproc != int(os.environ["WORLD_SIZE"]):
        from loralab.errors import ConfigError

        raise ConfigError(f"--nproc {args.nproc}, but this process runs as rank {os.environ['RANK']} of "
                          f"{os.environ['WORLD_SIZE']} (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set in the "
                          "environment, as torchrun sets them): unset them for loralab to launch the processes, or "
                          "drop --nproc under torchrun")
    args.nproc = args.nproc or cfg.distributed.nproc  # the flag wins over the config's key
    if args.executor == "ray" and not distributed.launched():  # N Ray Train workers (loralab.cli.ray_train)
        from loralab.cli.ray_train import train_on_ray

        summary = train_on_ray(args, cfg)
    elif args.nproc > 1 and not distributed.launched():  # this process launches the ranks (loralab.cli.launch)
        from loralab.cli.launch import train_on_processes

        summary = train_on_processes(args, cfg)
    else:  # one process, or one rank of a torchrun job
        from loralab.ending import sigterm_interrupts
        from loralab.train.loop import train  # the training stack: not imported by a launcher

        with distributed.process_group(cfg) if distributed.launched() else sigterm_interrupts():
            summary = train(cfg, show_progress=not args.json and distributed.writes(), resume=bool(args.resume))
            if not distributed.writes():
                return 0  # rank 0 answers for the run
    emit_json(summary) if args.json else _print_summary(summary, cfg.quant.mode)
    return 0


def arithmetic_test_set(task: str, n: int, template: str = "alpaca") -> tuple[list[str], list[str]]:
    from loralab.data.dataset import DATA_DIR, read_records
    from loralab.data.templates import format_prompt

    records = [r for _, r in read_records(DATA_DIR / f"{task}_test.jsonl")][:n]
    prompts = [format_prompt(r["instruction"], r["input"], template=template) for r in records]
    return prompts, [r["output"] for r in records]


def _accuracy_rows(model, tokenizer, n: int, *, progress: bool = False) -> dict[str, dict]:
    from loralab.evaluate.exact_match import exact_match

    out = {}
    for task in ("arithmetic_2ds", "arithmetic_4ds"):
        prompts, answers = arithmetic_test_set(task, n)
        acc = exact_match(model, tokenizer, prompts, answers, max_new_tokens=8, progress=task if progress else None)
        lo, hi = acc.wilson()
        out[task] = {"exact_match": acc.value, "ci_low": lo, "ci_high": hi, "n": acc.n}
    return out


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Accuracy of the tiny base, a LoRA run on arithmetic, accuracy again."""
    from loralab.models import load_base
    from loralab.train.loop import train_with_model

    t0 = time.perf_counter()
    cfg = _config(str(QUICKSTART), args)
    if not args.out and not args.name and not any(o.startswith("output.dir=") for o in args.overrides):
        cfg.output.dir = "runs/quickstart"
    base, tokenizer = load_base(cfg.model, cfg.quant, progress=not args.json)
    log.info("evaluating the base model on %d held-out problems per task ...", args.eval_n)
    before = _accuracy_rows(base, tokenizer, args.eval_n, progress=not args.json)
    del base
    log.info("fine-tuning with LoRA (r=%d, alpha=%g, targets=%s) ...", cfg.lora.r, cfg.lora.alpha,
             ",".join(cfg.lora.targets))
    trained = train_with_model(cfg, show_progress=not args.json)
    summary = trained.summary
    after = _accuracy_rows(trained.model, trained.tokenizer, args.eval_n, progress=not args.json)
    result = {"before": before, "after": after, "summary": summary, "total_time_s": time.perf_counter() - t0}
    write_atomic(RunDir(summary["run_dir"]).quickstart, {k: v for k, v in result.items() if k != "summary"})
    if args.json:
        emit_json(result)
        return 0
    print(f"exact match on {args.eval_n} held-out problems per task:")
    print(table([(task, f"{before[task]['exact_match']:.1%}", f"{after[task]['exact_match']:.1%}") for task in before],
                ["task", "base", "LoRA"], align=["left", "right", "right"]))
    print(f"\ntrained {summary['trainable_params']:,} of {summary['total_params']:,} parameters in "
          f"{summary['train_time_s']:.1f} s ({summary['tokens_per_s']:.0f} tokens/s), "
          f"final eval loss {_eval_loss_text(summary)}; total {result['total_time_s']:.0f} s")
    print(f"run directory: {summary['run_dir']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from loralab.adapters import adapter_dir, load_adapter
    from loralab.data.templates import chat_turn_end, format_prompt, prompt_special_tokens
    from loralab.evaluate.exact_match import greedy_generate
    from loralab.models import load_base
    from loralab.preflight import check_adapter_base

    run = adapter_run(args.adapter)
    model_path = args.model or run["model_path"] or "builtin:tiny"
    template = "none" if args.raw else args.template or run["template"] or "alpaca"
    if args.adapter:  # checked before the base loads
        adapter_dir(args.adapter)
        check_adapter_base(args.adapter, model_path, force=args.force)
        log.info("generating with %s on %s, prompt template %s", args.adapter, model_path, template)
    model, tokenizer = load_base(*base_configs(model_path, args, run["config"]), progress=not args.json)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    prompts = [format_prompt(p, template=template, tokenizer=tokenizer) for p in args.prompt]
    stop = args.stop or (chat_turn_end(tokenizer) if template == "chat" else None)  # the turn's end, as trained
    outs = greedy_generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, stop=stop,
                           add_special_tokens=prompt_special_tokens(template))
    if args.json:
        emit_json({"model": model_path, "adapter": args.adapter, "template": template,
                   "generations": [{"prompt": p, "output": o} for p, o in zip(args.prompt, outs, strict=True)]})
    else:
        for o in outs:
            print(o.strip())
    return 0


def adapter_run(adapter: str | None) -> dict:
    """What an adapter's run says about using it: ``config`` (the run's config.yaml, or {}),
    ``model_path`` (the run's model.path, else the base the adapter records) and ``template``
    (chat for a run trained on chat data, else its data.template); None where unknown."""
    from loralab.adapters import recorded_base
    from loralab.config import read_yaml
    from loralab.evaluate.score import trained_template

    if not adapter:
        return {"config": {}, "model_path": None, "template": None}
    run = RunDir(adapter)
    config = (read_yaml(run.config) or {}) if run.config.is_file() else {}
    template = trained_template(adapter)
    model_path = ((config.get("model") or {}).get("path") or (recorded_base(adapter) or {}).get("path")
                  or peft_base(adapter))
    return {"config": config, "model_path": model_path, "template": template}


def peft_base(adapter: str) -> str | None:
    """The base a plain PEFT adapter names (adapter_config.json's base_model_name_or_path), for
    an adapter saved by PEFT itself rather than by a loralab run."""
    import json

    for folder in (RunDir(adapter).adapter, Path(adapter)):
        if (folder / "adapter_config.json").is_file():
            try:
                return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get(
                    "base_model_name_or_path") or None
            except (OSError, ValueError, AttributeError):
                return None
    return None


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold the adapter into the base weights; the result loads with from_pretrained."""

    import torch

    from loralab.adapters import adapter_dir, load_adapter, merge_into_base
    from loralab.config import read_yaml
    from loralab.models import DTYPES, load_base, stored_dtype
    from loralab.preflight import check_adapter_base

    run = RunDir(args.run_dir)
    out = Path(args.out_dir)
    if out.exists():
        raise ModelError(f"{out} already exists; choose a new directory (nothing was overwritten)")
    saved = (read_yaml(run.config) or {}) if run.config.is_file() else {}
    base_path = args.model or (saved.get("model") or {}).get("path")
    if base_path is None:
        raise ModelError(f"{run.root}: no {CONFIG} to read the base model from; pass --model")
    model_cfg, quant = base_configs(base_path, args, saved)
    adapter_dir(run.root)
    check_adapter_base(run.root, base_path, force=args.force)
    if quant.mode != "none" and not args.dequantize:
        source = "--quant" if args.quant else f"the run's quant.mode in {run.config}"
        raise ModelError(
            f"the base would be loaded in 4 bits ({quant.mode}, from {source}); "
            "merging into 4-bit weights rounds the merged weights back to 4 bits and loses most of the adapter. "
            "Pass --dequantize to merge into the dequantized 4-bit base (the weights the adapter was trained on), "
            "or --quant none to merge into the original full-precision weights")
    # Merged in fp32 whatever the run trained in (B @ A added to bf16 weights would round it
    # away), then saved in --dtype or the dtype the base is stored in.
    save_dtype = args.dtype or stored_dtype(base_path, trust_remote_code=model_cfg.trust_remote_code) or "fp32"
    model_cfg = dataclasses.replace(model_cfg, dtype="fp32")
    model, tokenizer = load_base(model_cfg, quant, progress=not args.json)
    if args.dequantize and quant.mode == "none":
        log.warning("note: --dequantize does nothing here: the run's base is not quantized (quant.mode none)")
    if quant.mode != "none":  # --dequantize: 4-bit -> plain Linear layers
        model = model.dequantize(dtype=torch.float32)
    merged = merge_into_base(load_adapter(model, run.root), dequantized=quant.mode != "none").to(DTYPES[save_dtype])
    merged.config.use_cache = True
    with atomic_dir(out, fsync=False) as tmp:  # a kill leaves the old directory or the new one
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    if args.json:
        emit_json({"merged": str(out), "base": base_path, "adapter": str(run.root)})
    else:
        print(f"merged model written to {out}")
    return 0
