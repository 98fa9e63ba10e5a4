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

The data is a key every run of a group shares (``train.fused.fuse_key``), so a data error is
the group's and each run gets it anyway; it is not checked here. The checks of a study's runs
together, which stop ``study run`` before any run starts, are ``loralab.study.preflight``.
"""

from __future__ import annotations

import torch

from loralab.config import Config
from loralab.errors import LoralabError


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
