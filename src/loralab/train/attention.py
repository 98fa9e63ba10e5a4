"""Attention kept inside each packed example, with no mask and no work across examples.

A packed forward (``data.packing``) holds several examples end to end in one row. With a
block-diagonal mask, attention is computed over the whole row and the masked blocks are thrown
away: on a row of five 56-token examples, four fifths of that work is wasted. Here each example
gets its own causal attention call over its own tokens:

    with segment_attention(model):
        model(input_ids=row, position_ids=pos, attention_mask=torch.ones_like(row),
              loralab_segments=(0, 56, 112, 170))

The function is registered with transformers' attention interface under ``NAME``, with sdpa's
mask function: an all-ones attention mask makes transformers skip the mask (plain causal), and
a forward without ``loralab_segments`` (evaluation, generation) is handed to transformers' sdpa
function unchanged. So the model can stay on ``NAME`` for a whole training loop, and activation
checkpointing, which repeats forwards during backward, repeats them the same way.

Models whose attention needs more than a plain causal softmax (logit soft-capping, attention
sinks, a sliding window shorter than an example) are refused by the function itself, and
:func:`supports_segments` checks each model once by comparing a packed forward with its
examples run alone, so a model that does not route attention through the interface keeps the
block-mask rows instead.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "loralab_segments"
_UNSUPPORTED = ("softcap", "s_aux")  # kwargs of attention variants a plain causal softmax would ignore


def segment_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention per example: query (batch, heads, seq, dim), key/value (batch, kv_heads, seq, dim);
    returns (batch, seq, heads, dim) like transformers' sdpa function. Without ``loralab_segments``
    it is transformers' sdpa function."""
    bounds = kwargs.pop("loralab_segments", None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None:  # the batch's all-ones mask leaves plain causal attention, which transformers skips
        raise ValueError(f"{NAME} attention got a mask for a packed row; pass an all-ones attention_mask")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"{NAME} attention does not implement {name}")
    window = kwargs.get("sliding_window")
    longest = max(e - s for s, e in itertools.pairwise(bounds))
    if window is not None and window < longest:
        raise ValueError(f"{NAME} attention: an example of {longest} tokens is longer than the sliding window {window}")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves several query heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                            dropout_p=dropout, scale=scaling)
             for s, e in itertools.pairwise(bounds)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, segment_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def segment_attention(model):
    """Route the model's attention through ``NAME`` for the forwards inside the block."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before


def supports_segments(model) -> bool:
    """Whether per-example attention gives this model the logits of its examples run alone.

    One small forward of two 5- and 7-token examples packed in a row, against each example
    alone with the model's own attention; any error or difference means no (the caller then
    keeps block-mask rows, which every model supports).
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    first, second = torch.arange(3, 8) % vocab, torch.arange(11, 18) % vocab
    row = torch.cat([first, second])[None].to(device)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with segment_attention(model):
                packed = model(input_ids=row, position_ids=pos, attention_mask=torch.ones_like(row),
                               loralab_segments=(0, 5, 12)).logits[0]
            alone = torch.cat([model(input_ids=ids[None].to(device)).logits[0] for ids in (first, second)])
    except Exception:  # noqa: BLE001 - any failure means "not supported", the fallback is always correct
        return False
    finally:
        model.train(was_training)
    # fp32 agrees to rounding; half precision rounds differently in a row of 12 than in rows of 5 and 7
    tolerance = 1e-3 if alone.dtype == torch.float32 else 3e-2
    packed, alone = packed.float(), alone.float()
    scale = alone.abs().max().clamp_min(1.0)
    return bool(torch.isfinite(packed).all() and (packed - alone).abs().max() / scale < tolerance)
