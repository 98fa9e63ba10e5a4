"""The response loss without a step's whole logits: the output head applied to a chunk of
positions at a time, each chunk's gradient for the head's input computed with its logits.

    sums = loss_sums(model, stacked, labels, positions, n_runs, autocast)   # (n_runs,) cross-entropy sums

A step's logits are (positions x vocabulary): with a 128k-token vocabulary, 8 rows of 1,024
response tokens hold 4 GiB of bf16 logits and 4 GiB more of fp32 log-probabilities. Chunked,
the step holds the head's input and its gradient (positions x hidden) and one chunk's logits at
a time (``CHUNK_LOGITS`` values); the head's matmuls are the same as the whole path's.

Chunking is used when the step would hold more than ``CHUNK_LOGITS`` logits and the output head
is a frozen ``nn.Linear`` whose output is the model's logits: checked once per head on a few
tokens, without gradients or dropout, so a model that soft-caps or scales its logits after the
head (Gemma 2, Cohere) keeps the plain path. Below the threshold (the shipped base, small
vocabularies) the plain path runs, so those losses are unchanged bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from loralab.data.dataset import IGNORE
from loralab.estimate import CHUNK_LOGITS
from loralab.train.step import forward_logits, token_loss_sum

log = logging.getLogger(__name__)

_head_is_last: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def loss_sums(model, stacked: dict, labels: torch.Tensor, positions: torch.Tensor, n_runs: int,
              autocast: str) -> torch.Tensor:
    """(n_runs,): each run's sum of next-token cross-entropy at ``positions``, from one forward of
    ``stacked`` (n_runs copies of a batch of rows labelled ``labels``, one copy per run)."""
    rows = labels.shape[0]
    head = chunkable_head(model, stacked, n_logits=n_runs * rows * len(positions))
    if head is None:
        logits = forward_logits(model, stacked, autocast, positions)  # (runs * rows, positions, vocab)
        return torch.stack([token_loss_sum(logits[j * rows:(j + 1) * rows], labels, positions)
                            for j in range(n_runs)])
    with head_passes_through(head):
        hidden = forward_logits(model, stacked, autocast, positions)  # (runs * rows, positions, hidden)
    return torch.stack([chunked_loss_sum(hidden[j * rows:(j + 1) * rows], head, labels, positions)
                        for j in range(n_runs)])


def chunkable_head(model, batch: dict, *, n_logits: int) -> nn.Linear | None:
    """The output head when this step's loss is computed in chunks: more than CHUNK_LOGITS
    logits, a frozen plain Linear head (no adapter, not quantized), whose output is the
    model's logits."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.weight.requires_grad or n_logits * head.out_features <= CHUNK_LOGITS:
        return None
    if head not in _head_is_last:
        _head_is_last[head] = head_output_is_the_logits(model, head, batch["input_ids"][:, :8])
        if not _head_is_last[head]:
            log.info("the loss is not chunked: %s changes its logits after the output head (soft-capping or "
                     "scaling), so each step keeps its whole logits", getattr(model.config, "model_type", "the model"))
    return head if _head_is_last[head] else None


def head_output_is_the_logits(model, head: nn.Linear, ids: torch.Tensor) -> bool:
    """Whether ``model``'s logits are exactly its output head's output on ``ids`` (eval mode,
    no gradient: no dropout, no random draw); each module's mode is put back as it was."""
    seen = []
    hook = head.register_forward_hook(lambda _module, _args, out: seen.append(out))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        hook.remove()
        for m, training in modes:
            m.training = training
    return len(seen) == 1 and seen[0].shape == logits.shape and torch.equal(seen[0], logits)


@contextlib.contextmanager
def head_passes_through(head: nn.Linear):
    """The model's forward returns the head's input (the final hidden states) as its logits."""
    own = head.__dict__.get("forward")  # a hook library's wrapper, kept
    head.forward = lambda hidden: hidden
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def chunked_loss_sum(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """token_loss_sum from the head's input at ``positions``: (rows, positions, hidden), the
    head applied CHUNK_LOGITS // vocabulary positions at a time."""
    targets = labels[:, positions + 1].flatten()
    size = max(1, CHUNK_LOGITS // head.out_features)
    return HeadLossInChunks.apply(hidden.flatten(0, 1), head.weight, head.bias, targets, size)


class HeadLossInChunks(torch.autograd.Function):
    """Sum of cross-entropy of ``linear(hidden, weight, bias)`` against ``targets``, chunk by
    chunk; the gradient for ``hidden`` is computed with each chunk's logits in the forward and
    kept (positions x hidden), so the backward needs no logits and runs no head again. The
    head's weight and bias are frozen (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, size):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for i in range(0, hidden.shape[0], size):
            logits = F.linear(hidden[i:i + size], weight, bias).float()
            t = targets[i:i + size]
            kept = (t != IGNORE).unsqueeze(1)
            t = t.clamp(min=0).unsqueeze(1)
            log_probs = logits.log_softmax(dim=-1)
            total -= log_probs.gather(1, t).masked_fill(~kept, 0).sum()
            if grad is not None:  # d loss / d logits = softmax - one-hot, rows without a label zero
                d = log_probs.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=logits.dtype))
                grad[i:i + size] = d.masked_fill_(~kept, 0).to(hidden.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None
