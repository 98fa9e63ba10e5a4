"""torch.compile of the base's decoder layers for training (train.compile), checked once, eager on failure.

    choice = compile_choice("auto", device, tokens, params, dtype=torch.bfloat16)  # (True, "auto: 2,100,000 ...")
    report = compile_layers(model, probe, reason)                 # CompileReport(on=True, seconds=36.1, ...)
    with eager():                                                 # evaluation, generation: never compiled
        ...

Each decoder layer (the classes a model lists in ``_no_split_modules``) is compiled on its
own with dynamic shapes, so one graph serves every layer and every sequence length; what
it fuses is the element-wise work between the matmuls (norms, rotary embeddings, the
activation, residual adds, dtype casts), a large part of a bf16 step's non-matmul time.
Attention stays outside the graphs (loralab.train.attention is never traced), so packed rows
of any layout never recompile.

The compile happens in :func:`compile_layers` itself, on a probe micro batch laid out like
the real ones: its time is the run's ``compile_time_s``, reported apart from training time,
and its logits are compared with the eager model's. Any error, or a difference beyond
rounding, leaves the layers eager and says why; the probe's gradients and random draws are
thrown away, so a run's result does not depend on whether it was probed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Work (planned training tokens x the base's parameters) from which train.compile auto compiles.
# Measured on this project's 2-core CPU (docs/performance.md): a 50M-parameter Llama compiles in
# 21-36 s and then trains bf16 steps 1.5x faster, so the compile is repaid after about 80,000
# tokens (4e12 parameter-tokens); the threshold is 5x that, so auto compiles only where the
# compile is a small part of the run. A GPU's eager step is ~50x faster for the same compile
# time, hence 50x the work there (not measured: no GPU was lent).
MIN_WORK = {"cpu": 2e13, "cuda": 1e15}


@dataclass(frozen=True)
class CompileReport:
    on: bool
    reason: str
    seconds: float = 0.0


def compile_choice(setting: bool | str, device: torch.device, planned_tokens: int, params: int, *,
                   dtype: torch.dtype) -> tuple[bool, str]:
    """Whether to compile, and why: train.compile true/false as set; auto from the tokens the
    run plans to train on times the base's parameters, against :data:`MIN_WORK` of the device,
    for a base that computes in ``dtype``. On the CPU auto compiles bf16 (and fp16) bases only:
    in fp32 the matmuls are most of a step and compiling the rest gained nothing measurable
    (docs/performance.md, "train.compile")."""
    if setting is True:
        return True, "train.compile: true"
    if setting is False:
        return False, "train.compile: false"
    least = MIN_WORK.get(device.type)
    if least is None:
        return False, f"auto: not compiled on {device.type}"
    if device.type == "cpu" and dtype == torch.float32:
        return False, "auto: not compiled in fp32 on the CPU, where it gains nothing measurable"
    work = planned_tokens * params
    said = f"{planned_tokens:,} tokens x {params / 1e6:.1f}M parameters planned ({work:.1e})"
    if work < least:
        return False, f"auto: {said}, compiled from {least:.0e} on {device.type}"
    return True, f"auto: {said}, compiled from {least:.0e} on {device.type}"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class the model names in ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_layers(model, probe, reason: str) -> CompileReport:
    """Compile every decoder layer and run ``probe(model)`` (a forward and backward of one
    step, returning its losses) eager and compiled; keep the compiled layers when both run and
    agree. The probe's gradients are cleared and the random state put back."""
    layers = decoder_layers(model)
    if not layers:
        return CompileReport(False, "no decoder layers found (_no_split_modules)")
    rng = _rng_state()
    try:
        reference = probe(model).float()
        for layer in layers:
            layer.compile(dynamic=True)
        t0 = time.perf_counter()
        compiled = probe(model).float()
        seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - any failure to compile means eager, which always works
        uncompile(model)
        return CompileReport(False, f"compile failed, eager: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        model.zero_grad(set_to_none=True)
        _set_rng_state(rng)
    # fp32 agrees to rounding; bf16 rounds a fused chain of element-wise ops once instead of per op
    tolerance = 1e-4 if compute_dtype(model) == torch.float32 else 1e-2
    error = float(((compiled - reference).abs() / reference.abs().clamp_min(1e-6)).max())
    if not torch.isfinite(compiled).all() or error > tolerance:
        uncompile(model)
        return CompileReport(False, f"the compiled step's loss differs from eager by {error:.2g} (relative): eager")
    return CompileReport(True, f"{reason}: {len(layers)} decoder layers compiled", seconds)


def uncompile(model) -> None:
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None


@contextlib.contextmanager
def eager():
    """Run what is inside without compiled code (evaluation and generation: no_grad forwards
    would compile graphs of their own)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def compute_dtype(model) -> torch.dtype:
    """The dtype the frozen base computes in: its first floating frozen parameter's (fp32 if none)."""
    return next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()),
                torch.float32)


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
