"""TensorBoard: event files in ``<run dir>/tb``, readable by ``tensorboard --logdir runs/``.

Metrics are scalars under their metrics.jsonl names; the resolved config is the run's
hyperparameters (the HParams dashboard compares a study's runs) and a ``config`` text; the
summary is ``summary/...`` scalars at the last step and a ``summary`` text. TensorBoard has
no artifacts: the adapter stays in the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loralab.track.sink import summary_numbers

TB_DIR = "tb"


def hparam_value(v: Any) -> int | float | str | bool:
    return v if isinstance(v, (int, float, str, bool)) else json.dumps(v)


class TensorBoardSink:
    def __init__(self, *, run_dir: Path, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.log_dir = Path(run_dir) / TB_DIR
        self.resumed = resumed
        self.last_step = 0
        self._writer_cls = SummaryWriter
        self.writer = None if resumed else SummaryWriter(str(self.log_dir), flush_secs=5)

    def _open(self, step: int):
        if self.writer is None:  # resumed: events past the checkpoint's step are dropped, then rewritten
            self.writer = self._writer_cls(str(self.log_dir), flush_secs=5, purge_step=step)
        return self.writer

    def state(self) -> dict[str, Any]:
        return {"log_dir": str(self.log_dir)}

    def log_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        w = self._open(0)
        for summ in hparams({k: hparam_value(v) for k, v in params.items()},
                            {"eval_loss": float("nan"), "train_loss": float("nan")}):
            w.file_writer.add_summary(summ)
        text = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in params.items())  # indented: markdown code
        w.add_text("config", text, 0)
        w.flush()

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        w = self._open(step)
        for k, v in values.items():
            w.add_scalar(k, v, step)
        self.last_step = max(self.last_step, step)

    def finish(self, summary: dict[str, Any], artifacts: dict[str, Path]) -> None:
        step = int(summary.get("steps_done") or self.last_step)
        w = self._open(step)
        for k, v in summary_numbers(summary).items():
            w.add_scalar(f"summary/{k}", v, step)
        shown = {k: summary.get(k) for k in ("status", "error", "run_dir")}
        w.add_text("summary", "\n".join(f"    {k}: {json.dumps(v, default=str)}" for k, v in shown.items()), step)
        w.close()
