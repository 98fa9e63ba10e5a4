"""What a study ran on, for the top of its report: the model, the data, the hardware, and the
seed's setup beside the runs' with every difference computed from the stored configs.

    ctx = study_context(Path("runs/dropout-quick/study.db"), "dropout-quick")
    ctx["deviations"]   # ["train.lr 0.0001 instead of the seed's 0.0003 (set by --set train.lr)", ...]
    ctx["model"]        # {"path": ..., "architecture": "LlamaForCausalLM", "parameters": 1234567, ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loralab.rundir import RunDir
from loralab.study.deviations import deviation_text, deviations
from loralab.study.keys import checked_part, fmt_config_value, get_key
from loralab.study.results import study_row
from loralab.study.store import open_readonly


def _model_config(path: str) -> dict[str, Any]:
    from loralab.models import BUILTIN_MODELS

    local = BUILTIN_MODELS.get(path, Path(path))
    try:
        return json.loads((Path(local) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a hub id or a directory since moved: the report says what it knows


def _read_summary(run_dir: str | None) -> dict[str, Any]:
    if not run_dir:
        return {}
    try:
        out = json.loads(RunDir(run_dir).summary.read_text(encoding="utf-8"))
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _values(configs: list[dict[str, Any]], key: str) -> str:
    seen: list[Any] = []
    for c in configs:
        v = get_key(c, key)
        if v not in seen:
            seen.append(v)
    return " / ".join(fmt_config_value(v) for v in seen)


def _lengths(stats: Any) -> str | None:
    """'min 12, median 112, p90 240, max 610 tokens' from summary["data_stats"]["token_lengths"]
    (loralab.data.dataset.length_stats)."""
    if not isinstance(stats, dict) or not isinstance(stats.get("token_lengths"), dict):
        return None
    d = stats["token_lengths"]
    parts = [f"{k} {d[k]:g}" for k in ("min", "median", "p90", "max") if isinstance(d.get(k), (int, float))]
    return (", ".join(parts) + " tokens") if parts else None


def study_context(db_path: str | Path, study_name: str) -> dict[str, Any]:
    con = open_readonly(db_path)
    try:
        srow = study_row(con, study_name, db_path)
        spec = json.loads(srow["spec_json"])
        rows = con.execute("SELECT name, axes_json, config_json, run_dir, total_params FROM runs "
                           "WHERE study_id = ? ORDER BY id", (srow["id"],)).fetchall()
    finally:
        con.close()
    configs = [json.loads(r["config_json"]) for r in rows]
    summaries = [s for s in (_read_summary(r["run_dir"]) for r in rows) if s]
    out: dict[str, Any] = {"seed": spec.get("seed") or {}, "profile": spec.get("profile"),
                           "hardware": spec.get("hardware")}
    if not configs:
        return out | {"model": {}, "data": {}, "setup": [], "deviations": []}
    path = get_key(configs[0], "model.path")
    mcfg = _model_config(path)
    params = ([r["total_params"] for r in rows if r["total_params"]]
              or [s.get("total_params") for s in summaries if s.get("total_params")])
    out["model"] = {
        "path": _values(configs, "model.path"),
        "architecture": ", ".join(mcfg.get("architectures") or []) or mcfg.get("model_type") or "unknown",
        "parameters": max(params) if params else None,
        "dtype": _values(configs, "model.dtype"),
        "quantization": _values(configs, "quant.mode"),
    }
    s0 = summaries[0] if summaries else {}
    out["data"] = {
        "path": _values(configs, "data.path"),
        "train_examples": s0.get("train_examples"), "val_examples": s0.get("val_examples"),
        "max_seq_length": _values(configs, "data.max_seq_length"),
        "token_lengths": _lengths(s0.get("data_stats")),
        "truncated": (s0.get("data_stats") or {}).get("truncated") if isinstance(s0.get("data_stats"), dict) else None,
        "lost_all_response": s0.get("truncated_to_no_response"),
    }
    devices = sorted({s["device"] for s in summaries if s.get("device")})
    out["devices"] = devices
    # the differences, recomputed from the stored configs; the source of each is what the
    # study recorded when it was loaded
    setup = (out["seed"] or {}).get("setup") or {}
    recorded = {d["key"]: d.get("source") for d in spec.get("deviations") or []}
    skip = set(spec.get("axes") or {}) | set(spec.get("tied") or {})
    devs = deviations(setup, configs, recorded, skip) if setup else []
    for d in devs:
        d["source"] = recorded.get(d["key"]) or "the study's configuration"
    out["deviations"] = [deviation_text(d) for d in devs]
    differs = {d["key"] for d in devs}
    seed_flat = checked_part(setup, "seed.setup") if setup else {}
    out["setup"] = [{"key": k, "seed": fmt_config_value(v),
                     "runs": "axis" if k in skip else _values(configs, k), "differs": k in differs}
                    for k, v in seed_flat.items()]
    return out


def context_lines(ctx: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) pairs for the report header: model, data, hardware, seed."""
    out = []
    m = ctx.get("model") or {}
    if m:
        params = f"{m['parameters']:,} parameters" if m.get("parameters") else "parameter count unknown"
        out.append(("Model", f"{m['path']} ({m['architecture']}, {params}, dtype {m['dtype']}, "
                             f"quantization {m['quantization']})"))
    d = ctx.get("data") or {}
    if d:
        parts = [d["path"]]
        if d.get("train_examples") is not None:
            parts.append(f"{d['train_examples']} training / {d.get('val_examples')} validation examples")
        parts.append(f"max_seq_length {d['max_seq_length']}")
        if d.get("token_lengths"):
            parts.append(f"token lengths: {d['token_lengths']}")
        if d.get("truncated") is not None:
            parts.append(f"{d['truncated']} examples truncated")
        if d.get("lost_all_response"):
            parts.append(f"{d['lost_all_response']} lost every response token to truncation")
        out.append(("Data", "; ".join(parts)))
    hw = ctx.get("hardware") or {}
    devices = ", ".join(ctx.get("devices") or [])
    if hw or devices:
        text = ", ".join(f"{k} {v}" for k, v in hw.items()) if isinstance(hw, dict) else str(hw)
        out.append(("Hardware", "; ".join(x for x in (text, f"runs on {devices}" if devices else "") if x)))
    seed = ctx.get("seed") or {}
    if seed.get("source"):
        out.append(("Seed", seed["source"]))
        for k in ("model", "data", "metric", "notes"):
            if seed.get(k):
                out.append((f"Seed's {k}", str(seed[k])))
    return out
