"""Several LoRA adapters over one frozen base, each owning a contiguous block of batch rows.

PEFT's mixed-adapter batches are inference-only, so fused training (loralab.train.core)
uses this small layer instead. The initial weights still come from PEFT, and the trained
ones go back through PEFT to be saved, so an adapter is bit-for-bit what a solo run of the
same config would start from, and is saved in exactly PEFT's format::

    inits = [initial_adapter(base, cfg.lora, seed=cfg.train.seed) for cfg in cfgs]
    routing = install(base, [i.weights for i in inits], seeds=[cfg.train.seed for cfg in cfgs])
    with routing.rows([0, 1, 2], rows_each=4, draw=7):   # run k owns rows [4k, 4k + 4); micro batch 7
        logits = base(input_ids=ids_for_three_runs).logits

LoRA dropout in a group draws each run's masks from a generator of its own, seeded by the
run's seed, the module and the micro batch (``draw``): a run's masks, and so its result, are
the same in whatever group it trains, and a forward recomputed by activation checkpointing
draws the same masks again.
    remove(base)
    save_trained_adapter(base, cfg.lora, seed=cfg.train.seed, weights=..., out_dir=...)
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loralab.adapters import attach_lora, count_params, dropout, save_adapter
from loralab.config import LoraConfig
from loralab.errors import ConfigError, ModelError


@dataclass
class LoraWeights:
    """One run's adapter on one base module, in PEFT's layout."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    dropout: float


@dataclass
class AdapterInit:
    """A run's initial adapter: {base module name: weights}, and PEFT's parameter counts."""

    weights: dict[str, LoraWeights]
    trainable_params: int
    total_params: int


def _lora_layers(peft_model) -> Iterator[tuple[str, nn.Module]]:
    """(base module name, PEFT LoRA layer) for every module holding the default adapter."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield name, module


def refuse_dora(lora: LoraConfig) -> None:
    """ConfigError for a DoRA adapter: this layer has no magnitude vector, so DoRA trains alone."""
    if lora.dora:
        raise ConfigError("lora.dora: DoRA runs cannot be fused (the batched LoRA layer has no "
                          "magnitude vector); train them alone")


def initial_adapter(base, lora: LoraConfig, *, seed: int) -> AdapterInit:
    """The weights PEFT initialises for ``lora`` and ``seed``, read off and then removed again.

    attach_lora seeds and calls get_peft_model exactly as a solo run does, so A (kaiming-uniform
    or gaussian) and B (zeros) are the solo run's initial weights; unload() puts the original
    base modules back, unchanged.
    """
    refuse_dora(lora)
    peft_model = attach_lora(base, lora, seed=seed)
    trainable, total = count_params(peft_model)
    weights = {}
    for name, layer in _lora_layers(peft_model):
        drop = layer.lora_dropout["default"]
        weights[name] = LoraWeights(
            A=layer.lora_A["default"].weight.detach().clone(),
            B=layer.lora_B["default"].weight.detach().clone(),
            scaling=float(layer.scaling["default"]),
            dropout=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
        )
    peft_model.unload()
    return AdapterInit(weights=weights, trainable_params=trainable, total_params=total)


def save_trained_adapter(base, lora: LoraConfig, *, seed: int, weights: dict[str, LoraWeights], out_dir: Path) -> None:
    """Write ``weights`` as a PEFT adapter: attach PEFT's own layers, copy in, save, unload."""
    peft_model = attach_lora(base, lora, seed=seed)
    try:
        layers = dict(_lora_layers(peft_model))
        if set(layers) != set(weights):
            raise ModelError(f"fused adapter modules {sorted(weights)} differ from PEFT's {sorted(layers)}")
        with torch.no_grad():
            for name, w in weights.items():
                layers[name].lora_A["default"].weight.copy_(w.A)
                layers[name].lora_B["default"].weight.copy_(w.B)
        save_adapter(peft_model, out_dir)
    finally:
        peft_model.unload()


class Routing:
    """Which run owns which batch rows; one object shared by every batched layer of a model."""

    def __init__(self) -> None:
        self.segments: list[tuple[int, slice]] | None = None
        self.total_rows: int | None = None  # None: one run owns whatever rows come (eval tasks)
        self.draw: int | None = None  # the micro batch being trained: seeds each run's dropout masks

    @contextlib.contextmanager
    def rows(self, runs: list[int], *, rows_each: int, draw: int | None = None):
        """Run ``runs[j]`` owns rows [j * rows_each, (j + 1) * rows_each) of the next forwards;
        ``draw`` numbers the micro batch (its dropout masks)."""
        self.segments = [(k, slice(j * rows_each, (j + 1) * rows_each)) for j, k in enumerate(runs)]
        self.total_rows = len(runs) * rows_each
        self.draw = draw
        try:
            yield self
        finally:
            self.segments, self.total_rows, self.draw = None, None, None

    @contextlib.contextmanager
    def only(self, run: int):
        """Every row goes through run ``run``'s adapter (evaluation tasks, generation)."""
        self.segments, self.total_rows = [(run, slice(None))], None
        try:
            yield self
        finally:
            self.segments, self.total_rows = None, None


class RunAdapter(nn.Module):
    """One run's trainable A and B on one base module, computed as PEFT's lora.Linear does."""

    def __init__(self, w: LoraWeights, *, key: int = 0):
        super().__init__()
        self.lora_A = nn.Parameter(w.A.clone())  # (r, in)
        self.lora_B = nn.Parameter(w.B.clone())  # (out, r)
        self.scaling = w.scaling
        self.dropout = nn.Dropout(w.dropout) if w.dropout > 0 else nn.Identity()
        self.key = key  # the run's seed and the module: with the micro batch, its dropout masks

    def forward(self, x: torch.Tensor, draw: int | None = None) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        if isinstance(self.dropout, nn.Dropout) and self.training and draw is not None:
            x = self.drop(x, draw)
        else:
            x = self.dropout(x)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def drop(self, x: torch.Tensor, draw: int) -> torch.Tensor:
        """Inverted dropout of x with a mask from a generator seeded by (run, module, micro
        batch) alone: the same in every group, and again when the forward is recomputed."""
        p = self.dropout.p
        g = torch.Generator(device=x.device).manual_seed((self.key * 1_000_003 + draw) % 2**63)
        if x.device.type == "cpu":
            return dropout(x, p, generator=g)
        return x * (torch.empty_like(x).bernoulli_(1 - p, generator=g) / (1 - p))


class BatchedLoraLinear(nn.Module):
    """A frozen base linear layer (nn.Linear, Conv1D or bitsandbytes Linear4bit) plus one
    adapter per run that targets it; the base matmul runs once over all rows."""

    def __init__(self, base_layer: nn.Module, name: str, routing: Routing):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.routing = routing
        self.adapters = nn.ModuleDict()  # str(run index) -> RunAdapter

    def adapter(self, run: int) -> RunAdapter | None:
        return self.adapters[str(run)] if str(run) in self.adapters else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (rows, seq, out), once for every run
        segments = self.routing.segments
        if segments is None:
            raise ModelError(f"{self.name}: a fused model was called outside Routing.rows/only")
        if self.routing.total_rows is not None and x.shape[0] != self.routing.total_rows:
            raise ModelError(
                f"{self.name} received {x.shape[0]} rows where the fused batch has {self.routing.total_rows}; "
                "this module does not see the batch dimension first, so it cannot be fused"
            )
        if len(segments) == 1:  # one run owns every row: evaluation, generation, a group of one
            adapter = self.adapter(segments[0][0])
            if adapter is None:
                return result
            return (result + adapter(x, self.routing.draw)).to(result.dtype)  # in the promoted dtype, as PEFT
        # The runs' rows are split once (its backward is one concatenation), and their deltas
        # are added in one go: slicing each run's rows out of x and the result would give each
        # backward a zero-filled gradient of the whole batch, K of them per layer.
        xs = x.split([rows.stop - rows.start for _, rows in segments])
        dtype = torch.promote_types(result.dtype, next(iter(self.adapters.values())).lora_A.dtype)
        deltas = []
        for (run, rows), x_run in zip(segments, xs, strict=True):
            adapter = self.adapter(run)
            deltas.append(adapter(x_run, self.routing.draw) if adapter is not None
                          else result.new_zeros((rows.stop - rows.start, *result.shape[1:]), dtype=dtype))
        return (result + torch.cat(deltas)).to(result.dtype)


def install(model: nn.Module, runs: list[dict[str, LoraWeights]], *, seeds: list[int] | None = None) -> Routing:
    """Wrap every base module some run targets; run k's adapters are runs[k], its dropout masks
    keyed by seeds[k] (default 0). Returns the routing."""
    routing = Routing()
    names = sorted({name for weights in runs for name in weights})
    for name in names:
        layer = BatchedLoraLinear(model.get_submodule(name), name, routing)
        for k, weights in enumerate(runs):
            if name in weights:
                key = (seeds[k] if seeds else 0) * 2**32 + zlib.crc32(name.encode())
                layer.adapters[str(k)] = RunAdapter(weights[name], key=key).to(weights[name].A.device)
        model.set_submodule(name, layer)
    return routing


def batched_layers(model: nn.Module) -> dict[str, BatchedLoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BatchedLoraLinear)}


def named_run_parameters(model: nn.Module, run: int, *, prefix: str = "") -> dict[str, nn.Parameter]:
    """Run ``run``'s trainable parameters, A then B per module in module order, under PEFT's names
    (``prefix`` + "<module>.lora_A.default.weight"), so a checkpoint reads the same whether its run
    trained alone or in a group."""
    out = {}
    for name, layer in batched_layers(model).items():
        if str(run) in layer.adapters:
            a = layer.adapters[str(run)]
            out[f"{prefix}{name}.lora_A.default.weight"] = a.lora_A
            out[f"{prefix}{name}.lora_B.default.weight"] = a.lora_B
    return out


def trained_weights(model: nn.Module, run: int) -> dict[str, LoraWeights]:
    """Run ``run``'s current weights, detached, keyed by base module name."""
    out = {}
    for name, layer in batched_layers(model).items():
        if str(run) in layer.adapters:
            a = layer.adapters[str(run)]
            out[name] = LoraWeights(A=a.lora_A.detach().clone(), B=a.lora_B.detach().clone(),
                                    scaling=a.scaling, dropout=getattr(a.dropout, "p", 0.0))
    return out


def remove(model: nn.Module) -> None:
    """Put the original base modules back."""
    for name, layer in batched_layers(model).items():
        model.set_submodule(name, layer.base_layer)
