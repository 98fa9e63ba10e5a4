"""What can be known of a run before it loads anything: the checks that make it ``invalid``.

    check_run(cfg, device="cpu")   # ModelError / ConfigError with the message the run would give

The model is read from its config.json on the ``meta`` device (``loralab.estimate``'s
description, cached per model), so checking every run of a study costs about a second. A
study's scheduler calls this per run before it forms fused groups: a run that would be
invalid is recorded alone with its own message and never joins a group, where its error
would take the other runs down with it. The checks are the run's own, not copies:

* its rank against every adapted matrix (``loralab.adapters.check_rank``, as PEFT's config does);
* its roles against the architecture (``loralab.roles.resolve_targets``);
* its attention, dtype and 4-bit quantization on this device (``loralab.models``).

The same holds for an adapter about to be used on a base (``check_adapter_base``): its recorded
base against the one named, and its matrices against the base's modules, before either loads.

The data is a key every run of a group shares (``train.fused.fuse_key``), so a data error is
the group's and each run gets it anyway; it is not checked here. The checks of a study's runs
together, which stop ``study run`` before any run starts, are ``loralab.study.preflight``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from loralab.config import Config
from loralab.errors import LoralabError, ModelError

log = logging.getLogger(__name__)


def check_run(cfg: Config, *, device: str) -> None:
    """Raise the error that would make ``cfg`` invalid on ``device`` (cpu or cuda), if any
    can be found without loading the model; a model that cannot be described passes (the run
    finds out for itself)."""
    from loralab.adapters import check_rank
    from loralab.estimate import describe_model, lora_modules
    from loralab.models import (
        check_attention,
        check_cpu_4bit_widths,
        check_optimizer_device,
        resolve_dtype,
    )

    check_optimizer_device(cfg.train.optimizer, torch.device(device))

    try:
        shape = describe_model(cfg.model.path)
    except LoralabError:
        return
    modules = lora_modules(shape, list(cfg.lora.targets))
    check_rank(cfg.lora.r, {m: shape.linears[m] for m in modules})
    dev = torch.device(device)
    check_attention(cfg.model, dev, resolve_dtype(cfg.model, dev, width=shape.hidden), cfg.quant)
    if cfg.quant.mode != "none" and dev.type == "cpu":
        check_cpu_4bit_widths({m: shape.linears[m][0] for m in shape.quantizable}, cfg.quant)


def smallest_dimension(cfg: Config) -> tuple[int, str] | None:
    """(the smallest dimension of any matrix ``cfg``'s targets adapt, that module's name): the
    largest rank the run can take. None when the model cannot be described."""
    from loralab.estimate import describe_model, lora_modules

    try:
        shape = describe_model(cfg.model.path)
    except LoralabError:
        return None
    dims = {m: min(shape.linears[m]) for m in lora_modules(shape, list(cfg.lora.targets))}
    if not dims:
        return None
    name = min(dims, key=dims.get)
    return dims[name], name


def check_adapter_base(run_or_adapter: str | Path, model_path: str, *, force: bool = False,
                       trust_remote_code: bool = False, force_how: str = "--force",
                       fix: str = "pass --model with the adapter's base") -> None:
    """Refuse (ModelError, exit 2) an adapter recorded for a different base than ``model_path``,
    naming both; with ``force`` only warn, if its matrices fit the base's modules
    (:func:`check_adapter_fits`). Checked from config.json, a few rows of the base's weights
    (``loralab.adapters.weights_sample``, at the places the record sampled) and the adapter's
    safetensors header, before the model loads. An adapter saved without the record (older
    loralab, plain PEFT) is checked for fit alone, with a note. ``fix`` and ``force_how`` are the
    ways out, in the caller's terms."""
    from loralab.adapters import describe_base, differing_weights, read_base_identity, recorded_base

    recorded = recorded_base(run_or_adapter)
    if recorded is None:
        log.info("note: %s has no record of its base model (saved by an older loralab); only its shapes are "
                 "checked against %s", run_or_adapter, model_path)
        check_adapter_fits(run_or_adapter, model_path)
        return
    # the base's weights read at the places the record sampled, once
    current = read_base_identity(model_path, trust_remote_code=trust_remote_code, at=recorded.get("weights") or {})
    if recorded.get("hash") != current["hash"]:
        message = (f"adapter {run_or_adapter} was trained on {describe_base(recorded)}, not on "
                   f"{describe_base(current)}; an adapter only means something on the base it was trained on")
    elif differs := differing_weights(recorded.get("weights"), current.get("weights")):
        was = recorded.get("path") or "?"
        what = (f"the model at {model_path} holds other weights than when it trained"
                if was == str(current.get("path")) else f"it was trained on {was}, not on {model_path}")
        message = (f"adapter {run_or_adapter}: {what}: the same architecture and sizes, but other weights ({differs} "
                   "differs: another checkpoint, such as a fine-tune, or another seed); an adapter only means "
                   "something on the base it was trained on")
    else:
        return
    if not force:
        raise ModelError(f"{message}. {fix[0].upper()}{fix[1:]}, or {force_how} to use it anyway")
    check_adapter_fits(run_or_adapter, model_path)
    log.warning("WARNING: %s (%s: using it anyway)", message, force_how)


def check_adapter_fits(run_or_adapter: str | Path, model_path: str) -> None:
    """Refuse (ModelError) an adapter whose matrices cannot go on ``model_path``'s modules, naming
    the first module that lacks or differs, from the safetensors header and the base's meta-device
    shapes (no weights load); a base that cannot be described passes (loading it finds out)."""
    from safetensors import safe_open

    from loralab.adapters import adapter_dir
    from loralab.estimate import describe_model

    try:
        linears = describe_model(model_path).linears
        path = adapter_dir(run_or_adapter) / "adapter_model.safetensors"
    except LoralabError:  # no adapter yet (a run being resumed), or a base loading will explain
        return
    with safe_open(str(path), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    for key, got in shapes.items():
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            continue
        if name not in linears:
            raise ModelError(f"adapter {run_or_adapter} adapts {name}, which {model_path} has no linear "
                             "module of; it does not fit this base")
        fan_in, fan_out = linears[name]
        want = got[0] if part == "B.weight" else got[1]
        have = fan_out if part == "B.weight" else fan_in
        if want != have:
            side = "output" if part == "B.weight" else "input"
            raise ModelError(f"adapter {run_or_adapter} was made for {name} with {want} {side} features; "
                             f"{model_path}'s {name} has {have}: it does not fit this base")
