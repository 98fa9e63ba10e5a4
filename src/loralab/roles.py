"""Adapter targets by role, in the seeds' vocabulary, mapped to real module names.

The seeds speak of LoRA on "query", "key", "value", "projection" (the attention output),
"mlp" and "head". Each architecture names those linear layers differently, and some fuse
several roles into one matrix (GPT-2's ``c_attn`` holds q, k and v). "attention" is the LoRA
paper's choice on any of them: query and value, or the fused matrix whole where q and v cannot
be taken alone (what PEFT adapts by default too). This module is the one place where roles
become PEFT ``target_modules``::

    resolve_targets(model_type="llama", module_names=names, targets=["query", "value"])
    -> Targets(peft=["self_attn.q_proj", "self_attn.v_proj"], modules=[...full names...])
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from loralab.errors import ModelError

ROLES = ("query", "key", "value", "projection", "mlp", "head")
ATTENTION = "attention"  # query and value, or the one q,k,v matrix: lora.targets' default

# role -> module-name suffixes (matched as PEFT does: equal, or ending in "." + suffix)
_LLAMA = {
    "query": ["self_attn.q_proj"],
    "key": ["self_attn.k_proj"],
    "value": ["self_attn.v_proj"],
    "projection": ["self_attn.o_proj"],
    "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "head": ["lm_head"],
}
_GPT2 = {
    "qkv": ["attn.c_attn"],
    "projection": ["attn.c_proj"],
    "mlp": ["mlp.c_fc", "mlp.c_proj"],
    "head": ["lm_head"],
}
_NEOX = {
    "qkv": ["attention.query_key_value"],
    "projection": ["attention.dense"],
    "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "head": ["lm_head"],  # informational: the head role resolves through get_output_embeddings()
}
_OPT = {
    "query": ["self_attn.q_proj"],
    "key": ["self_attn.k_proj"],
    "value": ["self_attn.v_proj"],
    "projection": ["self_attn.out_proj"],
    "mlp": ["fc1", "fc2"],
    "head": ["lm_head"],
}
_PHI3 = {
    "qkv": ["self_attn.qkv_proj"],
    "projection": ["self_attn.o_proj"],
    "mlp": ["mlp.gate_up_proj", "mlp.down_proj"],
    "head": ["lm_head"],
}
_PHI = {
    "query": ["self_attn.q_proj"],
    "key": ["self_attn.k_proj"],
    "value": ["self_attn.v_proj"],
    "projection": ["self_attn.dense"],
    "mlp": ["mlp.fc1", "mlp.fc2"],
    "head": ["lm_head"],
}
_FALCON = {
    "qkv": ["self_attention.query_key_value"],
    "projection": ["self_attention.dense"],
    "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "head": ["lm_head"],
}

# model_type (config.json) -> role map. Families that copy Llama's layout share it.
ARCHITECTURES: dict[str, dict[str, list[str]]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    "opt": _OPT,
    "phi3": _PHI3,
    "phi": _PHI,
    "falcon": _FALCON,
}

# Human names of the fused modules, for the error message.
_FUSED_NAMES = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "phi3": "Phi-3", "falcon": "Falcon"}


class FusedRolesError(ModelError):
    """Query, key or value asked for apart on an architecture that holds them in one matrix: a
    setting this model cannot take, like a rank above its matrices' dimensions."""


@dataclass(frozen=True)
class Targets:
    """What to hand PEFT (``peft``) and the full module names it will wrap (``modules``)."""

    peft: list[str] | str  # list of suffixes, or one regex (full match) when the user gave one
    modules: list[str]


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def role_map(model_type: str, module_names: Iterable[str]) -> dict[str, list[str]]:
    """The role map of an architecture; unknown ones are guessed from Llama-style names."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    names = list(module_names)
    for candidate in (_LLAMA, _OPT, _NEOX, _GPT2, _PHI3):
        probe = candidate.get("query", candidate.get("qkv"))[0]
        if any(_matches(n, probe) for n in names):
            return candidate
    return {}


def attention_roles(model_type: str, module_names: Iterable[str]) -> tuple[list[str], str | None]:
    """The attention roles LoRA adapts by default, and the architecture's name for its fused
    matrix where it has one: the LoRA paper's query and value, or query, key and value where the
    architecture holds them in one matrix (only all three can be asked for there)."""
    rmap = role_map(model_type, module_names)
    if "qkv" not in rmap:
        return ["query", "value"], None
    return ["query", "key", "value"], f"{_FUSED_NAMES.get(model_type, model_type)} ({rmap['qkv'][0]})"


def expand_roles(model_type: str, roles: list[str], module_names: Iterable[str]) -> list[str]:
    """Turn roles into module suffixes; raise on a role an architecture fuses or lacks."""
    names = list(module_names)
    rmap = role_map(model_type, names)
    asked = set(roles)
    suffixes: list[str] = []
    if "qkv" in rmap:
        attn = asked & {"query", "key", "value"}
        if attn and attn != {"query", "key", "value"}:
            fused = rmap["qkv"][0]
            arch = _FUSED_NAMES.get(model_type, model_type)
            raise FusedRolesError(
                f"lora.targets asks for {', '.join(sorted(attn))} alone, but {arch} fuses query, key and value "
                f"into one matrix ({fused}). Ask for all three together: targets [query, key, value], or "
                f"[attention] (the default, which adapts {fused} whole on {arch}), or the module's name "
                f"({fused.split('.')[-1]})."
            )
        if attn:
            suffixes += rmap["qkv"]
            asked -= attn
    for role in ROLES:
        if role in asked:
            if role not in rmap:
                raise ModelError(
                    f"lora.targets: no module for role {role!r} in model_type {model_type!r}; "
                    "name the modules directly or use a regex (re:...)"
                )
            suffixes += rmap[role]
    return suffixes


def linear_module_names(model) -> list[str]:
    """Names of every linear layer (nn.Linear, GPT-2's Conv1D, bitsandbytes 4-bit)."""
    import torch

    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.append(name)
    return names


def head_module_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def resolve_targets(
    *, model_type: str, linear_names: list[str], head_name: str | None, targets: list[str]
) -> Targets:
    """Resolve roles, raw module names and ``re:`` regexes against a model's linear layers."""
    roles = [t for t in targets if t in ROLES]
    if ATTENTION in targets:
        roles += [r for r in attention_roles(model_type, linear_names)[0] if r not in roles]
    regexes = [t[3:] for t in targets if t.startswith("re:")]
    raw = [t for t in targets if t not in ROLES and t not in ("all", ATTENTION) and not t.startswith("re:")]
    unknown = [t for t in raw if not any(_matches(n, t) for n in linear_names)]
    if unknown:
        sample = sorted({n.split(".")[-1] for n in linear_names})
        raise ModelError(
            f"lora.targets: {', '.join(map(repr, unknown))} is neither a role "
            f"({', '.join(ROLES)}, {ATTENTION}, all) nor a linear module of this model. Its linear layers are "
            f"named {', '.join(sample)}; a regex is written re:<pattern>."
        )
    # The head is found from the model itself (get_output_embeddings), whatever its name.
    suffixes = expand_roles(model_type, [r for r in roles if r != "head"], linear_names) + raw
    if "head" in roles:
        if head_name is None or head_name not in linear_names:
            raise ModelError("lora.targets asks for head, but this model has no linear output head")
        suffixes.append(head_name)
    if "all" in targets:
        suffixes += sorted({n.split(".")[-1] for n in linear_names if n != head_name})
    compiled = []
    for rx in regexes:
        try:
            compiled.append(re.compile(rx))
        except re.error as exc:
            raise ModelError(f"lora.targets: re:{rx} is not a valid regex ({exc})") from None
    modules = [
        n
        for n in linear_names
        if any(_matches(n, s) for s in suffixes) or any(c.fullmatch(n) for c in compiled)
    ]
    if "all" in targets:  # a suffix shared with the head (rare) must not pull the head in
        modules = [n for n in modules if n != head_name or "head" in roles]
    if not modules:
        hint = ""
        if regexes and linear_names:  # re.fullmatch: a pattern for a suffix alone matches nothing
            example = linear_names[0]
            hint = (f"; a re: pattern must match a module's full name, such as {example} "
                    f"(re:.*\\.{re.escape(example.split('.')[-1])} matches every {example.split('.')[-1]})")
        raise ModelError(f"lora.targets {targets} matches no linear module of this model{hint}")
    suffixes = list(dict.fromkeys(suffixes))
    if regexes or "all" in targets:
        # One exact regex keeps PEFT's selection identical to ours.
        return Targets(peft="^(" + "|".join(re.escape(m) for m in modules) + ")$", modules=modules)
    return Targets(peft=suffixes, modules=modules)
