"""The adapters of a group: the GroupAdapters interface, SoloAdapters and FusedAdapters."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

import torch

from loralab.adapters import attach_lora, count_params, save_adapter
from loralab.config import Config
from loralab.errors import ConfigError, LoralabError, ModelError
from loralab.rundir import FINAL, Status
from loralab.train import distributed
from loralab.train.chunked_loss import loss_sums
from loralab.train.group import (
    initial_adapter,
    install,
    named_run_parameters,
    remove,
    save_trained_adapter,
    trained_weights,
)
from loralab.train.runs import Run, fails_alone

ChargeTo = Callable[[Run], AbstractContextManager]  # Clock.charge_to: time spent inside goes to the run


class GroupAdapters(Protocol):
    """The trainable adapters of a group of K >= 1 runs over one frozen base: all the training
    core (loralab.train.core) knows of them. Runs are named by their index in the group.

    SoloAdapters is a group of one, PEFT's own model; FusedAdapters puts K runs' adapters in
    loralab.train.group's batched layer. The core picks neither: its caller passes the class.
    """

    model: torch.nn.Module
    """The model every forward goes through (the PEFT model, or the base with batched layers)."""
    rejected: dict[int, LoralabError]
    """Runs whose adapters could not be built, each with its own error: they end invalid alone."""
    done_on_resume: ClassVar[frozenset[Status]]
    """Statuses of a previous session that a resume returns as they are instead of training on."""

    @classmethod
    def attach(cls, base: torch.nn.Module, cfgs: list[Config]) -> GroupAdapters:
        """Put run k's adapter (cfgs[k].lora, seeded by cfgs[k].train.seed) into ``base``."""
        ...

    def routed(self, runs: list[int], *, rows_each: int, draw: int | None = None) -> AbstractContextManager:
        """Within it, runs[j] owns rows [j * rows_each, (j + 1) * rows_each) of each forward;
        ``draw`` numbers the micro batch being trained (its dropout masks)."""
        ...

    def only(self, run: int) -> AbstractContextManager:
        """Within it, every row goes through ``run``'s adapter (evaluation tasks)."""
        ...

    def named_params(self, run: int) -> dict[str, torch.nn.Parameter]:
        """``run``'s trainable parameters under PEFT's names, in PEFT's order: a checkpoint has
        one format whether its run trained alone or in a group."""
        ...

    def counts(self, run: int) -> tuple[int, int]:
        """``run``'s (trainable, total) parameters, as PEFT counts them."""
        ...

    def save(self, runs: list[Run], charge_to: ChargeTo) -> None:
        """Write each run's adapter in PEFT's format to its run directory, the time charged to it."""
        ...

    def summary_extra(self, *, group_size: int, wall_s: float, train_s: float) -> dict[str, Any]:
        """What each run's summary.json says of its group (nothing for a group of one)."""
        ...


class SoloAdapters:
    """A group of one: the PEFT model. ``routed`` and ``only`` have nothing to route. Its run's
    failures are the run's: none is ``rejected`` alone, and a failing save raises. A resume
    trains on from a diverged run's last good checkpoint (as a study's retry expects)."""

    done_on_resume: ClassVar[frozenset[Status]] = frozenset({Status.COMPLETED})

    def __init__(self, model):
        self.model = model
        self.rejected: dict[int, LoralabError] = {}
        self.trainable, self.total = count_params(model)

    @classmethod
    def attach(cls, base, cfgs: list[Config]) -> SoloAdapters:
        (cfg,) = cfgs
        return cls(attach_lora(base, cfg.lora, seed=cfg.train.seed))

    def routed(self, runs: list[int], *, rows_each: int, draw: int | None = None):
        return contextlib.nullcontext()  # PEFT's own dropout draws from the global generator

    def only(self, run: int):
        return contextlib.nullcontext()

    def named_params(self, run: int) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def counts(self, run: int) -> tuple[int, int]:
        return self.trainable, self.total

    def save(self, runs: list[Run], charge_to: ChargeTo) -> None:
        """Every rank calls it; rank 0 writes. fsdp: the shards gathered whole first (a collective)."""
        for r in runs:
            with charge_to(r):
                weights = {n: distributed.whole(p) for n, p in self.named_params(r.index).items()}
                if distributed.writes():
                    save_adapter(self.model, r.dir.adapter, weights if distributed.sharded() else None)

    def summary_extra(self, *, group_size: int, wall_s: float, train_s: float) -> dict[str, Any]:
        return {}


class FusedAdapters:
    """K runs' adapters in loralab.train.group's layer over one base; run k owns a block of rows.

    A run whose adapters cannot be built (its rank, its roles against this base) is
    ``rejected`` alone, with its own error: it gets no adapter and the others train on. A run
    that diverged or was stopped early left its group: a resume returns it as it is."""

    done_on_resume: ClassVar[frozenset[Status]] = FINAL

    def __init__(self, base, cfgs: list[Config]):
        self.model = base
        self.cfgs = cfgs
        self.inits: dict[int, Any] = {}
        self.rejected: dict[int, LoralabError] = {}
        for k, c in enumerate(cfgs):
            try:
                self.inits[k] = initial_adapter(base, c.lora, seed=c.train.seed)
            except (ConfigError, ModelError) as exc:  # raised before PEFT touches the base
                self.rejected[k] = exc
        if not self.inits:
            raise RunsRejected(self.rejected)
        self.routing = install(base, [self.inits[k].weights if k in self.inits else {} for k in range(len(cfgs))],
                               seeds=[c.train.seed for c in cfgs])

    @classmethod
    def attach(cls, base, cfgs: list[Config]) -> FusedAdapters:
        return cls(base, cfgs)

    def routed(self, runs: list[int], *, rows_each: int, draw: int | None = None):
        return self.routing.rows(runs, rows_each=rows_each, draw=draw)

    def only(self, run: int):
        return self.routing.only(run)

    def named_params(self, run: int) -> dict[str, torch.nn.Parameter]:
        return named_run_parameters(self.model, run, prefix="base_model.model.")

    def counts(self, run: int) -> tuple[int, int]:
        return self.inits[run].trainable_params, self.inits[run].total_params

    def save(self, runs: list[Run], charge_to: ChargeTo) -> None:
        if not distributed.writes():  # a fused group trains on one process (fused.check_group)
            return
        weights = {r.index: trained_weights(self.model, r.index) for r in runs}
        remove(self.model)  # PEFT's own layers go in to save
        for r in runs:
            with charge_to(r), fails_alone(r, runs, "saving its adapter"):
                save_trained_adapter(self.model, r.cfg.lora, seed=r.cfg.train.seed, weights=weights[r.index],
                                     out_dir=r.dir.adapter)

    def summary_extra(self, *, group_size: int, wall_s: float, train_s: float) -> dict[str, Any]:
        return {"fused": {
            "group_size": group_size,
            "group_wall_time_s": wall_s,
            "group_train_time_s": train_s,
            "time_attribution": "equal shares: step time among the runs training at that step, set-up and "
                                "unattributed time among all runs, each adapter save to its own run",
            "peak_memory": "peak_memory_bytes is the whole group's process",
        }}


class RunsRejected(ModelError):
    """Every run of a group was rejected while its adapters were built; ``errors`` holds each
    run's own error, by run index."""

    def __init__(self, errors: dict[int, LoralabError]):
        super().__init__("; ".join(str(e) for e in errors.values()))
        self.errors = errors


def stack_runs(batch: dict, n: int) -> dict:
    """n copies of a batch along the batch dimension: (n * batch, seq); a packed batch's
    example boundaries are the same in every copy. One run: the batch itself."""
    if n == 1:
        return batch
    return {k: v.repeat(n, 1) if isinstance(v, torch.Tensor) and v.dim() == 2 else v
            for k, v in batch.items() if k not in ("labels", "n_tokens", "positions")}


def run_losses(model, batch: dict, n_runs: int, autocast: str) -> torch.Tensor:
    """(n_runs,): each run's sum of next-token cross-entropy over the batch's label positions,
    from one forward over n_runs stacked copies of the batch (its rows routed per run)."""
    return loss_sums(model, stack_runs(batch, n_runs), batch["labels"], batch["positions"], n_runs, autocast)
