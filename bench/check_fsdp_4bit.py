"""Whether a bitsandbytes 4-bit layer (nf4, quant_storage bf16: the storage FSDP can shard)
still computes after FSDP2's fully_shard, the sharding loralab's distributed.strategy fsdp uses.
loralab refuses quant.mode nf4/fp4 with fsdp on what this prints (docs/distributed.md).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --master-addr 127.0.0.1 bench/check_fsdp_4bit.py

On the CPU (gloo) with torch 2.13 and bitsandbytes 0.50.2, both ranks print
"ValueError: quant_state is required": the sharded weight is a plain DTensor, without the
quantization state the 4-bit matmul needs.
"""
import bitsandbytes as bnb
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
lin = torch.nn.Linear(256, 256, bias=False)
q = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                      quant_storage=torch.bfloat16)
q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                             quant_storage=torch.bfloat16)
q = q.to("cpu")  # quantizes on the CPU backend
x = torch.randn(4, 256, dtype=torch.bfloat16)
with torch.no_grad():
    before = q(x).float()
model = torch.nn.Sequential(q)
try:
    fully_shard(model)
    with torch.no_grad():
        after = model(x).float()
    print(f"rank {rank}: max |after - before| = {(after - before).abs().max().item():.4g} "
          f"(|before| max {before.abs().max().item():.3g}); weight type after shard: {type(model[0].weight).__name__}",
          flush=True)
except Exception as exc:  # noqa: BLE001
    print(f"rank {rank}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
dist.destroy_process_group()
