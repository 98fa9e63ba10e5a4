"""LoRA dropout's mask (loralab.adapters.dropout): the Bernoulli mask and scaling of nn.Dropout,
drawn from 32 random bits per element, in the adapters a run trains (solo through PEFT, fused)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from loralab.adapters import LoraDropout, dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_keeps_one_minus_p_and_scales_by_its_inverse(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 1001, generator=g)  # odd count: the last 64-bit draw is half used
    y = dropout(x, p, generator=g)
    keep = y != 0
    n = x.numel()
    # within 5 binomial standard deviations of n * (1 - p)
    assert abs(keep.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(y[keep], x[keep] * (1 / (1 - p)))
    # both 32-bit halves of each 64-bit draw are used, independently: neighbours are uncorrelated
    k = keep.flatten().float()
    corr = torch.corrcoef(torch.stack([k[0:-1:2], k[1::2]]))[0, 1].item()
    assert abs(corr) < 0.01
    # the mask depends on the generator alone, not on x's values
    other = dropout(x.abs() + 1, p, generator=torch.Generator().manual_seed(1))
    assert torch.equal(other != 0, dropout(x, p, generator=torch.Generator().manual_seed(1)) != 0)


def test_mask_follows_the_generator_and_its_gradient_is_the_mask():
    x = torch.randn(64, 96, requires_grad=True)
    a = dropout(x, 0.2, generator=torch.Generator().manual_seed(7))
    b = dropout(x, 0.2, generator=torch.Generator().manual_seed(7))
    c = dropout(x, 0.2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    assert torch.equal(x.grad, (a != 0).float() / 0.8)
    bf16 = torch.randn(64, 96).to(torch.bfloat16)
    assert dropout(bf16, 0.2).dtype == torch.bfloat16
    assert dropout(x, 0.0) is x


def test_the_module_is_identity_in_evaluation_and_draws_from_the_global_generator():
    drop = LoraDropout(0.3)
    assert isinstance(drop, nn.Dropout) and drop.p == 0.3
    x = torch.randn(32, 32)
    assert torch.equal(drop.eval()(x), x)  # evaluation: identity
    torch.manual_seed(3)
    y = drop.train()(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # the global generator, seeded as the run seeds it


def test_a_run_trains_with_it_and_the_seed_decides_its_masks(tiny_model_dir, cfg_factory):
    """A run's PEFT layers hold LoraDropout; the same seed trains the same losses again, another
    seed other losses (fused groups draw their masks with the same function: test_fused)."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from loralab.adapters import attach_lora
    from loralab.train.loop import train

    model_dir = tiny_model_dir("qwen2")
    cfg = cfg_factory(model_dir, lora__dropout=0.3)
    peft_model = attach_lora(AutoModelForCausalLM.from_pretrained(model_dir), cfg.lora, seed=1)
    drops = [m.lora_dropout["default"] for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert drops and all(type(d) is LoraDropout and d.p == 0.3 for d in drops)

    def losses(*extra: str) -> list[float]:
        s = train(cfg_factory(model_dir, *extra, lora__dropout=0.3, train__lr=3e-3))
        rows = [json.loads(line) for line in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in rows if "train_loss" in r] + [s["final_eval_loss"]]

    first, again, other = losses(), losses(), losses("train.seed=7")
    assert len(first) == 4 and first == again and first != other
