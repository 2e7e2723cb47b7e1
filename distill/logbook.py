"""Where training records go: `log.jsonl` always, and TensorBoard as well with `--tensorboard`.

Each role (teacher, student_scratch, student, ...) gets its own TensorBoard folder, `tensorboard/<role>`, so
TensorBoard overlays them as runs. Epoch records are plotted against the epoch (`epoch/...`), step records
against the global step (`step/...`), and each epoch adds histograms of the model's weights and gradients.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

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


def read_log(path: str) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, List[Dict[str, Any]]]]:
    """Epoch records and step records per model, in order. A log can hold several attempts (resumed or
    repeated stages): a later record replaces an earlier one of the same epoch (step), and a new epoch 1
    (a training started afresh) starts the model's history again."""
    epochs: Dict[str, Dict[int, Dict[str, Any]]] = {}
    steps: Dict[str, Dict[int, Dict[str, Any]]] = {}
    if not os.path.isfile(path):
        return {}, {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except ValueError:  # a line cut short by a crash: the rest of the log is still good
                continue
            if not isinstance(r, dict) or "model" not in r or "epoch" not in r or "event" in r:
                continue
            role = str(r["model"])
            if "step" in r:
                seen = steps.setdefault(role, {})
                if seen and r["epoch"] == 1 and r["step"] <= max(seen):
                    seen.clear()
                seen[int(r["step"])] = r
            elif "val_accuracy" in r:
                seen = epochs.setdefault(role, {})
                if r["epoch"] == 1:
                    seen.clear()
                seen[int(r["epoch"])] = r
    order = lambda d: {k: [v[i] for i in sorted(v)] for k, v in d.items()}  # noqa: E731
    return order(epochs), order(steps)
