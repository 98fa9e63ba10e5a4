"""LoRA adapters through PEFT: attach by role, count, save, load, merge."""

from __future__ import annotations

from pathlib import Path

import torch

from loralab.config import LoraConfig
from loralab.errors import ModelError
from loralab.roles import head_module_name, linear_module_names, resolve_targets
from loralab.rundir import RunDir


def peft_lora_config(model, lora: LoraConfig):
    """PEFT's LoraConfig for ``lora``, with roles resolved against ``model``'s modules."""
    from peft import LoraConfig as PeftLoraConfig

    names = linear_module_names(model)
    targets = resolve_targets(
        model_type=getattr(model.config, "model_type", ""),
        linear_names=names,
        head_name=head_module_name(model),
        targets=lora.targets,
    )
    modules = dict(model.named_modules())
    check_rank(lora.r, {name: _in_out(modules[name]) for name in targets.modules})
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.rslora,
        use_dora=lora.dora,
        init_lora_weights=True if lora.init == "default" else "gaussian",
        target_modules=targets.peft,
        task_type="CAUSAL_LM",
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
    )


def check_rank(r: int, dims: dict[str, tuple[int, int] | None]) -> None:
    """ModelError when rank ``r`` is above a dimension of an adapted module ({name: (in, out)});
    one check for a loaded model (PEFT's config) and a meta-device one (loralab.preflight)."""
    for name, d in dims.items():
        if d and r > min(d):
            raise ModelError(
                f"lora.r = {r} is larger than the dimensions of {name} ({d[0]} x {d[1]}); "
                f"a rank above {min(d)} adds parameters but no expressiveness"
            )


def _in_out(module) -> tuple[int, int] | None:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return None


def attach_lora(model, lora: LoraConfig, *, seed: int):
    """Wrap ``model`` with trainable LoRA adapters (deterministic init for ``seed``)."""
    from peft import get_peft_model

    config = peft_lora_config(model, lora)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def count_params(peft_model) -> tuple[int, int]:
    """(trainable, total) exactly as PEFT's print_trainable_parameters counts them."""
    trainable, total = peft_model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def save_adapter(peft_model, out_dir: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors atomically (loralab.rundir.atomic_dir:
    a full disk or a kill leaves the previous adapter or none, never half of one)."""
    from loralab.rundir import atomic_dir

    with atomic_dir(out_dir, fsync=False) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)


# Files that can only be read by unpickling, i.e. by running code chosen by whoever wrote them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickles(directory: Path, what: str) -> None:
    """Raise ModelError when ``directory`` holds a pickled file; such files are never opened."""
    found = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if found:
        raise ModelError(
            f"{what} {directory} holds {', '.join(found)}: pickled files can run code when loaded, so loralab "
            "never opens them; use safetensors (adapter_model.safetensors) and remove the pickled file"
        )


def adapter_dir(run_or_adapter: str | Path) -> Path:
    """Accept a run directory (with adapter/) or an adapter directory itself; safetensors only."""
    p = Path(run_or_adapter)
    if (RunDir(p).adapter / "adapter_config.json").is_file():
        p = RunDir(p).adapter
    elif not (p / "adapter_config.json").is_file():
        raise ModelError(f"{p}: neither a run directory with adapter/ nor a PEFT adapter directory")
    refuse_pickles(p, "adapter")
    if not (p / "adapter_model.safetensors").is_file():
        raise ModelError(f"{p}: no adapter_model.safetensors (loralab loads safetensors adapters only)")
    return p


def load_adapter(model, run_or_adapter: str | Path, *, trainable: bool = False):
    """Load a PEFT adapter onto ``model``; a shape mismatch names the module."""
    from peft import PeftModel

    path = adapter_dir(run_or_adapter)
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ModelError(f"adapter {path} does not fit this base model: {detail}") from None
