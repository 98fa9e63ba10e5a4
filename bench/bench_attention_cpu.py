"""Ways to attend within the examples of a packed row on the CPU, forward + backward, timed.

    PYTHONPATH=src python bench/bench_attention_cpu.py [--threads 2] [--repeats 3]

loralab's CPU kernel for packed rows is one SDPA call per example
(loralab.train.attention._per_example). This times it against the alternatives a packed row
allows, on the rows of bench_user.py's cases (8 examples of the 50M model's shapes, cut at 256
and at 1,024, bf16) and of the quickstart (16 short examples of the tiny base's shapes, fp32):

* ``gathered``: the examples gathered into one padded (examples, heads, longest, dim) batch and
  one causal SDPA call (the padding sits after each example's tokens, so causal masking keeps it
  unseen), then gathered back;
* ``block_mask``: one SDPA call over the whole row with a block-diagonal causal mask;
* ``matmul_backward``: SDPA's forward per example, its backward written as matmuls and an fp32
  softmax (per example);
* ``flex``: PyTorch's FlexAttention with a document mask (compiled), where torch runs its
  backward on the CPU.

Each result is the median over repeats of the mean of 10 forward + backward passes, in ms; the
outputs are checked against per_example first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

ROWS = {  # name: (example lengths, heads, head dim, dtype)
    "50M-cut256": ([256, 256, 256, 156, 139, 214, 256, 256], 10, 64, torch.bfloat16),
    "50M-cut1024": ([1024, 300, 180, 95, 600, 250, 1024, 140], 10, 64, torch.bfloat16),
    "tiny-quickstart": ([random.Random(i).randint(30, 60) for i in range(16)], 6, 32, torch.float32),
}


def per_example(q, k, v, lens):
    parts = zip(*(t.split(lens, dim=2) for t in (q, k, v)), strict=True)
    return torch.cat([F.scaled_dot_product_attention(a, b, c, is_causal=True) for a, b, c in parts], dim=2)


def gathered(q, k, v, lens):
    n, longest = len(lens), max(lens)
    starts = [0, *itertools.accumulate(lens)][:-1]
    index = torch.tensor([s + min(j, n_ - 1) for s, n_ in zip(starts, lens, strict=True) for j in range(longest)])
    back = torch.tensor([i * longest + j for i, n_ in enumerate(lens) for j in range(n_)])

    def pad(t):  # (1, heads, row, dim) -> (examples, heads, longest, dim)
        return t[0].index_select(1, index).view(t.shape[1], n, longest, t.shape[3]).transpose(0, 1)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True)
    return out.transpose(0, 1).reshape(q.shape[1], n * longest, q.shape[3]).index_select(1, back)[None]


def block_mask(q, k, v, lens):
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = (doc[:, None] == doc[None]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _MatmulBackward(torch.autograd.Function):
    """Causal attention of one example: SDPA forward, backward as matmuls and an fp32 softmax."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out = ctx.saved_tensors
        scale, n = q.shape[-1] ** -0.5, q.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        p = scores.softmax(-1)
        grad = grad.to(q.dtype)
        dv = torch.matmul(p.to(q.dtype).transpose(-1, -2), grad)
        dp = torch.matmul(grad, v.transpose(-1, -2)).float()
        ds = (p * (dp - (grad.float() * out.float()).sum(-1, keepdim=True))).to(q.dtype)
        return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


def matmul_backward(q, k, v, lens):
    parts = zip(*(t.split(lens, dim=2) for t in (q, k, v)), strict=True)
    return torch.cat([_MatmulBackward.apply(a, b, c) for a, b, c in parts], dim=2)


def flex(q, k, v, lens):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, len(doc), len(doc),
                             device="cpu")
    return torch.compile(flex_attention)(q, k, v, block_mask=mask)


KERNELS = {"per_example": per_example, "gathered": gathered, "block_mask": block_mask,
           "matmul_backward": matmul_backward, "flex": flex}


def time_kernel(fn, q, k, v, grad, lens, passes: int = 10) -> float:
    for _ in range(2):
        fn(q, k, v, lens).backward(grad)
    start = time.perf_counter()
    for _ in range(passes):
        fn(q, k, v, lens).backward(grad)
    return (time.perf_counter() - start) / passes * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "torch": torch.__version__, "rows": {}}
    for name, (lens, heads, dim, dtype) in ROWS.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, sum(lens), dim, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, heads, sum(lens), dim, dtype=dtype)
        reference = per_example(q, k, v, lens).float()
        usable, times = {}, {}
        for kernel, fn in KERNELS.items():
            try:
                diff = (fn(q, k, v, lens).float() - reference).abs().max().item()
                fn(q, k, v, lens).backward(grad)
                usable[kernel] = diff
            except Exception as exc:  # noqa: BLE001 - a kernel torch refuses here is reported, not timed
                times[kernel] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        runs = {kernel: [] for kernel in usable}
        for _ in range(args.repeats):  # interleaved: each repeat times every kernel once
            for kernel in usable:
                runs[kernel].append(time_kernel(KERNELS[kernel], q, k, v, grad, lens))
        times.update({kernel: round(statistics.median(ms), 2) for kernel, ms in runs.items()})
        report["rows"][name] = {"lengths": lens, "ms": times, "max_abs_diff": usable}
        print(name, json.dumps(times), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
