"""loralab: a lab for LoRA / QLoRA fine-tuning, measured."""

__version__ = "0.1.0"
