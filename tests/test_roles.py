"""Roles -> module names across architectures, checked on real (tiny) models through PEFT."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS
from loralab.adapters import attach_lora, peft_lora_config
from loralab.config import LoraConfig
from loralab.errors import ModelError
from loralab.roles import ROLES, head_module_name, linear_module_names, resolve_targets

LLAMA_LIKE = {
    "query": ["self_attn.q_proj"],
    "key": ["self_attn.k_proj"],
    "value": ["self_attn.v_proj"],
    "projection": ["self_attn.o_proj"],
    "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "head": ["lm_head"],
}
EXPECTED = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "opt": {
        "query": ["self_attn.q_proj"],
        "key": ["self_attn.k_proj"],
        "value": ["self_attn.v_proj"],
        "projection": ["self_attn.out_proj"],
        "mlp": ["fc1", "fc2"],
        "head": ["lm_head"],
    },
    "gpt2": {
        "qkv": ["attn.c_attn"],
        "projection": ["attn.c_proj"],
        "mlp": ["mlp.c_fc", "mlp.c_proj"],
        "head": ["lm_head"],
    },
    "gpt_neox": {
        "qkv": ["attention.query_key_value"],
        "projection": ["attention.dense"],
        "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
        "head": ["lm_head"],  # transformers 5 names the GPT-NeoX head lm_head (was embed_out)
    },
    "phi3": {
        "qkv": ["self_attn.qkv_proj"],
        "projection": ["self_attn.o_proj"],
        "mlp": ["mlp.gate_up_proj", "mlp.down_proj"],
        "head": ["lm_head"],
    },
}
FUSED = {"gpt2": "c_attn", "gpt_neox": "query_key_value", "phi3": "qkv_proj"}
N_LAYERS = 2


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir))


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def wrapped_modules(peft_model) -> set[str]:
    out = set()
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            out.add(name.removeprefix("base_model.model."))
    return out


def role_cases():
    for arch in ARCHS:
        for role in (*ROLES, "all"):
            targets = [role]
            if arch in FUSED and role in ("query", "key", "value"):
                if role != "query":
                    continue
                targets = ["query", "key", "value"]
            yield pytest.param(arch, targets, id=f"{arch}-{'+'.join(targets)}")


@pytest.mark.parametrize("arch,targets", list(role_cases()))
def test_role_wraps_exact_modules(tiny_model_dir, arch, targets):
    model = load(tiny_model_dir(arch))
    assert model.config.model_type == arch
    linear = linear_module_names(model)
    head = head_module_name(model)
    rmap = EXPECTED[arch]
    if targets == ["all"]:
        expected = {n for n in linear if n != head}
        assert head in linear  # the head is a linear layer, excluded on purpose
    else:
        key = "qkv" if len(targets) == 3 else targets[0]
        suffixes = rmap[key]
        expected = {n for n in linear if any(_matches(n, s) for s in suffixes)}
        per_layer = 1 if key == "head" else N_LAYERS
        assert len(expected) == len(suffixes) * per_layer
    peft = attach_lora(model, LoraConfig(r=2, targets=targets, dropout=0.0), seed=0)
    assert wrapped_modules(peft) == expected
    if targets == ["all"]:
        assert head not in wrapped_modules(peft)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "phi3"])
@pytest.mark.parametrize("role", ["query", "key", "value"])
def test_fused_role_alone_refused(tiny_model_dir, arch, role):
    model = load(tiny_model_dir(arch))
    with pytest.raises(ModelError) as exc:
        peft_lora_config(model, LoraConfig(targets=[role]))
    msg = str(exc.value)
    assert FUSED[arch] in msg
    assert "query, key and value" in msg or "query, key, value" in msg
    assert "[query, key, value]" in msg


@pytest.mark.parametrize("arch", ARCHS)
def test_the_default_targets_are_the_modules_peft_adapts_by_default(tiny_model_dir, arch):
    """lora.targets' default, attention, wraps what PEFT's own default (target_modules unset)
    wraps: q and v where they are apart, the fused q,k,v matrix whole where they are not (PEFT
    has no default for Phi-3: there it is qkv_proj, as on GPT-2 and GPT-NeoX)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    ours = wrapped_modules(attach_lora(load(tiny_model_dir(arch)), LoraConfig(r=2, dropout=0.0), seed=0))
    if arch == "phi3":
        assert ours == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(N_LAYERS)}
    else:
        assert ours == wrapped_modules(get_peft_model(load(tiny_model_dir(arch)), PeftLoraConfig(r=2)))
    assert len(ours) == (1 if arch in FUSED else 2) * N_LAYERS


def test_fused_two_of_three_refused(tiny_model_dir):
    model = load(tiny_model_dir("gpt2"))
    with pytest.raises(ModelError, match="c_attn"):
        peft_lora_config(model, LoraConfig(targets=["query", "value"]))


def test_head_role_neox(tiny_model_dir):
    model = load(tiny_model_dir("gpt_neox"))
    assert head_module_name(model) == "lm_head"
    cfg = peft_lora_config(model, LoraConfig(r=2, targets=["head"]))
    assert "lm_head" in str(cfg.target_modules)


def test_unknown_role_lists_roles(tiny_model_dir):
    model = load(tiny_model_dir("llama"))
    with pytest.raises(ModelError) as exc:
        resolve_targets(model_type="llama", linear_names=linear_module_names(model),
                        head_name=head_module_name(model), targets=["querry"])
    msg = str(exc.value)
    assert "'querry'" in msg
    for role in (*ROLES, "all"):
        assert role in msg
    assert "q_proj" in msg  # lists the model's real linear layer names


def test_raw_module_name(tiny_model_dir):
    model = load(tiny_model_dir("llama"))
    t = resolve_targets(model_type="llama", linear_names=linear_module_names(model),
                        head_name="lm_head", targets=["down_proj"])
    assert t.peft == ["down_proj"]
    assert t.modules == [f"model.layers.{i}.mlp.down_proj" for i in range(N_LAYERS)]


def test_regex_target(tiny_model_dir):
    model = load(tiny_model_dir("llama"))
    t = resolve_targets(model_type="llama", linear_names=linear_module_names(model),
                        head_name="lm_head", targets=["re:.*q_proj"])
    assert t.modules == [f"model.layers.{i}.self_attn.q_proj" for i in range(N_LAYERS)]
    assert isinstance(t.peft, str)
    peft = attach_lora(model, LoraConfig(r=2, targets=["re:.*q_proj"]), seed=0)
    assert wrapped_modules(peft) == set(t.modules)


def test_bad_regex(tiny_model_dir):
    model = load(tiny_model_dir("llama"))
    with pytest.raises(ModelError, match="not a valid regex"):
        peft_lora_config(model, LoraConfig(targets=["re:(q_proj"]))


def test_regex_matching_nothing(tiny_model_dir):
    model = load(tiny_model_dir("llama"))
    with pytest.raises(ModelError, match="matches no linear module"):
        peft_lora_config(model, LoraConfig(targets=["re:nothing_here"]))
    # a suffix alone matches nothing (the pattern must match the whole name): said, with the way
    with pytest.raises(ModelError) as err:
        peft_lora_config(model, LoraConfig(targets=["re:q_proj"]))
    assert str(err.value).endswith("a re: pattern must match a module's full name, such as model.layers.0.self_attn."
                                   "q_proj (re:.*\\.q_proj matches every q_proj)")
    assert len(peft_lora_config(model, LoraConfig(targets=["re:.*\\.q_proj"])).target_modules) > 0


def test_rank_larger_than_layer(tiny_model_dir):
    model = load(tiny_model_dir("llama"))  # hidden 32; k_proj is 32 -> 16 (2 kv heads of 8)
    peft_lora_config(model, LoraConfig(r=16, targets=["key"]))
    peft_lora_config(model, LoraConfig(r=20, targets=["query"]))
    with pytest.raises(ModelError) as exc:
        peft_lora_config(model, LoraConfig(r=20, targets=["key"]))
    msg = str(exc.value)
    assert "lora.r = 20" in msg and "k_proj" in msg and "32 x 16" in msg
    with pytest.raises(ModelError, match="lora.r = 33"):
        peft_lora_config(model, LoraConfig(r=33, targets=["query"]))


def test_rank_larger_than_conv1d(tiny_model_dir):
    model = load(tiny_model_dir("gpt2"))  # c_attn is 32 -> 96
    with pytest.raises(ModelError, match="c_attn"):
        peft_lora_config(model, LoraConfig(r=33, targets=["query", "key", "value"]))


def test_gpt2_fan_in_fan_out_and_output_unchanged(tiny_model_dir):
    model = load(tiny_model_dir("gpt2"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    cfg = peft_lora_config(model, LoraConfig(targets=["query", "key", "value", "mlp"]))
    assert cfg.fan_in_fan_out is True
    peft = attach_lora(model, LoraConfig(targets=["query", "key", "value", "mlp"], dropout=0.0), seed=0)
    peft.eval()
    with torch.no_grad():
        after = peft(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)  # B starts at zero
