"""Outputs of a trained model without a graph, in eval mode, batch by batch on the model's own device."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, runtime: Any = None) -> torch.Tensor:
    """Logits (on the CPU) in eval mode without a graph; the model's train/eval mode is restored afterwards.

    With a `runtime` of several processes, each predicts its own contiguous slice of `x` and the slices are
    gathered, so every process gets all N rows and each sample counts once (N need not divide evenly)."""
    if runtime is not None and runtime.distributed:
        from .runtime import shard
        mine = shard(len(x), runtime.world_size, runtime.rank)
        rows = x[mine.start:mine.stop] if len(mine) else x[:1]  # (no rows of its own: an empty block, shaped)
        out = predict(model, rows, batch_size)
        return runtime.gather_rows(out if len(mine) else out[:0], len(x))
    was_training = model.training
    model.eval()
    device = model_device(model)
    pad = getattr(model, "pad_id", None)
    order = (x != pad).sum(1).argsort() if pad is not None else None  # text: batch similar lengths together
    try:
        with torch.inference_mode():
            xs = x if order is None else x[order]
            out = torch.cat([model(xs[i:i + batch_size].to(device)).float().cpu()
                             for i in range(0, len(xs), batch_size)])
    finally:
        model.train(was_training)
    if order is not None:
        out = torch.empty(out.shape).index_copy_(0, order, out)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    return (predict(model, x, batch_size).argmax(1) == y).float().mean().item()
