"""Library output a loralab user cannot act on, filtered where it starts; ``-v`` or
``LORALAB_VERBOSE=1`` shows everything.

    quiet_libraries()   # once per process, by the CLI (and a fused group's process)

Each filter names one message and says why it is dropped; anything else a library says still
reaches the user. Children started by a study inherit ``LORALAB_VERBOSE``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def verbose() -> bool:
    """Whether the user asked to see everything (``-v`` sets LORALAB_VERBOSE=1 for children too)."""
    return os.environ.get("LORALAB_VERBOSE", "") not in ("", "0")


def quiet_libraries() -> None:
    """Drop the library messages below, unless verbose."""
    if verbose():
        return
    # bitsandbytes warns at import ("Failed to load CPU gemm_4bit_forward from kernels-community
    # ... trust_remote_code") when its optional CPU kernel package cannot load. PEFT imports
    # bitsandbytes whenever it is installed (peft/helpers.py), so every run printed it, quantized
    # or not; its own CPU kernels are used instead, and a 4-bit run the CPU cannot train is
    # refused by loralab.models in loralab's words. Errors still show.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # On a CPU with AVX512 bitsandbytes takes its CPU kernels from the kernels package's hub
    # repository (kernels-community/quantization-bitsandbytes); with the hub in offline mode
    # (HF_HUB_OFFLINE=1, as on a machine without the hub) the kernels package then warns that it
    # skips the publisher's trust check, on every run, quantized or not. Errors still show.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    # transformers' and huggingface_hub's bars ("Loading weights", "Writing model shards") are
    # lines of carriage returns in a log or a pipe; a terminal keeps them (and loralab's training
    # turns them on or off itself, loralab.progress.library_bars). Read when they are imported.
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers deprecates PreTrainedModel.is_gradient_checkpointing and PEFT's PeftModel reads
    # it in its constructor: a FutureWarning about PEFT's code on every run, nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
