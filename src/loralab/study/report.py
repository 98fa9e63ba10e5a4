"""The study report: a self-contained HTML page, Markdown beside it, and the PNG plots.

    paths = write_report(Path("runs/rank_alpha_grid/study.db"), "rank_alpha_grid", Path("report"))
    # {"html": .../report.html, "markdown": .../report.md, "pngs": [...], "findings": .../findings.json}

Everything is read from the study database (runs, metric series, the study spec); the
findings come from loralab.study.findings. The HTML page is the Jinja2 template
templates/report.html.j2 (autoescaped); it embeds every image as a base64 data URI and loads
nothing from elsewhere; report.md references the PNG files next to it. Plots: the metric
curves per run grouped by the axis under study, a heatmap over two numeric axes, cost (time,
peak memory, trainable parameters) against quality with the Pareto frontier, and the spread
across seeds wherever repeats exist.

matplotlib is the optional ``report`` extra; it is used through its object interface (no
pyplot, so no global backend is switched) and renders with Agg.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError
from loralab.rundir import Status, write_atomic
from loralab.study import stats
from loralab.study.context import context_lines, study_context
from loralab.study.findings import PARETO_COSTS, findings_from, pareto_points
from loralab.study.levels import at_level, config_label, fmt_value, levels, tied_to
from loralab.study.results import SEED_KEY, StudyData, canon, read_series, read_study, repeat_groups
from loralab.units import is_number

NOT_CURVES = {"train_loss", "lr", "tokens_seen", "grad_norm", "epoch"}
MIB = 1024 * 1024


@dataclass
class Figure:
    path: Path
    title: str
    caption: str


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        raise LoralabError(
            "the study report draws its plots with matplotlib, which is not installed: "
            "pip install 'loralab[report]' (or pip install matplotlib)"
        ) from None
    return MplFigure


def write_report(db_path: str | Path, study_name: str, out_dir: str | Path) -> dict[str, Any]:
    """Write report.html, report.md, findings.json and the PNGs into ``out_dir``; return their paths."""
    mpl_figure = _matplotlib()
    data = read_study(db_path, study_name)
    found = findings_from(data)
    series = read_series(db_path, study_name)
    ctx = study_context(db_path, study_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_curves(mpl_figure, data, found, series, out)
    figures += plot_train_loss(mpl_figure, data, series, out)
    figures += plot_heatmap(mpl_figure, data, out)
    figures += plot_pareto(mpl_figure, data, out)
    figures += plot_spread(mpl_figure, data, out)
    remove_stale_figures(out, keep=[f.path for f in figures])
    paths = {
        "html": _write_text(out / "report.html", render_html(data, found, figures, ctx)),
        "markdown": _write_text(out / "report.md", render_markdown(data, found, figures, ctx)),
        "findings": _write_text(out / "findings.json", json.dumps(found, indent=2, default=str)),
        "pngs": [f.path for f in figures],
    }
    return paths


# the names _save writes
REPORT_FIGURES = ("curves_*.png", "train_loss*.png", "heatmap_*.png", "pareto.png", "spread.png")


def remove_stale_figures(out: Path, keep: list[Path]) -> None:
    """Delete the figures an earlier report wrote into ``out`` that this one did not (a metric
    or axis since gone); files of any other name are left alone."""
    kept = {p.resolve() for p in keep}
    for pattern in REPORT_FIGURES:
        for path in out.glob(pattern):
            if path.resolve() not in kept:
                path.unlink()


def _write_text(path: Path, text: str) -> Path:
    write_atomic(path, text, fsync=False)
    return path


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buf.getvalue(), fsync=False)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def plain_numbers(ax) -> None:
    """Tick labels show the values themselves: no '+1.2345e0' offset or scientific factor in a
    corner, so runs that differ only in the last digits stay readable (log axes keep theirs)."""
    for axis in (ax.xaxis, ax.yaxis):
        fmt = axis.get_major_formatter()
        if hasattr(fmt, "set_useOffset"):
            fmt.set_useOffset(False)
            fmt.set_scientific(False)


def _tick_label(v: Any) -> str:
    """Powers of two as 2^k (the seeds' grids are log-spaced), everything else as is."""
    if is_number(v) and v > 0:
        k = math.log2(v)
        if abs(k - round(k)) < 1e-9:
            return f"$2^{{{int(round(k))}}}$"
    return fmt_value(v)


# ---------------------------------------------------------------- (a) curves against step

def curve_metrics(data: StudyData, series: dict[str, dict[str, list]]) -> list[str]:
    names = {n for per_run in series.values() for n in per_run}
    first = [m for m in ("eval_loss", data.metric) if m in names]
    rest = sorted(n for n in names if n not in NOT_CURVES and n not in first and "/" in n)
    return list(dict.fromkeys(first + rest))


def plot_curves(mpl_figure, data: StudyData, found: list[dict], series, out: Path) -> list[Figure]:
    """One figure per metric, one line per run, colored by the axis under study."""
    finding_axes = [f["axis"] for f in found if f.get("axis") in data.axes]
    group_axes = list(dict.fromkeys(data.axes[:1] + finding_axes)) or [None]
    figures = []
    for metric in curve_metrics(data, series):
        # the study metric is drawn once per axis a finding looks at; other metrics by the first axis
        for axis in group_axes if metric == data.metric else group_axes[:1]:
            fig = mpl_figure(figsize=(7.5, 4.5))
            ax = fig.add_subplot()
            _draw_curves(ax, data, series, metric, axis)
            suffix = f"_by_{_slug(axis)}" if axis and len(group_axes) > 1 and metric == data.metric else ""
            path = _save(fig, out / f"curves_{_slug(metric)}{suffix}.png")
            by = f", colored by {axis}" if axis else ""
            single = all(len(series.get(r.name, {}).get(metric) or []) <= 1 for r in data.runs)
            figures.append(Figure(path, f"{metric} against step{by}",
                                  f"Each run has one value of {metric} (one evaluation), drawn as a point: there is "
                                  "no curve to show." if single else
                                  "One line per run; dashed lines are runs that did not complete."))
    return figures


def _draw_curves(ax, data: StudyData, series, metric: str, axis: str | None) -> None:
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    values = levels(data.runs, axis) if axis else [None]
    cmap = matplotlib.colormaps["viridis"]
    color = {canon(v): cmap(i / max(1, len(values) - 1) * 0.9) for i, v in enumerate(values)}
    seen = set()
    for run in data.runs:
        points = series.get(run.name, {}).get(metric)
        if not points:
            continue
        key = canon(run.axes.get(axis)) if axis else canon(None)
        label = None
        if key not in seen:
            seen.add(key)
            label = fmt_value(run.axes.get(axis)) if axis else "runs"
        done = run.status == Status.COMPLETED
        # one point (a single evaluation) is no line: a visible marker instead
        marker = "o" if len(points) == 1 else "." if len(points) < 12 else None
        ax.plot([s for s, _ in points], [v for _, v in points], color=color[key], label=label,
                linestyle="-" if done else "--", alpha=0.85 if done else 0.5, marker=marker)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    plain_numbers(ax)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=8, title=axis, title_fontsize=8, loc="best")


def plot_train_loss(mpl_figure, data: StudyData, series, out: Path) -> list[Figure]:
    """The training loss (metrics.jsonl train lines, every train.log_every steps) of every run,
    so a study with few evaluations still has curves."""
    if not any(series.get(r.name, {}).get("train_loss") for r in data.runs):
        return []
    axis = data.axes[0] if data.axes else None
    fig = mpl_figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    _draw_curves(ax, data, series, "train_loss", axis)
    path = _save(fig, out / "train_loss.png")
    by = f", colored by {axis}" if axis else ""
    return [Figure(path, f"training loss against step{by}",
                   "The loss of each optimizer step's batch as the run logged it (train.log_every); "
                   "dashed lines are runs that did not complete.")]


# ---------------------------------------------------------------- (b) heatmap over two axes

def heatmap_axes(data: StudyData) -> tuple[str, str] | None:
    """The first two numeric axes that are not tied to each other (r x alpha), or None."""
    numeric = [a for a in data.axes if all(is_number(r.axes.get(a)) for r in data.runs)]
    for i, a in enumerate(numeric):
        for b in numeric[i + 1:]:
            if b not in tied_to(data, a) and a not in tied_to(data, b):
                return a, b
    return None


def plot_heatmap(mpl_figure, data: StudyData, out: Path) -> list[Figure]:
    pair = heatmap_axes(data)
    if pair is None or not data.ok:
        return []
    y_axis, x_axis = pair
    ys, xs = levels(data.runs, y_axis), levels(data.runs, x_axis)
    grid = [[math.nan] * len(xs) for _ in ys]
    counts = [[0] * len(xs) for _ in ys]
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            vals = [r.value for r in at_level(at_level(data.ok, y_axis, yv), x_axis, xv)]
            if vals:
                grid[i][j], counts[i][j] = stats.mean(vals), len(vals)
    fig = mpl_figure(figsize=(1.0 + 0.9 * len(xs), 1.2 + 0.6 * len(ys)))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="viridis_r" if data.goal == "min" else "viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label=f"final {data.metric} ({'lower' if data.goal == 'min' else 'higher'} is better)")
    ax.set_xticks(range(len(xs)), [_tick_label(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_tick_label(v) for v in ys])
    ax.set_xlabel(x_axis)
    ax.set_ylabel(y_axis)
    finite = [v for row in grid for v in row if not math.isnan(v)]
    best = (min if data.goal == "min" else max)(finite)
    for i in range(len(ys)):
        for j in range(len(xs)):
            v = grid[i][j]
            text = "failed" if math.isnan(v) else f"{v:.3g}" + (f"\nn={counts[i][j]}" if counts[i][j] > 1 else "")
            r, g, b, _ = im.cmap(im.norm(v)) if not math.isnan(v) else (1, 1, 1, 1)
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black",
                    fontweight="bold" if v == best else "normal")
    path = _save(fig, out / f"heatmap_{_slug(y_axis)}_{_slug(x_axis)}.png")
    return [Figure(path, f"final {data.metric}: {y_axis} x {x_axis}",
                   "Mean over repeats (n = runs per cell when more than one); the best cell in bold; "
                   "'failed' marks cells with no completed run.")]


# ---------------------------------------------------------------- (c) cost against quality

def plot_pareto(mpl_figure, data: StudyData, out: Path) -> list[Figure]:
    points = pareto_points(data)
    costs = [(attr, label) for attr, label in PARETO_COSTS if any(p[attr] is not None for p in points)]
    if not points or not costs:
        return []
    fig = mpl_figure(figsize=(4.2 * len(costs), 4.0))
    for k, (attr, label) in enumerate(costs):
        ax = fig.add_subplot(1, len(costs), k + 1)
        pts = [p for p in points if p[attr] is not None]
        scale = MIB if attr == "memory_bytes" else 1
        xs = [p[attr] / scale for p in pts]
        ys = [p["metric"] for p in pts]
        front = stats.pareto_front(xs, ys, data.goal)
        ax.scatter(xs, ys, color="0.6", s=18, label="configuration")
        fr = sorted((x, y, _short(p["config"])) for x, y, p, f in zip(xs, ys, pts, front, strict=True) if f)
        # a staircase: from each optimal point, the next one costs more and is better
        ax.plot([x for x, _, _ in fr], [y for _, y, _ in fr], "o-", color="tab:red", ms=5, drawstyle="steps-post",
                label="Pareto frontier")
        for n, (x, y, name) in enumerate(fr[:8]):  # alternate above / below so neighbours do not overlap
            ax.annotate(name, (x, y), fontsize=6, xytext=(4, 4 if n % 2 == 0 else -10), textcoords="offset points")
        if attr == "params" and min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
        plain_numbers(ax)
        ax.set_xlabel(label + (" (MiB)" if attr == "memory_bytes" else ""))
        ax.set_ylabel(f"final {data.metric}")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7)
    path = _save(fig, out / "pareto.png")
    return [Figure(path, f"cost against {data.metric}",
                   "One point per configuration (mean over its repeats); red: the Pareto frontier, "
                   "configurations no other one beats on both the cost and the metric. "
                   + pareto_noise_note(data, points))]


def pareto_noise_note(data: StudyData, points: list[dict]) -> str:
    """Whether the frontier's quality differences stand out of the seed noise."""
    values = [p["metric"] for p in points if p.get("metric") is not None]
    if len(values) < 2:
        return ""
    span = max(values) - min(values)
    if data.noise_sd is None:
        return ("The study has no repeats, so seed noise is unknown: the frontier may be drawn from "
                f"differences (largest {span:.3g}) that a different seed would reorder.")
    if span <= 2 * data.noise_sd:
        return (f"Every difference in {data.metric} between these configurations ({span:.3g} at most) is "
                f"within the seed noise (2 x seed-to-seed SD = {2 * data.noise_sd:.3g}): this frontier "
                "is drawn from noise; read the configurations as tied on quality.")
    return (f"The metric spans {span:.3g}, against a seed-to-seed SD of {data.noise_sd:.3g}; differences "
            f"under {2 * data.noise_sd:.3g} between neighbouring points are within the seed noise.")


def _short(label: str) -> str:
    """"lora.r=2, lora.alpha=512" -> "r=2, alpha=512" for labels inside plots."""
    return re.sub(r"[A-Za-z_]+\.(?=[A-Za-z_]+=)", "", label)


# ---------------------------------------------------------------- (d) spread across seeds

def plot_spread(mpl_figure, data: StudyData, out: Path) -> list[Figure]:
    groups = [g for g in repeat_groups(data.ok).values() if len(g) >= 2]
    if not groups:
        return []
    fig = mpl_figure(figsize=(7.5, 1.2 + 0.35 * len(groups)))
    ax = fig.add_subplot()
    for i, runs in enumerate(groups):
        vals = [r.value for r in runs]
        m, lo, hi = stats.mean_interval(vals)
        ax.errorbar([m], [i], xerr=[[m - lo], [hi - m]], fmt="o", color="tab:blue", capsize=3,
                    label="mean and 95% interval" if i == 0 else None)
        ax.scatter(vals, [i] * len(vals), color="tab:orange", s=12, zorder=3, label="one seed" if i == 0 else None)
    ax.set_yticks(range(len(groups)), [_short(config_label(g[0], data.axes)) for g in groups], fontsize=7)
    plain_numbers(ax)
    ax.set_xlabel(f"final {data.metric}")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="best")
    path = _save(fig, out / "spread.png")
    return [Figure(path, f"spread of {data.metric} across seeds",
                   "Each configuration that ran with several seeds: every seed's value, their mean and "
                   "the 95% t interval of the mean.")]


# ---------------------------------------------------------------- tables and pages

RUN_COLUMNS = ("run", "axes", "status", "final metric", "time (s)", "peak memory (MiB)", "trainable params")


def run_table(data: StudyData) -> list[list[str]]:
    left_out = {r.name: why for r, why in data.excluded}
    rows = []
    for r in data.runs:
        axes = ", ".join(f"{k}={fmt_value(v)}" for k, v in r.axes.items())
        rows.append([r.name, axes, left_out.get(r.name, r.status), "" if r.value is None else f"{r.value:.4g}",
                     "" if r.time_s is None else f"{r.time_s:.1f}",
                     "" if r.memory_bytes is None else f"{r.memory_bytes / MIB:.0f}",
                     "" if r.params is None else f"{r.params:,}"])
    return rows


def _header(data: StudyData) -> list[tuple[str, str]]:
    spec = data.spec
    out = [(k.capitalize(), str(spec[k])) for k in ("description", "question", "claim") if spec.get(k)]
    out.append(("Metric", f"{data.metric} ({'lower' if data.goal == 'min' else 'higher'} is better)"))
    n_ok = len(data.ok)
    repeats = (f"seed-to-seed SD {data.noise_sd:.3g} (df {data.noise_df})" if data.noise_sd is not None
               else "no repeats: differences cannot be separated from seed noise")
    out.append(("Runs", f"{len(data.runs)} ({n_ok} completed and counted, {len(data.excluded)} left out); {repeats}"))
    axes = [a for a in data.axes if a != SEED_KEY]
    out.append(("Axes", ", ".join(f"{a} ({len(levels(data.runs, a))} values)" for a in axes) or "none"))
    return out


def _deviation_block(ctx: dict[str, Any]) -> list[str]:
    if not (ctx.get("seed") or {}).get("setup"):
        return []
    return ctx.get("deviations") or ["none: every run used the seed's setup"]


def render_markdown(data: StudyData, found: list[dict], figures: list[Figure],
                    ctx: dict[str, Any] | None = None) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    ctx = ctx or {}
    lines = [f"# Study report: {data.name}", ""]
    verdict, found = split_verdict(found)
    if verdict:
        lines += [f"**Verdict: {cell(verdict['text'])}**", ""]
    devs = _deviation_block(ctx)
    if devs:
        lines += ["**Differences from the seed's setup** (computed from the run configs):", ""]
        lines += [f"- {cell(d)}" for d in devs] + [""]
    lines += [f"- **{k}:** {cell(v)}" for k, v in context_lines(ctx)]
    lines += [f"- **{k}:** {cell(v)}" for k, v in _header(data)]
    if ctx.get("setup"):
        lines += ["", "## The seed's setup beside this study's", "", "| key | seed | this study | |",
                  "|---|---|---|---|"]
        lines += [f"| {r['key']} | {cell(r['seed'])} | {cell(r['runs'])} | {'differs' if r['differs'] else ''} |"
                  for r in ctx["setup"]]
    lines += ["", f"## {findings_title(verdict)}", ""]
    lines += [f"- **{f['kind']}**: {cell(f['text'])}" for f in found] or ["- none"]
    lines += ["", "## Plots", ""]
    for f in figures:
        lines += [f"### {f.title}", "", f"![{f.title}]({f.path.name})", "", f.caption, ""]
    lines += ["## Runs", "", "| " + " | ".join(RUN_COLUMNS) + " |", "|" + "---|" * len(RUN_COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in run_table(data)]
    lines += ["", "## Runs left out of the statistics", ""]
    lines += [f"- {r.name}: {cell(why)}" for r, why in data.excluded] or ["- none: every run completed"]
    return "\n".join(lines) + "\n"


def render_html(data: StudyData, found: list[dict], figures: list[Figure], ctx: dict[str, Any] | None = None) -> str:
    """The page, from templates/report.html.j2 (Jinja2, autoescaped), every PNG inlined."""
    ctx = ctx or {}
    pngs = [{"title": f.title, "caption": f.caption,
             "png_base64": base64.b64encode(f.path.read_bytes()).decode("ascii")}
            for f in figures]
    verdict, found = split_verdict(found)
    return _templates().get_template("report.html.j2").render(
        name=data.name, verdict=verdict["text"] if verdict else None, findings_title=findings_title(verdict),
        deviations=_deviation_block(ctx), header=context_lines(ctx) + _header(data),
        setup=ctx.get("setup") or [], findings=found, figures=pngs, columns=RUN_COLUMNS, rows=run_table(data),
        excluded=[(r.name, why) for r, why in data.excluded])


def split_verdict(found: list[dict]) -> tuple[dict | None, list[dict]]:
    """(the verdict of a study that could not answer, or None; the other findings)."""
    verdict = next((f for f in found if f["kind"] == "verdict"), None)
    return verdict, [f for f in found if f is not verdict]


def findings_title(verdict: dict | None) -> str:
    return "What the runs showed (not results: see the verdict)" if verdict else "Findings"


@functools.cache
def _templates():
    """The report's Jinja2 environment: templates shipped in loralab/study/templates, HTML
    autoescaped, undefined names an error (a template typo fails the test, not the reader)."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("loralab.study", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
