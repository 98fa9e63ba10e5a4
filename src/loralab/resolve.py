"""Settings that follow from the model, the data and the machine, filled in before a run.

    cfg, notes = resolve_config(load_config("run.yaml"))
    cfg.train.micro_batch_size   # 16: "auto" became the largest divisor of the batch that fits
    notes                        # {"train.micro_batch_size": "auto: ..."} (why each value is what it is)

``loralab train`` and ``loralab study run`` both call this, so a study's runs and a single run
resolve alike. ``resolve_data`` is the one resolution of ``data.max_seq_length: auto``
(the longest example, capped by the model's context) for ``loralab train`` (the loaded model's
config) and ``loralab tune`` (the model's config.json, before any weights load)::

    splits = resolve_data(cfg, tokenizer, model.config)   # cfg.data.max_seq_length is a number now

``train.micro_batch_size: auto`` is the same maths as any other micro batch
(loralab's loss per step does not depend on it); it only decides how much of the device a
forward uses.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from loralab.config import Config
from loralab.errors import DataError, LoralabError

if TYPE_CHECKING:
    from loralab.data.dataset import Splits

CPU_SHARE = 0.5  # of physical RAM: leave the rest to other workers and the OS


def device_budget_bytes(device: str) -> int:
    """Memory one run may plan for: the GPU's total memory, or half of the machine's RAM."""
    if device.startswith("cuda"):  # cuda or cuda:N
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[1] * 0.9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CPU_SHARE)


def _device(cfg: Config) -> str:
    if cfg.model.device != "auto":
        return cfg.model.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_micro_batch(cfg: Config, *, budget_bytes: int | None = None) -> tuple[int, str]:
    """(largest divisor of train.batch_size whose estimated memory fits, why)."""
    from loralab.estimate import estimate_run
    from loralab.units import human_bytes

    device = _device(cfg)
    budget = budget_bytes if budget_bytes is not None else device_budget_bytes(device)
    probe = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=1))
    try:
        est = estimate_run(probe, budget_bytes=budget, device=device.split(":")[0])  # cuda:N estimates as cuda
    except LoralabError as exc:  # no estimate (the model cannot be described): the safe choice
        return 1, f"auto: no memory estimate ({str(exc).splitlines()[0]}), so micro batch 1"
    fits = est.max_micro_batch or 0
    batch = cfg.train.batch_size
    micro = max(d for d in range(1, batch + 1) if batch % d == 0 and (d <= fits or d == 1))
    why = (f"auto: the largest divisor of batch {batch} that the estimate fits in {human_bytes(budget)} "
           f"of {device} memory (fits up to {fits}); same maths as any micro batch")
    return micro, why


def resolve_config(cfg: Config, *, budget_bytes: int | None = None) -> tuple[Config, dict[str, str]]:
    """A copy of ``cfg`` with every ``auto`` value this module knows filled in, and
    {key: why} for each value it filled."""
    notes: dict[str, str] = {}
    if cfg.train.micro_batch_size == "auto":
        micro, notes["train.micro_batch_size"] = auto_micro_batch(cfg, budget_bytes=budget_bytes)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))
    return cfg, notes


def seed_dtype_here(cfg: Config, notes: dict[str, str]) -> tuple[Config, dict[str, str]]:
    """A seed's ``model.dtype: bf16`` for a run on this machine's CPU where the CPU would emulate
    bf16 (neither AMX-BF16 nor AVX512-BF16: its bf16 matmuls run about 100x slower than fp32):
    fp32 instead, with why in ``notes`` (a study's report lists it as a difference from the
    seed). The seeds trained on GPUs, where bf16 is native; a value set by the user is kept."""
    from loralab.models import EMULATED_BF16, emulates_bf16

    if cfg.model.dtype != "bf16" or not emulates_bf16(_device(cfg)):
        return cfg, notes
    model = dataclasses.replace(cfg.model, dtype="fp32")
    why = f"auto: this CPU has {EMULATED_BF16}; --set model.dtype=bf16 keeps the seed's bf16"
    return dataclasses.replace(cfg, model=model), {**notes, "model.dtype": why}


def seed_targets_here(cfg: Config, notes: dict[str, str]) -> tuple[Config, dict[str, str]]:
    """A seed's ``lora.targets`` that names query or value without all three of q, k and v, on a
    model that holds them in one matrix (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``, ...):
    q, k and v together, that matrix whole, with why in ``notes`` (a study lists it as a
    difference from the seed). The seeds trained Llama, where q and v are apart; on such a model
    their setup can only be had this way, and every run of it would be refused otherwise."""
    from loralab.estimate import describe_model
    from loralab.roles import attention_roles

    qkv = ("query", "key", "value")
    asked = [t for t in cfg.lora.targets if t in qkv]
    if not asked or set(asked) == set(qkv):
        return cfg, notes
    try:
        shape = describe_model(cfg.model.path)
    except LoralabError:  # the run's own checks say why
        return cfg, notes
    _, fused = attention_roles(shape.model_type, shape.linears)
    if fused is None:
        return cfg, notes
    at = cfg.lora.targets.index(asked[0])
    rest = [t for t in cfg.lora.targets if t not in qkv]
    lora = dataclasses.replace(cfg.lora, targets=[*rest[:at], *qkv, *rest[at:]])
    why = (f"auto: {fused} holds query, key and value in one matrix, so the seed's {', '.join(asked)} can only be "
           "adapted with it, whole")
    return dataclasses.replace(cfg, lora=lora), {**notes, "lora.targets": why}


def resolve_data(cfg: Config, tokenizer: Any, model_config: Any) -> Splits:
    """The run's splits, ``data.max_seq_length: auto`` resolved from the data and capped by the
    context of ``model_config`` (transformers' config), written back into ``cfg``, and checked
    against that context."""
    from loralab.data.dataset import load_splits, model_context

    splits = load_splits(cfg.data, tokenizer, seed=cfg.train.seed, context=model_context(model_config))
    cfg.data.max_seq_length = splits.stats["max_seq_length"]
    check_context(cfg, model_config, splits)
    check_vocab(cfg, model_config, splits, tokenizer)
    return splits


def check_vocab(cfg: Config, model_config: Any, splits: Splits, tokenizer: Any) -> None:
    """Refuse token ids the model's embeddings have no row for (a tokenizer with added tokens,
    such as a chat template's, on a model that was not resized): they would fail mid-step with
    an IndexError."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return
    top = max((max(e.input_ids) for e in splits.train + splits.val if e.input_ids), default=-1)
    if top >= vocab:
        token = tokenizer.convert_ids_to_tokens(top)
        raise DataError(
            f"{cfg.data.path}: the tokenizer gives token id {top} ({token!r}), but the model has vocab_size {vocab} "
            f"({cfg.model.path}/config.json): its embeddings have no row for it. The tokenizer has {len(tokenizer)} "
            "tokens (added ones, such as a chat template's, count too): resize the model's embeddings to it "
            "(model.resize_token_embeddings(len(tokenizer)), then save_pretrained) or use the model's own tokenizer"
        )


def check_context(cfg: Config, model_config: Any, splits: Splits) -> None:
    """Refuse examples longer than the positions the model was built for (before they crash a step)."""
    from loralab.data.dataset import model_context

    context = model_context(model_config)
    if not context:
        return
    longest = max(len(e.input_ids) for e in splits.train + splits.val)
    if longest > context:
        cut = longest == cfg.data.max_seq_length  # the longest examples were cut there: the setting is the length
        what = (f"examples are cut at data.max_seq_length = {longest} tokens" if cut else
                f"an example is {longest} tokens long")
        raise DataError(
            f"{cfg.data.path}: {what}, more than the model's context of {context} positions "
            f"(max_position_embeddings in {cfg.model.path}/config.json); set data.max_seq_length <= {context}, "
            "or auto (the data's longest example, capped at the context)"
        )


def describe_hardware() -> dict[str, str]:
    """The machine a study is driven from: CPU, cores, RAM and GPU (name and memory)."""
    import platform

    out = {"cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count() or "?"),
           "ram": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            out["cpu"] = names[0]
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        out["gpu"] = "none"
    return out
