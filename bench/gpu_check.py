"""The GPU check: what only a GPU can show about loralab, in under 8 minutes on one GPU, as one JSON file.

    python bench/gpu_check.py --out $OUT/gpu_check.json      # on a machine with one CUDA GPU
    python bench/gpu_check.py --cpu-smoke --out /tmp/smoke.json   # anywhere: every code path, tiny sizes, < 2 min
    bash bench/gpu_check.sh [--cpu-smoke]                     # the same; the JSON goes to $OUT or bench/results/

Sections, in this order, each recorded with its seconds and, if it fails, its error (the other
sections still run); a section that would start after the time budget is recorded as skipped:

* ``env``: torch, CUDA, the GPU, what ``model.dtype: auto`` resolves to, loralab's device note.
* ``matmul_ceiling``: the best bf16 torch.matmul FLOP/s (fp32 in the smoke).
* ``memory``: ``loralab estimate`` against the measured peak for LoRA and nf4 QLoRA on a ~1.1B
  random-init Llama (TinyLlama's shape: 22 layers of 2048, 4 key/value heads) at two sequence
  lengths; measured = the run's summary peak and torch's max reserved + the CUDA context.
* ``attention``: which packed-attention kernel ran (loralab.train.attention) on a GQA model.
* ``syncs``: host-device syncs per optimizer step (Tensor.item/tolist/nonzero/__bool__/__int__/
  __float__ and torch.cuda.synchronize on device tensors, counted over 2 and 6 steps; the
  difference / 4).
* ``speed``: bench_speed's quick cases in bf16 against the Trainer + PEFT reference
  (bench/reference_trainer.py), each side in its own process: useful tokens/s, the ratio and
  % of the matmul ceiling (bench_speed.useful_flops).
* ``fused``: K=8 LoRA runs fused over one base (train_fused) against the same 8 one after
  another (train), in-process; wall seconds and the largest final-loss difference.
* ``quickstart``: ``loralab quickstart --json`` on CUDA, as a user runs it.
* ``multi_gpu``: with 2 or more GPUs, ``loralab train --nproc N`` (NCCL) against ``--nproc 1``:
  scaling efficiency (tokens/s on N against N times one), the adapters' largest difference,
  each rank's peak memory against the estimate; skipped with one GPU (2 gloo processes in the
  smoke).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench")]
ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "TOKENIZERS_PARALLELISM": "false"}

# TinyLlama-1.1B's shape, random init; the smoke's is small enough for bitsandbytes' CPU kernels (>= 64 wide).
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1276, max_position_embeddings=512)
GQA_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1276, max_position_embeddings=2048)

PLANS = {
    "gpu": dict(device="cuda", dtype="bf16", budget_s=420, words=1500, ceiling_n=8192, memory_model=ONE_B,
                memory_seq=[512, 2048], memory_micro=2, sync_micro=4, speed_cases=[
                    "tiny-bf16-lora-mb1", "tiny-bf16-lora-mb8", "big-bf16-lora-mb8"], speed_steps=None,
                speed_examples=None,
                fused_k=8, fused_steps=30, quickstart=[], attention_len=512, multi_steps=40),
    "smoke": dict(device="cpu", dtype="fp32", budget_s=600, words=60, ceiling_n=256, memory_model=SMOKE_MODEL,
                  memory_seq=[96, 128], memory_micro=1, sync_micro=2, speed_cases=["tiny-fp32-lora-mb8"],
                  speed_steps=1, speed_examples=16, fused_k=2, fused_steps=1,
                  quickstart=["--set", "train.max_steps=1", "--set", "eval.every=0", "--set", "data.limit=32",
                              "--set", "data.val_max_examples=4", "--eval-n", "2"],
                  attention_len=96, multi_steps=2),
}


# ----------------------------------------------------------------------------- helpers


def build_llama(out: Path, shape: dict, *, dtype: str) -> Path:
    """A random-init Llama with the tiny base's tokenizer, saved as safetensors."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loralab.models import BUILTIN_MODELS, DTYPES

    tiny = BUILTIN_MODELS["builtin:tiny"]
    base = json.loads((tiny / "config.json").read_text())
    cfg = LlamaConfig(bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"],
                      pad_token_id=base["pad_token_id"], **shape)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # a 1B model is built on the GPU in seconds
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, out / name)
    return out


def long_records(path: Path, n: int, words_each: int) -> Path:
    """n instructions whose responses run past any sequence length used here (so every example is
    truncated to exactly max_seq_length tokens, the estimate's assumption)."""
    words = "north south east west river hill stone field city road".split()
    rows = [{"instruction": f"Describe route {i}.", "input": "",
             "output": " ".join(words[(i + k) % len(words)] for k in range(words_each))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(model: str, data_path: Path, out: Path, plan: dict, **sections) -> object:
    from loralab.config import config_from_dict

    raw = {"model": {"path": model, "device": plan["device"], "dtype": plan["dtype"]},
           "lora": {"r": 8, "alpha": 16, "targets": ["query", "value"]},
           "data": {"path": str(data_path), "val_max_examples": 4, "max_seq_length": 64},
           "train": {"batch_size": 2, "micro_batch_size": 2, "max_steps": 2, "warmup_steps": 0, "log_every": 1},
           "output": {"dir": str(out), "save_adapter": False}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def free_device() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- sections


def section_env(plan: dict, work: Path) -> dict:
    import torch
    import transformers

    from loralab.models import choose_device, cuda_problem, nvidia_driver_answers, resolve_dtype

    device, note = choose_device("auto")
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
           "cuda_available": torch.cuda.is_available(), "cuda_problem": cuda_problem(),
           "nvidia_smi": nvidia_driver_answers(), "auto_device": str(device), "device_note": note,
           "auto_dtype": resolve_dtype("auto", device)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                "gpu_memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count}
    return out


def section_matmul_ceiling(plan: dict, work: Path) -> dict:
    import torch

    from loralab.models import DTYPES

    n, dtype, device = plan["ceiling_n"], DTYPES[plan["dtype"]], plan["device"]
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        torch.matmul(a, b)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    sync()
    seconds = time.perf_counter() - t0
    return {"shape": [n, n, n], "dtype": plan["dtype"], "flops_per_s": 2 * n**3 * reps / seconds}


def section_memory(plan: dict, work: Path) -> dict:
    """loralab estimate against the measured peak, LoRA and nf4 QLoRA, two sequence lengths."""
    import torch

    from loralab.estimate import estimate_run
    from loralab.train.loop import train

    model = build_llama(work / "one-b", plan["memory_model"], dtype="bf16" if plan["device"] == "cuda" else "fp32")
    data = long_records(work / "long.jsonl", 32, plan["words"])
    cuda = plan["device"] == "cuda"
    rows = []
    for quant in ("none", "nf4"):
        for seq in plan["memory_seq"]:
            free_device()
            idle_used = (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) if cuda else None
            idle_reserved = torch.cuda.memory_reserved() if cuda else None
            micro = plan["memory_micro"]
            cfg = run_config(str(model), data, work / f"mem-{quant}-{seq}", plan,
                             quant={"mode": quant, "compute_dtype": "bf16" if cuda else "fp32"},
                             data={"max_seq_length": seq, "val_max_examples": micro},
                             train={"batch_size": micro, "micro_batch_size": micro, "max_steps": 2})
            est = estimate_run(cfg, device=plan["device"]).memory_bytes
            t0 = time.perf_counter()
            summary = train(cfg)
            row = {"quant": quant, "seq_len": seq, "micro_batch": micro, "seconds": time.perf_counter() - t0,
                   "estimated_total_bytes": est["total"], "estimate": est,
                   "summary_peak_bytes": summary.get("peak_memory_bytes"), "status": summary["status"]}
            if cuda:
                # context (and other non-torch memory) = what the device showed used at idle minus torch's reserve
                context = idle_used - idle_reserved
                row |= {"max_reserved_bytes": torch.cuda.max_memory_reserved(),
                        "max_allocated_bytes": torch.cuda.max_memory_allocated(), "context_bytes": context,
                        "measured_bytes": torch.cuda.max_memory_reserved() + context}
                row["estimate_over_measured"] = est["total"] / row["measured_bytes"]
            rows.append(row)
            del summary
    return {"model": plan["memory_model"], "runs": rows}


def section_attention(plan: dict, work: Path) -> dict:
    """Which kernel computes packed rows on this device (a GQA model, data.packing on)."""
    from loralab.train import attention
    from loralab.train.loop import train

    model = build_llama(work / "gqa", GQA_MODEL, dtype="fp32")
    data = long_records(work / "attn.jsonl", 16, plan["words"])
    attention.last_kernel = None
    cfg = run_config(str(model), data, work / "attn", plan,
                     data={"packing": True, "max_seq_length": plan["attention_len"]},
                     train={"batch_size": 4, "micro_batch_size": 4, "max_steps": 2})
    summary = train(cfg)
    return {"packed_attention": summary.get("packed_attention"), "kernel_ran": attention.last_kernel,
            "kernel_chosen": dict(attention._chosen), "candidates": attention.kernel_candidates(
                __import__("torch").device(plan["device"])), "status": summary["status"]}


SYNC_METHODS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__")


def count_syncs(fn, device_type: str) -> tuple[object, dict]:
    """Run fn() counting the calls that wait for the device (on tensors of ``device_type``)."""
    import torch

    counts = dict.fromkeys([*SYNC_METHODS, "synchronize"], 0)
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name):
        real = saved[name]

        def counted(self, *a, **k):
            if self.device.type == device_type:
                counts[name] += 1
            return real(self, *a, **k)

        return counted

    real_sync = torch.cuda.synchronize

    def sync(*a, **k):
        counts["synchronize"] += 1
        return real_sync(*a, **k)

    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, wrap(name))
        torch.cuda.synchronize = sync
        result = fn()
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)
        torch.cuda.synchronize = real_sync
    return result, counts


def section_syncs(plan: dict, work: Path) -> dict:
    from loralab.train.loop import train

    data = long_records(work / "sync.jsonl", 32, plan["words"])
    micro = plan["sync_micro"]
    per = {}
    for steps in (2, 6):
        cfg = run_config("builtin:tiny", data, work / f"sync-{steps}", plan,
                         train={"batch_size": 2 * micro, "micro_batch_size": micro, "max_steps": steps,
                                "log_every": 1000}, eval={"every": 0})
        _, per[steps] = count_syncs(lambda cfg=cfg: train(cfg), plan["device"])
    diff = {k: (per[6][k] - per[2][k]) / 4 for k in per[6]}
    return {"micro_batches_per_step": 2, "per_step": diff, "per_step_total": sum(diff.values()),
            "counted_2_steps": per[2], "counted_6_steps": per[6]}


def section_speed(plan: dict, work: Path) -> dict:
    import bench_speed

    (work / "speed-data").mkdir()
    paths = bench_speed.write_data(work / "speed-data")
    if plan["speed_examples"]:  # the smoke: one step's examples and a few to score
        for key, path in paths.items():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            path.write_text("".join(lines[: plan["speed_examples"] // (2 if key == "val" else 1)]), encoding="utf-8")
    big = bench_speed.build_big_model(work / "speed-big")
    models = {"tiny": "builtin:tiny", "big": str(big)}
    from loralab.models import BUILTIN_MODELS

    dirs = {"tiny": BUILTIN_MODELS["builtin:tiny"], "big": big}
    ceiling = section_matmul_ceiling(plan, work)["flops_per_s"]
    rows = []
    for name in plan["speed_cases"]:
        case = bench_speed.parse_case(name)
        steps = plan["speed_steps"] or bench_speed.N_TRAIN[case["model"]] // bench_speed.GLOBAL_BATCH
        spec = {"model": models[case["model"]], "train": str(paths[case["model"]]), "val": str(paths["val"]),
                "dtype": case["dtype"], "quant": case["quant"], "micro_batch": case["micro_batch"],
                "steps": steps, "device": plan["device"], "run_dir": str(work / f"speed-{name}")}
        ours = worker(["--speed-worker", json.dumps(spec)])
        ref = reference(spec, work / f"ref-{name}.json")
        cfg = json.loads((Path(dirs[case["model"]]) / "config.json").read_text())
        lengths = bench_speed.example_lengths(models[case["model"]], paths[case["model"]], paths["val"])
        flops = bench_speed.useful_flops(cfg, lengths[: steps * bench_speed.GLOBAL_BATCH], ours["trainable_params"])
        for side in (ours, ref):
            side["useful_flops_per_s"] = flops / side["train_time_s"]
            side["pct_of_matmul_ceiling"] = 100 * side["useful_flops_per_s"] / ceiling
        rows.append({"case": name, "steps": steps, "loralab": ours, "reference": ref,
                     "speed_ratio": ours["tokens_per_s"] / ref["tokens_per_s"],
                     "eval_loss_diff": ours["final_eval_loss"] - ref["final_eval_loss"]})
    return {"matmul_ceiling_flops_per_s": ceiling, "cases": rows}


def speed_worker(spec: dict) -> dict:
    """loralab's side of a speed case (its own process), packing on as in bench_speed."""
    import torch

    from loralab.config import config_from_dict
    from loralab.train.loop import train

    cfg = config_from_dict({
        "model": {"path": spec["model"], "dtype": spec["dtype"], "device": spec["device"]},
        "quant": {"mode": spec["quant"], "compute_dtype": spec["dtype"]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["query", "value"]},
        "data": {"path": spec["train"], "val_path": spec["val"], "max_seq_length": 512, "val_max_examples": 10_000,
                 "packing": True},
        "train": {"batch_size": 16, "micro_batch_size": spec["micro_batch"], "max_steps": spec["steps"],
                  "lr": 2e-3, "warmup_steps": 0, "log_every": 1000},
        "output": {"dir": spec["run_dir"], "save_adapter": False},
    })
    s = train(cfg)
    return {"tokens": s["tokens_seen"], "train_time_s": s["train_time_s"], "tokens_per_s": s["tokens_per_s"],
            "final_eval_loss": s["final_eval_loss"], "trainable_params": s["trainable_params"],
            "packed_attention": s.get("packed_attention"), "peak_memory_bytes": s.get("peak_memory_bytes"),
            "peak_cuda_reserved_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None}


def worker(args: list[str], timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def reference(spec: dict, out: Path, timeout: float = 300) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "reference_trainer.py"), "--model", spec["model"],
           "--train", spec["train"], "--val", spec["val"], "--dtype", spec["dtype"], "--quant", spec["quant"],
           "--micro-batch", str(spec["micro_batch"]), "--batch", "16", "--steps", str(spec["steps"]),
           "--lr", "2e-3", "--warmup", "0", "--max-len", "512", "--device", spec["device"], "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"reference trainer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def section_fused(plan: dict, work: Path) -> dict:
    import bench_fused
    import torch

    from loralab.config import config_from_dict
    from loralab.train.fused import train_fused
    from loralab.train.loop import train

    def configs(tag: str) -> list:
        raw = bench_fused.run_configs("builtin:tiny", work / tag, plan["fused_k"], steps=plan["fused_steps"])
        for c in raw:
            c["model"]["device"] = plan["device"]
        return [config_from_dict(c) for c in raw]

    sync = torch.cuda.synchronize if plan["device"] == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fused = train_fused(configs("fused"))
    sync()
    t_fused = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [train(c) for c in configs("sequential")]
    sync()
    t_seq = time.perf_counter() - t0
    diffs = [abs(a["final_eval_loss"] - b["final_eval_loss"]) for a, b in zip(fused, alone, strict=True)]
    return {"k": plan["fused_k"], "steps": plan["fused_steps"], "fused_s": t_fused, "sequential_s": t_seq,
            "speedup": t_seq / t_fused, "max_final_loss_diff": max(diffs)}


def section_quickstart(plan: dict, work: Path) -> dict:
    out = work / "quickstart"
    cmd = [sys.executable, "-m", "loralab.cli", "quickstart", "--json", "--out", str(out),
           "--set", f"model.device={plan['device']}", *plan["quickstart"]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=work)
    if proc.returncode:
        raise RuntimeError(f"quickstart failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    s = result["summary"]
    return {"seconds": time.perf_counter() - t0, "before": result["before"], "after": result["after"],
            "device": s.get("device"), "train_time_s": s["train_time_s"], "tokens_per_s": s["tokens_per_s"],
            "final_eval_loss": s["final_eval_loss"], "peak_memory_bytes": s.get("peak_memory_bytes")}


def section_multi_gpu(plan: dict, work: Path) -> dict:
    """One run on N GPUs (loralab train --nproc N, NCCL) against the same run on one: scaling
    efficiency (tokens/s on N against N times one GPU), the adapters' difference, and each
    rank's peak memory against the estimate. On the CPU smoke: 2 gloo processes."""
    import torch
    from safetensors.torch import load_file

    from loralab.config import load_config
    from loralab.estimate import estimate_run, per_rank

    n = torch.cuda.device_count() if plan["device"] == "cuda" else 2
    if n < 2:
        return {"skipped": f"{n} CUDA device: this section needs 2 or more"}
    cfg = work / "run.yaml"
    cfg.write_text(json.dumps({
        "model": {"path": "builtin:tiny", "device": plan["device"], "dtype": plan["dtype"]},
        "data": {"path": "builtin:arithmetic_2ds", "val_max_examples": 4, "max_seq_length": 64},
        "lora": {"dropout": 0.0},
        "train": {"batch_size": 4 * n, "micro_batch_size": 4, "max_steps": plan["multi_steps"], "warmup_steps": 0}}))
    summaries = {}
    for procs in (1, n):
        out = work / f"n{procs}"
        proc = subprocess.run([sys.executable, "-m", "loralab.cli", "train", str(cfg), "--out", str(out), "--json",
                               "--nproc", str(procs)], env=ENV, capture_output=True, text=True, timeout=600, cwd=work)
        if proc.returncode:
            raise RuntimeError(f"--nproc {procs} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        summaries[procs] = json.loads(proc.stdout)
    one, many = (load_file(work / f"n{p}" / "adapter" / "adapter_model.safetensors") for p in (1, n))
    ranks = summaries[n]["extra"]["distributed"]
    return {"n": n, "backend": ranks["backend"], "steps": plan["multi_steps"],
            "tokens_per_s_1": summaries[1]["tokens_per_s"], "tokens_per_s_n": summaries[n]["tokens_per_s"],
            "scaling_efficiency": summaries[n]["tokens_per_s"] / (n * summaries[1]["tokens_per_s"]),
            "adapter_max_abs_diff": max(float((one[k] - many[k]).abs().max()) for k in one),
            "peak_memory_bytes_1": summaries[1]["peak_memory_bytes"],
            "peak_memory_bytes_per_rank": ranks["peak_memory_bytes_per_rank"],
            "estimated_memory_bytes_per_rank": per_rank(estimate_run(load_config(cfg), device=plan["device"]),
                                                        n).memory_bytes["total"]}


SECTIONS = {"env": section_env, "matmul_ceiling": section_matmul_ceiling, "memory": section_memory,
            "attention": section_attention, "syncs": section_syncs, "speed": section_speed,
            "fused": section_fused, "quickstart": section_quickstart, "multi_gpu": section_multi_gpu}


def run(plan_name: str, out: Path, only: list[str] | None = None) -> dict:
    plan = PLANS[plan_name]
    results: dict = {"plan": plan_name, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "budget_s": plan["budget_s"], "sections": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loralab-gpu-check-") as tmp:
        for name, fn in SECTIONS.items():
            if only and name not in only:
                continue
            elapsed = time.perf_counter() - start
            if elapsed > plan["budget_s"] and name != "env":
                results["sections"][name] = {"skipped": f"time budget spent ({elapsed:.0f} s)"}
                continue
            t0 = time.perf_counter()
            work = Path(tmp) / name
            work.mkdir()
            try:
                res = fn(plan, work)
                res["seconds"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - one section's failure is a result, not the end of the check
                res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:],
                       "seconds": time.perf_counter() - t0}
            results["sections"][name] = res
            free_device()
            print(f"[{time.perf_counter() - start:6.1f} s] {name}: "
                  + ("ERROR " + res["error"] if "error" in res else f"ok ({res['seconds']:.1f} s)"),
                  file=sys.stderr, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, default=str))  # partial results survive a kill
    results["total_s"] = time.perf_counter() - start
    out.write_text(json.dumps(results, indent=2, default=str))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="the JSON file (default: $OUT/gpu_check.json, else bench/results/)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks every code path runs")
    ap.add_argument("--only", help="comma-separated sections (default: all)")
    ap.add_argument("--speed-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.speed_worker:
        print("RESULT " + json.dumps(speed_worker(json.loads(args.speed_worker))), flush=True)
        return 0
    name = "smoke" if args.cpu_smoke else "gpu"
    if name == "gpu":
        import torch

        if not torch.cuda.is_available():
            from loralab.models import cuda_problem

            print(f"gpu_check: CUDA is not usable here ({cuda_problem()}); use --cpu-smoke", file=sys.stderr)
            return 2
    default_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    out = args.out or default_dir / ("gpu_check_smoke.json" if args.cpu_smoke else "gpu_check.json")
    results = run(name, out, args.only.split(",") if args.only else None)
    failed = [k for k, v in results["sections"].items() if "error" in v]
    print(f"gpu_check: {out} ({results['total_s']:.0f} s)" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
