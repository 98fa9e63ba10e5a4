"""One run on N processes (ranks): what the training core asks of torch.distributed.

    loralab train run.yaml --nproc 2                       # loralab.cli.launch starts the ranks
    torchrun --nproc-per-node 2 -m loralab.cli train run.yaml --out runs/a   # or any torchrun

Strategy ddp, the same maths as one process: every rank holds the whole base and the same
adapters; each step's micro batches are laid out exactly as one process lays them out (same
examples, same order, same packing) and dealt round-robin to the ranks (micro batch j to rank
j % N); every rank divides its losses by the response tokens of the WHOLE step, so the sum of
the ranks' gradients (one all-reduce per step, before clipping) is the one-process gradient,
and every rank then takes the same optimizer step. Only rank 0 writes the run directory
(``writes()``); the others read it (a resume's checkpoint) and keep their metrics to
themselves.

Strategy fsdp, the same maths with the model sharded (``shard``: FSDP2 ``fully_shard`` on
every decoder layer and the root, base and adapters alike): the same layout and loss divisor
as ddp, but FSDP's reduce-scatter sums the gradients into each rank's shard during backward
(summed, not averaged: each loss is already divided by the whole step's tokens), so only the
step's loss is all-reduced. FSDP's collectives pair up, so every rank runs as many forward and
backward passes as the rank with the most micro batches: a rank short of one runs one of its
own (rank 0's first when it has none) again with loss weight 0. Checkpoints and the final
adapter gather the shards whole on every rank (``whole``) for rank 0 to write, in the
one-process format; a load shards them again (``shard_like``).

Outside a process group (a plain run) every function here is the identity: rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

import torch
import torch.distributed as dist

from loralab.config import Config
from loralab.errors import ConfigError, LoralabError, ModelError

log = logging.getLogger(__name__)


class RankLost(LoralabError):
    """A collective failed because another rank's connection closed: it died."""

    exit_code = 1


class RankTimeout(LoralabError):
    """A collective waited longer than distributed.timeout_s: another rank hangs or died."""

    exit_code = 1


def launched() -> bool:
    """Whether this process is a worker started by torchrun (or loralab's launcher)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


_strategy = "ddp"  # the joined process group's distributed.strategy (process_group sets it)


def sharded() -> bool:
    """Whether the model is sharded over the ranks: distributed.strategy fsdp on several processes."""
    return active() and _strategy == "fsdp"


def writes() -> bool:
    """Whether this process writes the run directory: rank 0 (and a plain run)."""
    return rank() == 0


def warn_idle_ranks(cfg: Config, nproc: int) -> None:
    """Warn (a launcher, once) when a step has fewer micro batches than processes: the others
    compute nothing and wait at every step."""
    micro = cfg.train.micro_batch_size
    if nproc > 1 and isinstance(micro, int) and cfg.grad_accum < nproc:
        log.warning("WARNING: %d processes, but a step has %d micro batches (train.batch_size %d / "
                    "train.micro_batch_size %d): %d process(es) compute nothing and wait at every step; a smaller "
                    "micro batch or fewer processes use them all", nproc, cfg.grad_accum, cfg.train.batch_size,
                    micro, nproc - cfg.grad_accum)


def check_strategy(cfg: Config, nproc: int) -> None:
    """Refuse what a run on ``nproc`` processes cannot do yet, before anything starts."""
    if nproc <= 1:
        return
    if cfg.distributed.strategy == "fsdp":
        check_fsdp(cfg)
    if cfg.model.device.startswith("cuda:"):
        raise ConfigError(f"model.device {cfg.model.device} names one GPU, but a run on {nproc} processes gives "
                          "each rank its own (LOCAL_RANK); set model.device=auto or cuda")


def check_fsdp(cfg: Config) -> None:
    """What distributed.strategy fsdp cannot do yet, refused before any process starts."""
    if cfg.quant.mode != "none":
        raise ConfigError(f"quant.mode {cfg.quant.mode} with distributed.strategy fsdp is not available: FSDP2's "
                          "fully_shard drops bitsandbytes' quantization state from a 4-bit weight it shards (the "
                          "forward fails: bench/check_fsdp_4bit.py); set quant.mode=none (fsdp shards the base in "
                          "model.dtype) or distributed.strategy=ddp (QLoRA, the base on every rank)")
    if cfg.train.compile is True:
        raise ConfigError("train.compile true with distributed.strategy fsdp is not available: compiled decoder "
                          "layers under fully_shard are not checked in loralab; set train.compile=false or auto "
                          "(auto trains eager with fsdp)")
    if cfg.train.auto_micro_batch:
        raise ConfigError("train.auto_micro_batch with distributed.strategy fsdp is not available: an out-of-memory "
                          "inside a pass leaves the other ranks waiting in fsdp's collectives of that pass; set "
                          "train.micro_batch_size to a size that fits (loralab estimate --nproc N) and "
                          "train.auto_micro_batch=false, or distributed.strategy=ddp (which halves it on every rank)")


@contextlib.contextmanager
def process_group(cfg: Config):
    """Join the job's process group for the length of the run: gloo on CPU, NCCL on CUDA (each
    rank on the GPU numbered by its LOCAL_RANK), collectives bounded by distributed.timeout_s."""
    world = int(os.environ["WORLD_SIZE"])
    check_strategy(cfg, world)
    from loralab.models import pick_device

    cuda = world > 1 and cfg.model.device != "cpu" and pick_device(cfg.model.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    joined = dist.is_initialized()  # Ray Train made the group (its backend, its timeout): join it
    if not joined:
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    global _strategy
    _strategy = cfg.distributed.strategy
    if not writes():
        logging.getLogger("loralab").setLevel(logging.WARNING)  # one rank speaks; the others only warn
    try:
        yield
    finally:
        _strategy = "ddp"
        if not joined:
            dist.destroy_process_group()


def shard(model: torch.nn.Module) -> None:
    """fsdp: FSDP2 ``fully_shard`` of every decoder layer, then of the root (embeddings, final
    norm, head), once the adapters are in; frozen base and adapters alike. The reduce-scatter
    of the gradients sums (divide factor 1, SUM collectives only: gloo has no pre-multiplied
    sum). Anything else: nothing."""
    if not sharded():
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from loralab.train.compiled import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise ModelError(f"distributed.strategy fsdp: {type(model).__name__} names no decoder layers "
                         "(_no_split_modules) to shard; set distributed.strategy=ddp")
    mesh = init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (world_size(),))
    for module in [*layers, model]:
        fully_shard(module, mesh=mesh)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    log.info("fsdp: %d decoder layers and the root sharded over %d ranks", len(layers), world_size())


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole on every rank: fsdp's sharded tensor (a DTensor) gathered, any other as it is.
    Every rank calls it for the same tensors in the same order (it is a collective)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor().detach() if isinstance(t, DTensor) else t


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as ``like``: rank 0's ``t`` sharded as ``like`` is when ``like``
    is a DTensor of the same shape (fsdp); else ``t`` as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or t.shape != like.shape:
        return t
    return distribute_tensor(t.detach().to(like.dtype), like.device_mesh, like.placements)


def my_share(batches: list[dict]) -> list[tuple[int, dict, float]]:
    """(index in the step, micro batch, loss weight) for this rank's micro batches of a step:
    j % N == rank, weight 1. fsdp: a rank with fewer than the most any rank has this step runs
    its first (rank 0's first when it has none) again with weight 0, so every rank runs as
    many forward and backward passes (FSDP's collectives pair up)."""
    n, r = world_size(), rank()
    mine = [(j, b, 1.0) for j, b in enumerate(batches) if j % n == r]
    if sharded():
        j, b, _ = mine[0] if mine else (0, batches[0], 1.0)
        mine += [(j, b, 0.0)] * (-(-len(batches) // n) - len(mine))
    return mine


def sum_over_ranks(params: list[torch.nn.Parameter], step_loss: torch.Tensor, *, timeout_s: int,
                   out_of_memory: bool = False) -> torch.Tensor:
    """Sum the trainable parameters' gradients and the step's losses over the ranks, in place
    (one flat all-reduce); the summed losses are returned. A rank with no micro batch this step
    contributes zeros. One more element counts the ranks that ran out of memory in the step
    (``out_of_memory``): when any did, every rank raises torch.OutOfMemoryError here, so every
    rank drops the step and halves its micro batch together (train.auto_micro_batch, ddp). fsdp:
    the gradients were summed into each rank's shard during backward; only the losses are."""
    if not active():
        return step_loss
    if sharded():
        with rank_timeout("summing a step's losses", timeout_s):
            dist.all_reduce(step_loss)
        return step_loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flag = torch.tensor([float(out_of_memory)], device=step_loss.device)
    flat = torch.cat([g.flatten().to(torch.float32) for g in grads] + [step_loss.to(torch.float32), flag])
    with rank_timeout("summing a step's gradients", timeout_s):
        dist.all_reduce(flat)
    # one host wait per step on several ranks (nothing on gloo's CPU): the ranks must agree now
    raise_if_out_of_memory(int(flat[-1].item()), "in training")
    flat = flat[:-1]
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
    return flat[offset:].to(step_loss.dtype)


def raise_if_out_of_memory(ranks: int, where: str) -> None:
    """Every rank raises the out-of-memory that ``ranks`` of them met, so all retry together."""
    if ranks:
        raise torch.OutOfMemoryError(f"out of memory {where} on {ranks} of {world_size()} ranks (seen from rank "
                                     f"{rank()})")


@contextlib.contextmanager
def out_of_memory_together(where: str, timeout_s: int):
    """An out-of-memory on any rank inside the block is raised on every rank at its end (one
    small all-gather): the ranks halve their micro batch together. Outside a group: as it is."""
    if not active():
        yield
        return
    failed = False
    try:
        yield
    except torch.OutOfMemoryError:
        failed = True
    with rank_timeout(f"agreeing whether a rank ran out of memory {where}", timeout_s):
        ranks = sum(gather_ints(int(failed)))
    raise_if_out_of_memory(ranks, where)  # outside: an OutOfMemoryError is a RuntimeError too


def start_together(params: list[torch.nn.Parameter], step: int, *, micro_batch_size: int, timeout_s: int) -> None:
    """Every rank starts from rank 0's adapters at the same step with the same micro batch
    size: ranks that disagree (a resume that found another checkpoint, an auto micro batch
    resolved to another size) are refused, since they would train a different run. fsdp: rank
    0's whole adapters, sharded again."""
    if not active():
        return
    with rank_timeout("starting (every rank loads the base and the data first)", timeout_s):
        steps, micros = gather_ints(step), gather_ints(micro_batch_size)
        with torch.no_grad():
            for p in params:
                if sharded():
                    p.copy_(shard_like(whole(p), p))
                else:
                    dist.broadcast(p.data, src=0)
    if len(set(steps)) > 1 or len(set(micros)) > 1:
        raise LoralabError(f"the ranks would start from different steps {steps} or micro batch sizes {micros} (by "
                           "rank): every rank must lay out the same step; set train.micro_batch_size to a number")


def rank_record(cfg: Config, peak_memory_bytes: int, micro_batch_size: int) -> dict:
    """The summary's ``distributed`` entry (world size, strategy, each rank's peak memory and
    micro batch at the end); empty for a plain run. Every rank calls it at the end of the run."""
    if not active():
        return {}
    with rank_timeout("gathering each rank's peak memory", cfg.distributed.timeout_s):
        peaks, micros = gather_ints(int(peak_memory_bytes)), gather_ints(micro_batch_size)
    return {"distributed": {"world_size": world_size(), "strategy": cfg.distributed.strategy,
                            "backend": dist.get_backend(), "peak_memory_bytes_per_rank": peaks,
                            "micro_batch_size_per_rank": micros}}


def gather_ints(value: int) -> list[int]:
    """Every rank's ``value``, by rank (a tensor collective: nothing is pickled between ranks)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64, device=device))
    return [int(t.item()) for t in out]


PASSES = "running a step's forward and backward passes (fsdp gathers and reduce-scatters shards in them)"
CLIPPING = "clipping a step's gradients (fsdp sums the norm of the shards)"
SAVING = "saving a checkpoint (fsdp gathers the shards)"


@contextlib.contextmanager
def sharded_collectives(doing: str, timeout_s: int):
    """fsdp: the block runs collectives (forward and backward passes gather and reduce-scatter
    shards, the gradient norm sums over them, a checkpoint gathers them); one that failed
    (gloo's or NCCL's error: a rank hangs or died) becomes rank_timeout's clear error, naming
    ``doing``. Any other error, and any error outside fsdp, passes as it is."""
    try:
        yield
    except RuntimeError as exc:
        said = str(exc).lower()
        if not sharded() or not any(k in said for k in ("gloo", "nccl", "timed out", "connection closed")):
            raise
        with rank_timeout(doing, timeout_s):
            raise


@contextlib.contextmanager
def rank_timeout(doing: str, timeout_s: int):
    """A collective that failed becomes one clear error naming what the rank was doing: a
    timeout (another rank hangs) or a lost connection (another rank died)."""
    try:
        yield
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        if "timed out" in first.lower() or "timeout" in first.lower():
            raise RankTimeout(f"rank {rank()} of {world_size()} waited more than distributed.timeout_s = {timeout_s} s "
                              f"for the other ranks while {doing}: a rank hangs or died ({first})") from None
        raise RankLost(f"rank {rank()} of {world_size()} lost the other ranks while {doing}: a rank died "
                       f"({first})") from None
