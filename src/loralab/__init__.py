"""loralab: a lab for LoRA / QLoRA fine-tuning, measured.

The Python API is loralab.api (docs/python-api.md)::

    from loralab import api
    result = api.train("run.yaml", out="runs/r16")

Its names that do not collide with loralab's subpackages are also here (loralab.Study,
loralab.load_config, loralab.TrainResult, loralab.Report); ``train``, ``evaluate`` and
``estimate`` are api.train, api.evaluate and api.estimate only, because loralab.train,
loralab.evaluate and loralab.estimate are the modules that implement them.
"""

__version__ = "0.1.0"

from loralab import api  # noqa: E402
from loralab.api import Report, Study, TrainResult, load_config  # noqa: E402

__all__ = ["Report", "Study", "TrainResult", "api", "load_config"]
