"""Tasks: what differs between kinds of learning problem, behind one protocol, so that the plan, the trainer
and the objective stay the same for each.

A task makes a training batch from sample indices (`collate`), counts what a training step got right
(`counts`), validates a model after each epoch (`validate`, whose `select_metric` picks the epoch kept), and
computes the test metrics (`metrics`). Classification (images, tabular rows, texts) is the first task; causal
language modelling (next tokens of a text) the second.
"""
from __future__ import annotations

from typing import Any, Dict, Protocol

import torch
from torch import nn

from ..registry import TASKS
from . import causal_lm, classification  # noqa: F401  (register `causal_lm` and `classification`)


class Task(Protocol):
    name: str
    select_metric: str  # the validation metric that picks the epoch kept (`train.select_metric` overrides it)

    def lower_is_better(self, metric: str) -> bool: ...

    def collate(self, data: Any, idx: torch.Tensor, transforms: Dict[str, Any], seed: int) -> Any: ...

    def counts(self, outputs: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]: ...

    def validate(self, model: nn.Module, data: Any, batch_size: int, runtime: Any) -> Dict[str, float]: ...

    def metrics(self, outputs: torch.Tensor, y: torch.Tensor, ecfg: Dict[str, Any]) -> Dict[str, float]: ...

    # optional: `evaluate(model, x, y, ecfg, batch_size, runtime, path)`, the test metrics computed from the
    # model itself (batch by batch, or by generating) instead of `metrics` on all its outputs at once


def task_for(data: Any = None, cfg: Any = None) -> Task:
    """The task of a data bundle (classification unless the data says otherwise, or no data is given), with
    the run's recipe when it needs settings from it (a language model's validation exact match)."""
    return TASKS.get(getattr(data, "task", "classification"), "task")(data, cfg)
