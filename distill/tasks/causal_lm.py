"""Causal language modelling: each sample is a window of tokens, the target the same window shifted by one;
every position counts (the batch's mask), the model is selected by validation loss, and the test metrics are
the loss per token, bits per character (for character tokens, the loss in bits) and perplexity."""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.batch import Batch
from ..engine.inference import predict
from ..registry import TASKS


def token_metrics(logits: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Mean next-token cross-entropy (nats), bits per token, perplexity and top-1 accuracy over all positions."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).item()
    return {"loss": loss, "bpc": loss / math.log(2), "perplexity": math.exp(min(loss, 80.0)),
            "accuracy": (logits.argmax(-1) == y).float().mean().item()}


@TASKS.register("causal_lm")
class CausalLM:
    name = "causal_lm"
    select_metric = "val_loss"

    def lower_is_better(self, metric: str) -> bool:
        return metric.endswith(("loss", "bpc", "perplexity"))

    def collate(self, data: Any, idx: torch.Tensor, transforms: Dict[str, Any], seed: int) -> Batch:
        x, y = data.x_train[idx], data.y_train[idx]
        return Batch(x, y, idx, torch.ones(y.shape, dtype=torch.bool))

    def counts(self, logits: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Correctly predicted next tokens and how many were predicted (the training accuracy)."""
        return {"correct": (logits.argmax(-1) == y).sum(), "labelled": (y >= 0).sum()}

    def validate(self, model: nn.Module, data: Any, batch_size: int, runtime: Any = None) -> Dict[str, float]:
        if not len(data.y_val):
            return {}
        m = token_metrics(predict(model, data.x_val, batch_size, runtime), data.y_val)
        return {"val_loss": m["loss"], "val_bpc": m["bpc"], "val_accuracy": m["accuracy"]}

    def metrics(self, logits: torch.Tensor, y: torch.Tensor, ecfg: Dict[str, Any]) -> Dict[str, float]:
        return token_metrics(logits, y)
