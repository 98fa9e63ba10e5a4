"""The finding kinds: a study's answers in plain language, with the numbers behind each sentence.

    for f in findings("runs/rank_alpha_grid/study.db", "rank_alpha_grid"):
        print(f["kind"], f["text"])

Every analysis uses each completed run's final value of the study metric, as
:mod:`loralab.study.results` reads it, and the matched comparisons of :mod:`loralab.study.levels`.
The seed noise (the standard deviation between repeats, pooled over every repeated
configuration) is the yardstick: a difference is called a win only when its 95% interval (t
interval with that pooled noise) excludes zero; without repeats the text says that the
difference cannot be separated from seed noise and names no winner. Runs that did not complete
(failed, skipped, stopped early, ...) are listed and left out of every statistic.

A study judged on several metrics (``metric`` plus ``metrics: [...]`` in the study file) gets
every finding once per metric, each on that metric's own values and seed noise (a finding
carries its ``metric``), and, per axis, an ``across_metrics`` finding that compares each level
with a reference level on every metric and says when they disagree: "quant.mode=nf4 against
quant.mode=none: better on arithmetic_2ds/exact_match by 0.04 +/- 0.02, worse on world_mc/mc2
by 0.03 +/- 0.01". The metrics disagree when one is better and another worse, each beyond the
seed noise; different directions that the noise cannot separate are said to be so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loralab.study import stats
from loralab.study.levels import (
    at_level,
    cells_of,
    compare,
    config_label,
    find_level,
    fmt_value,
    level_label,
    level_stats,
    levels,
    value_of,
)
from loralab.study.results import (
    SEED_KEY,
    RunResult,
    StudyData,
    canon,
    for_metric,
    read_study,
    repeat_groups,
)
from loralab.study.spec import FINDING_KINDS

NO_REPEATS = "no repeats: differences cannot be separated from seed noise"
KINDS = tuple(FINDING_KINDS)


def diff_text(data: StudyData, cmp: dict[str, Any]) -> str:
    """"+0.012 +/- 0.020 (95% interval), within the seed noise"."""
    d = f"{cmp['difference']:+.3g}"
    if cmp["half_width"] is None:
        return f"{d} ({NO_REPEATS})"
    verdict = "beyond the seed noise" if cmp["beyond_noise"] else "within the seed noise"
    return f"{d} +/- {cmp['half_width']:.2g} (95% interval), {verdict}"


# ---------------------------------------------------------------- the kinds

def axis_effect(data: StudyData, axis: str) -> dict[str, Any]:
    """The metric per level of ``axis``, the best level, and whether it beats the runner-up."""
    rows = level_stats(data, data.ok, axis)
    out: dict[str, Any] = {"kind": "axis_effect", "axis": axis, "metric": data.metric, "goal": data.goal,
                           "levels": rows, "best": None, "runner_up": None, "comparison": None, "winner": None}
    if len(rows) < 2:
        out["text"] = f"{axis}: only {len(rows)} level(s) completed; nothing to compare."
        return out
    cells = {canon(r["value"]): cells_of(data, data.ok, axis, r["value"]) for r in rows}
    shared = set.intersection(*(set(c) for c in cells.values()))
    uneven = any(set(c) != shared for c in cells.values())

    def rank_key(row: dict[str, Any]) -> float:
        if uneven and shared:  # rank on the settings every level ran with
            return stats.mean([stats.mean(cells[canon(row["value"])][c]) for c in shared])
        return row["mean"]

    ranked = sorted(rows, key=rank_key, reverse=data.goal == "max")
    best, second = ranked[0], ranked[1]
    out.update(best=best["value"], runner_up=second["value"])
    per_level = "; ".join(_level_text(r) for r in rows)
    cmp = compare(data, data.ok, axis, best["value"], second["value"])
    out["comparison"] = cmp
    word = "lowest" if data.goal == "min" else "highest"
    head = f"{data.metric} by {axis}: {per_level}."
    if uneven:
        head += (" (Not every level ran under the same other settings, so these means are not directly "
                 "comparable; levels are ranked on the settings all of them ran with, and the difference "
                 "below uses only the settings both levels ran with.)")
    b, s = level_label(data, axis, best["value"]), level_label(data, axis, second["value"])
    if cmp is None:
        out["text"] = (f"{head} {b} had the {word} mean; it never ran alongside {s} under the same other settings, "
                       "so they cannot be compared.")
    elif cmp["beyond_noise"]:
        out["winner"] = best["value"]
        out["text"] = f"{head} {b} was best: against the runner-up {s} the difference was {diff_text(data, cmp)}."
    elif cmp["half_width"] is None:
        out["text"] = (f"{head} {b} had the {word} mean, {s} came next (difference {cmp['difference']:+.3g}); "
                       f"{NO_REPEATS}, so no level is named best.")
    else:
        out["text"] = (f"{head} {b} had the {word} mean, but against the runner-up {s} the difference was "
                       f"{diff_text(data, cmp)}: no level is clearly best.")
    return out


def _level_text(row: dict[str, Any]) -> str:
    ci = f" [{row['low']:.4g}, {row['high']:.4g}]" if row["low"] is not None else ""
    return f"{fmt_value(row['value'])}: {row['mean']:.4g}{ci} (n={row['n']})"


def trend_within(data: StudyData, axis: str, within: str) -> dict[str, Any]:
    """For each value of ``within``: was a higher ``axis`` value better?

    A slice counts as "higher was better" when the rank correlation between the axis value
    and the metric's goodness (its negative for goal min) is positive; the highest-vs-lowest
    difference is also checked against the seed noise.
    """
    slices = []
    for w in levels(data.ok, within):
        runs = at_level(data.ok, within, w)
        rows = level_stats(data, runs, axis)
        if len(rows) < 2:
            continue
        goodness = [r["mean"] if data.goal == "max" else -r["mean"] for r in rows]
        rho = stats.spearman(list(range(len(rows))), goodness)
        best = max(range(len(rows)), key=lambda i: goodness[i])
        cmp = compare(data, runs, axis, rows[-1]["value"], rows[0]["value"])
        helps = cmp is not None and data.better(cmp["mean_a"], cmp["mean_b"])
        slices.append({"within": w, "levels": rows, "rho": rho,
                       "trend": "higher" if rho > 0 else "lower" if rho < 0 else "none",
                       "best": rows[best]["value"], "best_at_highest": best == len(rows) - 1,
                       "highest_vs_lowest": cmp,
                       "highest_beats_lowest_beyond_noise": bool(cmp and cmp["beyond_noise"] and helps)})
    n = len(slices)
    k = sum(s["trend"] == "higher" for s in slices)
    k_lower = sum(s["trend"] == "lower" for s in slices)
    k_best = sum(s["best_at_highest"] for s in slices)
    k_noise = sum(s["highest_beats_lowest_beyond_noise"] for s in slices)
    out = {"kind": "trend_within", "axis": axis, "within": within, "metric": data.metric, "goal": data.goal,
           "slices": slices, "n": n, "k_higher_better": k, "k_lower_better": k_lower,
           "k_best_at_highest": k_best, "k_beyond_noise": k_noise}
    if n == 0:
        out["text"] = f"{axis} within {within}: no {within} value has two or more {axis} levels completed."
        return out
    every = "every" if n > 1 else "the only"
    if k == n:
        head = f"higher {axis} was better at {every} {within} ({k}/{n})"
    elif k_lower == n:
        head = f"lower {axis} was better at {every} {within} ({k_lower}/{n})"
    else:
        head = f"higher {axis} was better at {k}/{n} {within} values, lower at {k_lower}/{n}"
    head += (f"; a {within} value counts when {data.metric} {'fell' if data.goal == 'min' else 'rose'} as {axis} "
             f"rose (rank correlation of the means); the highest {axis} was best at {k_best}/{n}")
    if data.noise_sd is None:
        out["text"] = f"{head}. {NO_REPEATS}."
    else:
        out["text"] = (f"{head}; the highest beat the lowest {axis} by more than the seed noise "
                       f"(95% interval of the difference excludes 0) at {k_noise}/{n}.")
    return out


def equivalence(data: StudyData, axis: str, reference: Any) -> dict[str, Any]:
    """Does each level match ``reference`` within the seed-to-seed spread?

    matched: the 95% interval of the difference includes 0 and the difference is no larger
    than one seed-to-seed standard deviation; differs: the interval excludes 0;
    inconclusive: neither (too few repeats to tell).
    """
    out: dict[str, Any] = {"kind": "equivalence", "axis": axis, "reference": reference, "metric": data.metric,
                           "noise_sd": data.noise_sd, "levels": []}
    if find_level(data.ok, axis, reference) is None:
        found = ", ".join(fmt_value(v) for v in levels(data.ok, axis)) or "none"
        out["text"] = f"{axis}={fmt_value(reference)} (the reference) has no completed run (completed levels: {found})."
        return out
    reference = find_level(data.ok, axis, reference)
    ref = level_label(data, axis, reference)
    parts = []
    for v in levels(data.ok, axis):
        if canon(v) == canon(reference):
            continue
        cmp = compare(data, data.ok, axis, v, reference)
        verdict = _equivalence_verdict(data, cmp)
        out["levels"].append({"value": v, "comparison": cmp, "verdict": verdict})
        lab = level_label(data, axis, v)
        if cmp is None:
            parts.append(f"{lab} never ran under the same other settings as {ref}")
        elif verdict == "unknown":
            parts.append(f"{lab} against {ref}: {data.metric} differed by {cmp['difference']:+.3g}; {NO_REPEATS}")
        else:
            said = {"matched": f"matched {ref} within the seed-to-seed spread",
                    "differs": f"differed from {ref}", "inconclusive": f"could not be told apart from {ref}, "
                    "but the difference is larger than the seed-to-seed spread (more repeats needed)"}[verdict]
            parts.append(f"{lab} {said}: {data.metric} differed by {diff_text(data, cmp)}")
    if data.noise_sd is not None:
        parts.append(f"seed-to-seed SD {data.noise_sd:.2g} (df {data.noise_df})")
    out["text"] = "; ".join(parts) + "." if parts else f"{axis} has no level besides the reference."
    return out


def _equivalence_verdict(data: StudyData, cmp: dict[str, Any] | None) -> str:
    if cmp is None:
        return "not comparable"
    if cmp["half_width"] is None:
        return "unknown"
    if cmp["beyond_noise"]:
        return "differs"
    return "matched" if abs(cmp["difference"]) <= data.noise_sd else "inconclusive"


def cost(data: StudyData, axis: str, baseline: Any) -> dict[str, Any]:
    """Per level against ``baseline``: peak memory and time change in percent (with their
    interval when repeats exist), parameter counts, and the metric difference with its interval."""
    out: dict[str, Any] = {"kind": "cost", "axis": axis, "baseline": baseline, "metric": data.metric, "levels": []}
    if find_level(data.ok, axis, baseline) is None:
        found = ", ".join(fmt_value(v) for v in levels(data.ok, axis)) or "none"
        out["text"] = f"{axis}={fmt_value(baseline)} (the baseline) has no completed run (completed levels: {found})."
        return out
    baseline = out["baseline"] = find_level(data.ok, axis, baseline)
    parts = []
    for v in levels(data.ok, axis):
        if canon(v) == canon(baseline):
            continue
        row: dict[str, Any] = {"value": v, "comparison": compare(data, data.ok, axis, v, baseline)}
        for attr, key in (("memory_bytes", "memory"), ("time_s", "time"), ("params", "params")):
            row[key] = _pct(compare(data, data.ok, axis, v, baseline, attr=attr))
        row["fused"] = trained_together(data, axis, v, baseline)
        if row["fused"]:  # a group's time and peak are shared equally among its runs: no difference to see
            row["memory"] = row["time"] = None
        out["levels"].append(row)
        parts.append(_cost_text(data, axis, v, baseline, row))
    out["text"] = " ".join(parts) if parts else f"{axis} has no level besides the baseline."
    return out


def trained_together(data: StudyData, axis: str, a: Any, b: Any) -> bool:
    """Whether a run at ``axis`` = ``a`` trained in one fused group with a run at ``b``: their
    time and peak memory are then the group's, shared, not measured for either setting."""
    dirs_b = {r.run_dir for r in data.ok if canon(r.axes.get(axis)) == canon(b) and r.run_dir}
    return any(set(r.fused_with) & dirs_b for r in data.ok if canon(r.axes.get(axis)) == canon(a))


def _mean_attr(runs: list[RunResult], attr: str) -> float | None:
    vals = [value_of(r, attr) for r in runs if value_of(r, attr) is not None]
    return stats.mean(vals) if vals else None


def _pct(cmp: dict[str, Any] | None) -> dict[str, Any] | None:
    """A matched difference as a percent change of the baseline's mean (and its interval)."""
    if cmp is None or not cmp["mean_b"]:
        return None
    pct = 100 * cmp["difference"] / cmp["mean_b"]
    half = None if cmp["half_width"] is None else 100 * cmp["half_width"] / abs(cmp["mean_b"])
    return {"level_mean": cmp["mean_a"], "baseline_mean": cmp["mean_b"], "change_pct": pct,
            "half_width_pct": half, "beyond_noise": cmp["beyond_noise"]}


def _cost_text(data: StudyData, axis: str, v: Any, baseline: Any, row: dict[str, Any]) -> str:
    def change(p: dict[str, Any] | None, what: str) -> str:
        if p is None:
            return f"{what} not measured"
        pct, half = p["change_pct"], p["half_width_pct"]
        if abs(pct) < 0.5 and not p["beyond_noise"]:
            text = f"the same {what}"
        else:
            text = f"saved {-pct:.0f}% {what}" if pct < 0 else f"cost {pct:.0f}% more {what}"
        if half is not None and half >= 0.5:  # memory on a GPU repeats exactly: no interval to give
            text += f" (+/- {half:.0f}%{'' if p['beyond_noise'] else ', within the run-to-run noise'})"
        return text

    cmp = row["comparison"]
    lab, base = level_label(data, axis, v), level_label(data, axis, baseline)
    if cmp is None:
        return f"{lab} never ran under the same other settings as {base}."
    if row.get("fused"):
        text = (f"{lab} against {base}: peak memory and time not measured apart (they trained in one fused group, "
                "whose time and peak are shared equally among its runs; loralab study run --no-fuse measures each "
                "alone)")
    else:
        text = f"{lab} against {base}: {change(row['memory'], 'peak memory')} and {change(row['time'], 'time')}"
    params = row["params"]
    if params is not None and params["level_mean"] != params["baseline_mean"]:
        text += f", {params['level_mean']:,.0f} trainable parameters instead of {params['baseline_mean']:,.0f}"
    return text + f"; {data.metric} differed by {diff_text(data, cmp)}."


def spread(data: StudyData) -> dict[str, Any]:
    """Repeats of one configuration: mean, SD, 95% interval and range, per repeated config."""
    groups = []
    for runs in repeat_groups(data.ok).values():
        if len(runs) < 2:
            continue
        vals = [r.value for r in runs]
        m, lo, hi = stats.mean_interval(vals)
        groups.append({"config": config_label(runs[0], data.axes), "runs": [r.name for r in runs],
                       "seeds": [r.axes.get(SEED_KEY) for r in runs], "n": len(vals), "mean": m,
                       "sd": stats.sample_sd(vals), "low": lo, "high": hi, "min": min(vals), "max": max(vals)})
    out = {"kind": "spread", "metric": data.metric, "groups": groups,
           "noise_sd": data.noise_sd, "noise_df": data.noise_df}
    if not groups:
        out["text"] = f"{NO_REPEATS} (no configuration ran with more than one seed)."
        return out
    shown = [f"{g['config']} over {g['n']} seeds: mean {g['mean']:.4g}, SD {g['sd']:.2g}, "
             f"95% interval [{g['low']:.4g}, {g['high']:.4g}], range {g['min']:.4g} to {g['max']:.4g}"
             for g in groups[:4]]
    more = f"; and {len(groups) - 4} more configurations" if len(groups) > 4 else ""
    pooled = (f"Seed-to-seed SD of {data.metric} pooled over {len(groups)} repeated configuration(s): "
              f"{data.noise_sd:.2g} (df {data.noise_df}); differences smaller than that are noise.")
    out["text"] = f"{data.metric} {'; '.join(shown)}{more}. {pooled}"
    return out


PARETO_COSTS = (("time_s", "time (s)"), ("memory_bytes", "peak memory"), ("params", "trainable parameters"))


def pareto_points(data: StudyData) -> list[dict[str, Any]]:
    """One point per configuration: means over its repeats of the metric and each cost."""
    points = []
    for runs in repeat_groups(data.ok).values():
        p = {"config": config_label(runs[0], data.axes), "runs": [r.name for r in runs], "n": len(runs),
             "metric": stats.mean([r.value for r in runs])}
        for attr, _ in PARETO_COSTS:
            p[attr] = _mean_attr(runs, attr)
        points.append(p)
    return points


def pareto(data: StudyData) -> dict[str, Any]:
    """The configurations no other one beats on both a cost and the metric, per cost."""
    points = pareto_points(data)
    fronts: dict[str, list[str]] = {}
    for attr, _ in PARETO_COSTS:
        pts = [p for p in points if p[attr] is not None]
        if len(pts) >= 1:
            flags = stats.pareto_front([p[attr] for p in pts], [p["metric"] for p in pts], data.goal)
            fronts[attr] = [p["config"] for p, f in zip(pts, flags, strict=True) if f]
    out = {"kind": "pareto", "metric": data.metric, "goal": data.goal, "points": points, "fronts": fronts}
    if not points:
        out["text"] = "no completed run to place on a Pareto frontier."
        return out
    parts = [f"against {label}: {'; '.join(fronts[attr])}" for attr, label in PARETO_COSTS if attr in fronts]
    noise = (f"{data.metric} differences under the seed-to-seed SD {data.noise_sd:.2g} are noise"
             if data.noise_sd is not None else NO_REPEATS)
    out["text"] = (f"Pareto-optimal configurations ({len(points)} in all; {data.metric}, "
                   f"{'lower' if data.goal == 'min' else 'higher'} is better) {' | '.join(parts)}. Note: {noise}.")
    return out


def verdict(data: StudyData) -> dict[str, Any] | None:
    """Why the study could not answer its question, or None when it could: fewer than two values
    of an axis have a completed run (the others invalid on this model, failed, ...), its runs
    trained too few steps, every completed run scored the same value (a metric at its floor or
    ceiling), or every difference between settings is within the seed noise. Each reason says
    what would answer it."""
    from loralab.study.steps import FLOOR_STEPS

    if not data.ok:
        if not data.runs:
            return None
        counts: dict[str, int] = {}
        for r in data.runs:
            counts[str(r.status)] = counts.get(str(r.status), 0) + 1
        ended = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        return {"kind": "verdict", "answered": False, "metric": data.metric,
                "reasons": [f"no run completed with a value of {data.metric} ({ended})"],
                "text": f"The study could not answer its question: no run completed with a value of {data.metric} "
                        f"({ended}); the excluded runs below say why each one ended."}
    reasons = []
    for axis in (a for a in data.axes if a != SEED_KEY):
        planned, done = levels(data.runs, axis), levels(data.ok, axis)
        if len(planned) > 1 and len(done) < 2:
            reasons.append(f"only {len(done)} of the {len(planned)} values of {axis} has a completed run "
                           f"({', '.join(fmt_value(v) for v in done) or 'none'}), so there is nothing to compare it "
                           "with; the excluded runs below say why the others ended")
    steps = [r.steps for r in data.ok if r.steps]
    if steps and max(steps) < FLOOR_STEPS:
        reasons.append(f"every run trained at most {max(steps)} optimizer step{'s' * (max(steps) != 1)}, under "
                       f"the {FLOOR_STEPS} it takes to leave the initialisation; give the runs more steps (a smaller "
                       "batch, more data or more epochs: loralab study run --dry-run counts them)")
    values = [r.value for r in data.ok]
    if len(values) > 1 and max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values))):
        v = values[0]
        edge = (" (the metric's floor)" if v == 0 and data.goal == "max" else
                " (the metric's ceiling)" if v == 1 and data.goal == "max" and "/" in data.metric else "")
        reasons.append(f"every completed run scored {data.metric} = {v:.4g}{edge}, so no setting can be told from "
                       "another; judge it on a metric that can move here (eval_loss, or a harness task)")
    elif data.noise_sd is not None:
        cmps = [axis_effect(data, a)["comparison"] for a in data.axes if a != SEED_KEY]
        cmps = [c for c in cmps if c is not None]
        if cmps and not any(c["beyond_noise"] for c in cmps):
            reasons.append(f"every difference between settings is within the seed noise (seed-to-seed SD "
                           f"{data.noise_sd:.2g}); more repeats or longer runs would narrow it")
    if not reasons:
        return None
    return {"kind": "verdict", "answered": False, "metric": data.metric, "reasons": reasons,
            "text": "The study could not answer its question: " + "; ".join(reasons) + ". The findings below "
                    "are what the runs showed, not results."}


def excluded(data: StudyData) -> dict[str, Any]:
    rows = [{"run": r.name, "status": r.status, "reason": why, "stopped_at_step": r.stopped_at_step}
            for r, why in data.excluded]
    listed = "; ".join(f"{row['run']} {row['reason']}" for row in rows)
    return {"kind": "excluded", "runs": rows, "n": len(rows), "n_total": len(data.runs),
            "text": f"{len(rows)} of {len(data.runs)} runs are left out of every statistic: {listed}."}


# ---------------------------------------------------------------- entry point

def default_findings(data: StudyData) -> list[dict[str, Any]]:
    """Without a findings list: each declared axis's effect, the seed spread, the Pareto set."""
    declared = [k for k in (data.spec.get("axes") or {}) if k in data.axes] or data.axes
    out: list[dict[str, Any]] = [{"kind": "axis_effect", "axis": a} for a in declared]
    out.append({"kind": "spread"})
    out.append({"kind": "pareto"})
    return out


def run_finding(data: StudyData, spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec.get("kind")
    axis = spec.get("axis")
    if kind not in FINDING_KINDS:
        return {"kind": str(kind), "text": f"unknown findings kind {kind!r} (known: {', '.join(KINDS)})"}
    missing = [k for k in FINDING_KINDS[kind] if k not in spec]
    if missing:
        return {"kind": kind, "text": f"{kind} needs {', '.join(missing)}; this finding was skipped."}
    for key in ("axis", "within"):
        if key in spec and spec[key] not in data.axes:
            return {"kind": kind, key: spec[key],
                    "text": f"{spec[key]} does not vary in this study (axes: {', '.join(data.axes) or 'none'})."}
    if kind == "axis_effect":
        return axis_effect(data, axis)
    if kind == "trend_within":
        return trend_within(data, axis, spec["within"])
    if kind == "equivalence":
        return equivalence(data, axis, spec["reference"])
    if kind == "cost":
        return cost(data, axis, spec["baseline"])
    if kind == "spread":
        return spread(data)
    return pareto(data)


def across_metrics(data: StudyData, axis: str, reference: Any = None) -> dict[str, Any]:
    """Each level of ``axis`` against ``reference`` (default: its first level) on every judged
    metric: better or worse by how much, with the 95% interval from that metric's seed noise,
    and whether the metrics disagree (one better, another worse, each beyond the noise)."""
    per_metric = [for_metric(data, m, g) for m, g in data.metrics]
    lv = levels(data.runs, axis)
    ref = find_level(data.runs, axis, reference) if reference is not None else None
    ref = lv[0] if ref is None and lv else ref
    out: dict[str, Any] = {"kind": "across_metrics", "axis": axis, "reference": ref,
                           "metrics": [m for m, _ in data.metrics], "levels": [], "disagree": False}
    parts = []
    for v in lv:
        if canon(v) == canon(ref):
            continue
        by_metric = {d.metric: _direction(d, compare(d, d.ok, axis, v, ref)) for d in per_metric}
        verdict = _agreement(by_metric.values())
        out["levels"].append({"value": v, "verdict": verdict, "by_metric": by_metric})
        pieces = [_direction_text(m, x) for m, x in by_metric.items()]
        ci = " (95% intervals)" if any(x["half_width"] is not None for x in by_metric.values()) else ""
        parts.append(f"{level_label(data, axis, v)} against {level_label(data, axis, ref)}: "
                     f"{', '.join(pieces)}{ci}: {AGREEMENT[verdict]}")
    out["disagree"] = any(level["verdict"] == "disagree" for level in out["levels"])
    if not parts:
        out["text"] = f"{axis}: no level besides {fmt_value(ref)} to compare across metrics."
    else:
        head = "The metrics disagree on" if out["disagree"] else "Across metrics,"
        out["text"] = f"{head} {axis}: " + "; ".join(parts) + "."
    return out


AGREEMENT = {
    "disagree": "the metrics disagree, each beyond the seed noise",
    "mixed": "the metrics point different ways, but not each beyond the seed noise",
    "mixed_no_repeats": f"the metrics point different ways ({NO_REPEATS})",
    "agree": "the metrics agree",
    "not comparable": "not comparable (never ran under the same other settings)",
}


def _direction(data: StudyData, cmp: dict[str, Any] | None) -> dict[str, Any]:
    """better / worse / same / not comparable, for ``cmp`` (level minus reference) on ``data``'s metric."""
    if cmp is None:
        return {"direction": "not comparable", "difference": None, "half_width": None, "beyond_noise": None,
                "goal": data.goal}
    a, b = cmp["mean_a"], cmp["mean_b"]
    direction = "better" if data.better(a, b) else "worse" if data.better(b, a) else "same"
    return {"direction": direction, "difference": cmp["difference"], "half_width": cmp["half_width"],
            "beyond_noise": cmp["beyond_noise"], "goal": data.goal}


def _direction_text(metric: str, x: dict[str, Any]) -> str:
    if x["direction"] in ("not comparable", "same"):
        return f"{x['direction']} on {metric}"
    text = f"{x['direction']} on {metric} by {abs(x['difference']):.3g}"
    if x["half_width"] is not None:
        text += f" +/- {x['half_width']:.2g}" + ("" if x["beyond_noise"] else " (within the seed noise)")
    return text


def _agreement(by_metric) -> str:
    xs = [x for x in by_metric if x["direction"] != "not comparable"]
    if not xs:
        return "not comparable"
    clear = {x["direction"] for x in xs if x["beyond_noise"]}
    if {"better", "worse"} <= clear:
        return "disagree"
    if {"better", "worse"} <= {x["direction"] for x in xs}:
        return "mixed_no_repeats" if all(x["half_width"] is None for x in xs) else "mixed"
    return "agree"


def _reference_of(data: StudyData, axis: str) -> Any:
    """The level a study's findings compare against for ``axis`` (a cost baseline or an
    equivalence reference), else None (the first level)."""
    for spec in data.spec.get("findings") or []:
        if spec.get("axis") == axis:
            for key in ("baseline", "reference"):
                if key in spec:
                    return spec[key]
    return None


def _metric_findings(data: StudyData, *, with_excluded: bool = True) -> list[dict[str, Any]]:
    """The study's findings (its list, or the default ones) on ``data``'s metric."""
    out = []
    if data.excluded and with_excluded:
        out.append(excluded(data))
    specs = data.spec.get("findings") or default_findings(data)
    for spec in specs:
        f = run_finding(data, spec)
        f["n_runs"] = len(data.ok)
        if data.excluded and f["kind"] in KINDS:
            f["n_excluded"] = len(data.excluded)
            f["text"] += f" ({len(data.excluded)} run(s) that did not complete are not counted.)"
        out.append(f)
    for f in out:
        f.setdefault("metric", data.metric)
    return out


def findings_from(data: StudyData) -> list[dict[str, Any]]:
    """Findings of an already-read study (the report reads the study once for both).

    A study that could not answer opens with its ``verdict`` (see :func:`verdict`), and every
    other finding is marked ``"result": False``: what the runs showed, not an answer.
    One metric: the study's findings. Several: the runs left out, an ``across_metrics``
    finding per varying axis, then every finding once per metric (its text opens with
    ``[metric]``), the runs a metric alone lacks listed with that metric's findings."""
    out = _all_findings(data)
    v = verdict(data)
    if v is None:
        return out
    for f in out:
        f["result"] = False
    return [v, *out]


def _all_findings(data: StudyData) -> list[dict[str, Any]]:
    if len(data.metrics) <= 1:
        return _metric_findings(data)
    out = [excluded(data)] if data.excluded else []
    out += [across_metrics(data, a, _reference_of(data, a)) for a in data.axes]
    left_out = {r.name for r, _ in data.excluded}
    for metric, goal in data.metrics:
        d = for_metric(data, metric, goal)
        fs = _metric_findings(d, with_excluded={r.name for r, _ in d.excluded} != left_out)
        for f in fs:
            f["text"] = f"[{metric}] {f['text']}"
        out += fs
    return out


def findings(db_path: str | Path, study_name: str) -> list[dict[str, Any]]:
    """Each finding as {"kind", "text", and the numbers behind the text}; see the module doc."""
    return findings_from(read_study(db_path, study_name))
