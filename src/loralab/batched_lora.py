"""Old import path of loralab.train.group (the batched adapter layer of fused groups)."""

from loralab.train.group import (
    AdapterInit,
    BatchedLoraLinear,
    LoraWeights,
    Routing,
    RunAdapter,
    batched_layers,
    initial_adapter,
    install,
    named_run_parameters,
    remove,
    run_parameters,
    save_trained_adapter,
    trained_weights,
)

__all__ = [
    "AdapterInit", "BatchedLoraLinear", "LoraWeights", "Routing", "RunAdapter", "batched_layers", "initial_adapter",
    "install", "named_run_parameters", "remove", "run_parameters", "save_trained_adapter", "trained_weights",
]
