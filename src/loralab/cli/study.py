"""``loralab study ...`` and ``loralab runs ...``: run studies, follow them, look at their runs.

    loralab study presets
    loralab study run preset:rank_alpha_grid --quick --workers 2
    loralab study run my_study.yaml --model models/llama --data train.jsonl --max-memory 24GB
    loralab study run preset:rank_alpha_grid --halving --eta 3 --min-steps 20
    loralab study run preset:rank_alpha_grid --executor ray --address ray://head:10001 --workers 8
    loralab study run preset:rank_alpha_grid --gpus 0,1,2,3 --no-fuse
    loralab study status rank_alpha_grid-quick
    loralab study report rank_alpha_grid-quick --dest reports/
    loralab study export rank_alpha_grid-quick --format csv
    loralab runs list --study rank_alpha_grid-quick --status completed
    loralab runs show r8-a16-s1 --study rank_alpha_grid-quick
    loralab runs compare r8-a16-s1 r8-a512-s1 --study rank_alpha_grid-quick

A study lives in ``<--out, default runs>/<study name>/``: ``study.db`` and one directory
per run. Every command that prints results takes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loralab.cli.output import emit_json, table
from loralab.cli.run import add_track_arg
from loralab.config import flat_keys
from loralab.errors import ConfigError
from loralab.rundir import SUMMARY, Status

if TYPE_CHECKING:
    from loralab.study.backends.warm import WarmStarter
    from loralab.study.options import StudyOptions

log = logging.getLogger(__name__)

DEFAULT_ROOT = "runs"


def register(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="many runs from one study file: run, status, report, presets, export")
    ssub = study.add_subparsers(dest="study_command", metavar="ACTION", required=True)

    p = ssub.add_parser("run", help="expand a study into runs and execute what is not done yet")
    p.add_argument("study", help="study YAML file or preset:NAME (see `loralab study presets`)")
    p.add_argument("--quick", action="store_true",
                   help="the study's quick variant (fewer steps and points); its name gets -quick")
    p.add_argument("--name", help="study name (default: the study file's name, -quick with --quick): a new name "
                                  "starts a fresh study, e.g. after changing a config the old study's runs were "
                                  "made with")
    p.add_argument("--model", help="base model for every run (replaces base model.path)")
    p.add_argument("--data", help="dataset for every run (replaces base data.path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key for every run (repeatable)")
    add_track_arg(p)
    _root_arg(p)
    p.add_argument("--workers", type=int,
                   help="slots of the pool: units (a run or a fused group) at a time, a run on K processes taking "
                        "K (default: one per GPU, else the widest run's processes, 1)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="backend: local processes or Ray tasks")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--gpus", help="local backend: GPUs to use, e.g. 0,1,2,3 (default: every visible one)")
    p.add_argument("--gpus-per-run", type=int, default=1, metavar="K",
                   help="every run (whose distributed.nproc is 1) trains on K processes, one device each: K GPUs on "
                        "the local backend (K worker slots on the CPU), K GPUs or CPUs per Ray task; such runs train "
                        "alone, not fused (default 1): docs/distributed.md")
    p.add_argument("--max-memory", help="skip runs whose estimated memory is over this, e.g. 8GB or 24GiB; "
                                        "also the memory one device gives fused groups (default: the device's)")
    p.add_argument("--halving", action="store_true",
                   help="successive halving on the study metric (stops poor runs early)")
    p.add_argument("--eta", type=int, help="halving: keep the best 1/eta at each rung (default 3)")
    p.add_argument("--min-steps", type=int, help="halving: the first rung's step (default 10)")
    p.add_argument("--retries", type=int, default=1,
                   help="times a killed run is run again in this invocation (default 1)")
    p.add_argument("--retry-failed", action="store_true",
                   help="also run failed, diverged, out-of-memory and invalid runs again")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="train runs that share a base in one process where they fit (default; --no-fuse: each alone)")
    p.add_argument("--budget", help="wall-time budget of this invocation, e.g. 90s, 30m, 2h: no run starts after it "
                                    "is spent; the rest stay pending for the next `study run`")
    p.add_argument("--dry-run", action="store_true",
                   help="expand and make every check a run makes before it starts (model, roles, data, tasks, "
                        "metric, memory gate), print the runs and those that cannot run, run nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)

    p = ssub.add_parser("status", help="runs per status and each run's outcome")
    p.add_argument("name")
    _root_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = ssub.add_parser("report", help="HTML + Markdown report with plots and findings")
    p.add_argument("name")
    _root_arg(p)
    p.add_argument("--dest", help="report directory (default <study dir>/report)")
    p.add_argument("--open", action="store_true", help="open report.html in your web browser")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)

    p = ssub.add_parser("presets", help="the shipped studies, one per seed experiment")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_presets)

    p = ssub.add_parser("export", help="the runs and metrics tables as CSV or Parquet, or the study into a tracker")
    p.add_argument("name")
    _root_arg(p)
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--dest", help="directory (default <study dir>/export)")
    p.add_argument("--to", choices=["tensorboard", "mlflow", "wandb"],
                   help="send the study's runs (and its report, when written) to this experiment tracker instead")
    p.add_argument("--tracking-uri", help="--to mlflow: tracking URI (default: MLflow's own, sqlite:///mlflow.db here)")
    p.add_argument("--project", default="loralab", help="--to wandb: W&B project (default loralab)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    runs = sub.add_parser("runs", help="runs, of studies or of `loralab train`: list, show, compare")
    rsub = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    p = rsub.add_parser("list", help="one line per run")
    p.add_argument("--study", help="only this study (default: every study under --out, and the run directories "
                                   "of `loralab train` there)")
    p.add_argument("--status", choices=[s.value for s in Status], help="only runs with this status")
    _root_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs_list)
    p = rsub.add_parser("show", help="one run: axes, outcome, final metrics")
    p.add_argument("run", help="a run directory (or its name under --out), or with --study a run of that study")
    p.add_argument("--study", help="the study RUN belongs to (default: RUN is a run directory)")
    _root_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs_show)
    p = rsub.add_parser("compare", help="runs side by side: config differences and final metrics")
    p.add_argument("runs", nargs="+", help="run directories (or names under --out), or with --study runs of that study")
    p.add_argument("--study", help="the study the runs belong to (default: each is a run directory)")
    _root_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs_compare)


def _root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_ROOT,
                   help=f"output root holding study directories (default {DEFAULT_ROOT})")


def study_root(out: str, name: str) -> Path:
    from loralab.paths import child_dir

    return child_dir(Path(out), name, what="study name").resolve()


def open_store(out: str, name: str):
    from loralab.study.store import Store

    db = study_root(out, name) / "study.db"
    if not db.is_file():
        raise ConfigError(f"no study {name!r} under {out} ({db} does not exist); run `loralab study run` first")
    return Store(db, readonly=True)  # readers never write, also beside a running driver


# ----------------------------------------------------------------------------- tables


def columns(rows: list[dict[str, Any]], names: list[str]) -> str:
    """Dict rows as a table of the columns ``names`` (a missing key shows as "-")."""
    return table([[r.get(c) for c in names] for r in rows], names)


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    if args.json:
        emit_json(obj)
    else:
        print(text)


# ----------------------------------------------------------------------------- study commands


def cmd_run(args: argparse.Namespace) -> int:
    from loralab.ending import sigterm_interrupts
    from loralab.study.backends.warm import warm_process
    from loralab.study.options import StudyOptions

    options = StudyOptions.from_args(args)  # refused here, before the study is even loaded
    # The local units' warm process loads the libraries while the study is checked and planned.
    # SIGTERM stops the driver as Ctrl-C does: its running runs are recorded interrupted.
    with sigterm_interrupts(), warm_process(local=options.executor != "ray" and not args.dry_run) as starter:
        return run_checked(args, options, starter)


def run_checked(args: argparse.Namespace, options: StudyOptions, starter: WarmStarter | None) -> int:
    """``study run`` once its flags are checked: load, check and plan the study, then run it."""
    from loralab.study.execute import run_study
    from loralab.study.preflight import preflight
    from loralab.study.spec import load_study
    from loralab.study.steps import step_plan, trained_on_changed_data
    from loralab.track import prepare_study_trackers, track_study

    study = load_study(args.study, quick=args.quick, model=args.model, data=args.data, overrides=args.overrides,
                       local=options.executor != "ray")
    if args.name:
        study.name = args.name  # checked by study_root: one path component
    track_study(study)
    root = study_root(args.out, study.name)
    study.place(root)
    options.check(study.runs)
    checks = preflight(study, max_memory=options.max_memory)  # every run's own checks, before any starts
    data_cache: dict = {}  # each distinct data setting tokenized once for both
    trained_on_changed_data(study, cache=data_cache)  # a study run again on other data: refused
    steps = step_plan(study, data_cache)  # each run's steps, tokens and time, said before any compute is spent
    if args.dry_run:
        from loralab.study.deviations import deviation_text

        rows = [{"name": r.name, **r.axes} for r in study.runs]
        devs = [deviation_text(d) for d in study.deviations]
        seed_line = f"seed: {study.seed['source']}\n" if study.seed.get("source") else ""
        also = "".join(f", {m} ({'higher' if g == 'max' else 'lower'} is better)" for m, g in study.metrics.items())
        seed_line += (f"judged on: {study.metric} ({'higher' if study.goal == 'max' else 'lower'} is better)"
                      f"{f'; also recorded: {also[2:]}' if also else ''}\n")
        dev_lines = ("differences from the seed's setup:\n" + "\n".join(f"  - {d}" for d in devs) + "\n" if devs
                     else "no difference from the seed's setup\n" if study.seed.get("setup") else "")
        skipped = "".join(f"\nwould be skipped: {n}: {why}" for n, why in checks.skipped.items())
        warning = steps.warning()
        _emit(args, {"study": study.name, "root": str(root), "profile": study.profile, "metric": study.metric,
                     "goal": study.goal, "metrics": study.metrics, "runs": rows,
                     "deviations": study.deviations, "steps": steps.to_json(), **checks.to_json()},
              f"study {study.name}: {len(rows)} runs in {root}\n{seed_line}{dev_lines}" + columns(rows, list(rows[0]))
              + "".join(f"\n{line}" for line in steps.invalid_lines() + steps.lines())
              + (f"\nWARNING: {warning}" if warning else "")
              + skipped + (f"\n{checks.text()}" if checks.cannot_run else ""))
        # the exit code the run would end with: 2 refused (nothing starts), 1 some runs would end invalid
        return 2 if checks.cannot_run else 1 if steps.invalid else 0
    if checks.cannot_run:
        raise ConfigError(f"{checks.text()}\nnothing was started; fix these (loralab study run ... --dry-run "
                          "checks again without running)")
    for line in steps.lines():
        log.info("%s", line)
    if steps.warning():
        log.warning("WARNING: %s", steps.warning())
    from loralab.study.baseline import base_warning, score_base

    base = score_base(study, root)  # the study metric on the base, once: can it move at all?
    if base is not None:
        log.info("the base scores %s = %.4g before training", base["metric"], base["value"])
    if base_warning(base):
        log.warning("WARNING: %s", base_warning(base))
    prepare_study_trackers(study)
    result = run_study(study, root=root, options=options, starter=starter)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result["counts"].items()))
    _emit(args, result, f"study {study.name}: {result['runs']} runs ({counts}); ran {result['ran']} in "
                        f"{result['wall_time_s']:.0f} s\ndatabase: {result['database']}\n"
                        f"next: loralab study status {study.name} --out {args.out}")
    return 0 if all(s in FINE for s in result["counts"]) else 1


# The statuses of a study that went as asked: exit code 0. Anything else (failed, invalid,
# diverged, out of memory, or runs left pending by --budget) is exit code 1.
FINE = (Status.COMPLETED, Status.STOPPED_EARLY, Status.SKIPPED)


def cmd_status(args: argparse.Namespace) -> int:
    from loralab.study.results import run_rows

    with open_store(args.out, args.name) as store:
        sid = store.study_id(args.name)
        spec = store.spec(args.name)
        metric = spec.get("metric", "eval_loss")
        rows = run_rows(store, sid, metric)
        counts = store.counts(sid)
    cols = ["name", "status", *spec.get("axes", {}).keys(), metric, "wall_s", "peak_MiB", "est_MiB", "attempts",
            "stopped_at"]
    cols = [c for c in cols if c in ("name", "status", metric) or any(r.get(c) is not None for r in rows)]
    text = (f"study {args.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "\n"
            + columns(rows, cols))
    _emit(args, {"study": args.name, "counts": counts, "metric": metric, "runs": rows}, text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from loralab.study.report import write_report

    root = study_root(args.out, args.name)
    db = root / "study.db"
    if not db.is_file():
        raise ConfigError(f"no study {args.name!r} under {args.out} ({db} does not exist)")
    paths = write_report(db, args.name, Path(args.dest) if args.dest else root / "report")
    paths = {k: [str(p) for p in v] if isinstance(v, (list, tuple)) else str(v) for k, v in paths.items()}
    _emit(args, paths, "\n".join(f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in paths.items()))
    if args.open:
        import webbrowser

        webbrowser.open(Path(paths["html"]).resolve().as_uri())
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from loralab.study.spec import describe_preset, preset_names

    rows = [describe_preset(n) for n in preset_names()]
    text = columns(rows, ["name", "runs", "quick_runs", "metric", "question"])
    _emit(args, {"presets": rows},
          text + "\n\nrun one: loralab study run preset:NAME --quick [--model DIR --data FILE]")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.to:
        return export_to_tracker(args)
    with open_store(args.out, args.name) as store:
        dest = Path(args.dest) if args.dest else study_root(args.out, args.name) / "export"
        paths = store.export(args.name, dest, args.format)
    _emit(args, {"files": [str(p) for p in paths]}, "\n".join(str(p) for p in paths))
    return 0


def export_to_tracker(args: argparse.Namespace) -> int:
    """``study export NAME --to mlflow|tensorboard|wandb``: each run a tracker run, after the fact."""
    from loralab.study.export import export_study

    open_store(args.out, args.name).close()  # a clear error when there is no such study
    rows = export_study(study_root(args.out, args.name) / "study.db", args.name, args.to,
                        tracking_uri=args.tracking_uri, project=args.project)
    sent = sum(r["sent"] for r in rows)
    text = (f"study {args.name}: {sent} of {len(rows)} sent to {args.to}\n"
            + columns(rows, ["run", "status", "sent", "why"]))
    _emit(args, {"study": args.name, "to": args.to, "runs": rows}, text)
    return 0 if all(r["sent"] or r["why"] for r in rows) else 1


# ----------------------------------------------------------------------------- runs commands


def cmd_runs_list(args: argparse.Namespace) -> int:
    if not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: no such directory (where studies and `loralab train` runs were written)")
    if args.study:
        names = [args.study]
    else:
        names = sorted(p.parent.name for p in Path(args.out).glob("*/study.db"))
    from loralab.study.results import run_rows

    rows: list[dict[str, Any]] = []
    for name in names:
        with open_store(args.out, name) as store:
            sid = store.study_id(name)
            metric = store.spec(name).get("metric", "eval_loss")
            for r in run_rows(store, sid, metric):
                if args.status and r["status"] != args.status:
                    continue
                rows.append({"study": name, "name": r["name"], "status": r["status"], "metric": metric,
                             "value": r[metric], "wall_s": r["wall_s"], "peak_MiB": r["peak_MiB"]})
    if not args.study:  # `loralab train` runs: run directories directly under --out
        for d in sorted(p.parent for p in Path(args.out).glob(f"*/{SUMMARY}")):
            r = _dir_detail(d, d.name)
            if not args.status or r["status"] == args.status:
                rows.append({"study": None, "name": r["name"], "status": r["status"], "metric": "eval_loss",
                             "value": r["final_metrics"].get("eval_loss"), "wall_s": r.get("wall_time_s"),
                             "peak_MiB": r["peak_memory_bytes"] / 2**20 if r.get("peak_memory_bytes") else None})
    text = columns(rows, ["study", "name", "status", "metric", "value", "wall_s", "peak_MiB"]) if rows else "no runs"
    _emit(args, {"runs": rows}, text)
    return 0


def _run_detail(store, sid: int, name: str) -> dict[str, Any]:
    r = store.run(sid, name)
    metrics = store.metrics(r["id"])
    final: dict[str, float] = {}
    for m in metrics:
        final[m["name"]] = m["value"]
    detail = {k: v for k, v in r.items() if k not in ("axes_json", "config_json")}
    detail["axes"] = json.loads(r["axes_json"])
    detail["config"] = json.loads(r["config_json"])
    detail["final_metrics"] = final
    detail["metric_points"] = len(metrics)
    return detail


def run_directory(out: str, run: str) -> Path:
    """A run given without --study: a run directory, or the name of one under ``out``."""
    for p in (Path(run), Path(out) / run):
        if (p / SUMMARY).is_file():
            return p
    raise ConfigError(f"no run directory {run} (nor {Path(out) / run}) with a {SUMMARY}; give a run directory, "
                      "or --study NAME for a run of a study")


def _dir_detail(run_dir: Path, name: str) -> dict[str, Any]:
    """A run directory as runs show/compare describe a study's run: its summary, config and the
    last value of every metric in its metrics.jsonl."""
    from loralab.config import read_yaml
    from loralab.rundir import RunDir
    from loralab.study.store import metric_rows

    rd = RunDir(run_dir)
    summary = rd.read_summary() or {}
    rows = sorted(metric_rows(rd.metrics))
    final = {name: value for _, name, value in rows}
    config = (read_yaml(rd.config) or {}) if rd.config.is_file() else {}
    return {**summary, "name": name, "run_dir": str(run_dir), "axes": {}, "attempts": None,
            "config": config, "final_metrics": final, "metric_points": len(rows)}


def _details(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    """Each named run's detail: of --study's runs, or of run directories."""
    if not args.study:
        return [_dir_detail(run_directory(args.out, n), n) for n in names]
    with open_store(args.out, args.study) as store:
        sid = store.study_id(args.study)
        return [_run_detail(store, sid, n) for n in names]


def cmd_runs_show(args: argparse.Namespace) -> int:
    d = _details(args, [args.run])[0]
    keys = ["name", "status", "axes", "attempts", "run_dir", "wall_time_s", "train_time_s", "tokens_per_s",
            "peak_memory_bytes", "estimated_memory_bytes", "trainable_params", "total_params", "stopped_at_step",
            "error"]
    rows = [(f"{k}:", d.get(k)) for k in keys] + [(f"final {k}:", v) for k, v in sorted(d["final_metrics"].items())]
    _emit(args, d, table(rows, align=["right", "left"]))
    return 0


def cmd_runs_compare(args: argparse.Namespace) -> int:
    details = _details(args, args.runs)
    flats = [flat_keys(d["config"]) for d in details]
    differ = sorted(k for k in flats[0] if k != "output.dir" and any(f.get(k) != flats[0].get(k) for f in flats))
    metric_names = sorted({k for d in details for k in d["final_metrics"]})
    fields = (["status"] + differ + ["wall_time_s", "peak_memory_bytes", "trainable_params"]
              + [f"final {m}" for m in metric_names])
    rows = []
    for f in fields:
        row = {"field": f}
        for d, flat in zip(details, flats, strict=True):
            if f.startswith("final "):
                row[d["name"]] = d["final_metrics"].get(f[6:])
            else:
                row[d["name"]] = flat.get(f, d.get(f))
        rows.append(row)
    _emit(args, {"runs": args.runs, "differences": differ, "rows": rows}, columns(rows, ["field", *args.runs]))
    return 0
