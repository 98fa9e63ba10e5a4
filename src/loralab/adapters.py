"""LoRA adapters through PEFT: attach by role (with loralab's dropout mask), count, save, load, merge.

An adapter knows its base: :func:`save_adapter` writes ``loralab_base.json`` beside PEFT's files
(the base's path or hub id, its config.json architecture and sizes, a hash of those, and a sample
of its weights), and ``loralab.preflight.check_adapter_base`` compares it with the base a command
is about to load, before it loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.config import LoraConfig
from loralab.errors import LoralabError, ModelError
from loralab.roles import head_module_name, linear_module_names, resolve_targets
from loralab.rundir import RunDir

log = logging.getLogger(__name__)
BASE_RECORD = "loralab_base.json"  # in the adapter directory, beside adapter_config.json
# config.json keys that decide the shapes an adapter is made for (each architecture uses some of them).
SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "ffn_dim", "num_hidden_layers",
             "n_layer", "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "vocab_size",
             "word_embed_proj_dim")


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
    """Wrap ``model`` with trainable LoRA adapters (deterministic init for ``seed``), their
    dropout masks drawn by :class:`LoraDropout`."""
    from peft import get_peft_model

    config = peft_lora_config(model, lora)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    use_lora_dropout(peft_model)
    return peft_model


def count_params(peft_model) -> tuple[int, int]:
    """(trainable, total) exactly as PEFT's print_trainable_parameters counts them."""
    trainable, total = peft_model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def save_adapter(peft_model, out_dir: Path, weights: dict[str, Any] | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors + the base's identity (BASE_RECORD)
    atomically (loralab.rundir.atomic_dir: a full disk or a kill leaves the previous adapter or
    none, never half of one). ``weights``: the trainable tensors by name, whole, in place of the
    model's own (a sharded model's, gathered); None: the model's."""
    from loralab.rundir import atomic_dir

    config = peft_model.get_base_model().config
    with atomic_dir(out_dir, fsync=False) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True,
                                   **({"state_dict": weights} if weights is not None else {}))
        identity = base_identity(config)
        adapted = [name.removeprefix("base_model.model.") + ".weight" for name, module in peft_model.named_modules()
                   if hasattr(module, "lora_A") and hasattr(module, "base_layer")]
        sample = weights_sample(getattr(config, "name_or_path", "") or "", also=adapted[:1] + adapted[-1:])
        record = identity if sample is None else {**identity, "weights": sample}
        (tmp / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- LoRA dropout's mask
# ``nn.Dropout`` draws its mask with ``bernoulli_``, which on the CPU asks the generator for one
# random number per element; for LoRA, whose adapter input is a whole activation, that draw was
# 15% of a bf16 training step of a 50M-parameter model (docs/performance.md). Here the mask comes
# from 32 random bits per element, two elements per 64-bit draw, compared with a threshold: the
# same Bernoulli(1 - p) keep mask and the same 1 / (1 - p) scaling (p rounded to a multiple of
# 2**-32), from the same seeded torch generator, with half the generator's work (a 1,789 x 640
# mask 1.2x-1.25x faster than nn.Dropout's on 2 threads: the timeit command in docs/performance.md). A different
# stream of masks than ``nn.Dropout`` for the same seed, so runs are as reproducible as before,
# not equal to runs of loralab versions that drew with ``nn.Dropout``.
#
# On CUDA and inside ``torch.compile`` (inductor draws its own masks, fused into the layer) it is
# ``nn.Dropout``.


def _threshold(p: float) -> int:
    """Keep a 32-bit signed draw when it is at least this: a fraction p of draws fall below."""
    return -(2**31) + round(p * 2**32)


def dropout(x: torch.Tensor, p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout of ``x`` (training mode) with a mask from 32 random bits per element."""
    if p == 0:
        return x
    n = x.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=x.device)
    bits.random_(-(2**63), 2**63 - 1, generator=generator)  # every bit uniform, both 32-bit halves signed
    keep = bits.view(torch.int32)[:n].view(x.shape) >= _threshold(p)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


class LoraDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training mask is drawn by :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        return dropout(x, self.p)


def use_lora_dropout(peft_model) -> None:
    """Swap the ``nn.Dropout`` of every PEFT LoRA layer of ``peft_model`` for :class:`LoraDropout`
    of the same p (PEFT's own ``nn.Identity`` where dropout is 0 stays)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, drop in module.lora_dropout.items():
                if type(drop) is nn.Dropout:
                    module.lora_dropout[name] = LoraDropout(drop.p)


# ----------------------------------------------------------------------------- the base an adapter belongs to


def base_identity(config, path: str | None = None) -> dict[str, Any]:
    """A base model's identity from its transformers config: path (builtin:NAME, a directory or a
    hub id), model_type, architectures, the sizes in SIZE_KEYS it has, and ``hash``, a digest of
    all but the path (two copies of one model in different places have the same hash)."""
    from loralab.models import BUILTIN_MODELS

    path = path or getattr(config, "name_or_path", "") or ""
    for name, directory in BUILTIN_MODELS.items():
        if path and Path(path).resolve() == directory.resolve():
            path = name
    raw = config.to_dict()
    shape = {"model_type": raw.get("model_type"), "architectures": raw.get("architectures") or [],
             "sizes": {k: raw[k] for k in SIZE_KEYS if isinstance(raw.get(k), int)}}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(path), **shape, "hash": digest}


def read_base_identity(model_path: str, *, trust_remote_code: bool = False,
                       at: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`base_identity` of the model at ``model_path`` from its config.json, with
    :func:`weights_sample` of its files where they are on this machine (no model loads);
    ``at`` as there ({}: no sample)."""
    from loralab.models import read_config

    identity = base_identity(read_config(model_path, trust_remote_code=trust_remote_code), model_path)
    sample = weights_sample(model_path, at)
    return identity if sample is None else {**identity, "weights": sample}


# A checkpoint and its fine-tune share config.json; a few of their weights tell them apart.
SAMPLE_TENSORS, SAMPLE_ROWS, SAMPLE_COLS = 3, 4, 8


def _weight_files(model_path: str) -> list[Path]:
    """The safetensors files of ``model_path``: a local directory's, or a hub id's in the local
    Hugging Face cache; [] where there are none here."""
    from loralab.models import resolve_model_path

    try:
        directory = Path(resolve_model_path(model_path))
    except LoralabError:
        return []
    if not directory.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return []
        cached = try_to_load_from_cache(model_path, "config.json")
        if not isinstance(cached, str):
            return []
        directory = Path(cached).parent
    return sorted(directory.glob("*.safetensors"))


def weights_sample(model_path: str, at: dict[str, Any] | None = None, *,
                   also: list[str] = ()) -> dict[str, dict[str, list]] | None:
    """``{tensor name: {"rows", "values"}}``: SAMPLE_COLS values from each of SAMPLE_ROWS rows
    spread over the first, middle and last two-dimensional floating-point tensors by name in
    ``model_path``'s safetensors files, and over the tensors in ``also`` (an adapter's own
    matrices, which merging it changes), read from the files alone (headers and those rows).
    ``at``: another sample, whose tensors and rows are read instead, to compare with it. Copies
    of one checkpoint in other dtypes agree to their rounding (:func:`differing_weights`); a
    fine-tune or another seed of the same architecture does not. None where the files are not on
    this machine or hold no such tensor."""
    from safetensors import safe_open

    if at is not None and not at:
        return None
    try:
        matrices: dict[str, Path] = {}
        for file in _weight_files(model_path):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    if len(part.get_shape()) == 2 and 0 not in part.get_shape() and \
                            part.get_dtype() in ("F64", "F32", "BF16", "F16"):
                        matrices[name] = file
        names = sorted(matrices)
        if at is not None:
            picked = {n: at[n]["rows"] for n in at if n in matrices}
        else:
            spread = {names[i * (len(names) - 1) // max(SAMPLE_TENSORS - 1, 1)] for i in range(SAMPLE_TENSORS)}
            picked = dict.fromkeys(sorted(spread) + [n for n in also if n in matrices and n not in spread])
        sample = {}
        for name, rows in picked.items():
            with safe_open(str(matrices[name]), framework="pt") as f:
                part = f.get_slice(name)
                n = part.get_shape()[0]
                rows = rows or sorted({i * n // SAMPLE_ROWS for i in range(SAMPLE_ROWS)})
                # rows read from the file into host memory: numpy's tolist, no device in sight
                values = [v for r in rows if r < n
                          for v in part[r:r + 1, :SAMPLE_COLS].float().numpy().ravel().tolist()]
                sample[name] = {"rows": rows, "values": [float(f"{v:.7g}") for v in values]}
    except (OSError, ValueError, RuntimeError) as exc:  # a damaged file: loading the model will say so
        log.debug("no weights sample of %s: %s", model_path, exc)
        return None
    return sample or None


def differing_weights(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str | None:
    """The first tensor two :func:`weights_sample` s both hold (at the same rows) whose values
    differ by more than bf16 rounding (2**-8 relative, what a copy saved in bf16 or fp16 differs
    by); None where none does, or there is nothing to compare."""
    for name in sorted(set(a or {}) & set(b or {})):
        x, y = a[name], b[name]
        if x["rows"] != y["rows"] or len(x["values"]) != len(y["values"]):
            continue
        if any(abs(u - v) > 2**-8 * max(abs(u), abs(v)) + 1e-7 for u, v in zip(x["values"], y["values"], strict=True)):
            return name
    return None


def base_record(model_path: str, *, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """:func:`read_base_identity`, or None where the config cannot be read (the run's loading
    reports that problem itself); what a run's summary.json records as ``base``."""
    try:
        return read_base_identity(model_path, trust_remote_code=trust_remote_code)
    except LoralabError:
        return None


def describe_base(identity: dict[str, Any]) -> str:
    """``path (model_type Arch, hidden_size 32, num_hidden_layers 2, ...)`` for messages."""
    sizes = ", ".join(f"{k} {v}" for k, v in identity.get("sizes", {}).items())
    arch = " ".join([identity.get("model_type") or "?", *identity.get("architectures", [])])
    return f"{identity.get('path') or '?'} ({arch}; {sizes})"


def recorded_base(run_or_adapter: str | Path) -> dict[str, Any] | None:
    """The base identity recorded with an adapter or run directory: the adapter's BASE_RECORD,
    else the run's summary.json ``base`` (a paused run has no adapter yet); None for older runs."""
    p = Path(run_or_adapter)
    for candidate in (RunDir(p).adapter / BASE_RECORD, p / BASE_RECORD):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    return (RunDir(p).read_summary() or {}).get("base")


# ----------------------------------------------------------------------------- merging


def merge_into_base(peft_model, *, dequantized: bool):
    """``peft_model``'s adapter folded into its base weights (PEFT's merge_and_unload), as a plain
    transformers model that saves and loads as its architecture's own:

    * an adapted output head whose weight is the input embeddings' (tied embeddings) gets a
      weight of its own first, and the config says untied: merged into the shared tensor, the
      adapter would change the input embeddings too;
    * after ``dequantized`` (``model.dequantize()``, which turns GPT-2's Conv1D layers into
      Linear ones) those layers are put back as Conv1D, their weights transposed back: saved as
      Linear they are of the wrong shape for the architecture, or silently transposed where square.
    """
    from transformers.pytorch_utils import Conv1D

    base = peft_model.get_base_model()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    head_weight = getattr(getattr(head, "base_layer", None), "weight", None)  # set where the head is adapted
    if head_weight is not None and embeddings is not None and head_weight is embeddings.weight:
        head.base_layer.weight = nn.Parameter(head_weight.detach().clone(), requires_grad=False)
        for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
            config.tie_word_embeddings = False
        log.info("the adapted output head shared its weight with the input embeddings: it is saved apart, untied")
    merged = peft_model.merge_and_unload()
    if dequantized:
        with torch.device("meta"):
            reference = type(merged)(merged.config)
        for name, module in reference.named_modules():
            if isinstance(module, Conv1D):
                linear = merged.get_submodule(name)
                if isinstance(linear, nn.Linear):
                    conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight)
                    conv.weight.data = linear.weight.data.T.contiguous()
                    if linear.bias is not None:
                        conv.bias.data = linear.bias.data.clone()
                    merged.set_submodule(name, conv)
    return merged


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
        summary = RunDir(p).read_summary()
        if summary:  # a run directory whose run saved no adapter: say how it ended
            raise ModelError(f"{p}: a run directory without an adapter: the run is {summary.get('status')}"
                             f"{': ' + str(summary['error']) if summary.get('error') else ''}")
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
