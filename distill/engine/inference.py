"""Outputs of a trained model without a graph, in eval mode, batch by batch on the model's own device."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# Max-pooling on the CPU is several times faster on channels-last inputs than on the usual NCHW ones
# (64x32x8x8: 27 us against 220 us with torch 2.13, 2 threads), and both kernels scan each window in the same
# order with the same comparison (a NaN wins), so the outputs are the same bit for bit (tested, NaN included).
# Only inference gains: the channels-last backward is slower. The hooks that switch the layout are on the model
# only inside `fast_pooling` (the online teacher, the soft-label cache), and the next layer gets the usual
# layout back.


def _pool_input(module: nn.Module, args: tuple) -> Any:
    x = args[0] if args else None  # (called with a keyword argument: left as it is)
    relayout = (isinstance(x, torch.Tensor) and not torch.is_grad_enabled() and x.dim() == 4
                and x.device.type == "cpu" and x.is_contiguous())
    module.__dict__["_distill_relayout"] = relayout
    return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if relayout else None


def _pool_output(module: nn.Module, _args: tuple, out: torch.Tensor) -> Any:
    return out.contiguous() if module.__dict__.pop("_distill_relayout", False) else None


@contextlib.contextmanager
def fast_pooling(model: nn.Module) -> Iterator[None]:
    """Inside this block, `model`'s 2-D max-pooling layers run channels-last on the CPU when gradients are off:
    the same outputs, faster. Their hooks are added on entry and removed on exit, so the model is left as it
    was (TorchScript, an export or a training step after the block never meet them)."""
    pools = model.__dict__.get("_distill_pools")
    if pools is None:  # (looked up once per model: not a walk over every module on every batch)
        pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d) and not m.return_indices]
        model.__dict__["_distill_pools"] = pools
    handles = [h for m in pools for h in (m.register_forward_pre_hook(_pool_input),
                                          m.register_forward_hook(_pool_output, prepend=True))]  # (before any capture)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in pools:
            m.__dict__.pop("_distill_relayout", None)


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
