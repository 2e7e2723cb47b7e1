"""Where training records go: `log.jsonl` always, and TensorBoard as well with `--tensorboard`.

Each role (teacher, student_scratch, student, ...) gets its own TensorBoard folder, `tensorboard/<role>`, so
TensorBoard overlays them as runs. Epoch records are plotted against the epoch (`epoch/...`), step records
against the global step (`step/...`), and each epoch adds histograms of the model's weights and gradients.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from torch import nn

from .errors import UserError
from .io import append_jsonl

SKIP = ("model", "epoch", "step")


def summary_writer_class():
    """torch's SummaryWriter, or a one-line error naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard: the tensorboard package is not installed; "
                        "pip install 'distill[tensorboard]'") from None
    return SummaryWriter


class Logbook:
    def __init__(self, path: Optional[str], tensorboard_dir: Optional[str] = None) -> None:
        self.path, self.tensorboard_dir = path, tensorboard_dir
        self._writers: Dict[str, Any] = {}

    def _writer(self, role: str):
        if role not in self._writers:
            self._writers[role] = summary_writer_class()(os.path.join(self.tensorboard_dir, role))
        return self._writers[role]

    def write(self, record: Dict[str, Any]) -> None:
        if self.path:
            append_jsonl(self.path, record)
        if self.tensorboard_dir and "model" in record:
            self._scalars(record)

    def _scalars(self, record: Dict[str, Any]) -> None:
        writer = self._writer(record["model"])
        per_step = "step" in record and "val_accuracy" not in record
        kind, x = ("step", record["step"]) if per_step else ("epoch", record["epoch"])
        for key, value in record.items():
            if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{kind}/{key}", value, x)
        for key, (_before, after) in record.get("adjusted", {}).items():
            writer.add_scalar(f"adjusted/{key}", after, x)

    def histograms(self, role: str, epoch: int, model: nn.Module) -> None:
        """Weights and (last step's) gradients of every parameter, at the end of an epoch."""
        if not self.tensorboard_dir:
            return
        writer = self._writer(role)
        for name, p in model.named_parameters():
            writer.add_histogram(f"weights/{name}", p.detach().float(), epoch)
            if p.grad is not None:
                writer.add_histogram(f"gradients/{name}", p.grad.detach().float(), epoch)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
