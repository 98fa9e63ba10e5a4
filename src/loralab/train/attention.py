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

How a packed row is computed (the *kernel*, :func:`kernel_candidates`): on the CPU, one SDPA call
per example (``per_example``); on CUDA, one varlen call for the whole row where available,
since there the launches of one call per example per layer dominate: flash-attn's
``flash_attn_varlen_func`` (``flash_varlen``, when the package is installed), else PyTorch's
FlexAttention with a document mask (``flex``, compiled). :func:`supports_segments` tries them
in that order against the examples run alone and keeps the first that agrees, so a kernel
that fails or differs on this model and device is never used. Grouped-query attention reads
each key/value head in place (``enable_gqa``), never a repeated copy.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "loralab_segments"
_UNSUPPORTED = ("softcap", "s_aux")  # kwargs of attention variants a plain causal softmax would ignore
TORCH_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa
_chosen: dict[str, str] = {}  # device type -> the kernel supports_segments settled on
last_kernel: str | None = None  # the kernel of the latest packed forward (the GPU check reports it)


def kernel_candidates(device: torch.device) -> list[str]:
    """Kernels for packed rows on ``device``, best first; per_example always works."""
    if device.type != "cuda":
        return ["per_example"]
    out = []
    if importlib.util.find_spec("flash_attn") is not None:
        out.append("flash_varlen")
    if TORCH_GQA:  # FlexAttention with enable_gqa: torch >= 2.5
        out.append("flex")
    return [*out, "per_example"]


def _per_example(query, key, value, bounds, dropout, scaling):
    """One causal SDPA call per example; (batch, heads, seq, dim)."""
    gqa = key.shape[1] != query.shape[1]  # grouped-query attention: each key/value head serves several query heads
    if gqa and not TORCH_GQA:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    extra = {"enable_gqa": True} if gqa and TORCH_GQA else {}
    # split, not slices: a slice's backward writes a zero tensor of the whole row per example,
    # split's is one concatenation
    lengths = [e - s for s, e in itertools.pairwise(bounds)]
    parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, **extra)
             for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)]
    return torch.cat(parts, dim=2)


@functools.lru_cache(maxsize=4)
def _document_mask(bounds: tuple[int, ...], device: torch.device):
    """FlexAttention's block mask: causal inside each example, nothing across (one per row, shared by all layers)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.tensor([e - s for s, e in itertools.pairwise(bounds)], device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)  # (seq,) example index

    def same_example_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(same_example_causal, B=None, H=None, Q_LEN=bounds[-1], KV_LEN=bounds[-1], device=device)


@functools.cache
def _flex_function(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if compiled else flex_attention


def _flex(query, key, value, bounds, scaling):
    """The whole row in one FlexAttention call with a document mask; (batch, heads, seq, dim).
    Compiled on CUDA (fused kernel); eager elsewhere (tests: it materializes the scores)."""
    mask = _document_mask(tuple(bounds), query.device)
    flex = _flex_function(query.device.type == "cuda")
    return flex(query, key, value, block_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])


def _flash_varlen(query, key, value, bounds, dropout, scaling):
    """flash-attn's varlen kernel over the row's examples; (batch=1, heads, seq, dim) in and out."""
    from flash_attn import flash_attn_varlen_func

    cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    longest = max(e - s for s, e in itertools.pairwise(bounds))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (seq, heads, dim); flash handles GQA itself
    out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling,
                                 causal=True)
    return out.transpose(0, 1)[None]


@torch.compiler.disable  # never traced: compiled decoder layers (train.compile) call it as it is, for any layout
def segment_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention per example: query (batch, heads, seq, dim), key/value (batch, kv_heads, seq, dim);
    returns (batch, seq, heads, dim) like transformers' sdpa function. Without ``loralab_segments``
    it is transformers' sdpa function."""
    global last_kernel
    bounds = kwargs.pop("loralab_segments", None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if isinstance(bounds, torch.Tensor):  # a host tensor (model_inputs), so compiled layers see a tensor, not ints
        bounds = bounds.numpy().tolist()
    if attention_mask is not None:  # the batch's all-ones mask leaves plain causal attention, which transformers skips
        raise ValueError(f"{NAME} attention got a mask for a packed row; pass an all-ones attention_mask")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"{NAME} attention does not implement {name}")
    window = kwargs.get("sliding_window")
    longest = max(e - s for s, e in itertools.pairwise(bounds))
    if window is not None and window < longest:
        raise ValueError(f"{NAME} attention: an example of {longest} tokens is longer than the sliding window {window}")
    kernel = _chosen.get(query.device.type, "per_example")
    if kernel == "flex" and dropout > 0:  # FlexAttention has no attention dropout
        kernel = "per_example"
    if kernel == "flash_varlen" and query.shape[0] == 1:
        out = _flash_varlen(query, key, value, bounds, dropout, scaling)
    elif kernel == "flex":
        out = _flex(query, key, value, bounds, scaling)
    else:
        kernel = "per_example"
        out = _per_example(query, key, value, bounds, dropout, scaling)
    last_kernel = kernel
    return out.transpose(1, 2).contiguous(), None


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


def supports_segments(model, kernels: list[str] | None = None) -> bool:
    """Whether per-example attention gives this model the logits of its examples run alone.

    One small forward of two 5- and 7-token examples packed in a row, against each example
    alone with the model's own attention, for each kernel of ``kernels`` (default
    :func:`kernel_candidates` of the model's device) in turn: the first that agrees is used for
    this device from then on. Any error or difference for all of them means no (the caller then
    keeps block-mask rows, which every model supports).
    """
    device = next(model.parameters()).device
    for kernel in kernels or kernel_candidates(device):
        _chosen[device.type] = kernel
        if _agrees_alone(model, device):
            return True
    _chosen.pop(device.type, None)
    return False


def _agrees_alone(model, device: torch.device) -> bool:
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
